"""Replay in a real 2-rank run: killed mid-phase, resumed, reported; the same run logs to every tracker
(TensorBoard, W&B offline, a local MLflow store), whose stores are read back against metrics.json."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_ok, corpus, run_deepspeed, tiny_run_config, write_config
from tracker_checks import (
    mlflow_client,
    mlflow_series,
    tracker_state,
    wandb_history,
    wandb_merged,
    wandb_run_ids,
    wandb_runs,
    wandb_series,
)

from pretrain.report import write_report

pytestmark = pytest.mark.distributed


def test_replay_run_resumes_and_reports_the_share_and_tokens(tmp_path):
    cfg = tiny_run_config(
        tmp_path,
        steps=4,
        checkpoint={"save_every": 2},
        replay={"share": 0.25, "sources": [{"name": "general", "train": [corpus("docs")[0]]}]},
        logging={"trackers": ["tensorboard", "wandb", "mlflow"]},
    )
    path = write_config(cfg, tmp_path / "run.yaml")
    os.environ["PRETRAIN_FAULT"] = "kill:7"  # phase 2, step 3: its step-6 checkpoint holds replay state
    # W&B's service writes its offline file every 15 s: a kill loses what it holds; flushed more often
    # here, the killed attempt's W&B record has something to compare with MLflow's
    os.environ["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = "0.5"
    try:
        killed = run_deepspeed(["pretrain", "train", "--config", str(path)])
    finally:
        del os.environ["PRETRAIN_FAULT"], os.environ["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"]
    assert killed.returncode != 0
    resumed = run_deepspeed(["pretrain", "train", "--config", str(path), "--resume"])
    assert_ok(resumed)
    assert "resumed from step-6: phase 2, step 2" in resumed.stdout + resumed.stderr
    run = tmp_path / "run"
    phases = json.loads((run / "metrics.json").read_text())["train"]
    # 4 steps x 2 ranks x micro-batch 2 = 16 blocks a phase; a quarter replayed, in turn from each source
    assert phases[0]["replay"]["tokens"] == {"general": 4 * 32}  # phase 1: nothing earlier but `general`
    assert phases[1]["replay"] == {
        "share": 0.25,
        "blocks": 16,
        "replay_blocks": 4,
        "share_used": 0.25,
        "tokens": {"news": 2 * 32, "general": 2 * 32},
    }
    report = write_report(run).read_text()
    assert "## Replay" in report and "| 2 (plays) | 0.25 | 0.2500 | news 64, general 64 |" in report
    _check_trackers(run, json.loads((run / "metrics.json").read_text()))


def _check_trackers(run, metrics):
    """What W&B and MLflow hold after the kill and the resume: one run each, holding the run's numbers."""
    ids = tracker_state(run)
    attempts = wandb_runs(run)  # W&B offline: a directory per attempt, named by the one run id
    assert len(attempts) == 2 and all(a.name.endswith(f"-{ids['wandb']}") for a in attempts)
    assert wandb_run_ids(run)[-1] == ids["wandb"]
    client = mlflow_client(run)
    (only,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert only.info.run_id == ids["mlflow"] and only.info.status == "FINISHED"
    # MLflow: every step once (the killed attempt's step 7 not again); W&B: the resumed attempt from
    # step 7, and what the killed one had written before the kill, the same numbers
    loss = mlflow_series(client, ids["mlflow"], "train/loss")
    assert [s for s, _ in loss] == list(range(1, 9))
    history = wandb_history(run)
    assert wandb_series(history[-1], "train/loss") == loss[-2:]
    assert wandb_merged(history, "train/loss").items() <= dict(loss).items()
    for j, d in enumerate(metrics["domains"]):
        column = [(row, values[j]) for row, values in enumerate(metrics["eval_loss"])]
        assert mlflow_series(client, ids["mlflow"], f"eval_loss/{d}") == column
        assert wandb_merged(history, f"eval_loss/{d}", x="phase").items() <= dict(column).items()
        assert wandb_series(history[-1], f"eval_loss/{d}", x="phase") == column[-1:]
    for name in ("plasticity", "avg_final_loss", "avg_forgetting"):
        assert mlflow_series(client, ids["mlflow"], f"forgetting/{name}")[-1] == (2, metrics[name])
        assert wandb_series(history[-1], f"forgetting/{name}", x="phase") == [(2, metrics[name])]
    pictures = {a.path for a in client.list_artifacts(ids["mlflow"], "report")}
    assert pictures == {"report/loss_heatmap.png", "report/loss_curves.png"}
    assert {"report/loss_heatmap/path", "report/loss_curves/path"} <= set().union(*history[-1])
