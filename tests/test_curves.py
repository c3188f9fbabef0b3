"""The forgetting curves of eval.every: phase spans, the largest rise of an earlier domain, the picture."""

from __future__ import annotations

import pytest

from pretrain.curves import curve_section, phase_spans, plot_eval_curve


def _point(phase, step, global_step, loss):
    return {"phase": phase, "step": step, "global_step": global_step, "loss": loss}


DATA = {
    "domains": ["code", "docs", "news"],  # news: evaluated only
    "phases": ["code", "docs"],
    "eval_curve": [
        _point(0, 0, 0, [5.0, 5.0, 5.0]),
        _point(1, 2, 2, [4.0, 4.8, 4.9]),
        _point(1, 4, 4, [3.0, 4.7, 4.8]),  # code's end: its reference
        _point(2, 2, 6, [3.75, 4.0, 4.7]),  # code forgot most here, mid-phase
        _point(2, 4, 8, [3.5, 3.0, 4.6]),  # and recovered some by the phase end
    ],
}


def test_phase_spans_follow_the_global_steps():
    assert phase_spans(DATA["eval_curve"], DATA["phases"]) == [(0, 4, "code"), (4, 8, "docs")]


def test_the_largest_rise_is_the_mid_phase_peak_not_the_phase_end():
    lines = curve_section(DATA)
    assert "| code | +0.7500 | 2 | 2 |" in lines  # 3.75 - 3.0, at phase 2 step 2; the end shows +0.5
    assert not any(line.startswith("| docs |") or line.startswith("| news |") for line in lines)


def test_a_nan_point_is_named_and_does_not_hide_the_peak():
    # once a NaN rise was the largest, every later `rise > nan` was false: the table showed +nan
    curve = [*DATA["eval_curve"][:4], _point(2, 3, 7, [float("nan"), 4.0, 4.7]), *DATA["eval_curve"][4:]]
    curve.append(_point(2, 5, 9, [4.5, 3.0, 4.6]))
    lines = curve_section({**DATA, "eval_curve": curve})
    assert "| code | +1.5000 (non-finite at phase 2, step 3) | 2 | 5 |" in lines


def test_the_picture_is_drawn_and_a_run_without_a_curve_gets_none(tmp_path):
    path = plot_eval_curve(DATA, tmp_path / "eval_curve.png", title="t")
    assert path.is_file() and path.stat().st_size > 10_000
    no_curve = {**DATA, "eval_curve": []}
    assert plot_eval_curve(no_curve, tmp_path / "none.png", title="t") is None
    assert curve_section(no_curve) == []


@pytest.mark.parametrize("cut", [1, 3])
def test_a_run_still_in_its_first_phases_has_spans_for_those_only(cut):
    curve = DATA["eval_curve"][:cut]
    assert len(phase_spans(curve, DATA["phases"])) == (0 if cut == 1 else 1)
