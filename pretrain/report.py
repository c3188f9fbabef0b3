"""Human-readable results: `report.md` and PNGs for one run, `comparison.md/png` and a verdict for several.

Reads a run's metrics.json (the matrix the pipeline writes) and recomputes the forgetting metrics from
the matrix with pretrain.metrics, so the tables and the metrics always agree. Pictures use matplotlib's
Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pretrain.metrics import MetricsError, forgetting_metrics, latest_phase, row_label

DEFINITIONS = {
    "avg_forgetting": "mean over domains trained before the last phase of the loss added since their best "
    "after their own phase (+ = forgot; lower is better)",
    "bwt": "mean of loss after a domain's own phase minus its final loss (- = forgetting, + = later "
    "phases helped it)",
    "plasticity": "mean drop of the trained domain's loss during its own phase (+ = learned; higher is "
    "better)",
    "fwt": "mean drop of a domain's loss from the initial model to just before its first phase, over "
    "domains first trained in phase 2 or later (+ = earlier phases helped it)",
    "avg_final_loss": "mean held-out loss after the last phase over all domains, evaluated-only included",
    "avg_final_perplexity": "mean held-out perplexity after the last phase over all domains",
}
SIGNED = {"avg_forgetting", "bwt", "plasticity", "fwt"}
COMPARED = ("avg_forgetting", "bwt", "plasticity", "fwt", "avg_final_loss", "avg_final_perplexity")


class ReportError(ValueError):
    """A run directory without a readable metrics.json."""


# -- loading


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """metrics.json with the forgetting metrics recomputed from its matrix ("error" says why they are not)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.json (has the run evaluated anything yet?)")
    data = json.loads(path.read_text())
    missing = [k for k in ("domains", "phases", "eval_loss", "perplexity") if k not in data]
    if missing:
        raise ReportError(f"{path}: missing {', '.join(missing)}")
    data.pop("error", None)
    try:
        data.update(
            forgetting_metrics(data["domains"], data["phases"], data["eval_loss"], data["perplexity"])
        )
    except MetricsError as err:
        data["error"] = str(err)
    return data


def run_label(data: dict[str, Any], run_dir: str | Path) -> str:
    """The method's name (metrics["method"]["name"]), else the run directory's name."""
    method = data.get("method")
    if isinstance(method, dict) and method.get("name"):
        return str(method["name"])
    return Path(run_dir).resolve().name


# -- one run


def write_report(run_dir: str | Path) -> Path:
    """Write report.md, loss_heatmap.png and loss_curves.png into the run directory; return report.md."""
    run = Path(run_dir)
    data = load_metrics(run)
    title = data.get("run_name") or run.resolve().name
    plot_heatmap(data, run / "loss_heatmap.png", title=f"held-out loss: {title}")
    plot_loss_curves(data, run / "loss_curves.png", title=f"held-out loss across phases: {title}")
    out = run / "report.md"
    out.write_text(report_markdown(data, title))
    return out


def report_markdown(data: dict[str, Any], title: str) -> str:
    domains, phases = data["domains"], data["phases"]
    done = _rows_present(data["eval_loss"]) - 1
    lines = [f"# Run report: {title}", ""]
    method = data.get("method")
    if isinstance(method, dict) and method:
        lines += ["Method: " + ", ".join(f"{k}={_plain(v)}" for k, v in method.items() if _is_scalar(v)), ""]
    status = f"{done} of {len(phases)} phases evaluated"
    lines += [f"Phases: {' -> '.join(phases)} ({status}).", ""]
    lines += ["## Held-out loss", "", _legend(domains, phases), ""]
    lines += [matrix_table(data["eval_loss"], domains, phases, "{:.4f}"), ""]
    lines += ["## Held-out perplexity", "", matrix_table(data["perplexity"], domains, phases, "{:.2f}"), ""]
    lines += _metrics_section(data)
    lines += _method_stats_section(data.get("migu"))
    lines += [
        "## Pictures",
        "",
        "![loss matrix](loss_heatmap.png)",
        "",
        "![loss across phases](loss_curves.png)",
        "",
        "Definitions and sign conventions: docs/metrics.md in the pretrain repository.",
        "",
    ]
    return "\n".join(lines)


def matrix_table(matrix: Sequence, domains: Sequence[str], phases: Sequence[str], fmt: str) -> str:
    """Markdown table, one row per phase (initial first), the domain trained in that phase in bold.

    Rows not evaluated yet show "—"; NaN/inf cells are marked "(!)" so they are never read as numbers.
    """
    header = "| | " + " | ".join(_domain_name(d, phases) for d in domains) + " |"
    lines = [header, "|---" * (len(domains) + 1) + "|"]
    for i in range(max(len(phases) + 1, len(matrix))):
        row = matrix[i] if i < len(matrix) else None
        trained = phases[i - 1] if 0 < i <= len(phases) else None
        cells = []
        for j, d in enumerate(domains):
            text = _cell_text(_raw_cell(matrix, i, j), fmt)
            cells.append(f"**{text}**" if d == trained and row is not None else text)
        lines.append(f"| {row_label(i, phases)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metrics_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Forgetting metrics", ""]
    if "error" in data:
        return lines + [f"**Not computed:** {data['error']}", ""]
    lines += ["| metric | value | meaning |", "|---|---|---|"]
    for name, meaning in DEFINITIONS.items():
        lines.append(f"| `{name}` | {_metric_text(name, data.get(name))} | {meaning} |")
    lines.append("")
    lines += _forgetting_table(data)
    untrained = data.get("untrained") or {}
    if untrained:
        lines += [
            "Evaluated-only domains (never trained; what the model knew before the run):",
            "",
            "| domain | initial loss | final loss | change (+ = worse) |",
            "|---|---|---|---|",
        ]
        for d, u in untrained.items():
            lines.append(f"| {d} | {u['initial']:.4f} | {u['final']:.4f} | {u['change']:+.4f} |")
        lines.append("")
    return lines


def _forgetting_table(data: dict[str, Any]) -> list[str]:
    forgot = data.get("forgetting") or {}
    if not forgot:
        return ["No domain was trained before the last phase yet: forgetting and bwt need two phases.", ""]
    loss, phases, domains = data["eval_loss"], data["phases"], data["domains"]
    last = len(loss) - 1
    lines = [
        "Per domain (phase = the latest phase that trained it):",
        "",
        "| domain | phase | loss after it | best since | final loss | forgetting |",
        "|---|---|---|---|---|---|",
    ]
    for d, f in forgot.items():
        j, k = domains.index(d), latest_phase(d, phases[:last])
        best = min(loss[i][j] for i in range(k, last))
        lines.append(f"| {d} | {k} | {loss[k][j]:.4f} | {best:.4f} | {loss[last][j]:.4f} | {f:+.4f} |")
    return lines + [""]


def _method_stats_section(stats: Any) -> list[str]:
    """Per-phase method statistics (metrics["migu"]): scalar fields as they are, per-layer dicts as means."""
    entries = [stats] if isinstance(stats, dict) else list(stats or [])
    entries = [e for e in entries if isinstance(e, dict) and e]
    columns = list(dict.fromkeys(k for e in entries for k, v in e.items() if _summary_value(v) is not None))
    if not columns:
        return []
    lines = ["## Method statistics", "", "Per-layer values are shown as their mean over layers.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for e in entries:
        lines.append("| " + " | ".join(_plain(_summary_value(e.get(c))) for c in columns) + " |")
    overlaps = [e["jaccard_with_previous"] for e in entries if _is_number(e.get("jaccard_with_previous"))]
    if overlaps:
        mean = sum(overlaps) / len(overlaps)
        lines += ["", f"Mean Jaccard overlap of the kept units between consecutive phases: {mean:.4f}."]
    return lines + [""]


# -- pictures


def plot_heatmap(data: dict[str, Any], path: str | Path, title: str = "held-out loss") -> Path:
    """The loss matrix as annotated cells; the cell of the domain each phase trained is outlined."""
    import matplotlib
    import numpy as np

    domains, phases = data["domains"], data["phases"]
    rows = max(len(phases) + 1, len(data["eval_loss"]))
    values = np.full((rows, len(domains)), np.nan)
    for i, row in enumerate(data["eval_loss"]):
        if row is not None:
            values[i, : len(row)] = [_as_float(v) for v in row]
    masked = np.ma.masked_invalid(values)
    fig = Figure(figsize=(2.5 + 1.3 * len(domains), 1.4 + 0.55 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(masked, cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, label="mean token loss")
    ax.set_xticks(range(len(domains)), [_domain_name(d, phases) for d in domains], rotation=30, ha="right")
    ax.set_yticks(range(rows), [row_label(i, phases) for i in range(rows)])
    ax.set_title(title)
    low, high = (masked.min(), masked.max()) if masked.count() else (0.0, 1.0)
    for i in range(rows):
        for j in range(len(domains)):
            v = values[i, j]
            text = _cell_text(_raw_cell(data["eval_loss"], i, j), "{:.3f}")
            light = math.isfinite(v) and (v - low) < 0.6 * (high - low or 1.0)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if light else "black")
        evaluated = i < len(data["eval_loss"]) and data["eval_loss"][i] is not None
        if evaluated and 0 < i <= len(phases) and phases[i - 1] in domains:
            j = domains.index(phases[i - 1])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_loss_curves(data: dict[str, Any], path: str | Path, title: str = "held-out loss") -> Path:
    """Each domain's held-out loss after each phase; shaded spans name the domain each phase trained."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    _draw_curves(fig.add_subplot(), data, title, legend=True)
    fig.savefig(path, dpi=100)
    return Path(path)


def _draw_curves(ax, data: dict[str, Any], title: str, legend: bool) -> None:
    domains, phases, loss = data["domains"], data["phases"], data["eval_loss"]
    xs = list(range(len(phases) + 1))
    for k, d in enumerate(phases, 1):
        ax.axvspan(k - 1, k, color="#f0f0f0" if k % 2 else "#e0e0e0", zorder=0)
        ax.text(k - 0.5, 1.0, f"phase {k}\n{d}", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    for j, d in enumerate(domains):
        ys = [_as_float(row[j]) if row is not None and j < len(row) else math.nan for row in loss]
        ys += [math.nan] * (len(xs) - len(ys))
        style = "-" if d in phases else "--"
        label = d if d in phases else f"{d} (eval only)"
        ax.plot(xs, ys[: len(xs)], style, marker="o", color=f"C{j % 10}", label=label, zorder=2)
    ax.set_xticks(xs, ["initial"] + [str(k) for k in xs[1:]])
    ax.set_xlim(-0.2, len(phases) + 0.2)
    ax.set_xlabel("after phase")
    ax.set_ylabel("held-out loss")
    ax.set_title(title, pad=30)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


# -- several runs


@dataclass
class RunMetrics:
    label: str
    path: Path
    data: dict[str, Any]


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunMetrics]:
    """Runs labelled by method name; repeated names get their directory name, then an index."""
    if not run_dirs:
        raise ReportError("compare needs at least one run directory")
    runs = [RunMetrics(run_label(d, p), Path(p), d) for p in run_dirs for d in [load_metrics(p)]]
    for suffix in (lambda i, r: f" ({r.path.resolve().name})", lambda i, r: f" #{i + 1}"):
        labels = [r.label for r in runs]
        for i, r in enumerate(runs):
            if labels.count(r.label) > 1:
                r.label += suffix(i, r)
    return runs


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, echo: bool = True) -> Path:
    """Write comparison.md and comparison.png into out_dir, print the terminal table and verdict (echo),
    and return comparison.md. The first run is the baseline the verdict compares against."""
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(runs, out / "comparison.png")
    (out / "comparison.md").write_text(comparison_markdown(runs))
    if echo:
        print(_format_table(runs) + "\n\n" + _verdict(runs))
    return out / "comparison.md"


def format_comparison(run_dirs: Sequence[str | Path]) -> str:
    """A compact fixed-width table of the runs' metrics and the verdict, for the terminal."""
    runs = load_runs(run_dirs)
    return _format_table(runs) + "\n\n" + _verdict(runs)


def comparison_verdict(run_dirs: Sequence[str | Path]) -> str:
    """Plain language: which run forgot least (avg_forgetting) and at what cost in plasticity vs the first."""
    return _verdict(load_runs(run_dirs))


def comparison_markdown(runs: list[RunMetrics]) -> str:
    lines = [f"# Comparison of {len(runs)} runs", "", "Baseline: " + runs[0].label + " (the first run).", ""]
    lines += ["| run | " + " | ".join(f"`{m}`" for m in COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for r in runs:
        values = [_metric_text(m, r.data.get(m)) if "error" not in r.data else "n/a" for m in COMPARED]
        lines.append(f"| {r.label} | " + " | ".join(values) + " |")
    domains = list(dict.fromkeys(d for r in runs for d in r.data["domains"]))
    lines += ["", "Final held-out loss per domain:", ""]
    lines += ["| run | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for r in runs:
        last = r.data["eval_loss"][-1] or []
        cells = {d: _cell_text(v, "{:.4f}") for d, v in zip(r.data["domains"], last, strict=False)}
        lines.append(f"| {r.label} | " + " | ".join(cells.get(d, "—") for d in domains) + " |")
    lines += ["", "## Verdict", "", _verdict(runs), "", "![comparison](comparison.png)", ""]
    lines += ["Definitions and sign conventions: docs/metrics.md in the pretrain repository.", ""]
    return "\n".join(lines)


def plot_comparison(runs: list[RunMetrics], path: str | Path) -> Path:
    """Top: each run's loss curves side by side (shared y axis); bottom: the signed metrics as bars."""
    n = len(runs)
    fig = Figure(figsize=(4.2 * n + 1.5, 8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, n)
    first = None
    for i, r in enumerate(runs):
        ax = fig.add_subplot(grid[0, i], sharey=first)
        first = first or ax
        _draw_curves(ax, r.data, r.label, legend=i == n - 1)
    bars = fig.add_subplot(grid[1, :])
    names = [m for m in COMPARED if m in SIGNED]
    width = 0.8 / n
    for i, r in enumerate(runs):
        ys = [_as_float(r.data.get(m)) if "error" not in r.data else math.nan for m in names]
        xs = [k + (i - (n - 1) / 2) * width for k in range(len(names))]
        bars.bar(xs, [0 if math.isnan(y) else y for y in ys], width, label=r.label, color=f"C{i % 10}")
        for x, y in zip(xs, ys, strict=True):
            _bar_label(bars, x, y)
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("loss units")
    bars.set_title("forgetting metrics (avg_forgetting: lower is better; bwt, plasticity, fwt: higher)")
    bars.legend()
    fig.savefig(path, dpi=90)
    return Path(path)


def _bar_label(ax, x: float, y: float) -> None:
    if math.isnan(y):
        ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8)
    else:
        ax.text(x, y, f"{y:+.3f}", ha="center", va="bottom" if y >= 0 else "top", fontsize=8)


def _format_table(runs: list[RunMetrics]) -> str:
    headers = ["run", "forgetting", "bwt", "plasticity", "fwt", "final_loss", "final_ppl"]
    rows = []
    for r in runs:
        if "error" in r.data:
            rows.append([r.label] + ["n/a"] * 6)
            continue
        rows.append([r.label] + [_metric_text(m, r.data.get(m)) for m in COMPARED])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [headers, *rows])


def _verdict(runs: list[RunMetrics]) -> str:
    base = runs[0]
    usable = [r for r in runs if "error" not in r.data and r.data.get("avg_forgetting") is not None]
    notes = [
        f"{r.label} has no forgetting metrics ({r.data.get('error') or 'fewer than two phases evaluated'})."
        for r in runs
        if r not in usable
    ]
    if len({tuple(r.data["phases"]) for r in runs}) > 1:
        notes.append("The runs did not train the same phases, so their numbers are not directly comparable.")
    if not usable:
        return " ".join(["No run can be judged yet."] + notes)
    best = min(usable, key=lambda r: r.data["avg_forgetting"])
    fb = best.data["avg_forgetting"]
    if base not in usable:
        head = (
            f"{best.label} forgot least (avg_forgetting {fb:.4f}); the baseline {base.label} has no metrics."
        )
    elif best is base or fb >= base.data["avg_forgetting"]:
        head = f"No run forgot less than the baseline {base.label} (avg_forgetting {fb:.4f})."
    else:
        head = f"{best.label} forgot least: {_versus(best, base)}"
    return " ".join([head] + notes)


def _versus(best: RunMetrics, base: RunMetrics) -> str:
    fb, f0 = best.data["avg_forgetting"], base.data["avg_forgetting"]
    pb, p0 = best.data.get("plasticity"), base.data.get("plasticity")
    less = f" ({(f0 - fb) / f0:.0%} less)" if f0 > 0 else ""
    text = f"avg_forgetting {fb:.4f} vs {f0:.4f} for {base.label}{less}, "
    if pb is None or p0 is None:
        text += "plasticity unknown."
    elif pb < p0:
        rel = f", {(p0 - pb) / p0:.0%} less" if p0 > 0 else ""
        text += f"at a plasticity cost of {p0 - pb:.4f} (plasticity {pb:.4f} vs {p0:.4f}{rel})."
    else:
        text += f"at no plasticity cost (plasticity {pb:.4f} vs {p0:.4f})."
    lb, l0 = best.data.get("avg_final_loss"), base.data.get("avg_final_loss")
    if lb is not None and l0 is not None:
        text += f" Average final loss {lb:.4f} vs {l0:.4f}."
    return text


# -- small helpers


def _raw_cell(matrix: Sequence, i: int, j: int) -> Any:
    row = matrix[i] if i < len(matrix) else None
    return row[j] if row is not None and j < len(row) else None


def _rows_present(matrix: Sequence) -> int:
    return sum(row is not None for row in matrix)


def _legend(domains: Sequence[str], phases: Sequence[str]) -> str:
    text = "Rows: the model after each phase; columns: held-out set of each domain; bold: the domain trained"
    text += " in that phase. NaN/inf cells are marked (!), rows not evaluated yet show —."
    if any(d not in phases for d in domains):
        text += " Domains marked (eval only) are never trained."
    return text


def _domain_name(domain: str, phases: Sequence[str]) -> str:
    return domain if domain in phases else f"{domain} (eval only)"


def _cell_text(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    v = _as_float(value)
    if math.isnan(v) and not isinstance(value, (int, float)):
        return f"{value!r} (!)"
    return fmt.format(v) if math.isfinite(v) else f"{v} (!)".replace("nan", "NaN")


def _metric_text(name: str, value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if name in SIGNED else f"{value:.4f}"


def _summary_value(value: Any) -> Any:
    """A scalar as is, a dict of numbers as their mean; None for anything else (lists, nested dicts)."""
    if _is_scalar(value):
        return value
    if isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
        return sum(value.values()) / len(value)
    return None


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
