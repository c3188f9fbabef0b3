"""Exact resume under real DeepSpeed on 2 CPU ranks: kill -9, SIGTERM, and a crash while saving.

Each interrupted run is resumed with `--resume` and must end with the same loss curve, evaluation
matrix, method statistics and final weights as the uninterrupted run of the same config (bitwise: same
world size, CPU). Every case stacks the methods with state: MIGU's masks, EWC's anchors and Fisher (each
rank's own ZeRO partition) and replay's stream of the earlier domain. The cases: ZeRO-2, and MIGU on LoRA
adapters (with dropout) at ZeRO-3 with ZeRO-Offload of optimizer and parameters
(configs/deepspeed/zero3_offload.json, train.optimizer cpu_adam), whose uninterrupted run also serves the
LoRA pipeline checks below (one launch fewer). The crash-while-saving run resumes on fewer ranks.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_ok,
    free_port,
    run_deepspeed,
    single_process_env,
    tiny_run_config,
    write_config,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# case: (ZeRO stage, sections added to the config)
# elastic resume: losses of the same blocks after reductions in another order (see the test's docstring)
TOL = 1e-4
OFFLOAD3 = {
    "deepspeed": {"config": str(REPO / "configs" / "deepspeed" / "zero3_offload.json")},
    "train": {"optimizer": "cpu_adam"},
}
CASES = {
    "zero2": (2, {}),
    # LoRA adapters with dropout, optimizer and parameters offloaded (DeepSpeedCPUAdam, overlap_comm)
    "zero3-lora-offload": (3, {"lora": {"r": 4, "dropout": 0.1}, **OFFLOAD3}),
}


def _config(tmp, name: str, case: str, steps: int = 4, grad_accum: int = 1):
    stage, sections = CASES[case]
    cfg = tiny_run_config(
        tmp,
        stage=stage,
        steps=steps,
        method={"name": "migu", "start_phase": 2},
        regularisation={"kind": "ewc", "weight": 1.0, "fisher_steps": 2},
        replay={"share": 0.25},
        checkpoint={"save_every": 2, "keep": 2},
        eval={"every": 2},  # forgetting curves: their points must continue across a resume too
        **sections,
    )
    cfg["output_dir"] = str(tmp / name)
    cfg["train"]["grad_accum"] = grad_accum
    return write_config(cfg, tmp / f"{name}.yaml")


def _train(cfg, *extra, env=None, ranks=2):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return run_deepspeed(["pretrain", "train", "--config", str(cfg), *extra], nprocs=ranks)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _same_run(a, b, case: str = "zero2"):
    """Bitwise the same run, except with DeepSpeedCPUAdam (train.optimizer cpu_adam, the offload case).

    Its C++ kernel keeps beta^t as a running product while a run continues, but recomputes it with pow()
    after a checkpoint is loaded: the bias correction then differs in its last bit (relative 1e-7), so the
    steps after a resume differ by ~1e-7 of a step. Measured: weights 7e-9 apart, losses 2e-7, the same
    masks. Held to 1e-6 (relative or absolute), which a wrong block, mask or optimizer state far exceeds.
    """
    same = _close if "offload" in case else _equal
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert same(ma["eval_loss"], mb["eval_loss"])
    assert same([p["losses"] for p in ma["train"]], [p["losses"] for p in mb["train"]])
    assert same(ma["migu"], mb["migu"])  # the method's own statistics continue exactly too
    assert same(ma["eval_curve"], mb["eval_curve"])
    wa, wb = (load_file(r / "export" / "phase-2" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]) or (same is _close and torch.allclose(wa[key], wb[key], 0, 1e-6))


def _equal(x, y) -> bool:
    return x == y


def _close(x, y) -> bool:
    """Equal in structure and in every non-number; numbers within 1e-6 relative or absolute."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(map(_close, x, y))
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)
    return x == y


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"resume-{request.param}")
    cfg = _config(tmp, "reference", request.param)
    assert_ok(_train(cfg))
    return tmp, request.param


def test_kill9_mid_phase_then_resume_equals_uninterrupted(reference):
    tmp, case = reference
    cfg = _config(tmp, "killed", case)
    killed = _train(cfg, env={"PRETRAIN_FAULT": "kill:7"})  # phase 2, step 3: after the step-6 checkpoint
    assert killed.returncode != 0
    assert (tmp / "killed" / "checkpoints" / "latest").read_text() == "step-6"
    assert not (tmp / "killed" / "export" / "phase-2").exists()
    resumed = _train(cfg, "--resume")
    assert_ok(resumed)
    assert "resumed from step-6: phase 2, step 2" in resumed.stdout + resumed.stderr
    _same_run(tmp / "reference", tmp / "killed", case)
    metrics = json.loads((tmp / "killed" / "metrics.json").read_text())
    curve = metrics["eval_curve"]
    assert [(p["phase"], p["step"], p["global_step"]) for p in curve] == [
        (0, 0, 0), (1, 2, 2), (1, 4, 4), (2, 2, 6), (2, 4, 8)
    ]  # fmt: skip
    ends = [p["loss"] for p in curve if p["step"] in (0, 4)]  # the phase ends are the matrix's rows
    assert ends == metrics["eval_loss"]
    from pretrain.report import write_report

    report = write_report(tmp / "killed").read_text()
    assert "## Forgetting curves" in report and (tmp / "killed" / "eval_curve.png").is_file()


def test_crash_while_saving_then_resume_on_fewer_ranks(reference):
    """A crash while saving phase 2 leaves `latest` at the previous complete checkpoint (step-6, mid-phase 2:
    MIGU masking, EWC pulling, 25% replay). The job is requeued on 1 rank: it resumes there and ends close
    to the uninterrupted 2-rank run. (More ranks: the SIGTERM test below, a 1-rank run resumed on 2; the
    data streams' and partitions' re-cut both ways in tests/test_data.py,
    tests/test_replay.py, tests/test_instruct.py and tests/test_elastic.py. Same ranks, bitwise: the kill -9
    and stop tests here.)

    The global batch is kept (grad_accum scaled), so each step takes the same blocks. Not bitwise: one
    rank sums the step's two micro-batch gradients by accumulation, two ranks by all-reduce, and fp32
    addition in another order rounds differently (relative 1e-7 per sum). Over the few steps after the
    resume such differences stay orders of magnitude below what another block would change (losses differ
    by 1e-1 between blocks).
    """
    tmp, case = reference
    if case != "zero2":
        pytest.skip("the checkpoint marker logic is stage-independent; covered at ZeRO-2")
    cfg = _config(tmp, "crashed", case)
    crashed = _train(cfg, env={"PRETRAIN_FAULT": "crash_saving:phase-2"})
    assert crashed.returncode != 0
    # the shards of phase-2 were written, but `latest` still names the last complete checkpoint
    assert (tmp / "crashed" / "checkpoints" / "latest").read_text() == "step-6"
    assert (tmp / "crashed" / "checkpoints" / "phase-2").is_dir()
    resumed = _train(cfg, "--resume", ranks=1)
    assert_ok(resumed)
    assert "resuming checkpoint step-6 of 2 ranks on 1" in resumed.stdout + resumed.stderr
    assert (tmp / "crashed" / "checkpoints" / "step-6" / "universal").is_dir()  # converted once, kept there
    ref, got = (json.loads((tmp / r / "metrics.json").read_text()) for r in ("reference", "crashed"))
    changes = {c["key"]: (c["from"], c["to"], c["global_step"]) for c in got["config_changes"]}
    assert changes == {"world_size": (2, 1, 6), "train.grad_accum": (1, 2, 6)}
    ref_losses, got_losses = ([x for p in m["train"] for x in p["losses"]] for m in (ref, got))
    assert len(got_losses) == len(ref_losses) == 8
    assert got_losses == pytest.approx(ref_losses, abs=TOL)
    for row_ref, row_got in zip(ref["eval_loss"], got["eval_loss"], strict=True):
        assert row_got == pytest.approx(row_ref, abs=TOL)
    assert got["migu"][1]["top_units"] == ref["migu"][1]["top_units"]


def test_stop_inside_a_masked_step_then_resume_equals_uninterrupted(reference):
    """A stop (here a NaN, as a SIGTERM would) comes after the step's forward: what MIGU recorded in it,
    and the random numbers the adapters' dropout drew in it, must not travel in the stop checkpoint,
    since the resumed run forwards that step again (with the state after the forward, the resumed step
    drew other dropout masks)."""
    tmp, case = reference
    if "lora" not in case:
        pytest.skip("the stop path is stage-independent; covered in the case with dropout")
    cfg = _config(tmp, "stopped", case)
    stopped = _train(cfg, env={"PRETRAIN_FAULT": "nan_loss:7"})  # phase 2 (masked), step 3
    assert stopped.returncode != 0
    assert (tmp / "stopped" / "checkpoints" / "latest").read_text() == "step-6-stop"
    assert_ok(_train(cfg, "--resume"))
    _same_run(tmp / "reference", tmp / "stopped", case)


def test_lora_run_trains_only_the_adapters_and_exports_the_merged_model(reference):
    """The LoRA case's uninterrupted run at ZeRO-3: at the end every base weight is bitwise the initial
    one (DeepSpeed's checkpoint, shards gathered), MIGU masked the adapters and nothing else, and the
    export of phase 2 (gathered from the shards, merged on rank 0), read as `pretrain eval` reads it, is
    the merged model of that checkpoint: the bounds are in tests/lora_checks.py."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from lora_checks import assert_export_is_merged
    from peft import PeftModel

    from pretrain.config import load_config
    from pretrain.methods.lora import apply_lora
    from pretrain.model import build_model, model_for_row

    tmp, case = reference
    if "lora" not in case:
        pytest.skip("LoRA case only")
    run = tmp / "reference"
    cfg = load_config(run / "config.yaml")
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="phase-2")
    exported, tokenizer = model_for_row(cfg, run, 2)
    model = apply_lora(cfg.lora, build_model(cfg.model, len(tokenizer), cfg.train.seed))
    initial = model.state_dict()
    assert trained.keys() == initial.keys()
    adapters = {k for k in initial if ".lora_A." in k or ".lora_B." in k}
    assert adapters and all(not torch.equal(trained[k], initial[k]) for k in adapters)
    for key in initial.keys() - adapters:
        assert torch.equal(trained[key], initial[key]), key
    summary = json.loads((run / "metrics.json").read_text())["migu"][1]
    assert summary["masked"] and {f"{n}.weight" for n in summary["kept_fraction"]} == adapters
    assert summary["kept_fraction"] == summary["expected_kept_fraction"]
    model.load_state_dict(trained)
    tokens = torch.randint(
        0, len(tokenizer), (2, cfg.train.seq_len), generator=torch.Generator().manual_seed(0)
    )
    assert_export_is_merged(model, exported, tokens)
    # the adapters beside it, gathered from the shards unmerged: peft loads them onto the base as trained
    base = build_model(cfg.model, len(tokenizer), cfg.train.seed)
    reloaded = PeftModel.from_pretrained(base, run / "export" / "phase-2" / "adapter").state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.items())


def test_sigterm_checkpoints_and_exits_75_then_resumes_on_more_ranks(tmp_path):
    """A plain single process, so the exit status is the trainer's own (75), stopped mid-phase; its
    requeued job gets 2 ranks: the stop checkpoint is converted to DeepSpeed's universal format, the
    stream continues from the same global block on the new ranks (accumulation 2 -> 1 keeps the global
    batch), and the phase ends with all its steps. Requeued again on 2 ranks (after a stop at step 20), it
    keeps that accumulation: the checkpoint's global batch, not the config's (2 ranks x 2 would double it).
    The DeepSpeed JSON pins that global batch (`train_batch_size`), which the resumes keep. A second phase
    of the same domain then continues its stream at the block after phase 1's 160 (gathered from both
    ranks at the phase's end)."""
    cfg = tiny_run_config(tmp_path, stage=2, steps=40, domains=("news",), train={"grad_accum": 2})
    cfg["phases"].append({"domain": "news", "steps": 2})
    zero2 = json.loads(Path(cfg["deepspeed"]["config"]).read_text())
    pinned = tmp_path / "zero2_pinned.json"
    pinned.write_text(json.dumps({**zero2, "train_batch_size": 2 * cfg["train"]["micro_batch_size"]}))
    cfg["deepspeed"]["config"] = str(pinned)
    path = write_config(cfg, tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "pretrain", "train", "--config", str(path)]
    stop_file = tmp_path / "stop"  # as a launch script names it: the stopped rank leaves it for the script
    returncode, log = _sigterm_at_step_3(cmd, {**single_process_env(), "PRETRAIN_STOP_FILE": str(stop_file)})
    assert returncode == 75, log
    assert stop_file.exists()  # a signal, not the file, stopped it; the file says the exit was a stop
    # and that its stop checkpoint was written (.saving while it was): a launch script requeues only then
    assert Path(f"{stop_file}.saving").exists() and Path(f"{stop_file}.saved").exists()
    run = tmp_path / "run"
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag.endswith("-stop")
    stopped = _train(path, "--resume", ranks=2, env={"PRETRAIN_FAULT": "nan_loss:20"})
    assert stopped.returncode != 0
    log = stopped.stdout + stopped.stderr
    assert f"resuming checkpoint {tag} of 1 ranks on 2" in log and "train.grad_accum 2 -> 1" in log
    assert (run / "checkpoints" / tag / "universal").is_dir()
    assert (run / "checkpoints" / "latest").read_text() == "step-19-stop"
    resumed = _train(path, "--resume", ranks=2)
    assert_ok(resumed)
    log = resumed.stdout + resumed.stderr
    assert "resuming checkpoint step-19-stop of 2 ranks on 2: train.grad_accum 1 -> 1" in log
    assert not (run / "checkpoints" / "step-19-stop" / "universal").exists()  # same ranks: no conversion
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["eval_loss"]) == 3 and len(metrics["train"][0]["losses"]) == 40
    assert metrics["train"][0]["tokens"] == 40 * 4 * cfg["train"]["seq_len"]  # 4 sequences a step throughout
    changes = {c["key"]: (c["from"], c["to"]) for c in metrics["config_changes"]}
    assert changes == {"world_size": (1, 2), "train.grad_accum": (2, 1)}
    continued = re.search(r"phase 2: news continues its stream from (\{.*?\})", log)
    assert continued, log
    assert {k: v for k, v in ast.literal_eval(continued.group(1)).items() if k != "skipped"} == _after(
        path, 160
    )


def _after(config: Path, blocks: int) -> dict:
    """Where the run's first domain's stream, read on one rank, stands after `blocks` blocks."""
    from pretrain.config import load_config
    from pretrain.data import TrainStream
    from pretrain.shuffle import Shuffle
    from pretrain.tokenizer import load_tokenizer

    cfg = load_config(config)
    t, domain = cfg.train, cfg.domains[0]
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    stream = TrainStream(
        domain.train, "text", tokenizer, t.seq_len, 0, 1, 1, shuffle=Shuffle(t.seed, t.shuffle_buffer)
    )
    it = iter(stream)
    for _ in range(blocks):
        next(it)
    # with the file sizes the first phase's stream took, which the later phase checks its files against
    keep = ("epoch", "block", "doc", "offset", "file_sizes")
    return {k: v for k, v in stream.state_dict().items() if k in keep}


def test_sigterm_to_the_launch_script_stops_both_ranks_of_the_deepspeed_launcher_with_a_checkpoint(tmp_path):
    """launch/local.sh under the real `deepspeed` command (2 CPU ranks). The launcher on one node does not
    pass SIGTERM on to its ranks; the script hands the stop over as a file: both ranks stop at the same
    step, the stop checkpoint is complete, and the script exits 75 (the launcher itself says 1)."""
    cfg = tiny_run_config(tmp_path, stage=2, steps=40, domains=("news",))
    path = write_config(cfg, tmp_path / "run.yaml")
    venv_bin = os.path.dirname(sys.executable)
    env = {**single_process_env(), "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "TMPDIR": str(tmp_path)}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    # to the script only, as `docker stop` signals PID 1
    returncode, log = _sigterm_at_step_3(["bash", str(REPO / "launch" / "local.sh"), str(path)], env)
    assert returncode == 75, log
    assert "stopped by the launch script's stop file" in log
    checkpoints = tmp_path / "run" / "checkpoints"
    tag = (checkpoints / "latest").read_text()
    assert tag.endswith("-stop")
    assert json.loads((checkpoints / tag / "complete.json").read_text())["world_size"] == 2


def _sigterm_at_step_3(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` (a 40-step phase), SIGTERM it once step 3 is logged; its exit status and output."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "| step 3/40" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def test_a_zero3_resume_on_other_ranks_keeps_norms_and_biases_undecayed(tmp_path):
    """DeepSpeed's ZeRO-3 universal load gave every optimizer group group 0's weight decay, so after a resume
    on another number of ranks the norms decayed too, and every later checkpoint kept it."""
    config = tiny_run_config(tmp_path, stage=3, train={"weight_decay": 0.1})
    path = write_config(config, tmp_path / "run.yaml")
    out = tmp_path / "decay.json"
    worker = Path(__file__).with_name("universal_decay_worker.py")
    assert_ok(run_deepspeed([str(worker), "--config", str(path), "--out", str(out)], nprocs=1, module=False))
    decay = json.loads(out.read_text())
    assert decay["saved"] == [0.1, 0.0]  # build_optimizer: matrices decay, 1-D parameters do not
    assert decay["loaded"] == decay["saved"]


def test_a_stop_between_two_micro_batches_then_resume_equals_uninterrupted(tmp_path):
    """grad_accum 2, a stop reaching one rank after the first micro-batch of a masked step was forwarded and
    backpropagated: the accumulated gradient, MIGU's magnitudes and the replay blocks read in that step
    must all be dropped, and the resumed run must take the step again from its start."""
    ref, stopped = (_config(tmp_path, name, "zero2", grad_accum=2) for name in ("reference", "stopped"))
    assert_ok(_train(ref))
    proc = _train(stopped, env={"PRETRAIN_FAULT": "stop_at_micro:7.1"})  # phase 2, step 3, micro-batch 1
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text() == "step-6-stop"
    assert_ok(_train(stopped, "--resume"))
    _same_run(tmp_path / "reference", tmp_path / "stopped")
