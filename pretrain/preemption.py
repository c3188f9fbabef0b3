"""SIGTERM/SIGINT handling: finish the current step on every rank, checkpoint, exit with EXIT_PREEMPTED.

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill a job. A signal may reach the ranks at
different steps, so the trainer all-reduces the flag once per step and all ranks stop at the same one.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the job's requeue logic resumes with --resume
EXIT_NONFINITE = 76  # a NaN/inf loss with policy `stop`: the last good state is checkpointed


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
