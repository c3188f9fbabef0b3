"""Every method of `pretrain train` run once on a GPU (not a test: the suite has no GPU to run them on).

Each run: the demo model from scratch, bf16, two phases (code, docs) of a few steps with evaluations and
phase-end checkpoints, world size 1, at ZeRO-2 and ZeRO-3; the methods of benchmarks/method_cost.py; and
the gradient-changing ones under ZeRO-2 Offload with and without overlap_comm (equal losses expected).
The runs share the GPU, a few at a time. Also asks the default process group of a GPU rank to reduce a
host tensor, the case `pretrain.distributed.all_reduce_sum` stages through the GPU. Writes OUT/gpu_methods.md:
    python benchmarks/gpu_methods.py OUT_DIR [--data CORPUS_DIR]
CORPUS_DIR is a demo corpus built beforehand (`python -m pretrain.demo_corpora DIR`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml
from method_cost import REPO, VARIANTS, environment, run_config

STEPS = (3, 3)
STAGES = (2, 3)
AT_ONCE = 8
TIMEOUT_S = 150
COLLECTIVE_CHECK = """
import torch, torch.distributed as dist
from pretrain.distributed import collective_device, init_distributed
init_distributed()
print("backend:", dist.get_backend())
try:
    dist.all_reduce(torch.ones(2))
    print("host tensor: reduced")
except Exception as e:
    print("host tensor:", type(e).__name__, str(e).splitlines()[0])
t = torch.ones(2).to(collective_device())
dist.all_reduce(t)
print("staged on", t.device, ": reduced", t.tolist())
"""


def run_one(cfg: dict, work: Path) -> dict:
    """One `pretrain train` run: (ok, seconds, the last lines of its log when it failed)."""
    name = Path(cfg["output_dir"]).name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pretrain", "train", "--config", str(path)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=environment(gpu=True), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, log = "timeout", str(e.stderr or "")
    metrics = Path(cfg["output_dir"]) / "metrics.json"
    final = json.loads(metrics.read_text()).get("avg_final_loss") if metrics.exists() else None
    (work / f"{name}.log").write_text(log)
    return {
        "name": name,
        "ok": code == 0,
        "seconds": round(time.monotonic() - start, 1),
        "avg_final_loss": round(final, 4) if final is not None else None,
        "error": ""
        if code == 0
        else " | ".join(line for line in log.splitlines()[-400:] if "Error" in line)[-600:],
    }


# ZeRO-Offload of the methods that change the CPU gradient, with and without overlap_comm: without it
# DeepSpeed waits for its gradient copies to pinned memory only in step() (the methods wait before they
# touch it, pretrain.methods.partitions.settle_offloaded_grads): each pair's losses should be equal
OFFLOAD_SETUPS = {"z2off": True, "z2off-nooverlap": False}
OFFLOAD_METHODS = ("none", "migu", "l2", "ewc")


def configs(data: Path, work: Path, methods: list[str]) -> list[dict]:
    out = []
    for stage in STAGES:
        ds = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        out += _setup(data, work, methods, f"z{stage}", ds, stage)
    for setup, overlap in OFFLOAD_SETUPS.items():
        ds = json.loads((REPO / "configs" / "deepspeed" / "zero2_offload.json").read_text())
        ds["zero_optimization"]["overlap_comm"] = overlap
        cfgs = _setup(data, work, [m for m in methods if m in OFFLOAD_METHODS], setup, ds, 2)
        out += [{**c, "train": {**c["train"], "optimizer": "cpu_adam"}} for c in cfgs]
    return out


def _setup(data: Path, work: Path, methods: list[str], setup: str, ds: dict, stage: int) -> list[dict]:
    """One run per method on DeepSpeed config `ds` in bf16, named METHOD-SETUP."""
    ds["bf16"] = {"enabled": True}
    (work / f"{setup}.json").write_text(json.dumps(ds))
    out = []
    for name in methods:
        slug = name.replace(" ", "").replace("%", "").replace("+", "_").replace("=", "")
        cfg = run_config(data, work / f"{slug}-{setup}", work / "tokenizer", VARIANTS[name][0], STEPS, stage)
        cfg["deepspeed"]["config"] = str(work / f"{setup}.json")
        out.append(cfg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = subprocess.run(
        [sys.executable, "-c", COLLECTIVE_CHECK],
        cwd=REPO,
        env=environment(gpu=True),
        capture_output=True,
        text=True,
    )
    collective = [
        line for line in check.stdout.splitlines() if line.startswith(("backend", "host", "staged"))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from pretrain.demo_corpora import build_demo_corpora

            data = work / "data"
            build_demo_corpora(str(data))
        cfgs = configs(data, work, args.methods)
        results = []

        def done(result: dict) -> None:  # the report after every run: a cut-short call keeps what ran
            results.append(result)
            if not result["ok"]:
                log = (work / f"{result['name']}.log").read_text()[-6000:]
                with open(args.out / "gpu_methods_errors.txt", "a") as f:
                    f.write(f"===== {result['name']}\n{log}\n")
            write_report(args.out / "gpu_methods.md", results, collective, check.stderr)

        done(run_one(cfgs[0], work))  # alone: it trains the tokenizer the others read
        with ThreadPoolExecutor(AT_ONCE) as pool:
            for future in as_completed([pool.submit(run_one, c, work) for c in cfgs[1:]]):
                done(future.result())
    print((args.out / "gpu_methods.md").read_text())


def write_report(path: Path, results: list[dict], collective: list[str], check_err: str) -> None:
    lines = ["# Every method on one GPU (bf16, world size 1, ZeRO-2 and ZeRO-3)", ""]
    lines += [f"Command: `python benchmarks/gpu_methods.py OUT --data CORPUS`; steps per phase {STEPS}.", ""]
    lines += ["Default process group of a GPU rank, asked to reduce a host tensor:", ""]
    lines += [f"- {line}" for line in collective] or [f"- check failed: {check_err[-500:]}"]
    lines += ["", "| run | ok | seconds | avg_final_loss | error |", "|---|---|---|---|---|"]
    for r in results:
        final = r["avg_final_loss"]
        lines.append(
            f"| {r['name']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {final} | {r['error']} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
