"""The forgetting metrics (pretrain.metrics) and the downstream accuracies at a phase boundary, as tracker
scalars at x = the phase (0: the initial model)."""

from __future__ import annotations

import math
from typing import Any

from pretrain.trackers.logger import MetricsLogger

SCALARS = ("avg_forgetting", "bwt", "plasticity", "fwt", "avg_final_loss", "avg_final_perplexity")


def log_forgetting(logger: MetricsLogger, metrics: dict[str, Any], phase: int, step: int) -> None:
    """Log `forgetting/<metric>`, `forgetting/domain/<d>` and `forgetting/untrained/<d>` for `phase`.

    `metrics` is a forgetting_metrics() dict or a whole metrics.json (same keys at the top level);
    `step` is the optimizer step the phase ended at.
    """
    if "error" in metrics:
        logger.text("forgetting/error", str(metrics["error"]), step, phase)
    logger.scalars(forgetting_scalars(metrics), step, phase)
    logger.flush()


def forgetting_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics as tagged numbers; undefined ones (None, e.g. bwt after one phase) and non-finite
    values are left out, not logged as 0."""
    tagged = {f"forgetting/{name}": metrics.get(name) for name in SCALARS}
    tagged |= {f"forgetting/domain/{d}": v for d, v in (metrics.get("forgetting") or {}).items()}
    for domain, info in (metrics.get("untrained") or {}).items():
        tagged[f"forgetting/untrained/{domain}"] = info.get("change")
    return {k: float(v) for k, v in tagged.items() if isinstance(v, (int, float)) and math.isfinite(v)}


ACCURACY_SCALARS = ("avg_final_accuracy", "avg_forgetting", "bwt", "plasticity", "fwt")


def accuracy_scalars(metrics: dict[str, Any], row: int) -> dict[str, float]:
    """`accuracy/<task>` of matrix row `row` and `accuracy_metrics/<metric>`, from a metrics.json dict;
    cells not scored and undefined metrics are left out, not logged as 0."""
    values = metrics["accuracy"][row] or []
    tagged = {f"accuracy/{task}": v for task, v in zip(metrics["tasks"], values, strict=True)}
    summary = metrics.get("accuracy_metrics") or {}
    tagged |= {f"accuracy_metrics/{name}": summary.get(name) for name in ACCURACY_SCALARS}
    return {k: float(v) for k, v in tagged.items() if isinstance(v, (int, float)) and math.isfinite(v)}
