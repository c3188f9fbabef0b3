"""A Weights & Biases run: offline by default, in <run_dir>/wandb, uploaded later with `wandb sync`.

W&B keeps one rising step per run, so everything is logged at the optimizer step; per-phase numbers also
carry `phase`, declared their x axis (define_metric), so their charts read by phase as in TensorBoard.
A resume reopens the run by the id trackers.json keeps (resume="allow"). Online, W&B continues the run
and ignores steps it already holds. Offline, each attempt is a directory of the same run id, which
`wandb sync` uploads into that one run, oldest first. W&B's service buffers its file: an attempt killed
with SIGKILL loses what it had not yet written (a stop by SIGTERM, exit 75, writes its run out at exit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.config import WandbConfig


class WandbBackend:
    name = "wandb"
    pictures = True

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or Path(run_dir).name,
            group=cfg.group,
            tags=cfg.tags or None,
            mode=cfg.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        # a resume may change resumable keys (train.lr, ...): the run's config shows the newest
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("phase", hidden=True)
        self._by_phase: set[str] = set()

    def scalars(self, values: dict[str, float], step: int, phase: int | None) -> None:
        if phase is not None:
            for key in values.keys() - self._by_phase:
                self.run.define_metric(key, step_metric="phase")
                self._by_phase.add(key)
            values = {**values, "phase": phase}
        self.run.log(values, step=step)

    def text(self, key: str, text: str, step: int, phase: int | None) -> None:
        self.run.summary[key] = text  # a note, not a series: the run's page shows the latest

    def picture(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        pass  # the W&B service writes as records arrive

    def close(self) -> None:
        self.run.finish()

    def run_id(self) -> str | None:
        return self.run.id
