"""SIGTERM/SIGINT handling: finish the current step on every rank, checkpoint, exit with EXIT_PREEMPTED.

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill a job. A signal may reach the ranks at
different steps, so the trainer all-reduces the flag once per step and all ranks stop at the same one.

A launcher may stand between the signal and the ranks (the deepspeed launcher on one machine does not
pass SIGTERM on; torchrun's agent kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later, 30 by
default, 900 in the launch scripts). The launch scripts
(launch/stop_on_signal.bash) therefore also hand a stop over as a file, named by PRETRAIN_STOP_FILE, that
every rank looks for at each micro-step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the job's requeue logic resumes with --resume
EXIT_NONFINITE = 76  # a NaN/inf loss with policy `stop`: the last good state is checkpointed
EXIT_BAD_DATA = 65  # EX_DATAERR: a rank could not read its next batch mid-phase; the state before is saved
STOP_FILE_ENV = "PRETRAIN_STOP_FILE"
SAVING_SUFFIX, SAVED_SUFFIX = ".saving", ".saved"  # beside the stop file: the stop checkpoint's progress


class StopRequest:
    def __init__(self, stop_file: str | None = None) -> None:
        self.signal_name = ""  # what asked for the stop; empty: nothing yet
        stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file else None

    @property
    def requested(self) -> bool:
        if not self.signal_name and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"the launch script's stop file {self.stop_file}"
        return bool(self.signal_name)

    def saving(self) -> None:
        """Say beside the stop file that this rank is writing its stop checkpoint: a launch script's
        requeue timer then leaves the job alone (a requeue would kill the save, and the requeued job would
        resume from the same checkpoint and lose the same work again)."""
        self._touch(SAVING_SUFFIX)

    def acknowledge(self) -> None:
        """Say in the stop file that this rank stopped (checkpointed, exiting 75): the launch script of a
        node whose own signal or file asked nothing (another node's did) then exits 75 too. The `.saved`
        file beside it tells a launch script the stop checkpoint was written: without it a failed rank is
        a failure, not a stop to requeue."""
        self._touch("")
        self._touch(SAVED_SUFFIX)

    def _touch(self, suffix: str) -> None:
        if self.stop_file is not None and self.stop_file.parent.is_dir():
            self.stop_file.with_name(self.stop_file.name + suffix).touch()

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
