"""The forgetting curves (eval.every): each domain's held-out loss over the whole run, by optimizer step.

Phase boundaries are shaded and named, so the picture shows when, inside a phase, an earlier domain's
loss rose. Reads metrics.json's `eval_curve`; a run without it (eval.every: 0) gets no picture.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.atomic import save_figure

PICTURE = "eval_curve.png"


def phase_spans(curve: list[dict[str, Any]], phases: list[str]) -> list[tuple[int, int, str]]:
    """(first global step, last global step, domain) of each phase the curve reaches."""
    spans = []
    start = 0
    for k, domain in enumerate(phases, 1):
        points = [p["global_step"] for p in curve if p["phase"] == k]
        if not points:
            break
        end = max(points)
        spans.append((start, end, domain))
        start = end
    return spans


def plot_eval_curve(data: dict[str, Any], path: str | Path, title: str) -> Path | None:
    """eval_curve.png: one line per domain (dashed: evaluated only) against the global step."""
    curve = data.get("eval_curve") or []
    if not curve:
        return None
    domains, phases = data["domains"], data["phases"]
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, (start, end, domain) in enumerate(phase_spans(curve, phases), 1):
        ax.axvspan(start, end, color="#f0f0f0" if k % 2 else "#e0e0e0", zorder=0)
        middle = (start + end) / 2
        ax.text(
            middle, 1.0, f"phase {k}\n{domain}", transform=ax.get_xaxis_transform(), ha="center", va="bottom"
        )
    steps = [p["global_step"] for p in curve]
    for j, d in enumerate(domains):
        losses = [p["loss"][j] for p in curve]
        style = "-" if d in phases else "--"
        ax.plot(
            steps,
            losses,
            style,
            marker=".",
            color=f"C{j % 10}",
            label=d if d in phases else f"{d} (eval only)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss")
    ax.set_title(title, pad=30)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path, dpi=100)


def curve_section(data: dict[str, Any]) -> list[str]:
    """report.md's lines for the curves: the picture and, per earlier domain, its worst rise in a phase."""
    curve = data.get("eval_curve") or []
    if not curve:
        return []
    lines = [
        "## Forgetting curves",
        "",
        f"Every domain's held-out loss every `eval.every` optimizer steps ({len(curve)} points).",
        "",
        f"![forgetting curves]({PICTURE})",
        "",
    ]
    rises = _largest_rises(curve, data["domains"], data["phases"])
    if rises:
        lines += ["| domain | largest rise inside a later phase | phase | at step |", "|---|---|---|---|"]
        lines += [_rise_row(*rise) for rise in rises]
        lines.append("")
    return lines


def _rise_row(domain: str, best: tuple | None, nonfinite: tuple | None) -> str:
    note = "" if nonfinite is None else f" (non-finite at phase {nonfinite[0]}, step {nonfinite[1]})"
    if best is None:
        return f"| {domain} | —{note} | — | — |"
    rise, phase, step = best
    return f"| {domain} | {rise:+.4f}{note} | {phase} | {step} |"


def _largest_rises(curve: list[dict[str, Any]], domains: list[str], phases: list[str]):
    """Per trained domain: (domain, (rise, phase, step) of the largest finite loss above its value at the
    end of its own last phase so far seen inside a later phase, the peak of forgetting that a phase-end
    matrix may not show; (phase, step) of the first non-finite rise, or None). A NaN is kept apart: once
    the largest, every later comparison with it was false and hid the real peak."""
    out = []
    for j, d in enumerate(domains):
        if d not in phases:
            continue
        trained_end = {k for k, p in enumerate(phases, 1) if p == d}
        best = nonfinite = None
        seen = False
        for point in curve:
            base = [p for p in curve if p["phase"] in trained_end and p["phase"] < point["phase"]]
            if not base:
                continue
            seen = True
            rise = _finite(point["loss"][j]) - _finite(max(base, key=lambda p: p["global_step"])["loss"][j])
            if not math.isfinite(rise):
                nonfinite = nonfinite or (point["phase"], point["step"])
            elif best is None or rise > best[0]:
                best = (rise, point["phase"], point["step"])
        if seen:
            out.append((d, best, nonfinite))
    return out


def _finite(value: Any) -> float:
    """A loss as a float; None (not evaluated) as NaN, which the caller keeps apart."""
    return math.nan if value is None else float(value)
