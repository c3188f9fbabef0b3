"""The run's metrics logger: every configured tracker on rank 0, nothing on the other ranks.

Each number has two positions: `step`, the optimizer step (W&B's history needs one rising step for the
whole run), and for per-phase numbers (the evaluation matrix, the forgetting metrics) `phase`, the matrix
row, which TensorBoard and MLflow use as the number's x as TensorBoard always has.

A resumed run reopens the same W&B and MLflow runs: their ids are kept in `trackers.json` in the run
directory. The steps between the last checkpoint and a kill come again after the resume; what each
tracker does with them is its backend's business (MLflow skips what its store already holds, W&B keeps
one rising step). TensorBoard writes a new event file per attempt, as it always has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pretrain.atomic import write_json_atomic
from pretrain.config import LoggingConfig
from pretrain.logs import log

STATE_FILE = "trackers.json"


class Backend(Protocol):
    name: str
    pictures: bool  # shows the report's pictures

    def scalars(self, values: dict[str, float], step: int, phase: int | None) -> None: ...

    def text(self, key: str, text: str, step: int, phase: int | None) -> None: ...

    def picture(self, key: str, path: Path, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def run_id(self) -> str | None: ...  # the run a resume reopens (W&B, MLflow); None: none


class MetricsLogger:
    """Writes to every backend it holds; with none (off rank 0) each call does nothing.

    A backend that fails (a full disk under TensorBoard's writer, a locked MLflow store, W&B's service
    gone) is dropped with a warning and the run goes on: a tracker's copy of the numbers is never worth
    the run, whose own record is metrics.json. It raised in the training loop before, on rank 0 alone,
    and the run lost all since its last checkpoint (by default the phase)."""

    def __init__(self, backends: list[Backend] | None = None):
        self.backends = backends or []

    @property
    def takes_pictures(self) -> bool:
        return any(b.pictures for b in self.backends)

    def scalars(self, values: dict[str, float], step: int, phase: int | None = None) -> None:
        self._each(lambda b: b.scalars(values, step, phase))

    def text(self, key: str, text: str, step: int, phase: int | None = None) -> None:
        self._each(lambda b: b.text(key, text, step, phase))

    def picture(self, key: str, path: Path, step: int) -> None:
        self._each(lambda b: b.picture(key, path, step) if b.pictures else None)

    def flush(self) -> None:
        self._each(lambda b: b.flush())

    def close(self) -> None:
        self._each(lambda b: b.close())

    def _each(self, call: Callable[[Backend], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as err:
                self.backends.remove(backend)
                log.warning(
                    "tracker %s failed (%s: %s): not logged to for the rest of this attempt; metrics.json "
                    "has every number",
                    backend.name,
                    type(err).__name__,
                    err,
                )


def open_trackers(
    cfg: LoggingConfig, run_dir: Path, rank: int, resuming: bool, config: dict[str, Any]
) -> MetricsLogger:
    """The logger of `logging.trackers` on rank 0 (an empty one elsewhere). `resuming`: reopen the
    tracker runs named in trackers.json; otherwise (a new run, or one started again) begin new ones."""
    if rank != 0:
        return MetricsLogger()
    path = Path(run_dir) / STATE_FILE
    saved = json.loads(path.read_text()) if resuming and path.is_file() else {}
    backends = [_open(name, cfg, Path(run_dir), config, saved.get(name)) for name in cfg.trackers]
    ids = {b.name: b.run_id() for b in backends if b.run_id() is not None}
    if ids:  # before anything is logged: a kill from now on still resumes the same runs
        write_json_atomic(path, {**saved, **ids}, indent=1)
    return MetricsLogger(backends)


def _open(
    name: str, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any], run_id: str | None
) -> Backend:
    if name == "tensorboard":
        from pretrain.trackers.tensorboard_backend import TensorBoardBackend

        return TensorBoardBackend(run_dir)
    if name == "wandb":
        from pretrain.trackers.wandb_backend import WandbBackend

        return WandbBackend(cfg.wandb, run_dir, config, run_id)
    from pretrain.trackers.mlflow_backend import MlflowBackend

    return MlflowBackend(cfg.mlflow, run_dir, config, run_id)
