"""Fault injection for the tests, in one place: PRETRAIN_FAULT=KIND:WHERE makes a run fail at one point.

The kinds (each used by a test under tests/distributed/): `kill:STEP` (SIGKILL to rank 0 after global step
STEP), `nan_loss:STEP` (rank 1's loss is NaN at global step STEP, counted from 1), `kill_scoring:ROW`
(SIGKILL as rank 0 scores accuracy row ROW), `stop_at_phase_end:PHASE` (a SIGTERM reaching rank 1 alone
during phase PHASE's evaluation or export), `crash_saving:TAG` (exit 86 in the middle of saving checkpoint
TAG), `stop_at_micro:STEP.MICRO` (a SIGTERM reaching rank 1 alone before micro-batch MICRO of global
step STEP). Unset, as in every real run, each check is one environment lookup.
"""

from __future__ import annotations

import os
import signal


def fault_at(kind: str, where: object) -> bool:
    """Whether PRETRAIN_FAULT asks for fault `kind` at `where` (a step, row, phase or checkpoint tag)."""
    return os.environ.get("PRETRAIN_FAULT") == f"{kind}:{where}"


def kill_self() -> None:
    """SIGKILL: no handler, no atexit, no flush, as when the scheduler or the OOM killer ends a rank."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_self() -> None:
    """Exit mid-operation without cleanup (86: no exit code the pipeline uses)."""
    os._exit(86)
