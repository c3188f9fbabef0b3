"""Experiment trackers: one MetricsLogger that writes the run's numbers to TensorBoard, W&B and MLflow.

The trainer calls `scalars`, `text` and `flush` without asking where they go; `open_trackers` builds the
logger from `logging.trackers` on rank 0 and an empty one (a no-op) on every other rank.
"""

from pretrain.trackers.logger import MetricsLogger, open_trackers
from pretrain.trackers.packages import require_trackers

__all__ = ["MetricsLogger", "open_trackers", "require_trackers"]
