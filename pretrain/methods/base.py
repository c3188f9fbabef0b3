"""The contract between the phase loop and a continual-learning method, and the method that does nothing.

The trainer calls, per phase: `begin_phase`; per micro-step: `before_backward` (after the forward),
`after_backward` (before `engine.step()`), or `discard_step` when the step is skipped; at the phase's end
`end_phase` (a JSON-able summary for metrics.json) and `log`; `state_dict`/`load_state_dict` travel in
every checkpoint so a resumed run continues the method exactly.
"""

from __future__ import annotations

from typing import Any, Protocol


class Method(Protocol):
    name: str

    def begin_phase(self, phase: int) -> None: ...

    def before_backward(self, engine: Any = None) -> None: ...

    def after_backward(self, engine: Any = None) -> None: ...

    def discard_step(self) -> None: ...

    def end_phase(self, phase: int) -> dict[str, Any]: ...

    def log(self, writer: Any, global_step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoMethod:
    """`none`: plain sequential training; installs nothing, costs nothing."""

    name = "none"

    def begin_phase(self, phase: int) -> None:
        pass

    def before_backward(self, engine: Any = None) -> None:
        pass

    def after_backward(self, engine: Any = None) -> None:
        pass

    def discard_step(self) -> None:
        pass

    def end_phase(self, phase: int) -> dict[str, Any]:
        return {}

    def log(self, writer: Any, global_step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
