"""TensorBoard event files in <run_dir>/tensorboard, as the trainer has always written them."""

from __future__ import annotations

from pathlib import Path


class TensorBoardBackend:
    name = "tensorboard"
    # The report's pictures stay out of the event files, which keep what they held before other trackers
    # existed; `pretrain report` writes the pictures into the run directory.
    pictures = False

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int, phase: int | None) -> None:
        x = step if phase is None else phase
        for key, value in values.items():
            self.writer.add_scalar(key, value, x)

    def text(self, key: str, text: str, step: int, phase: int | None) -> None:
        self.writer.add_text(key, text, step if phase is None else phase)

    def picture(self, key: str, path: Path, step: int) -> None:
        raise NotImplementedError("TensorBoard takes no pictures (pictures = False)")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def run_id(self) -> str | None:
        return None
