"""Faults on real 2-rank runs: a NaN on one rank, a kill before any checkpoint, bad records, a changed
world size or tokenizer on resume."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
from conftest import corpus_lines, run_deepspeed, tiny_run_config, write_config, write_jsonl

from pretrain.schedule import phase_lr_factor

pytestmark = pytest.mark.distributed


def _launch(cfg_path, *extra, fault=""):
    os.environ["PRETRAIN_FAULT"] = fault
    try:
        return run_deepspeed(["pretrain", "train", "--config", str(cfg_path), *extra])
    finally:
        del os.environ["PRETRAIN_FAULT"]


def test_nan_stop_never_rewrites_latest_and_resumes_with_a_lower_lr_or_skip(tmp_path):
    path = write_config(tiny_run_config(tmp_path, steps=4, domains=("news",)), tmp_path / "run.yaml")
    ckpts = tmp_path / "run" / "checkpoints"
    proc = _launch(path, fault="nan_loss:3")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss at phase 1 step 3: checkpointing and exiting with 76" in out
    assert (ckpts / "latest").read_text() == "step-2-stop"
    first = _files(ckpts / "step-2-stop")
    # probe 4: resumed as it was, the run meets the same NaN and wrote into the checkpoint `latest` named
    again = _launch(path, "--resume", fault="nan_loss:3")
    assert "resumed from step-2-stop: phase 1, step 2" in again.stdout + again.stderr
    assert again.returncode != 0 and (ckpts / "latest").read_text() == "step-2-stop-2"
    # the same state (step 2) as step-2-stop-2: rotation counts the copies once, the older pruned
    assert first and not (ckpts / "step-2-stop").exists()
    # the keys a user changes to get past it are accepted on resume; this attempt dies before it checkpoints
    changed = ["--set", "train.lr=1e-3", "--set", "train.on_nonfinite=skip"]
    assert _launch(path, "--resume", *changed, fault="kill:3").returncode != 0
    # requeued as it was, from the same checkpoint (config.yaml has the change already): it still applies
    lowered = _launch(path, "--resume", *changed, fault="nan_loss:3")  # and the same bad batch comes again
    assert lowered.returncode == 0, lowered.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    changes = {c["key"]: (c["from"], c["to"], c["global_step"]) for c in metrics["config_changes"]}
    assert changes == {"train.lr": (1e-2, 1e-3, 2), "train.on_nonfinite": ("stop", "skip", 2)}
    lrs = [
        float(m) for m in re.findall(r"\| step \d/4 \| loss \S+ \| lr (\S+)", lowered.stdout + lowered.stderr)
    ]
    factors = [phase_lr_factor(s, [0], [4], warmup=0, min_ratio=0.1) for s in (2, 3)]
    assert lrs == pytest.approx([1e-3 * f for f in factors], rel=1e-2)  # logged with 3 digits
    assert metrics["skipped_steps"] == [3] and len(metrics["train"][0]["losses"]) == 4


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_nan_with_skip_policy_skips_the_step_on_every_rank(tmp_path):
    cfg = tiny_run_config(
        tmp_path,
        steps=4,
        domains=("news",),
        train={"on_nonfinite": "skip"},
        method={"name": "migu", "start_phase": 1},
    )
    proc = _launch(write_config(cfg, tmp_path / "run.yaml"), fault="nan_loss:3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3]
    losses = metrics["train"][0]["losses"]
    assert math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert all(math.isfinite(x) for x in metrics["eval_loss"][1])
    # probe 5: the skipped step's non-finite activations stayed in MIGU's magnitudes and statistics
    migu = metrics["migu"][0]
    assert migu["steps"] == 3 and migu["masked"]
    assert all(math.isfinite(v) for q in migu["magnitude_quantiles"].values() for v in q)


def test_a_stop_during_a_phase_end_exits_75_after_the_phase_checkpoint(tmp_path):
    # a SIGTERM reaching one rank during the phase's evaluation or export: taken right after the phase's
    # checkpoint (75, so the job is requeued), before the downstream scoring and the next phase
    path = write_config(tiny_run_config(tmp_path, steps=2), tmp_path / "run.yaml")
    proc = _launch(path, fault="stop_at_phase_end:1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by a signal on another rank after checkpoint phase-1: exiting with 75" in out  # rank 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "phase-1"
    assert not re.search(r"phase 2 plays \| step", out)
    resumed = _launch(path, "--resume")
    again = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, again[-3000:]
    assert "resumed from phase-1: phase 2, step 0" in again and not re.search(r"phase 1 news \| step", again)
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]) == 2


def test_killed_before_the_first_checkpoint_then_resume_starts_again(tmp_path):
    # probe 1: the default save_every 0 leaves no checkpoint before phase 1 ends; a requeued job failed
    path = write_config(tiny_run_config(tmp_path, steps=4, domains=("news",)), tmp_path / "run.yaml")
    killed = _launch(path, fault="kill:2")
    run = tmp_path / "run"
    assert killed.returncode != 0 and not (run / "checkpoints" / "latest").exists()
    first = json.loads((run / "metrics.json").read_text())
    resumed = _launch(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no complete checkpoint: starting the run again" in resumed.stdout + resumed.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["train"][0]["losses"]) == 4 and len(metrics["eval_loss"]) == 2
    assert json.loads((run / "metrics.attempt-1.json").read_text()) == first  # the attempt's record kept
    assert metrics["eval_loss"][0] == first["eval_loss"][0]  # the same initial model


def test_a_changed_tokenizer_on_resume_is_a_clear_error(tmp_path):
    # probe 8: resuming after the tokenizer at tokenizer.path changed ended in an embedding-size traceback
    cfg = tiny_run_config(tmp_path, steps=2, domains=("news",))
    cfg["tokenizer"] = {"source": "path", "path": _tokenizer(tmp_path)}
    path = write_config(cfg, tmp_path / "run.yaml")
    assert _launch(path).returncode == 0
    tok = tmp_path / "tok"
    shutil.rmtree(tok)
    _tokenizer(tmp_path, vocab_size=448)  # someone retrained it in place
    before = _files(tmp_path / "run")
    proc = _launch(path, "--resume")
    assert proc.returncode != 0
    assert "the tokenizer changed since checkpoint phase-1 was written (512 tokens, now 448" in proc.stderr
    assert f"tokenizer.path {tok}" in proc.stderr and "Traceback" not in proc.stderr
    assert _files(tmp_path / "run") == before  # config.yaml and metrics.json untouched


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


def test_a_bad_record_met_mid_phase_saves_the_step_before_and_a_resume_skips_it(tmp_path):
    # it stopped the run without a checkpoint (the ranks meet it at different micro-steps, so the rank that
    # raised left the others in a collective): all since the last checkpoint, by default the phase, lost
    # short records: the reader tokenizes 256 at a time, so record 261 is read after some steps
    text = " ".join(corpus_lines("news", 40))
    records = [{"text": text[i : i + 30]} for i in range(0, 30 * 400, 30)]
    train = write_jsonl(tmp_path / "train.jsonl", [*records[:260], '{"text": "unterminated', *records[260:]])
    run = {"shuffle_buffer": 0, "micro_batch_size": 8}
    cfg = tiny_run_config(tmp_path, steps=12, domains=("news",), train=run)
    cfg["domains"][0]["train"] = [train]
    cfg["tokenizer"] = {"source": "path", "path": _tokenizer(tmp_path)}
    path = write_config(cfg, tmp_path / "run.yaml")
    proc = _launch(path)
    out = proc.stdout + proc.stderr
    stopped = re.search(
        r"a batch that could not be read at phase 1 step (\d+): checkpointing and exiting with 65", out
    )
    assert proc.returncode != 0 and stopped, out[-3000:]
    step = int(stopped[1])
    assert 1 < step < 12, "the record must be met mid-phase, after the start's check of the first step"
    assert f"{train}: line 261" in out and "--set train.on_bad_record=skip" in out
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step-{step - 1}-stop"
    trained = [float(x) for x in re.findall(r"\| step \d+/12 \| loss (\S+)", out)]
    resumed = _launch(path, "--resume", "--set", "train.on_bad_record=skip")
    again = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, again[-3000:]
    assert f"resumed from step-{step - 1}-stop: phase 1, step {step - 1}" in again
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = metrics["train"][0]["losses"]
    assert len(losses) == 12 and losses[: step - 1] == pytest.approx(trained, abs=5e-5)  # logged: 4 digits
    assert metrics["skipped_records"]["train"] == {"news": 1}
    assert [c["key"] for c in metrics["config_changes"]] == ["train.on_bad_record"]


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


def _tokenizer(tmp_path, vocab_size: int = 512) -> str:
    from pretrain.tokenizer import train_tokenizer

    cfg = tiny_run_config(tmp_path)
    files = [(d["train"], "text") for d in cfg["domains"]]
    train_tokenizer(files, str(tmp_path / "tok"), vocab_size=vocab_size, max_sentences=500)
    return str(tmp_path / "tok")


def _cpu_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


@pytest.mark.skipif(not _cpu_fp16(), reason="DeepSpeed trains fp16 on this accelerator only with oneDNN fp16")
def test_fp16_overflow_steps_leave_the_fisher_finite_and_the_schedule_whole(tmp_path):
    """fp16 with a loss scale far too high: DeepSpeed skips the first steps as overflows (their gradients
    are inf, grad_norm logged as inf). EWC's Fisher window must leave those steps out (one inf there made
    the Fisher NaN and zero), and the per-phase schedule must count them as steps (DeepSpeed does not step
    its scheduler on an overflow), so each step's lr is the schedule's for that step and phase 2 re-warms
    at its first step."""
    fp16 = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}
    ds = {"zero_optimization": {"stage": 2}, "fp16": fp16}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = tiny_run_config(
        tmp_path,
        steps=6,
        deepspeed={"config": str(tmp_path / "ds.json")},
        regularisation={"kind": "ewc", "weight": 1.0, "fisher_steps": 6},
        train={"warmup_steps": 0, "min_lr_ratio": 0.1},
    )
    proc = run_deepspeed(["pretrain", "train", "--config", str(write_config(cfg, tmp_path / "run.yaml"))])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    logged = re.findall(r"phase (\d) \w+ \| step (\d)/6 \| .* \| lr (\S+) \| grad_norm (\S+)", out)
    assert len(logged) == 12
    lrs = [float(lr) for _, _, lr, _ in logged]
    factors = [phase_lr_factor(s, [0, 6], [6, 6], warmup=0, min_ratio=0.1) for s in range(12)]
    assert lrs == pytest.approx([1e-2 * f for f in factors], rel=1e-2)  # logged with 3 digits
    overflowed = [(int(p), int(k)) for p, k, _, norm in logged if norm == "inf"]
    assert (1, 1) in overflowed and len(overflowed) < 12  # some steps skipped, not all (loss scale 2^20)
    fisher, pull = json.loads((tmp_path / "run" / "metrics.json").read_text())["migu"]
    # the Fisher of phase 1: its steps whose loss gradient was finite (the pull starts in phase 2)
    assert fisher["fisher_steps"] == 6 - sum(p == 1 for p, _ in overflowed)
    assert math.isfinite(pull["reg_penalty_mean"]) and pull["reg_penalty_mean"] > 0
