"""Accuracy on a downstream task, end to end: a 2-rank ZeRO-3 run scores a continual-learning benchmark
task (the vendored copa slice) with lm-evaluation-harness after every phase.

Phase 1 trains on copa's own text (the task is linked to it), phase 2 on news. The first launch is killed
as rank 0 scores phase 1's row; the resume scores it and trains phase 2 (so the numbers below are those
of a run resumed at a phase's checkpoint, which an uninterrupted run gives too). The run's
accuracy matrix is checked against its definitions, against lm-eval's own evaluation of the same export
(the harness loading the model itself, from the task YAML `pretrain tasks yaml` writes), and against
what a `pretrain eval` job computes for a row; TensorBoard, the report and compare show it.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import REPO, assert_ok, run_deepspeed, tiny_run_config, write_config

pytestmark = pytest.mark.distributed

COPA = REPO / "tests" / "data" / "cl_benchmark" / "copa"
DOCS = 40  # test records in the vendored slice: every accuracy is a multiple of 1/40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accuracy")
    cfg = tiny_run_config(tmp, stage=3, domains=("news",), steps=3, eval={"tasks": [str(COPA)]})
    # copa's train records are its own domain (held out: its test records' text, which no phase trains)
    cfg["domains"].insert(
        0, {"name": "copa", "train": [str(COPA / "train.jsonl")], "heldout": [str(COPA / "test.jsonl")]}
    )
    cfg["phases"].insert(0, {"domain": "copa", "steps": 3})
    cfg["eval"]["task_domains"] = {"cl_copa": "copa"}
    train = ["pretrain", "train", "--config", str(write_config(cfg, tmp / "run.yaml"))]
    os.environ["PRETRAIN_FAULT"] = "kill_scoring:1"  # SIGKILL to rank 0 as it scores phase 1's row
    try:
        killed = run_deepspeed(train)
    finally:
        del os.environ["PRETRAIN_FAULT"]
    resumed = run_deepspeed([*train, "--resume"])
    assert_ok(resumed)
    logs = {"killed": killed.returncode, "resumed": resumed.stdout + resumed.stderr}
    (tmp / "launches.json").write_text(json.dumps(logs))
    return tmp / "run"


def test_a_kill_while_scoring_costs_the_scoring_not_the_phase(run):
    # the phase's checkpoint came after its scoring: a scoring error or a kill then (minutes of lm-eval)
    # lost the phase, and a requeue trained it again
    logs = json.loads((run.parent / "launches.json").read_text())
    assert logs["killed"] != 0
    assert "resumed from phase-1: phase 2, step 0" in logs["resumed"]
    assert "phase 1's accuracy was not scored before the run stopped: scoring it now" in logs["resumed"]
    assert not re.search(r"phase 1 copa \| step", logs["resumed"])  # not trained again
    assert re.search(r"phase 2 news \| step 3/3", logs["resumed"])


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_accuracy_matrix_has_a_row_per_phase_and_its_metrics_follow_the_definitions(run):
    from pretrain.metrics import accuracy_metrics

    m = _metrics(run)
    assert m["tasks"] == ["cl_copa"] and m["task_docs"] == {"cl_copa": DOCS} and m["task_metric"] == "acc"
    assert m["task_domains"] == {"cl_copa": "copa"} and m["phases"] == ["copa", "news"]
    acc = [row[0] for row in m["accuracy"]]
    assert len(acc) == 3  # the initial model and after each phase
    for a in acc:  # a mean of 40 zeros and ones
        assert 0 <= a <= 1 and abs(a * DOCS - round(a * DOCS)) < 1e-9
    got = m["accuracy_metrics"]
    assert got == accuracy_metrics(m["tasks"], m["phases"], m["task_domains"], m["accuracy"])
    # phase 1 trains cl_copa's domain, phase 2 none: forgetting = best since phase 1 (row 1) minus last
    assert got["forgetting"] == {"cl_copa": acc[1] - acc[2]} and got["avg_forgetting"] == acc[1] - acc[2]
    assert got["bwt"] == acc[2] - acc[1] and got["plasticity"] == acc[1] - acc[0]
    assert got["fwt"] is None and got["untrained"] == {}  # first trained in phase 1: no transfer term
    assert got["avg_final_accuracy"] == acc[2]


def test_the_harness_on_its_own_gives_our_accuracy_for_the_same_model(run, tmp_path):
    """lm-eval loads export/phase-1 itself (HFLM from a path) and reads the task from the YAML file our
    template writes; its accuracy equals the run's row 1 exactly (both are k/40: a tie in the order of
    float noise would be needed to differ, and the margins below show there is none)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain.cl_benchmark import write_task_yaml

    yaml_file = write_task_yaml(COPA, tmp_path)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(run / "export" / "phase-1"), "dtype": "float32", "device": "cpu"},
        tasks=[str(yaml_file)],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    samples = out["samples"]["cl_copa"]
    margins = [abs(s["filtered_resps"][0][0] - s["filtered_resps"][1][0]) for s in samples]
    assert len(samples) == DOCS
    assert out["results"]["cl_copa"]["acc,none"] == _metrics(run)["accuracy"][1][0], min(margins)


def test_an_eval_job_scores_a_row_as_the_run_did(run):
    """What `pretrain eval --phase 2` does for the row (its steps, in this process: a job's start costs
    ~30 s here): score the export with downstream.score_row and record it beside the loss row. The row,
    cleared first, comes back with the number the run had in line: the same model through the same code."""
    from pretrain.config import load_config
    from pretrain.eval_job import _record_row, _score_tasks
    from pretrain.results import RunResults

    cfg, path, m = load_config(run / "config.yaml"), run / "metrics.json", _metrics(run)
    inline, m["accuracy"][2] = m["accuracy"][2], None
    path.write_text(json.dumps(m))
    ev = {
        "loss": dict(zip(m["domains"], m["eval_loss"][2], strict=True)),
        "perplexity": dict(zip(m["domains"], m["perplexity"][2], strict=True)),
        "tokens": m["eval_tokens"],
    }
    _record_row(path, cfg, 2, ev, RunResults.for_run(cfg), _score_tasks(cfg, run, 2, "cpu"))
    assert _metrics(run)["accuracy"][2] == inline and _metrics(run)["eval_loss"] == m["eval_loss"]


def test_tensorboard_report_and_compare_show_the_accuracy(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.report import compare_runs, write_report

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    acc = [row[0] for row in _metrics(run)["accuracy"]]
    logged = events.Scalars("accuracy/cl_copa")
    assert [e.step for e in logged] == [0, 1, 2]
    assert [e.value for e in logged] == pytest.approx(acc, abs=1e-7)  # TensorBoard keeps float32
    assert [e.step for e in events.Scalars("accuracy_metrics/plasticity")] == [1, 2]
    report = write_report(run).read_text()
    assert "## Accuracy on downstream tasks" in report and "## Held-out loss" in report
    assert f"**{acc[1]:.4f}**" in report  # phase 1's row, the cell of the task it trained in bold
    assert (run / "accuracy_heatmap.png").is_file()
    comparison = compare_runs([run], tmp_path, echo=False).read_text()
    assert f"| none | {acc[2]:.4f} | " in comparison and "Final held-out loss per domain" in comparison
