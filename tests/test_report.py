"""report.md, the PNGs and the comparison of runs, from metrics.json files built by hand."""

from __future__ import annotations

import json
import math
import re

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.methods.migu import QUANTILES, encode_units
from pretrain.report import (
    ReportError,
    compare_runs,
    format_comparison,
    jaccard,
    overlap_matrix,
    unit_sets,
    write_report,
)

DOMAINS = ["code", "docs", "plays", "news"]
PHASES = ["code", "docs", "plays"]
LOSS = [
    [4.0, 4.0, 4.0, 5.0],
    [2.0, 3.5, 3.8, 5.1],
    [1.7, 2.0, 3.6, 5.2],
    [3.0, 1.8, 1.5, 5.4],
]
VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def write_run(path, loss=LOSS, method="none", **extra):
    path.mkdir(parents=True, exist_ok=True)
    ppl = [None if row is None else [math.exp(v) for v in row] for row in loss]
    data = {"domains": DOMAINS, "phases": PHASES, "eval_loss": loss, "perplexity": ppl, **extra}
    if method is not None:
        data["method"] = {"name": method, "threshold": 0.7}
    (path / "metrics.json").write_text(json.dumps(data))
    return path


def pixels_near(path, rgb, tol=12) -> int:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())


def assert_picture(path, min_w=400, min_h=250, min_colors=50):
    with Image.open(path) as img:
        img.verify()  # a valid PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_w and img.height >= min_h
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) >= min_colors  # not a blank image


def test_report_tables_hold_the_matrix(tmp_path):
    report = write_run(tmp_path / "run").joinpath("report.md")
    assert write_report(tmp_path / "run") == report
    text = report.read_text()
    assert "| | code | docs | plays | news (eval only) |" in text
    assert "| initial | 4.0000 | 4.0000 | 4.0000 | 5.0000 |" in text
    assert "| after phase 2 (docs) | 1.7000 | **2.0000** | 3.6000 | 5.2000 |" in text
    assert "| after phase 3 (plays) | 3.0000 | 1.8000 | **1.5000** | 5.4000 |" in text
    assert f"| after phase 1 (code) | **{math.exp(2.0):.2f}** | {math.exp(3.5):.2f} |" in text  # perplexity
    assert "3 of 3 phases evaluated" in text


def test_report_metrics_section(tmp_path):
    write_report(write_run(tmp_path / "run"))
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| `avg_forgetting` | +0.5500 |" in text  # (1.3 - 0.2) / 2
    assert "| `bwt` | -0.4000 |" in text
    assert "| `plasticity` | +1.8667 |" in text
    assert "| `fwt` | +0.4500 |" in text
    assert "| `avg_final_loss` | 2.9250 |" in text
    assert "| code | 1 | 2.0000 | 1.7000 | 3.0000 | +1.3000 |" in text  # phase, after it, best, final
    assert "| docs | 2 | 2.0000 | 2.0000 | 1.8000 | -0.2000 |" in text
    assert "| news | 5.0000 | 5.4000 | +0.4000 |" in text
    assert "## Method statistics" not in text


def test_report_pictures_show_the_matrix(tmp_path):
    run = write_run(tmp_path / "run")
    write_report(run)
    heatmap, curves = run / "loss_heatmap.png", run / "loss_curves.png"
    assert_picture(heatmap)
    # the lowest cell (1.5) is dark purple and the news column (highest) yellow: whole cells, not just
    # the colour bar's ends
    assert pixels_near(heatmap, VIRIDIS_LOW) > 2000
    assert pixels_near(heatmap, VIRIDIS_HIGH) > 4000
    assert_picture(curves)
    for rgb in TAB10:  # one line per domain, in matplotlib's C0..C3
        assert pixels_near(curves, rgb) > 300, rgb


def test_nan_cell_is_marked_and_metrics_refused(tmp_path):
    loss = [list(r) for r in LOSS]
    loss[2][1] = math.nan
    run = write_run(tmp_path / "run", loss=loss)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "| after phase 2 (docs) | 1.7000 | **NaN (!)** | 3.6000 | 5.2000 |" in text
    assert "**Not computed:** eval_loss of domain 'docs' after phase 2 (docs) (row 2) is nan" in text
    assert "| `avg_forgetting` |" not in text
    assert_picture(run / "loss_heatmap.png")
    assert pixels_near(run / "loss_heatmap.png", (0xDD, 0xDD, 0xDD), tol=2) > 1000  # the grey NaN cell


def test_partial_run(tmp_path):
    run = write_run(tmp_path / "run", loss=LOSS[:2])
    write_report(run)
    text = (run / "report.md").read_text()
    assert "1 of 3 phases evaluated" in text
    assert "| after phase 3 (plays) | — | — | — | — |" in text
    assert "| `bwt` | n/a |" in text and "| `plasticity` | +2.0000 |" in text
    assert "forgetting and bwt need two phases" in text
    assert_picture(run / "loss_curves.png")


def test_report_lists_what_the_run_skipped(tmp_path):
    bad = ["code.jsonl: line 7: not valid JSON"]
    records = {"train": {"code": 3}, "heldout": {"news": 1}, "examples": bad}
    run = write_run(tmp_path / "run", skipped_steps=[4], skipped_records=records)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "## Skipped" in text and "non-finite loss: [4]" in text
    assert "Bad records skipped in code train: 3" in text and "in news heldout: 1" in text
    assert "code.jsonl: line 7: not valid JSON" in text
    write_report(write_run(tmp_path / "clean", skipped_steps=[], skipped_records={}))
    assert "## Skipped" not in (tmp_path / "clean" / "report.md").read_text()


def test_report_lists_the_keys_a_resume_changed(tmp_path):
    change = {"key": "train.lr", "from": 0.01, "to": 0.001, "phase": 2, "step": 5, "global_step": 9}
    write_report(write_run(tmp_path / "run", config_changes=[change]))
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Changed on resume" in text and "- train.lr: 0.01 -> 0.001 (phase 2, from step 6)" in text
    write_report(write_run(tmp_path / "plain"))
    assert "## Changed on resume" not in (tmp_path / "plain" / "report.md").read_text()
    assert "Read with care" not in text  # the lr changes training, not how the rows are scored


def test_report_warns_when_a_resume_changed_how_a_matrix_is_scored(tmp_path):
    blocks = {"key": "eval.max_blocks", "from": 64, "to": 16, "phase": 2, "step": 0, "global_step": 4}
    metric = {"key": "eval.task_metric", "from": "acc", "to": "acc_norm", "phase": 3, "step": 0}
    write_report(write_run(tmp_path / "run", config_changes=[blocks, metric], **ACCURACY))
    text = (tmp_path / "run" / "report.md").read_text()
    loss_note = "changed how the held-out loss matrix is scored (eval.max_blocks 64 -> 16 from phase 2)"
    accuracy_note = "accuracy matrix is scored (eval.task_metric acc -> acc_norm from phase 3)"
    assert loss_note in text and accuracy_note in text
    assert text.index(loss_note) < text.index("## Accuracy on downstream tasks") < text.index(accuracy_note)


def test_method_statistics_generic(tmp_path):
    migu = [
        {"phase": 1, "masked": True, "kept_fraction": {"a": 0.5, "b": 0.7}, "jaccard_with_previous": None},
        {"phase": 2, "masked": True, "kept_fraction": {"a": 0.4, "b": 0.6}, "jaccard_with_previous": 0.3},
        {"phase": 3, "masked": True, "top_units": {"a": "0-3"}, "jaccard_with_previous": 0.5},
    ]
    run = write_run(tmp_path / "run", method="migu", migu=migu)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "Same in every phase: masked=yes." in text  # constant columns leave the table
    assert "| phase | kept_fraction | jaccard_with_previous |" in text  # top_units left out
    assert "| 1 | 0.6000 | — |" in text and "| 2 | 0.5000 | 0.3000 |" in text
    assert "between consecutive phases: 0.4000." in text
    assert "migu_overlap.png" not in text  # "0-3" is no bitmap of two phases: no pictures
    assert not (run / "migu_overlap.png").exists() and not (run / "migu_magnitudes.png").exists()


D_OUT = 10
LAYERS = [f"model.layers.{b}.{kind}" for b in range(3) for kind in ("attn.q_proj", "mlp.up_proj")]


def bitmap(units):
    mask = torch.zeros(D_OUT, dtype=torch.bool)
    mask[list(units)] = True
    return encode_units(mask)


def migu_stats(kept=((0, 1, 2), (0, 1, 5), (6, 7, 8)), masked=(False, True, True)):
    """One summary per phase as GradientMask.end_phase writes them: phase k keeps the units kept[k - 1]
    in every layer; magnitudes spread wider in later phases."""
    stats, previous = [], None
    for k, (units, on) in enumerate(zip(kept, masked, strict=True), 1):
        spread = 0.2 * k
        quantiles = [
            1 - 3 * spread,
            1 - spread,
            1 - spread / 2,
            1.0,
            1 + spread / 2,
            1 + spread,
            1 + 3 * spread,
        ]
        overlap = None if previous is None else len(previous & set(units)) / len(previous | set(units))
        stats.append(
            {
                "phase": k,
                "method": "migu",
                "masked": on,
                "threshold": 0.7,
                "kept_fraction": {n: 0.3 for n in LAYERS} if on else {},
                "expected_kept_fraction": {n: 0.3 for n in LAYERS},
                "quantiles": list(QUANTILES),
                "magnitude_quantiles": {n: [max(q, 0.01) for q in quantiles] for n in LAYERS},
                "jaccard_with_previous": overlap,
                "jaccard_per_layer": {} if overlap is None else {n: overlap for n in LAYERS},
                "top_units": {n: bitmap(units) for n in LAYERS},
            }
        )
        previous = set(units)
    return stats


def test_jaccard_and_overlap_matrix_of_hand_made_sets():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5 and jaccard(set(), set()) == 1.0 and jaccard({1}, {2}) == 0.0
    sets = [
        {"a": {0, 1, 2}, "b": {0, 1}},
        {"a": {0, 1, 5}, "b": {2, 3}},
        {"a": {6, 7, 8}},  # layer b missing: the mean is over the layers both phases have
    ]
    m = overlap_matrix(sets)
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert m[0, 2] == 0.0 and m[1, 2] == 0.0
    assert np.isnan(overlap_matrix([{"a": {1}}, {"b": {1}}])[0, 1])  # no layer in common


def test_unit_sets_decode_the_bitmaps():
    entry = migu_stats()[1]
    assert unit_sets(entry) == {n: {0, 1, 5} for n in LAYERS}
    assert unit_sets({"top_units": {"x": bitmap([9])}}) == {"x": {9}}  # the last unit of a padded digit
    assert unit_sets({"kept_fraction": {"x": 0.3}}) == {}  # a `random` summary records no sets


def test_migu_pictures(tmp_path):
    run = write_run(tmp_path / "run", method="migu", migu=migu_stats())
    write_report(run)
    text = (run / "report.md").read_text()
    overlap, magnitudes = run / "migu_overlap.png", run / "migu_magnitudes.png"
    assert (
        "![MIGU mask overlap](migu_overlap.png)" in text
        and "![MIGU output magnitudes](migu_magnitudes.png)" in text
    )
    assert text.index("## Method statistics") < text.index("migu_overlap.png") < text.index("## Pictures")
    assert "two independent random sets of this size overlap about 0.18." in text  # 0.3 / 1.7
    assert "| phase | masked | kept_fraction | jaccard_with_previous |" in text
    assert "Same in every phase: method=migu, threshold=0.7000, expected_kept_fraction=0.3000." in text
    assert_picture(overlap, min_w=600, min_h=300)
    # cells of overlap 1 (the diagonal) are bright yellow, cells of 0 (phases 1, 2 vs 3) dark purple
    assert pixels_near(overlap, VIRIDIS_HIGH) > 2000
    assert pixels_near(overlap, VIRIDIS_LOW) > 2000
    assert_picture(magnitudes, min_w=600, min_h=300)
    assert pixels_near(magnitudes, (0x9E, 0xCA, 0xE1), tol=4) > 3000  # the boxes: 6 layers x 3 phases
    assert pixels_near(magnitudes, (214, 39, 40), tol=20) > 50  # the red medians


def test_migu_pictures_subsample_many_layers(tmp_path):
    stats = migu_stats()
    many = [f"model.layers.{i}.mlp.up_proj" for i in range(80)]
    for e in stats:
        e["top_units"] = dict.fromkeys(many, e["top_units"][LAYERS[0]])
        e["magnitude_quantiles"] = dict.fromkeys(many, e["magnitude_quantiles"][LAYERS[0]])
    run = write_run(tmp_path / "run", method="migu", migu=stats)
    write_report(run)
    with Image.open(run / "migu_magnitudes.png") as img:
        assert img.height < 1400  # 30 rows drawn, not 80
    assert_picture(run / "migu_overlap.png")


def test_no_migu_pictures_without_unit_data(tmp_path):
    none = write_run(tmp_path / "none")
    write_report(none)
    assert not list(none.glob("migu_*.png"))
    assert "MIGU" not in (none / "report.md").read_text()
    rand = [{k: e[k] for k in ("phase", "method", "masked", "kept_fraction")} for e in migu_stats()]
    random = write_run(tmp_path / "random", method="random", migu=rand)
    write_report(random)
    assert not list(random.glob("migu_*.png"))
    assert "records no unit magnitudes or kept sets" in (random / "report.md").read_text()


def test_missing_metrics_json(tmp_path):
    with pytest.raises(ReportError, match="no metrics.json"):
        write_report(tmp_path)


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "is not valid JSON"), ('{"eval_loss": [', "is not valid JSON"), ("[]", "holds a list")],
)
def test_an_unreadable_metrics_json_is_named(tmp_path, text, why):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(ReportError, match=f"metrics.json {why}"):
        write_report(tmp_path)


_RUN = '"domains": ["a", "b"], "phases": ["a", "b"], "eval_loss": [[1, 2]], "perplexity": [[3, 7]]'


@pytest.mark.parametrize(
    ("fields", "why"),
    [  # hand edits that were tracebacks (TypeError, KeyError, IndexError) in report and compare
        (
            '"domains": ["a"], "phases": null, "eval_loss": [], "perplexity": []',
            "`phases` is not a list of names",
        ),
        (
            '"domains": ["a"], "phases": ["a"], "eval_loss": null, "perplexity": []',
            "`eval_loss` is not a list",
        ),
        (_RUN + ', "accuracy": [[0.5]]', "accuracy row 0 is not a list of 0 numbers"),
        (_RUN + ', "tasks": ["t"], "accuracy": [0.5]', "accuracy row 0 is not a list of 1 numbers"),
        (
            _RUN + ', "eval_curve": [{"loss": [1]}]',
            "`eval_curve` is not a list of points with a loss for each",
        ),
    ],
)
def test_a_metrics_json_of_the_wrong_shape_is_named(tmp_path, fields, why):
    (tmp_path / "metrics.json").write_text("{" + fields + "}")
    with pytest.raises(ReportError, match=f"metrics.json does not hold a run's results .*{re.escape(why)}"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match=re.escape(why)):
        compare_runs([tmp_path, tmp_path], tmp_path / "cmp", echo=False)


def test_phases_evaluated_count_the_rows_after_the_initial_one(tmp_path):
    # an eval job's `--phase 2` alone said "0 of 3 phases evaluated" (row 0 was taken as present)
    write_report(write_run(tmp_path, loss=[None, None, LOSS[2]]))
    assert "1 of 3 phases evaluated" in (tmp_path / "report.md").read_text()


def test_a_run_with_no_row_yet_is_reported_and_compared(tmp_path):
    # eval.inline false: the trainer writes the file before any eval job has filled row 0
    empty = write_run(tmp_path / "empty", loss=[], method="migu")
    write_report(empty)
    assert "0 of 3 phases evaluated" in (empty / "report.md").read_text()
    text = compare_runs([write_run(tmp_path / "done"), empty], tmp_path / "cmp").read_text()
    assert "| migu | — | — | — | — |" in text  # its final losses: none yet


def three_runs(tmp_path):
    none = write_run(tmp_path / "a", method="none")  # avg_forgetting 0.55, plasticity 1.8667
    rand = [list(r) for r in LOSS]
    rand[3][0] = 2.5  # code forgets less: 0.8 -> avg 0.3
    random = write_run(tmp_path / "b", loss=rand, method="random")
    migu = [list(r) for r in LOSS]
    migu[3][0], migu[3][2] = 1.8, 2.1  # code: 0.1 -> avg -0.05; plays only drops 3.6 -> 2.1 (1.5)
    return [none, random, write_run(tmp_path / "c", loss=migu, method="migu")]


def test_compare_names_the_run_that_forgot_least(tmp_path, capsys):
    out = compare_runs(three_runs(tmp_path), tmp_path / "cmp")
    assert out == tmp_path / "cmp" / "comparison.md"
    text = out.read_text()
    assert "| none | +0.5500 | -0.4000 | +1.8667 |" in text
    assert "| migu | -0.0500 |" in text
    plasticity = (2.0 + 1.5 + 1.5) / 3
    verdict = (
        f"migu forgot least: avg_forgetting -0.0500 vs 0.5500 for none (109% less), at a plasticity cost "
        f"of {1.8667 - plasticity:.4f} (plasticity {plasticity:.4f} vs 1.8667"
    )
    assert verdict in text and verdict in capsys.readouterr().out
    assert_picture(tmp_path / "cmp" / "comparison.png", min_w=900, min_h=500)
    for rgb in TAB10[:3]:  # the three runs' bars
        assert pixels_near(tmp_path / "cmp" / "comparison.png", rgb) > 1000, rgb


def test_compare_picture_colours_a_domain_alike_in_every_panel_and_labels_each(tmp_path, monkeypatch):
    # colours went by a domain's position in each run, so runs in other phase orders swapped them, and
    # the only legend, the last run's, named the other panels' lines wrongly
    order2 = [LOSS[0], [3.5, 2.0, 3.8, 5.1], [2.0, 1.7, 3.6, 5.2], [1.8, 3.0, 1.5, 5.4]]
    runs = [write_run(tmp_path / "a"), write_run(tmp_path / "b", loss=order2, method="migu")]
    data = json.loads((runs[1] / "metrics.json").read_text())
    data.update(domains=["docs", "code", "plays", "news"], phases=["docs", "code", "plays"])
    (runs[1] / "metrics.json").write_text(json.dumps(data))
    figures = []
    monkeypatch.setattr("pretrain.report.save_figure", lambda fig, path, dpi: figures.append(fig) or path)
    compare_runs(runs, tmp_path / "cmp")
    panels = [ax for ax in figures[-1].axes if ax.get_legend() is not None][:2]
    colour = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in panels]
    assert colour[0] == colour[1] and len(set(colour[0].values())) == 4
    assert [sorted(t.get_text() for t in ax.get_legend().get_texts()) for ax in panels] == [
        sorted(colour[0])
    ] * 2


def test_compare_when_the_baseline_forgot_least(tmp_path):
    runs = three_runs(tmp_path)
    text = format_comparison([runs[2], runs[0]])
    assert text.splitlines()[0].split() == [
        "run",
        "forgetting",
        "bwt",
        "plasticity",
        "fwt",
        "final_loss",
        "final_ppl",
    ]
    assert text.splitlines()[1].split()[:2] == ["migu", "-0.0500"]
    assert "No run forgot less than the baseline migu (avg_forgetting -0.0500)." in text


def test_compare_says_when_the_baseline_did_not_forget(tmp_path):
    # later phases improved the earlier domains of both runs: avg_forgetting -0.1 and -0.2
    base = [[4, 4, 4, 5], [2.0, 3.5, 3.8, 5], [1.9, 2.0, 3.6, 5], [1.8, 1.9, 1.5, 5]]
    other = [[4, 4, 4, 5], [2.5, 3.5, 3.8, 5], [2.3, 2.5, 3.6, 5], [2.1, 2.3, 2.0, 5]]
    text = format_comparison([write_run(tmp_path / "a", base), write_run(tmp_path / "b", other, "migu")])
    assert "No forgetting to reduce: the baseline none did not forget on average" in text
    lowest = "Lowest avg_forgetting: migu, avg_forgetting -0.2000 vs -0.1000 for none, at a plasticity cost"
    assert lowest in text
    assert "forgot least" not in text


def test_compare_labels_and_unusable_runs(tmp_path):
    a = write_run(tmp_path / "first", method=None)
    b = write_run(tmp_path / "x" / "dup", method="migu")
    c = write_run(tmp_path / "y" / "dup", method="migu", loss=LOSS[:2])
    text = format_comparison([a, b, c])
    assert text.splitlines()[1].startswith("first ")  # no method: the directory's name
    assert "migu (dup) #2" in text and "migu (dup) #3" in text
    assert "migu (dup) #3 has no forgetting metrics (fewer than two phases evaluated)." in text


def test_compare_labels_say_what_else_a_run_trained_with(tmp_path):
    # labelled by method name alone, replay, EWC and LoRA runs of one method read as "migu (dir)"
    from conftest import tiny_run_config, write_config

    from pretrain.config import load_config, save_config

    path = write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml")
    recipes = {
        "plain": ["method.name=migu"],
        "replay": ["method.name=migu", "replay.share=0.05"],
        "ewc": ["regularisation.kind=ewc", "regularisation.weight=0.1"],
        "lora": ["method.name=migu", "method.start_phase=2", "lora.r=8"],
    }
    runs = []
    for name, overrides in recipes.items():
        runs.append(write_run(tmp_path / name, method=load_config(path, overrides).method.name))
        save_config(load_config(path, overrides), runs[-1] / "config.yaml")
    runs.append(write_run(tmp_path / "bare", method="random"))  # metrics.json alone: the method's name
    rows = [line.split("  ")[0] for line in format_comparison(runs).splitlines()[1:6]]
    assert rows == ["migu", "migu + replay 5%", "none + ewc (w 0.1)", "migu + lora r8", "random"]


def test_compare_says_when_the_runs_have_evaluated_different_numbers_of_phases(tmp_path):
    done = write_run(tmp_path / "done", method="none")
    partway = write_run(tmp_path / "partway", loss=LOSS[:3], method="migu")  # phase 3 still training
    text = format_comparison([done, partway])
    assert "evaluated different numbers of phases (none 3, migu 2)" in text
    assert "evaluated different numbers" not in format_comparison([done, write_run(tmp_path / "b")])


# Accuracy on downstream tasks (eval.tasks): t_code linked to the code domain, general evaluated only;
# in eighths as in tests/test_metrics.py, so the printed values are exact
ACCURACY = {
    "tasks": ["t_code", "general"],
    "task_domains": {"t_code": "code"},
    "accuracy": [[4 / 8, 5 / 8], [6 / 8, 5 / 8], [7 / 8, 4 / 8], [4 / 8, 2 / 8]],
    "task_docs": {"t_code": 8, "general": 8},
    "harness": "0.4.13",
    "task_metric": "acc",
}


def test_report_shows_the_accuracy_matrix_its_metrics_and_picture(tmp_path):
    run = write_run(tmp_path / "run", **ACCURACY)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "## Accuracy on downstream tasks" in text and "lm-evaluation-harness 0.4.13 (`acc`: " in text
    assert "| | t_code | general |" in text
    assert "| initial | 0.5000 | 0.6250 |" in text
    assert "| after phase 1 (code) | **0.7500** | 0.6250 |" in text  # phase 1 trains t_code's domain
    assert "| after phase 3 (plays) | 0.5000 | 0.2500 |" in text  # plays trains no task: nothing bold
    assert "| `avg_final_accuracy` | 0.3750 |" in text  # (4/8 + 2/8) / 2
    assert "| `avg_forgetting` | +0.3750 |" in text  # best since phase 1: 7/8 (row 2), last 4/8
    assert "| `bwt` | -0.2500 |" in text and "| `plasticity` | +0.2500 |" in text  # 4/8 - 6/8; 6/8 - 4/8
    assert "| `fwt` | n/a |" in text  # t_code is first trained in phase 1
    assert "| general | 0.6250 | 0.2500 | -0.3750 |" in text  # evaluated only: change = final - initial
    # one of 8 documents is 0.125; the final standard error of t_code: sqrt(0.5 * 0.5 / 8)
    assert (
        f"t_code 8 (one document = 0.1250, final standard error sqrt(p(1-p)/n) = {math.sqrt(1 / 32):.4f})"
        in text
    )
    assert "## Held-out loss" in text and "| `avg_forgetting` | +0.5500 |" in text  # the loss part as before
    heatmap = run / "accuracy_heatmap.png"
    assert_picture(heatmap)
    # on the fixed 0-1 scale each cell has viridis' colour of its accuracy (a scale from the data's own
    # range would paint 0.25 in the darkest purple): whole cells, not just the colour bar
    for value in (0.25, 0.875):
        rgb = tuple(round(255 * c) for c in matplotlib.colormaps["viridis"](value)[:3])
        assert pixels_near(heatmap, rgb, tol=3) > 3000, value


def test_report_accuracy_partway_and_with_a_missing_cell(tmp_path):
    partway = {**ACCURACY, "accuracy": ACCURACY["accuracy"][:2]}
    text = write_report(write_run(tmp_path / "a", **partway)).read_text()
    assert "| after phase 2 (docs) | — | — |" in text and "| `bwt` | n/a |" in text
    missing = {**ACCURACY, "accuracy": [[0.5, 0.625], [0.75, None]]}  # a task added on a resume
    text = write_report(write_run(tmp_path / "b", **missing)).read_text()
    assert "| after phase 1 (code) | **0.7500** | — |" in text
    assert "| `plasticity` | +0.2500 |" in text  # of t_code alone: 6/8 - 4/8
    assert "Left out of the metrics above, not scored in every row: general (rows 1)." in text
    none_whole = {**ACCURACY, "accuracy": [[0.5, None], [None, 0.5]]}
    text = write_report(write_run(tmp_path / "d", **none_whole)).read_text()
    assert "**Metrics not computed:** no task is scored in every row yet (task 't_code': rows [1]" in text
    assert "## Accuracy" not in write_report(write_run(tmp_path / "c")).read_text()  # no eval.tasks


def test_compare_shows_both_matrices(tmp_path, capsys):
    none = write_run(tmp_path / "a", **ACCURACY)
    better = {**ACCURACY, "accuracy": [*ACCURACY["accuracy"][:3], [6 / 8, 3 / 8]]}
    migu = write_run(tmp_path / "b", method="migu", **better)
    text = compare_runs([none, migu], tmp_path / "cmp").read_text()
    assert "| none | +0.5500 | -0.4000 |" in text  # the loss metrics as before
    assert "| run | `avg_final_accuracy` | `avg_forgetting` | `bwt` | `plasticity` | `fwt` |" in text
    assert "| none | 0.3750 | +0.3750 | -0.2500 | +0.2500 | n/a |" in text
    assert "| migu | 0.5625 | +0.1250 | +0.0000 | +0.2500 | n/a |" in text  # 7/8 best, 6/8 last
    assert "| run | t_code | general |" in text and "| migu | 0.7500 | 0.3750 |" in text
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "final_acc" and table[2].split()[-1] == "0.5625"
    assert format_comparison([write_run(tmp_path / "c")]).splitlines()[0].split()[-1] == "final_ppl"


def test_compare_verdict_reads_accuracy_and_says_when_it_disagrees_with_loss(tmp_path):
    better = {**ACCURACY, "accuracy": [*ACCURACY["accuracy"][:3], [6 / 8, 3 / 8]]}
    none = write_run(tmp_path / "a", **ACCURACY)
    same_loss = write_run(tmp_path / "b", method="migu", **better)  # higher accuracy, the same losses
    text = format_comparison([none, same_loss])
    assert "No run forgot less than the baseline none" in text
    assert (
        "On downstream tasks migu ended highest: average final accuracy 0.5625, accuracy forgetting "
        "+0.1250 vs average final accuracy 0.3750, accuracy forgetting +0.3750 for none." in text
    )
    assert "Held-out loss (none) and task accuracy (migu) favour different runs" in text
    loss = [list(r) for r in LOSS]
    loss[3][0] = 1.8  # code forgets less: migu wins on loss too
    agrees = write_run(tmp_path / "c", loss=loss, method="migu", **better)
    text = format_comparison([none, agrees])
    assert "migu forgot least" in text and "On downstream tasks migu ended highest" in text
    assert "favour different runs" not in text
    worse = {**ACCURACY, "accuracy": [*ACCURACY["accuracy"][:3], [3 / 8, 2 / 8]]}  # migu wins on loss only
    text = format_comparison([none, write_run(tmp_path / "d", loss=loss, method="migu", **worse)])
    assert "No run ended with a higher average task accuracy than none (average final accuracy 0.3750" in text
    assert "Held-out loss (migu) and task accuracy (none) favour different runs" in text
    text = format_comparison([write_run(tmp_path / "e"), write_run(tmp_path / "f", loss=loss, method="migu")])
    assert "task accuracy" not in text and "On downstream tasks" not in text  # no eval.tasks: loss only


def test_compare_does_not_rank_accuracy_scored_on_fewer_phases(tmp_path):
    # a run whose last phase's scoring failed (loss rows complete, accuracy one row short) was ranked by its
    # accuracy after phase 2 against the other's after phase 3, with no word
    none = write_run(tmp_path / "a", **ACCURACY)
    short = {**ACCURACY, "accuracy": [[0.5, 0.625], [7 / 8, 7 / 8], [7 / 8, 7 / 8]]}
    text = format_comparison([none, write_run(tmp_path / "b", method="migu", **short)])
    assert (
        "Task accuracy not compared: the runs have scored different numbers of phases (none 3, migu 2)"
        in text
    )
    assert "ended highest" not in text
    table = compare_runs([none, tmp_path / "b"], tmp_path / "cmp").read_text()
    assert "| migu (after phase 2 (docs)) | 0.8750 | 0.8750 |" in table


def test_compare_does_not_rank_averages_over_different_tasks_or_domains(tmp_path):
    # a run scoring only the easy task (or with the hard one added on a resume, not scored back yet) was
    # declared highest over one scoring lower on both; a baseline's extra evaluated-only domain moved its
    # average final loss, which the verdict set against the other's
    none = write_run(tmp_path / "a", **ACCURACY)
    easy_only = {**ACCURACY, "tasks": ["general"], "task_domains": {}, "task_docs": {"general": 8}}
    easy_only["accuracy"] = [[row[1] + 0.125] for row in ACCURACY["accuracy"]]  # above none on general
    text = format_comparison([none, write_run(tmp_path / "b", method="migu", **easy_only)])
    assert (
        "Task accuracy not compared: the runs' averages cover different tasks or metrics (none: general, "
        "t_code (acc); migu: general (acc))" in text
    )
    assert "ended highest" not in text
    added = {**ACCURACY, "accuracy": [[None, 5 / 8], [None, 5 / 8], [7 / 8, 4 / 8], [7 / 8, 4 / 8]]}
    text = format_comparison([none, write_run(tmp_path / "c", method="migu", **added)])
    assert "migu: general (acc)" in text and "ended highest" not in text
    loss = [[*row[:3]] for row in LOSS]  # no evaluated-only news, and code forgets less
    loss[3][0] = 1.8
    fewer = write_run(tmp_path / "d", loss=loss, method="migu", domains=DOMAINS[:3])
    text = format_comparison([write_run(tmp_path / "e"), fewer])
    assert "migu forgot least" in text
    assert "Average final loss not compared: the runs evaluate different domains" in text


def test_a_report_rerun_that_fails_midway_leaves_the_last_report_and_pictures_whole(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    write_report(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "metrics.json"}
    pictures = [name for name in before if name.endswith(".png")]
    assert pictures and "report.md" in before
    write_run(run, loss=[*LOSS[:3], [2.5, 2.2, 1.4, 5.6]])  # the run has moved on: every file would change
    written = []

    def disk_full(fd):  # each file's bytes are written, then the disk cannot take them (ENOSPC at flush)
        written.append(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pretrain.atomic.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_report(run)
    monkeypatch.undo()
    assert written  # the failure came mid-write, not before it
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "metrics.json"}
    assert after == before  # no torn file, no temporary left
    for name in pictures:
        assert_picture(run / name)


def test_report_and_compare_refuse_to_write_over_a_users_file_of_that_name(tmp_path):
    run = write_run(tmp_path / "run")
    write_report(run)
    write_report(run)  # its own report.md is rewritten
    notes = "my notes on this run\n"
    (run / "report.md").write_text(notes)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ReportError, match=r"report\.md exists and was not written by pretrain"):
        write_report(run)
    assert (run / "report.md").read_text() == notes and sorted(p.name for p in run.iterdir()) == before
    other = write_run(tmp_path / "other")
    cmp = tmp_path / "cmp"
    compare_runs([run, other], cmp, echo=False)
    compare_runs([run, other], cmp, echo=False)  # its own comparison.md is rewritten
    (cmp / "comparison.md").write_text(notes)
    with pytest.raises(ReportError, match=r"comparison\.md exists and was not written by pretrain"):
        compare_runs([run, other], cmp, echo=False)
    assert (cmp / "comparison.md").read_text() == notes
    (tmp_path / "a-file").write_text(notes)
    with pytest.raises(ReportError, match="--out .*a-file is a file"):
        compare_runs([run, other], tmp_path / "a-file", echo=False)
    assert (tmp_path / "a-file").read_text() == notes
