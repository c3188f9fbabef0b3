"""Replay in a real 2-rank run: killed mid-phase, resumed, reported."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_ok, corpus, run_deepspeed, tiny_run_config, write_config

from pretrain.report import write_report

pytestmark = pytest.mark.distributed


def test_replay_run_resumes_and_reports_the_share_and_tokens(tmp_path):
    cfg = tiny_run_config(
        tmp_path,
        steps=4,
        checkpoint={"save_every": 2},
        replay={"share": 0.25, "sources": [{"name": "general", "train": [corpus("docs")[0]]}]},
    )
    path = write_config(cfg, tmp_path / "run.yaml")
    os.environ["PRETRAIN_FAULT"] = "kill:7"  # phase 2, step 3: its step-6 checkpoint holds replay state
    try:
        killed = run_deepspeed(["pretrain", "train", "--config", str(path)])
    finally:
        del os.environ["PRETRAIN_FAULT"]
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
