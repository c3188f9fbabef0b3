"""Evaluation as its own job and the report, end to end on 2 CPU ranks under the deepspeed launcher, on a run
whose second phase is an instruction domain (trained and evaluated on its answer tokens only)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import (
    INSTRUCTION,
    assert_ok,
    instruction_corpus,
    run_deepspeed,
    run_single,
    tiny_run_config,
    write_config,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.instruct import ExampleStream, heldout_examples, model_inputs
from pretrain.shuffle import Shuffle

pytestmark = pytest.mark.distributed


def _close(a, b, tol):
    return len(a) == len(b) and all(r == pytest.approx(q, abs=tol) for r, q in zip(a, b, strict=True))


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def _single(*args):
    proc = run_single(list(args), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _news_then_qa(tmp, **sections) -> dict:
    """Phase 1 trains text (news), phase 2 an instruction domain (qa: lines of the plays, labelled)."""
    cfg = tiny_run_config(tmp, stage=3, steps=3, domains=("news",), method={"name": "migu", "start_phase": 2})
    train, heldout = instruction_corpus(tmp / "qa")
    cfg["domains"].append({"name": "qa", "train": [train], "heldout": [heldout], "instruction": INSTRUCTION})
    cfg["phases"].append({"domain": "qa", "steps": 3})
    return cfg | sections


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inline")
    cfg = _news_then_qa(tmp)
    assert_ok(run_deepspeed(["pretrain", "train", "--config", str(write_config(cfg, tmp / "run.yaml"))]))
    return tmp / "run"


def test_eval_job_reproduces_inline_numbers(inline_run):
    inline = _metrics(inline_run)["eval_loss"]
    assert_ok(run_deepspeed(["pretrain", "eval", "--run", str(inline_run)]))
    again = _metrics(inline_run)["eval_loss"]
    assert _close(again, inline, 1e-5)
    # a re-run gives the same numbers; a single process (other summation order) agrees to float tolerance
    assert_ok(run_deepspeed(["pretrain", "eval", "--run", str(inline_run), "--phase", "2"]))
    assert _metrics(inline_run)["eval_loss"] == again
    _single("eval", "--run", str(inline_run), "--phase", "1")
    assert _metrics(inline_run)["eval_loss"][1] == pytest.approx(inline[1], abs=1e-4)


def test_instruction_phase_trains_and_evaluates_on_answer_tokens_only(inline_run):
    from transformers import AutoModelForCausalLM

    from pretrain.config import load_config
    from pretrain.tokenizer import load_tokenizer

    cfg, m = load_config(inline_run / "config.yaml"), _metrics(inline_run)
    qa, t = cfg.domain("qa"), cfg.train
    assert m["domains"] == ["news", "qa"] and [len(row) for row in m["eval_loss"]] == [2, 2, 2]
    assert m["eval_loss"][2][1] < m["eval_loss"][1][1]  # phase 2 taught it to answer
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    rows = heldout_examples(qa.heldout, qa.instruction, tokenizer, t.seq_len, cfg.eval.max_blocks)
    assert m["eval_tokens"]["qa"] == int((rows.labels != -100).sum())  # answers and EOS, nothing else
    # phase 2's first step starts from phase 1's export: its loss is the mean over the two ranks' first
    # batches of the answer-token loss, and not the loss over every token
    model = AutoModelForCausalLM.from_pretrained(inline_run / "export" / "phase-1", local_files_only=True)
    shuffle = Shuffle(t.seed, t.shuffle_buffer)
    batches = [
        next(iter(ExampleStream(qa.train, qa.instruction, tokenizer, t.seq_len, r, 2, 2, shuffle=shuffle)))
        for r in range(2)
    ]
    with torch.no_grad():
        answers = [model(**model_inputs(b)).loss.item() for b in batches]
        everything = [model(input_ids=b.input_ids, labels=b.input_ids).loss.item() for b in batches]
    trained = m["train"][1]["losses"][0]
    assert trained == pytest.approx(sum(answers) / 2, rel=1e-5)
    assert abs(trained - sum(everything) / 2) > 1e-2


def test_report_writes_markdown_and_real_pictures(inline_run):
    _single("report", "--run", str(inline_run))
    report = (inline_run / "report.md").read_text()
    loss = _metrics(inline_run)["eval_loss"]
    assert f"{loss[2][1]:.4f}" in report and "avg_forgetting" in report
    for name in ("loss_heatmap.png", "loss_curves.png"):
        with Image.open(inline_run / name) as img:
            img.verify()
        with Image.open(inline_run / name) as img:
            assert img.size[0] >= 400 and img.size[1] >= 300
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # not a blank canvas


def test_deferred_evaluation_fills_the_matrix_by_jobs(inline_run, tmp_path):
    cfg = _news_then_qa(tmp_path, eval={"batch_size": 4, "max_blocks": 8, "inline": False})
    path = write_config(cfg, tmp_path / "run.yaml")
    assert_ok(run_deepspeed(["pretrain", "train", "--config", str(path)]))
    run = tmp_path / "run"
    assert _metrics(run)["eval_loss"] == []
    assert_ok(run_deepspeed(["pretrain", "eval", "--run", str(run)]))
    deferred = _metrics(run)
    # same seed, data and config: the job-evaluated matrix equals the in-line one of the same training
    assert _close(deferred["eval_loss"], _metrics(inline_run)["eval_loss"], 1e-5)
    assert deferred["avg_forgetting"] is not None and deferred["plasticity"] > 0
    out = _single("compare", str(inline_run), str(run), "--out", str(tmp_path))
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "comparison.png").is_file()
    # the two runs' matrices agree to float noise, so the verdict may take any of its three forms (whether
    # the tiny run forgot at all depends on its data order)
    assert re.search(r"forgot least|No run forgot less|No forgetting to reduce", out.stdout), out.stdout


def test_eval_job_at_zero2_and_its_rows_survive_a_resume(tmp_path):
    # probes 2 and 3: an eval job crashed at ZeRO-2 ("requires an optimizer"); a resume erased its rows
    cfg = tiny_run_config(
        tmp_path, stage=2, steps=3, eval={"inline": False}, checkpoint={"save_every": 2, "keep": 2}
    )
    path = write_config(cfg, tmp_path / "run.yaml")
    run = tmp_path / "run"
    os.environ["PRETRAIN_FAULT"] = "kill:5"  # phase 2, step 2: after its step-5 checkpoint
    try:
        killed = run_deepspeed(["pretrain", "train", "--config", str(path)])
    finally:
        del os.environ["PRETRAIN_FAULT"]
    assert killed.returncode != 0 and (run / "checkpoints" / "latest").read_text() == "step-5"
    assert_ok(run_deepspeed(["pretrain", "eval", "--run", str(run)]))  # phase 1 is exported, 2 is not
    by_job = _metrics(run)["eval_loss"]
    assert len(by_job) == 2 and by_job[1][0] < by_job[0][0]  # phase 1 learned its own domain
    assert_ok(run_deepspeed(["pretrain", "train", "--config", str(path), "--resume"]))
    metrics = _metrics(run)
    assert metrics["eval_loss"][:2] == by_job and len(metrics["train"]) == 2
    assert_ok(run_deepspeed(["pretrain", "eval", "--run", str(run), "--phase", "2"]))
    assert _metrics(run)["eval_loss"][:2] == by_job and _metrics(run)["avg_forgetting"] is not None
    # the trainer logged no forgetting metrics: at a phase's end no job had its row yet, so they were the
    # phase before's, tagged with this one (and the last phase's never came)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and not [t for t in tags if t.startswith("forgetting/")]
