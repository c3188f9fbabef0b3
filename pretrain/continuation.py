"""A domain trained again in a later phase (`code, docs, code`) continues its stream where it stopped.

Each phase's stream of its own domain is an endless, epoch after epoch, sequence of blocks (examples, for
an instruction domain). At a phase's end the ranks' stream states give where that sequence stopped: the
furthest rank's position, which is the boundary after the last block any rank trained on (every rank
reads every document; see data.reshard_stream_state). Kept without what depends on the ranks, it starts
the domain's next phase on any number of ranks, with or without replay, at the very next block: a later
phase of a domain trains on data its earlier phases have not seen, until the corpus runs out and the
stream starts its next epoch, as one long phase would.

Replay sources are not continued: replaying an earlier domain means taking again blocks it trained on.
"""

from __future__ import annotations

from typing import Protocol

from pretrain.instruct import is_example_state

_BLOCK_FIELDS = ("epoch", "block", "doc", "offset", "skipped")
_EXAMPLE_FIELDS = ("epoch", "example", "skipped")


class _Stream(Protocol):
    world_size: int

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def stream_position(state: dict) -> dict:
    """A rank's position in its phase's stream of the domain (from its stream state), without the ranks:
    what the ranks gather at the phase's end (the state itself names every file)."""
    own = _own(state)
    position = {k: own[k] for k in (_EXAMPLE_FIELDS if is_example_state(own) else _BLOCK_FIELDS)}
    # the sizes its files had then: the next phase checks them, as a resume does (none from before 2026-11-28)
    return position | ({"file_sizes": own["file_sizes"]} if "file_sizes" in own else {})


def stream_end(positions: list[dict]) -> dict:
    """Where the phase's stream of its domain stopped, from every rank's `stream_position` at its end."""
    unit = "example" if "example" in positions[0] else "block"
    return max(positions, key=lambda p: (p["epoch"], p[unit]))


def continue_stream(stream: _Stream, end: dict) -> None:
    """Start a new phase's `stream` of the domain at `end` (from `stream_end`), the next block to rank 0.

    Bad records the earlier phases met are not counted again: the count goes on from theirs."""
    state = stream.state_dict()
    if "replay" in state:  # its own domain's reader is a one-rank stream
        state["readers"]["domain"] = {**state["readers"]["domain"], **end, "shift": 0}
    else:
        unit = "example" if "example" in end else "block"
        state = {**state, **end, "shift": -end[unit] % stream.world_size}
    stream.load_state_dict(state)


def _own(state: dict) -> dict:
    """The state of the phase's own domain's stream (with replay, its reader)."""
    return state["readers"]["domain"] if "replay" in state else state
