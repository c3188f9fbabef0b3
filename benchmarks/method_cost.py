"""What each method costs per optimizer step in the real pipeline (not a test): `pretrain train` runs.

Run (writes benchmarks/method_cost.md; about 25 minutes on 2 CPU cores):
    python benchmarks/method_cost.py --rounds 3

Every variant trains the demo's model (configs/demo.yaml: a 4-layer Llama from scratch, micro-batch 8 x
seq 128 per rank) on 2 CPU ranks at ZeRO-2 for two phases, code then docs, with the same tokenizer.
Methods act from phase 2 on (MIGU and the pull start there; replay has nothing to replay in phase 1), so
the cost is phase 2's: its wall time per optimizer step as the trainer records it (`train[1].seconds /
steps` in metrics.json: data, forward, backward, method, step; no evaluation or checkpoint). Rounds run
every variant once, in a rotated order, so drift of the machine spreads over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PHASE1_STEPS, PHASE2_STEPS = 10, 60

# name: (config sections, needs old data)
VARIANTS: dict[str, tuple[dict, str]] = {
    "none": ({}, "no"),
    "migu": ({"method": {"name": "migu"}}, "no"),
    "random": ({"method": {"name": "random"}}, "no"),
    "l2": ({"regularisation": {"kind": "l2", "weight": 1.0}}, "no (a copy of the weights)"),
    "ewc": ({"regularisation": {"kind": "ewc", "weight": 1.0}}, "no (weights + Fisher)"),
    "replay 5%": ({"replay": {"share": 0.05}}, "yes (earlier domains' files)"),
    "lora r=8": ({"lora": {"r": 8}}, "no"),
    "migu + ewc": ({"method": {"name": "migu"}, "regularisation": {"kind": "ewc"}}, "no"),
    "migu + replay 5%": ({"method": {"name": "migu"}, "replay": {"share": 0.05}}, "yes"),
    "migu + lora r=8": ({"method": {"name": "migu"}, "lora": {"r": 8}}, "no"),
}


def run_config(
    data: Path, out: Path, tokenizer: Path, sections: dict, steps=(PHASE1_STEPS, PHASE2_STEPS), stage: int = 2
) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["domains"] = [
        {"name": d, "train": [str(data / d / "train.jsonl")], "heldout": [str(data / d / "heldout.jsonl")]}
        for d in ("code", "docs")
    ]
    cfg["phases"] = [{"domain": "code", "steps": steps[0]}, {"domain": "docs", "steps": steps[1]}]
    cfg["output_dir"] = str(out)
    cfg["tokenizer"]["path"] = str(tokenizer)
    cfg["eval"] = {"max_blocks": 8}
    cfg["checkpoint"] = {"export": False}
    cfg["deepspeed"] = {"config": str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")}
    cfg["train"]["log_every"] = 1000
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def environment(gpu: bool) -> dict[str, str]:
    # the environment's `ninja` first, as in the tests (tests/conftest.py: a switch rebuilds DeepSpeed's op)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path}
    return env if gpu else {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train_once(cfg: dict, work: Path, port: int) -> float:
    """Phase 2's seconds per optimizer step of one `pretrain train` run on 2 ranks."""
    path = work / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = environment(gpu=False)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    cmd += ["--module", "pretrain", "train", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{path} failed:\n{proc.stderr[-3000:]}")
    phase2 = json.loads((Path(cfg["output_dir"]) / "metrics.json").read_text())["train"][1]
    return phase2["seconds"] / phase2["steps"]


def measure(rounds: int, work: Path) -> dict[str, list[float]]:
    from pretrain.demo_corpora import build_demo_corpora

    data = work / "data"
    build_demo_corpora(str(data))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for i, name in enumerate(order):
            out = work / f"r{r}-{names.index(name)}"
            cfg = run_config(data, out, work / "tokenizer", VARIANTS[name][0])
            times[name].append(train_once(cfg, work, 29600 + i))
            print(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.4f} s/step", flush=True)
    return times


def report(times: dict[str, list[float]], args: argparse.Namespace, load: tuple[float, float]) -> str:
    base = statistics.median(times["none"])
    lines = [
        "# Cost per optimizer step of each method (CPU, 2 ranks, ZeRO-2)",
        "",
        "Command:",
        "",
        "```",
        f"python benchmarks/method_cost.py --rounds {args.rounds}",
        "```",
        "",
        f"`pretrain train` on the demo model (configs/demo.yaml), phase 1 code ({PHASE1_STEPS} steps),",
        f"phase 2 docs ({PHASE2_STEPS} steps); the time is phase 2's seconds per optimizer step from",
        f"metrics.json (data, forward, backward, method, step), median over {args.rounds} rounds in rotated",
        "order.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after. Differences of a few percent are within the noise.",
        "",
        "| method | s/step (median) | all rounds | / none | needs old data |",
        "|---|---|---|---|---|",
    ]
    for name, (_, old_data) in VARIANTS.items():
        t = times[name]
        med = statistics.median(t)
        rounds = ", ".join(f"{x:.4f}" for x in t)
        lines.append(f"| {name} | {med:.4f} | {rounds} | {med / base:.3f} | {old_data} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("method_cost.md"))
    args = parser.parse_args()
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        times = measure(args.rounds, Path(tmp))
    text = report(times, args, (before, os.getloadavg()[0]))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
