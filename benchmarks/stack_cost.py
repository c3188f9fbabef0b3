"""Cost per token of our loop, its methods, and the stacks users run today (not a test).

Run (writes benchmarks/stack_cost.md; the full run about 45 minutes on 2 CPU cores, --quick a few):
    python benchmarks/stack_cost.py            # 3 rounds, ZeRO-2 and ZeRO-3, 60 measured steps
    python benchmarks/stack_cost.py --quick    # 1 round, ZeRO-2, 30 steps -> benchmarks/quick/
    bash benchmarks/gpu_cost.sh                # one GPU, bf16, a 135M- and a 1B-sized Llama

By default on 2 CPU ranks, the demo model (configs/demo.yaml: a 4-layer Llama from scratch, micro-batch
8 x seq 128 per rank), the same DeepSpeed JSON for every variant:
- ours: `pretrain train` with `none`, `migu`, `random`, replay 5% and EWC over two phases (code, then the
  measured phase on docs: the methods act from phase 2 on); its time is phase 2's `seconds` from
  metrics.json, and its data-waiting share that phase's `data_wait_share`;
- Hugging Face `Trainer` with its DeepSpeed integration, and a minimal DeepSpeed loop
  (reference_stacks/), trained on phase 2's first blocks for the same steps, from the same initial
  weights, tokenized beforehand (so their data costs nothing: ours reads and tokenizes while it trains),
  timed after as many untimed steps as ours' phase 1 has (their clocks start warm, as ours does);
  `--stacks deepspeed_loop_sync` adds the bare loop with our per-micro-step `loss.item()` before backward
  (a GPU question: the host's wait for the forward; see gpu_cost.md).
Every round runs every variant once in a rotated order, so the machine's drift spreads over all. Beside
the mean step (the phase's seconds over its steps) stands the median of the steps' own times, which a
few stalls in a short window (a GPU's 30 steps are a few seconds) do not move. The
host memory is the largest resident set of any process of the run (os.wait4 on the launcher: its ranks
included) over the whole run; on a GPU, rank 0's peak allocated GPU memory is shown beside it. The
table is rewritten after every run, so a run cut short leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from method_cost import REPO, VARIANTS, environment, run_config

PHASE1_STEPS = 5
METHODS = ("none", "migu", "random", "replay 5%", "ewc")
# on request only: `none` without the read-ahead thread, to tell its cost on a host-bound GPU step
# and `none` reading its files pre-tokenized (train.token_cache, filled before the rounds): its data then
# costs what the references' does, nearly nothing
EXTRA = {"none no-prefetch": ({"train": {"prefetch": 0}}, "no"), "none pre-tokenized": ({}, "no")}
STACKS = {
    "hf_trainer": "HF Trainer + DeepSpeed",
    "deepspeed_loop": "bare DeepSpeed loop",
    "deepspeed_loop_sync": "bare loop + loss.item() before backward",  # ours' sync, alone: a GPU question
}
DEFAULT_STACKS = ["hf_trainer", "deepspeed_loop"]
# Llama shapes from scratch (the tokenizer is trained on the demo corpora, so the vocabulary is smaller
# than the originals': the layers are the originals')
MODELS = {
    "demo": ({}, {}),  # configs/demo.yaml's
    "135m": (  # SmolLM2-135M's layers
        dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3),
        dict(micro_batch_size=8, seq_len=1024),
    ),
    "1b": (  # Llama-3.2-1B's layers
        dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8),
        dict(micro_batch_size=4, seq_len=1024),
    ),
}


def launch(args: argparse.Namespace, command: list[str], port: int) -> int:
    """Run a deepspeed launch to its end; the peak resident KiB of its largest process."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks)]
    cmd += ["--master_port", str(port), *command]
    with tempfile.TemporaryFile("w+") as log:
        env = environment(args.gpu)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of the launcher and its ranks
        code = os.waitstatus_to_exitcode(status)
        if code:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{log.read()[-3000:]}")
    return usage.ru_maxrss


def ours(args: argparse.Namespace, cfg: dict, work: Path, port: int, phase: int = 1) -> dict:
    """Phase `phase`'s (0-based) cost in one `pretrain train` run."""
    path = work / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    peak = launch(args, ["--module", "pretrain", "train", "--config", str(path)], port)
    run_dir = Path(cfg["output_dir"])
    phase = json.loads((run_dir / "metrics.json").read_text())["train"][phase]
    # the phase-end checkpoints are never read here, and a 1B model's take ~14 GB each (bf16 weights,
    # fp32 master and Adam moments): the runs one after another would fill a GPU machine's disk
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "s_per_step": phase["seconds"] / phase["steps"],
        "median_step": phase["step_seconds_median"],
        "tokens_per_s": phase["tokens_per_s"],
        "data_wait_share": phase["data_wait_share"],
        "peak_mib": peak / 1024,
        "gpu_mib": phase.get("peak_gpu_mib"),
    }


def stack(args: argparse.Namespace, script: str, cfg_path: Path, blocks: Path, work: Path, port: int) -> dict:
    out = work / f"{script}.json"
    command = [str(REPO / "benchmarks" / "reference_stacks" / f"{script}.py"), "--config", str(cfg_path)]
    command += ["--blocks", str(blocks), "--steps", str(args.steps), "--warmup", str(PHASE1_STEPS)]
    command += ["--out", str(out)]
    peak = launch(args, command, port)
    result = json.loads(out.read_text())
    return {
        "s_per_step": result["seconds"] / args.steps,
        "median_step": result["step_seconds_median"],
        "tokens_per_s": result["tokens_per_s"],
        "peak_mib": peak / 1024,
        "gpu_mib": result.get("peak_gpu_mib"),
    }


def config(args: argparse.Namespace, data: Path, work: Path, name: str, stage: int, out: Path) -> dict:
    """`name`'s run config at `stage`, with the chosen model, precision and phase steps."""
    cfg = run_config(
        data, out, work / "tokenizer", {**VARIANTS, **EXTRA}[name][0], (PHASE1_STEPS, args.steps), stage
    )
    model, train = MODELS[args.model]
    cfg["model"].update(model)
    positions = cfg["model"]["max_position_embeddings"]
    cfg["model"]["max_position_embeddings"] = max(positions, train.get("seq_len", 0))
    cfg["train"].update(train)
    if args.model != "demo":
        cfg["tokenizer"]["vocab_size"] = 8192
    if name == "none pre-tokenized":
        cfg["train"]["token_cache"] = str(work / "token_cache")
    ds = json.loads(Path(cfg["deepspeed"]["config"]).read_text())
    ds["bf16"] = {"enabled": args.bf16}
    cfg["deepspeed"]["config"] = str(work / f"zero{stage}.json")
    Path(cfg["deepspeed"]["config"]).write_text(json.dumps(ds))
    return cfg


def measure(args: argparse.Namespace, work: Path) -> None:
    from reference_stacks.common import write_blocks

    from pretrain.config import validate
    from pretrain.demo_corpora import build_demo_corpora
    from pretrain.token_cache import pretokenize

    data = args.data or work / "data"
    if not args.data:
        build_demo_corpora(str(data))
    paths, blocks = {}, {}
    for stage in args.stages:  # the reference stacks' config: `none` at that stage, phase 2's blocks
        cfg = config(args, data, work, "none", stage, work / f"ref{stage}")
        paths[stage] = work / f"ref{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump(cfg))
        out = work / f"blocks{stage}.pt"
        steps = PHASE1_STEPS + args.steps  # the references' untimed warm-up, then the timed steps
        blocks[stage] = write_blocks(validate(cfg), "docs", steps, args.ranks, out)
    if "none pre-tokenized" in args.methods:  # untimed, once: the files are the same at every stage
        cfg = validate(config(args, data, work, "none pre-tokenized", args.stages[0], work / "pre"))
        for path, meta in pretokenize(cfg):
            print(f"pre-tokenized {path}: {meta['tokens']:,} tokens", flush=True)
    # `none` and the reference stacks first, then the other methods: a run cut short by a time limit
    # (gpu_cost.sh) keeps the comparison of stacks at every stage; the rounds rotate this order anyway
    first = [name for name in (*args.methods, *args.stacks) if name == "none" or name in STACKS]
    rest = [name for name in args.methods if name not in first]
    names = [(name, stage) for group in (first, rest) for stage in args.stages for name in group]
    results: dict[tuple[str, int], list[dict]] = {v: [] for v in names}
    start, before = time.monotonic(), os.getloadavg()[0]
    for r in range(args.rounds):
        for i, (name, stage) in enumerate(names[r % len(names) :] + names[: r % len(names)]):
            port = 29700 + i
            if name in STACKS:
                got = stack(args, name, paths[stage], blocks[stage], work, port)
            else:
                out = work / f"r{r}-{name.replace(' ', '').replace('%', '')}-z{stage}"
                got = ours(args, config(args, data, work, name, stage, out), work, port)
            results[(name, stage)].append(got)
            print(f"round {r + 1}/{args.rounds} {name} ZeRO-{stage}: {got}", flush=True)
            minutes = (time.monotonic() - start) / 60
            args.out.write_text(report(results, args, (before, os.getloadavg()[0]), minutes))


def median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def table(results: dict[tuple[str, int], list[dict]], args: argparse.Namespace, stage: int) -> list[str]:
    base = results[("none", stage)] if "none" in args.methods else []
    gpu = " | GPU MiB (rank 0)" if args.gpu else ""
    lines = [
        f"### ZeRO-{stage}",
        "",
        "| variant | s/step | tokens/s (median) | all rounds | step time / none | median step s (/ none) "
        f"| ours (none) / this, tokens/s | data waiting | host peak MiB{gpu} |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.gpu else ""),
    ]
    for name in (*args.methods, *args.stacks):
        runs = results[(name, stage)]
        if not runs:
            continue
        rounds = ", ".join(f"{run['tokens_per_s']:.0f}" for run in runs)
        step = median(runs, "s_per_step")
        step_ratio = f"{step / median(base, 's_per_step'):.3f}" if base else ""
        ours_ratio = f"{median(base, 'tokens_per_s') / median(runs, 'tokens_per_s'):.3f}" if base else ""
        wait = f"{median(runs, 'data_wait_share'):.2%}" if name not in STACKS else "(pre-tokenized)"
        label = STACKS[name] if name in STACKS else f"ours, {name}"
        typical = median(runs, "median_step")
        typical_ratio = f" ({typical / median(base, 'median_step'):.3f})" if base else ""
        row = f"| {label} | {step:.4f} | {median(runs, 'tokens_per_s'):.0f} | {rounds} | {step_ratio} "
        row += f"| {typical:.4f}{typical_ratio} "
        row += f"| {ours_ratio if name in STACKS else ''} | {wait} | {median(runs, 'peak_mib'):.0f} |"
        if args.gpu:
            gpu_mib = median(runs, "gpu_mib")
            row += f" {gpu_mib:.0f} |" if gpu_mib is not None else " |"
        lines.append(row)
    return lines + [""]


def machine(gpu: bool) -> str:
    where = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return f"{torch.cuda.get_device_name()}, {where}" if gpu else where


def report(results, args: argparse.Namespace, load: tuple[float, float], minutes: float) -> str:
    lines = [
        f"# Cost per token: our loop, its methods, and the stacks users run today ({args.ranks} "
        f"{'GPU' if args.gpu else 'CPU rank'}{'s' if args.ranks > 1 else ''}, model {args.model}"
        f"{', bf16' if args.bf16 else ''})",
        "",
        f"Command: `python benchmarks/stack_cost.py {shlex.join(args.argv)}` ({args.rounds} round(s), "
        f"{args.steps} measured steps, {minutes:.0f} minutes). What each variant is and how its time is "
        "taken: the docstring of benchmarks/stack_cost.py.",
        f"Machine: {machine(args.gpu)}; load average {load[0]:.2f} before, {load[1]:.2f} after.",
        "",
    ]
    for stage in args.stages:
        lines += table(results, args, stage)
    return "\n".join(lines)


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, ZeRO-2, 30 steps (a few minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=[*METHODS, *EXTRA])
    parser.add_argument("--stacks", nargs="*", default=DEFAULT_STACKS, choices=list(STACKS))
    parser.add_argument("--model", default="demo", choices=list(MODELS))
    parser.add_argument("--gpu", action="store_true", help="GPU ranks (else CPU ranks, DS_ACCELERATOR=cpu)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--data",
        type=Path,
        help="an existing demo corpus (python -m pretrain.demo_corpora DIR; code and "
        "docs are read); default: built in the work directory from the installed packages",
    )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.rounds, args.steps, args.stages = 1, 30, [2]
    here = Path(__file__).parent
    args.out = args.out or (here / "quick" if args.quick else here) / "stack_cost.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = arguments(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
