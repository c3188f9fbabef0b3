"""Human-readable results: `report.md` and PNGs for one run, `comparison.md/png` and a verdict for several.

Reads a run's metrics.json (the matrix the pipeline writes) and recomputes the forgetting metrics from
the matrix with pretrain.metrics, so the tables and the metrics always agree. Pictures use matplotlib's
Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pretrain.accuracy_report import (
    accuracy_section,
    accuracy_summary,
    accuracy_verdict,
    comparison_section,
    scoring_changed_note,
    trained_tasks,
)
from pretrain.atomic import foreign_file, save_figure, write_text_atomic
from pretrain.curves import PICTURE as CURVE_PICTURE
from pretrain.curves import curve_section, plot_eval_curve
from pretrain.metrics import MetricsError, forgetting_metrics, latest_phase, row_label
from pretrain.results_shape import shape_problems

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
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds a {type(data).__name__}, not a run's results")
    missing = [k for k in ("domains", "phases", "eval_loss", "perplexity") if k not in data]
    if missing:
        raise ReportError(f"{path}: missing {', '.join(missing)}")
    if problems := shape_problems(data):
        raise ReportError(f"{path} does not hold a run's results ({'; '.join(problems)})")
    data.pop("error", None)
    try:
        data.update(
            forgetting_metrics(data["domains"], data["phases"], data["eval_loss"], data["perplexity"])
        )
    except MetricsError as err:
        data["error"] = str(err)
    data["accuracy_metrics"] = accuracy_summary(data)
    return data


def run_label(data: dict[str, Any], run_dir: str | Path) -> str:
    """The method's name (metrics["method"]["name"]), else the run directory's name, with what else the
    run's config.yaml trained with: `migu + replay 5%`, `none + ewc (w 0.1)`, `migu + lora r8`."""
    method = data.get("method")
    if isinstance(method, dict) and method.get("name"):
        return " + ".join([str(method["name"]), *_recipe(Path(run_dir) / "config.yaml")])
    return Path(run_dir).resolve().name


def _recipe(config: Path) -> list[str]:
    """Replay, a regulariser and LoRA as the run's saved config has them; none if it has no readable one
    (a directory holding only metrics.json)."""
    try:
        cfg = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(cfg, dict):
        return []
    replay, reg, lora = (
        cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("replay", "regularisation", "lora")
    )
    phases = [p for p in cfg.get("phases") or [] if isinstance(p, dict)]
    parts = []
    if isinstance(share := replay.get("share"), int | float) and share > 0:
        parts.append(f"replay {share * 100:g}%")
    elif any(isinstance(p.get("replay_share"), int | float) and p["replay_share"] > 0 for p in phases):
        parts.append("replay (per phase)")
    if reg.get("kind") not in (None, "none"):
        weight = reg.get("weight")
        parts.append(f"{reg['kind']} (w {weight:g})" if isinstance(weight, int | float) else str(reg["kind"]))
    if lora:
        parts.append(f"lora r{lora.get('r')}")
    return parts


# -- one run


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and the pictures of write_pictures into the run directory; return report.md."""
    run = Path(run_dir)
    data = load_metrics(run)
    title = report_title(data, run)
    out = run / "report.md"
    _refuse_foreign(out, "# Run report: ")
    pictures = write_pictures(data, run, title)
    migu = [p.name for p in pictures if p.name.startswith("migu_")]
    write_text_atomic(out, report_markdown(data, title, migu_pictures=migu))
    return out


def _refuse_foreign(path: Path, header: str) -> None:
    """ReportError if `path` exists and is not a file pretrain wrote (it starts with `header`): a user's own
    notes that happen to have the name are not written over."""
    if foreign_file(path, header):
        raise ReportError(
            f"{path} exists and was not written by pretrain (it does not start with {header.strip()!r}): "
            "move it, or write the report elsewhere"
        )


def report_title(data: dict[str, Any], run_dir: str | Path) -> str:
    return data.get("run_name") or Path(run_dir).resolve().name


def write_pictures(data: dict[str, Any], out_dir: str | Path, title: str) -> list[Path]:
    """The report's pictures into out_dir: loss_heatmap.png, loss_curves.png, then the MIGU ones, the
    accuracy matrix (accuracy_heatmap.png, with eval.tasks) and the forgetting curves (eval_curve.png, with
    eval.every) if the run has them."""
    out = Path(out_dir)
    pictures = [
        plot_heatmap(data, out / "loss_heatmap.png", title=f"held-out loss: {title}"),
        plot_loss_curves(data, out / "loss_curves.png", title=f"held-out loss across phases: {title}"),
        *write_migu_pictures(data, out, title),
    ]
    if data.get("tasks") and data.get("accuracy"):
        path = out / "accuracy_heatmap.png"
        pictures.append(plot_accuracy_heatmap(data, path, title=f"downstream accuracy: {title}"))
    curve = plot_eval_curve(data, out / CURVE_PICTURE, title=f"held-out loss by step: {title}")
    return pictures + ([curve] if curve else [])


def write_migu_pictures(data: dict[str, Any], run_dir: str | Path, title: str) -> list[Path]:
    """migu_overlap.png (needs top sets of two phases) and migu_magnitudes.png (needs quantiles) when the
    run's metrics hold them; nothing for `none` runs, nor for `random` runs, which record neither."""
    run, summaries, made = Path(run_dir), migu_summaries(data), []
    if sum(bool(unit_sets(e)) for e in summaries) >= 2:
        made.append(plot_migu_overlap(data, run / "migu_overlap.png", title=f"MIGU mask overlap: {title}"))
    if any(e.get("magnitude_quantiles") for e in summaries):
        path = run / "migu_magnitudes.png"
        made.append(plot_migu_magnitudes(data, path, title=f"MIGU output magnitudes: {title}"))
    return made


def report_markdown(data: dict[str, Any], title: str, migu_pictures: Sequence[str] = ()) -> str:
    domains, phases = data["domains"], data["phases"]
    done = _rows_present(data["eval_loss"][1:])  # row 0 is the model before phase 1
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
    lines += curve_section(data)
    lines += accuracy_section(data)
    lines += _replay_section(data)
    lines += _skipped_section(data)
    lines += _config_changes_section(data)
    lines += _method_stats_section(data.get("migu"))
    lines += _migu_pictures_section(data, migu_pictures)
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
    return lines + scoring_changed_note(data, ("eval.max_blocks",), "held-out loss matrix")


def _replay_section(data: dict[str, Any]) -> list[str]:
    """Per phase with replay: the share configured and used, and the tokens replayed per source."""
    rows = [(p, p["replay"]) for p in data.get("train", []) if p.get("replay")]
    if not rows:
        return []
    lines = [
        "## Replay",
        "",
        "| phase | share | share used | replayed tokens per source |",
        "|---|---|---|---|",
    ]
    for phase, replay in rows:
        tokens = ", ".join(f"{name} {n:,}" for name, n in replay["tokens"].items())
        label = f"{phase['phase']} ({phase['domain']})"
        lines.append(f"| {label} | {replay['share']:.4g} | {replay['share_used']:.4f} | {tokens} |")
    return [*lines, ""]


def _config_changes_section(data: dict[str, Any]) -> list[str]:
    """Keys a resume changed (train.lr, train.on_nonfinite, ...), with the step they took effect at."""
    lines = [
        f"- {c['key']}: {_as_set(c['from'])} -> {_as_set(c['to'])}"
        f" (phase {c['phase']}, from step {c['step'] + 1})"
        for c in data.get("config_changes") or []
    ]
    return ["## Changed on resume", "", *lines, ""] if lines else []


def _skipped_section(data: dict[str, Any]) -> list[str]:
    """What the run skipped instead of stopping (train.on_nonfinite / train.on_bad_record: skip)."""
    lines = []
    if data.get("skipped_steps"):
        lines.append(f"- Optimizer steps skipped for a non-finite loss: {data['skipped_steps']}")
    records = data.get("skipped_records") or {}
    for split in ("train", "heldout"):
        for domain, n in (records.get(split) or {}).items():
            lines.append(f"- Bad records skipped in {domain} {split}: {n}")
    lines += [f"  - e.g. {m}" for m in records.get("examples", [])]
    return ["## Skipped", "", *lines, ""] if lines else []


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
    """Per-phase method statistics (metrics["migu"]): scalar fields as they are, per-layer dicts as means.

    Columns with the same value in every phase go into one line above the table, and
    `jaccard_per_layer` (its mean is `jaccard_with_previous`) is left out, so the table stays narrow.
    """
    entries = [stats] if isinstance(stats, dict) else list(stats or [])
    entries = [e for e in entries if isinstance(e, dict) and e]
    columns = list(dict.fromkeys(k for e in entries for k, v in e.items() if _summary_value(v) is not None))
    if "jaccard_with_previous" in columns and "jaccard_per_layer" in columns:
        columns.remove("jaccard_per_layer")
    if not columns:
        return []
    lines = ["## Method statistics", "", "Per-layer values are shown as their mean over layers.", ""]
    same = [c for c in columns if c != "phase" and len(entries) > 1 and _constant(entries, c)]
    if same:
        text = ", ".join(f"{c}={_plain(_summary_value(entries[0].get(c)))}" for c in same)
        lines += [f"Same in every phase: {text}.", ""]
        columns = [c for c in columns if c not in same]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for e in entries:
        lines.append("| " + " | ".join(_plain(_summary_value(e.get(c))) for c in columns) + " |")
    overlaps = [e["jaccard_with_previous"] for e in entries if _is_number(e.get("jaccard_with_previous"))]
    if overlaps:
        mean = sum(overlaps) / len(overlaps)
        lines += ["", f"Mean Jaccard overlap of the kept units between consecutive phases: {mean:.4f}."]
    return lines + [""]


def _constant(entries: list[dict[str, Any]], column: str) -> bool:
    values = [_plain(_summary_value(e.get(column))) for e in entries]
    return len(set(values)) == 1 and values[0] != "—"


def _migu_pictures_section(data: dict[str, Any], pictures: Sequence[str]) -> list[str]:
    """Links to the MIGU pictures with how to read them; for `random` runs, why there are none."""
    lines = []
    if "migu_overlap.png" in pictures:
        chance = _chance_overlap(migu_summaries(data))
        lines += [
            "![MIGU mask overlap](migu_overlap.png)",
            "",
            "Left: per layer, the Jaccard overlap |A∩B|/|A∪B| of the units kept (largest mean output "
            "magnitude) in a phase and in the one before; right: the same averaged over layers for every "
            "pair of phases. Low values off the diagonal mean the domains light up different units"
            + (f"; two independent random sets of this size overlap about {chance:.2f}." if chance else "."),
            "",
        ]
    if "migu_magnitudes.png" in pictures:
        lines += [
            "![MIGU output magnitudes](migu_magnitudes.png)",
            "",
            "Per phase and layer, the spread of the L1-normalised output magnitudes over a layer's units "
            "(x d_out, so 1 = every unit equal): box 25-75%, whiskers 10-90%, dots min and max, bar the "
            "median; a wide box means a few units carry most of the output, which is what MIGU's top-T "
            "choice relies on.",
            "",
        ]
    method = data.get("method")
    if not pictures and isinstance(method, dict) and method.get("name") == "random" and migu_summaries(data):
        lines += [
            "The `random` ablation records no unit magnitudes or kept sets, so it has no MIGU pictures.",
            "",
        ]
    return lines


# -- pictures


def plot_heatmap(data: dict[str, Any], path: str | Path, title: str = "held-out loss") -> Path:
    """The loss matrix as annotated cells; the cell of the domain each phase trained is outlined."""
    domains, phases = data["domains"], data["phases"]
    labels = [_domain_name(d, phases) for d in domains]
    return _matrix_heatmap(data["eval_loss"], domains, labels, phases, phases, path, title, "mean token loss")


def plot_accuracy_heatmap(data: dict[str, Any], path: str | Path, title: str = "accuracy") -> Path:
    """The accuracy matrix the same way, on a fixed 0-1 scale; the task each phase trained is outlined."""
    tasks = data["tasks"]
    trained = trained_tasks(data)
    return _matrix_heatmap(
        data["accuracy"], tasks, tasks, data["phases"], trained, path, title, "accuracy", vrange=(0.0, 1.0)
    )


def _matrix_heatmap(
    matrix: Sequence,
    columns: Sequence[str],
    xlabels: Sequence[str],
    phases: Sequence[str],
    trained: Sequence[str | None],
    path: str | Path,
    title: str,
    label: str,
    vrange: tuple[float, float] | None = None,
) -> Path:
    """Rows = phases (initial first), a cell per column, annotated; NaN and not-evaluated cells grey;
    trained[k-1], the column phase k trained, outlined in red in row k."""
    import matplotlib
    import numpy as np

    rows = max(len(phases) + 1, len(matrix))
    values = np.full((rows, len(columns)), np.nan)
    for i, row in enumerate(matrix):
        if row is not None:
            values[i, : len(row)] = [_as_float(v) for v in row]
    masked = np.ma.masked_invalid(values)
    fig = Figure(figsize=(2.5 + 1.3 * len(columns), 1.4 + 0.55 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    low, high = vrange or ((masked.min(), masked.max()) if masked.count() else (0.0, 1.0))
    image = ax.imshow(masked, cmap=cmap, aspect="auto", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(range(len(columns)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(rows), [row_label(i, phases) for i in range(rows)])
    ax.set_title(title)
    for i in range(rows):
        for j in range(len(columns)):
            v = values[i, j]
            text = _cell_text(_raw_cell(matrix, i, j), "{:.3f}")
            light = math.isfinite(v) and (v - low) < 0.6 * (high - low or 1.0)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if light else "black")
        evaluated = i < len(matrix) and matrix[i] is not None
        if evaluated and 0 < i <= len(trained) and trained[i - 1] in columns:
            j = list(columns).index(trained[i - 1])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return save_figure(fig, path, dpi=100)


def plot_loss_curves(data: dict[str, Any], path: str | Path, title: str = "held-out loss") -> Path:
    """Each domain's held-out loss after each phase; shaded spans name the domain each phase trained."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    _draw_curves(fig.add_subplot(), data, title, legend=True)
    return save_figure(fig, path, dpi=100)


def _draw_curves(
    ax, data: dict[str, Any], title: str, legend: bool, colors: dict[str, str] | None = None
) -> None:
    """The run's held-out losses after each phase, a line per domain in `colors` (by default its own
    domains' order: runs drawn side by side pass one map, or a domain changes colour between panels)."""
    domains, phases, loss = data["domains"], data["phases"], data["eval_loss"]
    colors = colors or domain_colors([domains])
    xs = list(range(len(phases) + 1))
    for k, d in enumerate(phases, 1):
        ax.axvspan(k - 1, k, color="#f0f0f0" if k % 2 else "#e0e0e0", zorder=0)
        ax.text(k - 0.5, 1.0, f"phase {k}\n{d}", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    for j, d in enumerate(domains):
        ys = [_as_float(row[j]) if row is not None and j < len(row) else math.nan for row in loss]
        ys += [math.nan] * (len(xs) - len(ys))
        style = "-" if d in phases else "--"
        label = d if d in phases else f"{d} (eval only)"
        ax.plot(xs, ys[: len(xs)], style, marker="o", color=colors[d], label=label, zorder=2)
    ax.set_xticks(xs, ["initial"] + [str(k) for k in xs[1:]])
    ax.set_xlim(-0.2, len(phases) + 0.2)
    ax.set_xlabel("after phase")
    ax.set_ylabel("held-out loss")
    ax.set_title(title, pad=30)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def domain_colors(domain_lists: list[list[str]]) -> dict[str, str]:
    """One colour per domain over all the lists, in order of first appearance."""
    return {d: f"C{j % 10}" for j, d in enumerate(dict.fromkeys(d for ds in domain_lists for d in ds))}


# -- MIGU pictures

MAX_LAYERS = 30  # more layers than this are shown evenly subsampled, and the titles say so


def migu_summaries(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-phase method summaries of metrics["migu"] (a list, or one dict), in phase order."""
    stats = data.get("migu")
    entries = [stats] if isinstance(stats, dict) else list(stats or [])
    return [e for e in entries if isinstance(e, dict) and e]


def unit_sets(entry: dict[str, Any]) -> dict[str, set[int]]:
    """Per layer, the indices of the units kept in that phase, decoded from its `top_units` bitmaps."""
    from pretrain.methods.migu import decode_units

    top = entry.get("top_units")
    if not isinstance(top, dict):
        return {}
    # d_out is not stored next to the bitmap; its padding bits are 0, so 4 * len decodes the same set
    return {
        name: set(decode_units(bits, 4 * len(bits)))
        for name, bits in top.items()
        if isinstance(bits, str) and re.fullmatch(r"[0-9a-fA-F]+", bits)  # malformed ones are left out
    }


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b|; 1 for two empty sets (as pretrain.methods.migu counts them)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def overlap_matrix(sets: Sequence[dict[str, set[int]]]):
    """Phase x phase matrix of the Jaccard overlap of kept units, averaged over the layers both phases
    have (NaN where they share none)."""
    import numpy as np

    n = len(sets)
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            common = sets[i].keys() & sets[j].keys()
            if common:
                out[i, j] = sum(jaccard(sets[i][k], sets[j][k]) for k in common) / len(common)
    return out


def plot_migu_overlap(data: dict[str, Any], path: str | Path, title: str = "MIGU mask overlap") -> Path:
    """Left: per layer, the Jaccard overlap of kept units with the previous phase; right: the phase x phase
    overlap averaged over layers, from the decoded top sets."""
    entries = [e for e in migu_summaries(data) if unit_sets(e)]
    sets = [unit_sets(e) for e in entries]
    labels = [_phase_label(e, data["phases"]) for e in entries]
    names = _layer_order(n for s in sets for n in s)
    shown, note = _pick_layers(names)
    pairs = list(zip(range(len(sets) - 1), range(1, len(sets)), strict=True))
    per_layer = [[_pair_overlap(sets[i], sets[j], n) for i, j in pairs] for n in shown]
    mean = [_nanmean([_pair_overlap(sets[i], sets[j], n) for n in names]) for i, j in pairs]
    fig = Figure(
        figsize=(4.5 + 1.1 * len(pairs) + 1.0 * len(sets), 2.5 + 0.26 * len(shown)), layout="constrained"
    )
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        2,
        2,
        width_ratios=[len(pairs) + 2.5, len(sets) + 0.5],
        height_ratios=[len(sets) + 1, max(len(shown) - len(sets), 1)],
    )
    left = fig.add_subplot(grid[:, 0])
    steps = [f"{labels[i]}\n→ {labels[j]}" for i, j in pairs]
    image = _overlap_cells(left, [mean] + per_layer, ["mean"] + _short_names(shown), steps)
    left.axhline(0.5, color="white", linewidth=3)
    left.set_title(
        "kept units shared with the\nprevious phase, per layer" + note.replace(" (", "\n("), fontsize=10
    )
    right = fig.add_subplot(grid[0, 1])
    _overlap_cells(right, overlap_matrix(sets).tolist(), labels, labels)
    right.set_title("all phase pairs, mean over layers", fontsize=10)
    fig.colorbar(image, ax=[left, right], label="Jaccard overlap of kept units", shrink=0.6)
    chance = _chance_overlap(entries)
    fig.suptitle(title + (f"\n(independent random sets of this size: about {chance:.2f})" if chance else ""))
    return save_figure(fig, path, dpi=100)


def _overlap_cells(ax, rows: Sequence[Sequence[float]], ylabels: Sequence[str], xlabels: Sequence[str]):
    """Jaccard values as viridis cells on [0, 1], annotated when the grid is small enough to read."""
    import matplotlib
    import numpy as np

    values = np.array(rows, dtype=float).reshape(len(ylabels), len(xlabels))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            text = "—" if math.isnan(v) else f"{v:.2f}"
            color = "white" if not math.isnan(v) and v < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    return image


def plot_migu_magnitudes(
    data: dict[str, Any], path: str | Path, title: str = "MIGU output magnitudes"
) -> Path:
    """One panel per phase, one box per layer from the recorded quantiles of the L1-normalised output
    magnitudes (x d_out: 1 = uniform)."""
    entries = [e for e in migu_summaries(data) if e.get("magnitude_quantiles")]
    names = _layer_order(n for e in entries for n in e["magnitude_quantiles"])
    shown, note = _pick_layers(names)
    fig = Figure(figsize=(2.0 + 2.6 * len(entries), 1.8 + 0.24 * len(shown)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(entries), sharex=True, sharey=True, squeeze=False)[0]
    high = max(max(q) for e in entries for q in e["magnitude_quantiles"].values() if q)
    low = min(min(q) for e in entries for q in e["magnitude_quantiles"].values() if q)
    for ax, e in zip(axes, entries, strict=True):
        stats = [_box_stats(e, n) for n in shown]
        ys = [k for k, st in enumerate(stats) if st is not None]
        ax.bxp(
            [stats[k] for k in ys],
            positions=ys,
            **_horizontal(),
            widths=0.6,
            showfliers=True,
            patch_artist=True,
            boxprops={"facecolor": "#9ecae1"},
            medianprops={"color": "#d62728"},
            flierprops={"marker": ".", "markersize": 3},
        )
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(
            _phase_label(e, data["phases"]) + ("" if e.get("masked", True) else "\n(not masked)"), fontsize=10
        )
        ax.set_xlabel("magnitude x d_out")
        if low > 0 and high / low > 30:
            ax.set_xscale("log")
    axes[0].set_yticks(range(len(shown)), _short_names(shown), fontsize=8)
    axes[0].set_ylim(len(shown) - 0.5, -0.5)
    fig.suptitle(f"{title}{note}\nbox 25-75%, whiskers 10-90%, dots min/max, red bar median; 1 = uniform")
    return save_figure(fig, path, dpi=100)


def _box_stats(entry: dict[str, Any], name: str) -> dict[str, Any] | None:
    """matplotlib bxp statistics from a layer's recorded quantiles (interpolated at the levels we draw)."""
    import numpy as np

    values = entry["magnitude_quantiles"].get(name)
    levels = entry.get("quantiles") or [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    if not values or len(values) != len(levels):
        return None
    at = dict(
        zip(
            (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            np.interp([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], levels, values),
            strict=True,
        )
    )
    return {
        "med": at[0.5],
        "q1": at[0.25],
        "q3": at[0.75],
        "whislo": at[0.1],
        "whishi": at[0.9],
        "fliers": [at[0.0], at[1.0]],
    }


def _horizontal() -> dict[str, Any]:
    """bxp's keyword for horizontal boxes: `orientation` since matplotlib 3.10, `vert` before."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _pair_overlap(a: dict[str, set[int]], b: dict[str, set[int]], name: str) -> float:
    return jaccard(a[name], b[name]) if name in a and name in b else math.nan


def _chance_overlap(entries: Sequence[dict[str, Any]]) -> float | None:
    """Expected Jaccard of two independent random sets keeping a fraction k of the units: k / (2 - k)."""
    fractions = [
        v for e in entries for v in (e.get("expected_kept_fraction") or {}).values() if _is_number(v)
    ]
    if not fractions:
        return None
    k = sum(fractions) / len(fractions)
    return k / (2 - k)


def _pick_layers(names: Sequence[str], limit: int = MAX_LAYERS) -> tuple[list[str], str]:
    """All layers, or `limit` of them evenly spaced, and the note that says so."""
    if len(names) <= limit:
        return list(names), ""
    picks = sorted({round(i * (len(names) - 1) / (limit - 1)) for i in range(limit)})
    return [names[i] for i in picks], f" ({len(picks)} of {len(names)} layers, evenly spaced)"


def _layer_order(names: Iterable[str]) -> list[str]:
    """Distinct layer names by block (the first number in the name), recorded order within a block."""
    unique = list(dict.fromkeys(names))
    block = {n: int(m.group()) if (m := re.search(r"\d+", n)) else -1 for n in unique}
    return sorted(unique, key=lambda n: block[n])


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share ("model.layers.")."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _phase_label(entry: dict[str, Any], phases: Sequence[str]) -> str:
    k = entry.get("phase")
    if isinstance(k, int) and 0 < k <= len(phases):
        return f"{k} {phases[k - 1]}"
    return f"phase {k}"


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


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
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: give the directory comparison.md and .png go to")
    _refuse_foreign(out / "comparison.md", "# Comparison of ")
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(runs, out / "comparison.png")
    write_text_atomic(out / "comparison.md", comparison_markdown(runs))
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
        last = (r.data["eval_loss"] or [None])[-1] or []  # no row yet: an eval job has still to write one
        cells = {d: _cell_text(v, "{:.4f}") for d, v in zip(r.data["domains"], last, strict=False)}
        lines.append(f"| {r.label} | " + " | ".join(cells.get(d, "—") for d in domains) + " |")
    lines += [""] + comparison_section([(r.label, r.data) for r in runs])
    lines += ["## Verdict", "", _verdict(runs), "", "![comparison](comparison.png)", ""]
    lines += ["Definitions and sign conventions: docs/metrics.md in the pretrain repository.", ""]
    return "\n".join(lines)


def plot_comparison(runs: list[RunMetrics], path: str | Path) -> Path:
    """Top: each run's loss curves side by side (shared y axis); bottom: the signed metrics as bars."""
    n = len(runs)
    fig = Figure(figsize=(4.2 * n + 1.5, 8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, n)
    first = None
    # one colour a domain in every panel; each panel its own legend (which domains it has, which are
    # evaluated only): runs in other phase orders, or with other domains, were coloured by position, and
    # the one legend, the last run's, misnamed the others' lines
    colors = domain_colors([r.data["domains"] for r in runs])
    for i, r in enumerate(runs):
        ax = fig.add_subplot(grid[0, i], sharey=first)
        first = first or ax
        _draw_curves(ax, r.data, r.label, legend=False, colors=colors)
        ax.legend(loc="best", fontsize=7)
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
    return save_figure(fig, path, dpi=90)


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
    if any(r.data.get("tasks") for r in runs):  # runs with eval.tasks: their average final accuracy too
        headers.append("final_acc")
        for row, r in zip(rows, runs, strict=True):
            row.append(
                _metric_text("avg_final_accuracy", r.data["accuracy_metrics"].get("avg_final_accuracy"))
            )
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
    done = {r.label: r.data["phases_done"] for r in usable}
    if len(set(done.values())) > 1:  # a run still training: its metrics cover fewer phases
        counts = ", ".join(f"{label} {n}" for label, n in done.items())
        notes.append(
            f"The runs have evaluated different numbers of phases ({counts}): their metrics cover "
            "different phases, so compare them once each has finished the same ones."
        )
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
    elif base.data["avg_forgetting"] <= 0:  # "forgot least" would mislead: nobody forgot
        head = (
            f"No forgetting to reduce: the baseline {base.label} did not forget on average "
            f"(avg_forgetting <= 0). Lowest avg_forgetting: {best.label}, {_versus(best, base)}"
        )
    else:
        head = f"{best.label} forgot least: {_versus(best, base)}"
    beats_base = base not in usable or fb < base.data["avg_forgetting"]
    return " ".join([head, *_accuracy_sentence(runs, best if beats_base else base), *notes])


def _accuracy_sentence(runs: list[RunMetrics], by_loss: RunMetrics) -> list[str]:
    """The verdict on task accuracy (none without two scored runs), and a warning when it favours
    another run than the held-out loss does (the order-1 run: migu by loss, none by accuracy)."""
    text, favoured = accuracy_verdict([(r.label, r.data) for r in runs])
    if favoured is not None and favoured != by_loss.label:
        text += (
            f" Held-out loss ({by_loss.label}) and task accuracy ({favoured}) favour different runs: read "
            "both matrices, and the accuracy's standard errors in each report."
        )
    return [text] if text else []


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
    if set(best.data["domains"]) != set(base.data["domains"]):  # a mean over other held-out sets
        text += " Average final loss not compared: the runs evaluate different domains."
    elif lb is not None and l0 is not None:
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


def _as_set(value: Any) -> str:
    """A config value as a user would have written it (an lr of 1e-05 stays 1e-05)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


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
