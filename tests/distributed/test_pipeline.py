"""End to end: real 2-rank DeepSpeed runs on CPU through the `deepspeed` launcher, ZeRO 0, 2 and 3."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import (
    assert_ok,
    run_deepspeed,
    run_single,
    shm_buffers_on_port,
    tiny_run_config,
    write_config,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=[0, 2, 3], ids=lambda s: f"zero{s}")
def finished_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"zero{request.param}")
    cfg = write_config(tiny_run_config(tmp, stage=request.param, steps=4), tmp / "run.yaml")
    # the ZeRO-2 run starts as a user starts it: the `deepspeed` command (the others its node launcher)
    args = ["pretrain", "train", "--config", str(cfg), "--set", "train.log_every=2"]
    proc = run_deepspeed(args, command=request.param == 2)
    assert_ok(proc)
    return tmp / "run", proc


def test_run_directory_has_everything(finished_run):
    run, _ = finished_run
    for path in ("config.yaml", "metrics.json", "tensorboard", "checkpoints/latest"):
        assert (run / path).exists(), path
    for phase in (1, 2):
        export = run / "export" / f"phase-{phase}"
        assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
        assert (export / "tokenizer.json").is_file() or (export / "tokenizer.model").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["log_every"] == 2


def test_metrics_matrix_shape_and_values(finished_run):
    m = json.loads((finished_run[0] / "metrics.json").read_text())
    assert m["domains"] == ["news", "plays"] and m["phases"] == ["news", "plays"]
    assert len(m["eval_loss"]) == 3 and all(len(row) == 2 for row in m["eval_loss"])
    for loss_row, ppl_row in zip(m["eval_loss"], m["perplexity"], strict=True):
        for loss, ppl in zip(loss_row, ppl_row, strict=True):
            assert math.isfinite(loss) and ppl == pytest.approx(math.exp(loss), rel=1e-6)
    for phase in m["train"]:  # the steps' times lie inside the phase's
        assert 0 < phase["step_seconds_median"] <= phase["step_seconds_max"] <= phase["seconds"]


def test_training_a_domain_lowers_its_heldout_loss(finished_run):
    loss = json.loads((finished_run[0] / "metrics.json").read_text())["eval_loss"]
    assert loss[1][0] < loss[0][0] - 0.02  # news, trained in phase 1
    assert loss[2][1] < loss[1][1] - 0.02  # plays, trained in phase 2


def test_only_rank0_logs_lines(finished_run):
    _, proc = finished_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any("[rank0]" in line and "phase 1 news | step 2/4" in line for line in lines)
    assert not any("[rank1]" in line and "| step" in line for line in lines)


def test_export_loads_in_transformers(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = finished_run[0] / "export" / "phase-2"
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    assert model.config.vocab_size >= len(tok)


def test_refuses_to_overwrite_a_finished_run(finished_run):
    run, _ = finished_run
    before = (run / "metrics.json").read_bytes()
    proc = run_single(["train", "--config", str(run / "config.yaml")], timeout=300)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    assert (run / "metrics.json").read_bytes() == before


def test_migu_on_a_loaded_checkpoint_sees_real_magnitudes(finished_run, tmp_path):
    # from_pretrained returns a model in eval mode; trained so, MIGU's hooks saw nothing and kept the
    # lowest-index rows of every layer
    run, _ = finished_run
    if not run.parent.name.startswith("zero2"):
        pytest.skip("one stage suffices: the model's mode does not depend on it")
    cfg = tiny_run_config(tmp_path, steps=2, domains=("plays",), method={"name": "migu", "start_phase": 1})
    cfg["model"] = {"source": "hf", "path": str(run / "export" / "phase-2")}
    cfg["tokenizer"] = {"source": "model"}
    assert_ok(run_deepspeed(["pretrain", "train", "--config", str(write_config(cfg, tmp_path / "c.yaml"))]))
    phase = json.loads((tmp_path / "run" / "metrics.json").read_text())["migu"][0]
    medians = {name: q[3] for name, q in phase["magnitude_quantiles"].items()}
    assert medians and all(m > 0 for m in medians.values()), medians


def test_no_shared_memory_buffers_left_behind(finished_run):
    # DeepSpeed's CPU all-reduce maps a 66 MiB /dev/shm buffer per rank and never unlinks it
    _, proc = finished_run
    assert "deepspeed_shm_comm_op built successfully" in proc.stdout + proc.stderr  # the buffers were made
    assert not shm_buffers_on_port(proc.master_port)
