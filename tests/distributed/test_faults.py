"""Faults on real 2-rank runs: a NaN on one rank, bad records, a changed world size on resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, free_port, run_deepspeed, tiny_run_config, write_config

pytestmark = pytest.mark.distributed


def _launch(cfg_path, *extra, fault=""):
    os.environ["PRETRAIN_FAULT"] = fault
    try:
        return run_deepspeed(["pretrain", "train", "--config", str(cfg_path), *extra])
    finally:
        del os.environ["PRETRAIN_FAULT"]


def test_nan_on_one_rank_stops_every_rank_with_last_good_checkpoint(tmp_path):
    path = write_config(tiny_run_config(tmp_path, steps=4, domains=("news",)), tmp_path / "run.yaml")
    proc = _launch(path, fault="nan_loss:3")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss at phase 1 step 3: checkpointing and exiting with 76" in out
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-2-stop"
    # the last good state: two steps trained, the third never applied
    resumed = _launch(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-2-stop: phase 1, step 2" in resumed.stdout + resumed.stderr


def test_nan_with_skip_policy_skips_the_step_on_every_rank(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=4, domains=("news",), train={"on_nonfinite": "skip"})
    proc = _launch(write_config(cfg, tmp_path / "run.yaml"), fault="nan_loss:3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3]
    losses = metrics["train"][0]["losses"]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert all(math.isfinite(x) for x in metrics["eval_loss"][1])


def test_resume_with_other_world_size_says_how_to_convert(tmp_path):
    path = write_config(tiny_run_config(tmp_path, steps=2, domains=("news",)), tmp_path / "run.yaml")
    assert _launch(path).returncode == 0
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}
    single = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", "--config", str(path), "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 2
    assert "written by 2 ranks, this run has 1" in single.stderr and "ds_to_universal" in single.stderr


def test_broken_record_is_named_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "a line of text " * 20})
    bad.write_text("\n".join([good] * 50 + ['{"text": "unterminated'] + [good] * 5) + "\n")
    cfg = tiny_run_config(tmp_path, steps=2, domains=("news",))
    cfg["domains"][0]["train"] = [str(bad)]
    cfg["tokenizer"] = {"source": "path", "path": _tokenizer(tmp_path)}
    proc = _launch(write_config(cfg, tmp_path / "run.yaml"))
    assert proc.returncode != 0
    assert f"{bad}" in proc.stderr and "51" in proc.stderr
    assert not (tmp_path / "run" / "export").exists()  # stopped before any phase finished


def test_skip_policy_skips_and_counts_bad_records(tmp_path):
    cfg = tiny_run_config(tmp_path, steps=2, domains=("news",), train={"on_bad_record": "skip"})
    domain = cfg["domains"][0]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    bad_train = _insert_line(domain["train"][0], train, '{"text": "unterminated')
    bad_heldout = _insert_line(domain["heldout"][0], heldout, '{"title": "no text"}')
    domain.update(train=[str(train)], heldout=[str(heldout)])
    proc = _launch(write_config(cfg, tmp_path / "run.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped bad record: {train}: line {bad_train}" in proc.stdout + proc.stderr
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_records"]
    assert skipped["train"] == {"news": 1} and skipped["heldout"] == {"news": 1}
    assert any(f"{heldout}: line {bad_heldout}" in m and "text" in m for m in skipped["examples"])


def _insert_line(source: str, dest, line: str) -> int:
    """dest: source's lines with `line` inserted in the middle, between two good records; its line number."""
    lines = open(source, encoding="utf-8").read().splitlines()
    index = len(lines) // 2
    assert 0 < index < len(lines), f"{source}: too few records to put a bad one between good ones"
    dest.write_text("\n".join(lines[:index] + [line] + lines[index:]) + "\n", encoding="utf-8")
    return index + 1


def _tokenizer(tmp_path) -> str:
    from pretrain.tokenizer import train_tokenizer

    cfg = tiny_run_config(tmp_path)
    files = [(d["train"], "text") for d in cfg["domains"]]
    train_tokenizer(files, str(tmp_path / "tok"), vocab_size=512, max_sentences=500)
    return str(tmp_path / "tok")
