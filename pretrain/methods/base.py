"""The contract between the phase loop and a continual-learning method, and how methods combine.

The trainer calls, per phase: `begin_phase` (not again when it resumes a phase midway: the checkpoint
holds the method's state); per micro-step: `before_backward` (after the forward), `after_backward`
(before `engine.step()`), or `discard_step` when the step is skipped or the run stops inside it, and
then `skip_step` when it is skipped (the phase counts it: a method's step count stays the trainer's); every
logging interval `scalars`; at the phase's end `end_phase` (a JSON-able summary for metrics.json) and
`log`. Every hook is called on every rank (a method may run collectives in any of them). `state_dict`
(the same on every rank, saved once) and `rank_state_dict` (this rank's own, e.g. its ZeRO partition of
something) travel in every checkpoint, so a resumed run continues exactly. A run resumed on another
number of ranks calls `reshard_rank_state` with every old rank's state instead of `load_rank_state_dict`.
`log` gets the run's metrics logger (pretrain/trackers), which is a no-op off rank 0.

A new method is one module with a class deriving from `MethodBase` that overrides the hooks it needs,
and one line in `build_method` (pretrain/methods/__init__.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pretrain.trackers import MetricsLogger


class Method(Protocol):
    name: str

    def begin_phase(self, phase: int) -> None: ...

    def before_backward(self, engine: Any = None) -> None: ...

    def after_backward(self, engine: Any = None) -> None: ...

    def discard_step(self) -> None: ...

    def skip_step(self) -> None: ...

    def scalars(self) -> dict[str, float]: ...

    def end_phase(self, phase: int) -> dict[str, Any]: ...

    def log(self, trackers: MetricsLogger, global_step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def rank_state_dict(self) -> dict[str, Any]: ...

    def load_rank_state_dict(self, state: dict[str, Any]) -> None: ...

    def reshard_rank_state(self, states: list[dict[str, Any]]) -> None: ...


class MethodBase:
    """Every hook, doing nothing: a method overrides only what it uses."""

    name = "base"

    def begin_phase(self, phase: int) -> None:
        pass

    def before_backward(self, engine: Any = None) -> None:
        pass

    def after_backward(self, engine: Any = None) -> None:
        pass

    def discard_step(self) -> None:
        pass

    def skip_step(self) -> None:
        pass

    def scalars(self) -> dict[str, float]:
        return {}

    def end_phase(self, phase: int) -> dict[str, Any]:
        return {}

    def log(self, trackers: MetricsLogger, global_step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rank_state_dict(self) -> dict[str, Any]:
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reshard_rank_state(self, states: list[dict[str, Any]]) -> None:
        """This rank's state from the states of all ranks of a run with another world size."""
        if any(states):  # a method with per-rank state must say how it is re-partitioned
            raise NotImplementedError(f"method {self.name} cannot resume on a different number of ranks")


class NoMethod(MethodBase):
    """`none`: plain sequential training; installs nothing, costs nothing."""

    name = "none"


class MethodStack(MethodBase):
    """Several methods as one, called in order: a regulariser's pull is in the gradient before a mask."""

    def __init__(self, methods: list[Method]):
        self.methods = methods
        self.name = "+".join(m.name for m in methods)

    def begin_phase(self, phase: int) -> None:
        for m in self.methods:
            m.begin_phase(phase)

    def before_backward(self, engine: Any = None) -> None:
        for m in self.methods:
            m.before_backward(engine)

    def after_backward(self, engine: Any = None) -> None:
        for m in self.methods:
            m.after_backward(engine)

    def discard_step(self) -> None:
        for m in self.methods:
            m.discard_step()

    def skip_step(self) -> None:
        for m in self.methods:
            m.skip_step()

    def scalars(self) -> dict[str, float]:
        return {k: v for m in self.methods for k, v in m.scalars().items()}

    def end_phase(self, phase: int) -> dict[str, Any]:
        """One row per phase: the members' summaries side by side (their keys do not collide)."""
        return {k: v for m in self.methods for k, v in m.end_phase(phase).items()}

    def log(self, trackers: MetricsLogger, global_step: int) -> None:
        for m in self.methods:
            m.log(trackers, global_step)

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.methods:
            m.load_state_dict(state[m.name])

    def rank_state_dict(self) -> dict[str, Any]:
        return {m.name: m.rank_state_dict() for m in self.methods}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.methods:
            m.load_rank_state_dict(state[m.name])

    def reshard_rank_state(self, states: list[dict[str, Any]]) -> None:
        for m in self.methods:
            m.reshard_rank_state([s[m.name] for s in states])
