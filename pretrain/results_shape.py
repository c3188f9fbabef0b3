"""What a metrics.json must hold before its matrices are read: torch-free, so `report` checks it too.

Hand-edited or foreign files failed deep inside a save (the trainer's, at every resume) or a report, with
an IndexError or TypeError; these checks name the field instead.
"""

from __future__ import annotations

from typing import Any

# a matrix and the list its rows have one value per entry of
MATRICES = {"eval_loss": "domains", "perplexity": "domains", "accuracy": "tasks"}


def shape_problems(data: dict[str, Any]) -> list[str]:
    """Why `data` (a parsed metrics.json) cannot be read as a run's results; empty if it can."""
    names = [key for key in ("domains", "phases", "tasks") if not _names(data.get(key, []))]
    if names:
        return [f"`{key}` is not a list of names" for key in names]
    problems = []
    for matrix, columns in MATRICES.items():
        rows, width = data.get(matrix, []), len(data.get(columns, []))
        if not isinstance(rows, list):
            problems.append(f"`{matrix}` is not a list of rows")
            continue
        problems += [
            f"{matrix} row {i} is not a list of {width} numbers, one per entry of {columns}"
            for i, row in enumerate(rows)
            if row is not None and not _numbers(row, width)
        ]
    if not problems and len(data.get("eval_loss", [])) != len(data.get("perplexity", [])):
        losses, perplexities = len(data.get("eval_loss", [])), len(data.get("perplexity", []))
        problems.append(f"{losses} eval_loss rows but {perplexities} perplexity rows")
    curve = data.get("eval_curve", [])
    width = len(data.get("domains", []))
    if not isinstance(curve, list) or any(
        not isinstance(p, dict) or not _numbers(p.get("loss"), width) for p in curve
    ):
        problems.append(f"`eval_curve` is not a list of points with a loss for each of {width} domains")
    return problems


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _numbers(row: Any, width: int) -> bool:
    """A list of `width` numbers or nulls (a cell not scored yet)."""
    return (
        isinstance(row, list)
        and len(row) == width
        and all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in row)
    )
