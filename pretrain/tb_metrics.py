"""TensorBoard at a phase boundary: the forgetting metrics (pretrain.metrics) and the downstream accuracies,
stepped by phase number (0: the initial model)."""

from __future__ import annotations

import math
from typing import Any

SCALARS = ("avg_forgetting", "bwt", "plasticity", "fwt", "avg_final_loss", "avg_final_perplexity")


def log_forgetting(writer: Any, metrics: dict[str, Any], phase: int) -> None:
    """Write `forgetting/<metric>`, `forgetting/domain/<d>` and `forgetting/untrained/<d>` at step `phase`.

    `metrics` is a forgetting_metrics() dict or a whole metrics.json (same keys at the top level).
    Undefined metrics (None, e.g. bwt after one phase) and non-finite values are skipped, not logged as 0.
    """
    if "error" in metrics:
        writer.add_text("forgetting/error", str(metrics["error"]), phase)
    for name in SCALARS:
        _scalar(writer, f"forgetting/{name}", metrics.get(name), phase)
    for domain, value in (metrics.get("forgetting") or {}).items():
        _scalar(writer, f"forgetting/domain/{domain}", value, phase)
    for domain, info in (metrics.get("untrained") or {}).items():
        _scalar(writer, f"forgetting/untrained/{domain}", info.get("change"), phase)
    writer.flush()


ACCURACY_SCALARS = ("avg_final_accuracy", "avg_forgetting", "bwt", "plasticity", "fwt")


def log_accuracy(writer: Any, metrics: dict[str, Any], row: int) -> None:
    """Write `accuracy/<task>` of matrix row `row` and `accuracy_metrics/<metric>` at step `row`.

    `metrics` is a metrics.json dict (RunResults.to_dict()); cells not scored and undefined metrics are
    skipped, not logged as 0.
    """
    values = metrics["accuracy"][row] or []
    for task, value in zip(metrics["tasks"], values, strict=True):
        _scalar(writer, f"accuracy/{task}", value, row)
    for name in ACCURACY_SCALARS:
        _scalar(writer, f"accuracy_metrics/{name}", (metrics.get("accuracy_metrics") or {}).get(name), row)
    writer.flush()


def _scalar(writer: Any, tag: str, value: Any, step: int) -> None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        writer.add_scalar(tag, float(value), step)
