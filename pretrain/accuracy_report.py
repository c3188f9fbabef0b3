"""The accuracy matrix in report.md and comparison.md: its table, its metrics with their meanings.

Reads `tasks`, `accuracy`, `task_docs`, `task_domains` and `harness` of a metrics.json (pretrain.results)
and recomputes the metrics with pretrain.metrics.accuracy_metrics, as the loss report recomputes its own,
so the tables and the metrics always agree. The picture is report.plot_accuracy_heatmap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pretrain.metrics import MetricsError, row_label, scored_accuracy_metrics

DEFINITIONS = {
    "avg_final_accuracy": "mean accuracy after the last phase over all tasks (higher is better)",
    "avg_forgetting": "mean over tasks whose domain was trained before the last phase of the accuracy lost "
    "since their best after that phase (+ = forgot; lower is better)",
    "bwt": "mean of the final accuracy minus the accuracy right after the task's own phase (- = forgetting, "
    "+ = later phases helped it)",
    "plasticity": "mean accuracy gained during the phases that trained a task's domain (+ = learned)",
    "fwt": "mean accuracy gained from the initial model to just before a task's first phase, over tasks "
    "first trained in phase 2 or later (+ = earlier phases helped it)",
}
SIGNED = {"avg_forgetting", "bwt", "plasticity", "fwt"}


def accuracy_summary(data: dict[str, Any]) -> dict[str, Any]:
    """The metrics of the accuracy matrix in `data`: {} until every row is scored, {"error": why} when a
    cell is missing or not a finite number."""
    rows = data.get("accuracy") or []
    if not rows or any(row is None for row in rows):
        return {}
    try:
        return scored_accuracy_metrics(data["tasks"], data["phases"], data.get("task_domains") or {}, rows)
    except MetricsError as err:
        return {"error": str(err)}


def trained_tasks(data: dict[str, Any]) -> list[str | None]:
    """Per phase, the task linked to the domain it trained (None where no task is)."""
    linked = {d: t for t, d in (data.get("task_domains") or {}).items()}
    return [linked.get(d) for d in data["phases"]]


# resumable keys (pretrain/rundir.py) that change what the later rows of a matrix are scored on
ACCURACY_SCORING_KEYS = ("eval.tasks", "eval.task_limit", "eval.task_metric")


def scoring_changed_note(data: dict[str, Any], keys: Sequence[str], matrix: str) -> list[str]:
    """A warning when a resume changed one of `keys`: the matrix's rows before and after were scored
    differently, and metrics across them (forgetting, bwt, ...) mix the two."""
    changes = [c for c in data.get("config_changes") or [] if c["key"] in keys]
    if not changes:
        return []
    what = "; ".join(f"{c['key']} {c['from']} -> {c['to']} from phase {c['phase']}" for c in changes)
    return [
        f"**Read with care:** a resume changed how the {matrix} is scored ({what}): its rows before and "
        "after were scored differently, and the metrics above compare the two.",
        "",
    ]


def _left_out_note(left_out: dict[str, list[int]]) -> list[str]:
    if not left_out:
        return []
    what = "; ".join(f"{t} (rows {', '.join(map(str, rows))})" for t, rows in left_out.items())
    return [
        f"Left out of the metrics above, not scored in every row: {what}. A task added on a resume is "
        "scored on the earlier rows by `pretrain eval --run DIR`; one removed is not scored again.",
        "",
    ]


def accuracy_section(data: dict[str, Any]) -> list[str]:
    """report.md's section on downstream accuracy; nothing for a run without eval.tasks."""
    tasks = data.get("tasks") or []
    if not tasks:
        return []
    lines = ["## Accuracy on downstream tasks", "", _legend(data), ""]
    lines += [accuracy_table(data["accuracy"], tasks, data["phases"], trained_tasks(data)), ""]
    lines += [_documents(data), ""]
    summary = data.get("accuracy_metrics") or {}
    if "error" in summary:
        return lines + [f"**Metrics not computed:** {summary['error']}", ""]
    if summary:
        lines += ["| metric | value | meaning |", "|---|---|---|"]
        lines += [f"| `{m}` | {metric_text(m, summary.get(m))} | {text} |" for m, text in DEFINITIONS.items()]
        lines += [""] + _left_out_note(summary.get("left_out") or {})
        lines += _untrained_table(summary.get("untrained") or {})
        lines += scoring_changed_note(data, ACCURACY_SCORING_KEYS, "accuracy matrix")
    return lines + ["![accuracy matrix](accuracy_heatmap.png)", ""]


def accuracy_table(
    matrix: Sequence, tasks: Sequence[str], phases: Sequence[str], trained: Sequence[str | None]
) -> str:
    """Markdown table, one row per phase (initial first); the task a phase trained in bold, rows and
    cells not scored yet as —."""
    lines = ["| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for i in range(max(len(phases) + 1, len(matrix))):
        row = matrix[i] if i < len(matrix) else None
        cells = []
        for j, task in enumerate(tasks):
            text = cell_text(row[j] if row is not None and j < len(row) else None)
            bold = row is not None and 0 < i <= len(trained) and trained[i - 1] == task
            cells.append(f"**{text}**" if bold else text)
        lines.append(f"| {row_label(i, phases)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_section(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """comparison.md's accuracy tables for (label, metrics) pairs; nothing when no run scored tasks."""
    runs = [(label, data) for label, data in runs if data.get("tasks")]
    if not runs:
        return []
    names = list(DEFINITIONS)
    lines = ["## Accuracy on downstream tasks", ""]
    lines += ["| run | " + " | ".join(f"`{m}`" for m in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, data in runs:
        summary = data.get("accuracy_metrics") or {}
        values = [metric_text(m, summary.get(m)) if "error" not in summary else "n/a" for m in names]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    tasks = list(dict.fromkeys(t for _, data in runs for t in data["tasks"]))
    lines += ["", "Final accuracy per task:", ""]
    lines += ["| run | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    rows = {len(data.get("accuracy") or []) for _, data in runs}
    for label, data in runs:
        matrix = data.get("accuracy") or [None]
        cells = {t: cell_text(v) for t, v in zip(data["tasks"], matrix[-1] or [], strict=False)}
        # a run scored on fewer phases says which: its last row is not the others' final one
        label += f" ({row_label(len(matrix) - 1, data['phases'])})" if len(rows) > 1 else ""
        lines.append(f"| {label} | " + " | ".join(cells.get(t, "—") for t in tasks) + " |")
    return lines + [""]


def accuracy_verdict(runs: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, str | None]:
    """The verdict's sentence on task accuracy for (label, metrics) pairs, the first the baseline, and the
    label of the run it favours (the baseline unless another ended strictly higher); ("", None) when fewer
    than two runs have accuracy metrics."""
    scored = [
        (label, summary, data)
        for label, data in runs
        if "avg_final_accuracy" in (summary := data.get("accuracy_metrics") or {})
    ]
    if len(scored) < 2 or scored[0][0] != runs[0][0]:
        return "", None
    done = {label: summary.get("phases_done") for label, summary, _ in scored}
    if len(set(done.values())) > 1:  # a final phase whose scoring failed or is still to come
        counts = ", ".join(f"{label} {n}" for label, n in done.items())
        return (
            f"Task accuracy not compared: the runs have scored different numbers of phases ({counts}).",
            None,
        )
    # each average is over the tasks that run scored in every row, by its own metric: not comparable
    # unless those are the same (other eval.tasks, or a task added on a resume and not scored back yet)
    averaged = {label: _averaged_over(summary, data) for label, summary, data in scored}
    if len(set(averaged.values())) > 1:
        what = "; ".join(
            f"{label}: {', '.join(tasks)} ({metric})" for label, (tasks, metric) in averaged.items()
        )
        return (
            f"Task accuracy not compared: the runs' averages cover different tasks or metrics ({what}).",
            None,
        )
    scored = [(label, summary) for label, summary, _ in scored]
    (base, b), (best, w) = scored[0], max(scored, key=lambda pair: pair[1]["avg_final_accuracy"])
    if w["avg_final_accuracy"] <= b["avg_final_accuracy"]:
        text = f"No run ended with a higher average task accuracy than {base} ({_acc(b)})."
        return text, base
    return f"On downstream tasks {best} ended highest: {_acc(w)} vs {_acc(b)} for {base}.", best


def _averaged_over(summary: dict[str, Any], data: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(the tasks a run's average final accuracy is over, its metric)."""
    left_out = summary.get("left_out") or {}
    return tuple(sorted(t for t in data["tasks"] if t not in left_out)), data.get("task_metric") or "acc"


def _acc(summary: dict[str, Any]) -> str:
    forgetting = summary.get("avg_forgetting")
    text = f"average final accuracy {summary['avg_final_accuracy']:.4f}"
    return text + (f", accuracy forgetting {forgetting:+.4f}" if forgetting is not None else "")


def _legend(data: dict[str, Any]) -> str:
    metric = data.get("task_metric") or "acc"
    harness = f" {data['harness']}" if data.get("harness") else ""
    meaning = (
        "the share of documents whose answer the model scored highest" if metric == "acc" else "its metric"
    )
    text = (
        f"Rows: the model after each phase; columns: the tasks of `eval.tasks`, scored by "
        f"lm-evaluation-harness{harness} (`{metric}`: {meaning}; higher is better)."
    )
    links = data.get("task_domains") or {}
    if links:
        text += (
            " Bold: the task linked to the domain the phase trained ("
            + ", ".join(f"{t} by {d}" for t, d in links.items())
            + "); the other tasks are evaluated only."
        )
    else:
        text += " No task is linked to a domain (`eval.task_domains`): every task is evaluated only."
    return text


def _documents(data: dict[str, Any]) -> str:
    """How many documents each accuracy averages, and what one document and the final standard error are."""
    docs, final = data.get("task_docs") or {}, (data.get("accuracy") or [None])[-1]
    parts = []
    for j, task in enumerate(data["tasks"]):
        n = docs.get(task)
        if not n:
            continue
        text = f"{task} {n} (one document = {1 / n:.4f}"
        p = final[j] if final is not None and j < len(final) else None
        if isinstance(p, (int, float)) and math.isfinite(p):
            text += f", final standard error sqrt(p(1-p)/n) = {math.sqrt(p * (1 - p) / n):.4f}"
        parts.append(text + ")")
    return "Documents per task: " + "; ".join(parts) + "." if parts else "Documents per task: not recorded."


def _untrained_table(untrained: dict[str, dict[str, float]]) -> list[str]:
    if not untrained:
        return []
    lines = [
        "Evaluated-only tasks (linked to no domain):",
        "",
        "| task | initial | final | change (+ = gained) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t} | {u['initial']:.4f} | {u['final']:.4f} | {u['change']:+.4f} |" for t, u in untrained.items()
    ]
    return lines + [""]


def cell_text(value: Any) -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"{value!r} (!)"
    return f"{v:.4f}" if math.isfinite(v) else f"{v} (!)".replace("nan", "NaN")


def metric_text(name: str, value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if name in SIGNED else f"{value:.4f}"
