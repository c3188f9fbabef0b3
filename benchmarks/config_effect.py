"""What one config key does to the training steps (not a test).

`pretrain train` with `none` on the demo model (2 CPU ranks, as stack_cost.py), one phase of --steps on
docs, each value of --key at each of --stages; the rounds run the values in alternating order. The time
is the phase's seconds per step from metrics.json, the data waiting its `data_wait_share`. E.g.
    python benchmarks/config_effect.py --key train.prefetch --values 0 2 --rounds 3
    python benchmarks/zero3_eval_effect.py --rounds 2     # eval.inline true / false at ZeRO-2 and ZeRO-3
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from stack_cost import arguments as stack_arguments
from stack_cost import config, machine, ours


def measure(key: str, values: list, stages: list[int], rounds: int, steps: int) -> dict[tuple, list[dict]]:
    """{(stage, value): [phase cost of each round]}"""
    section, name = key.split(".")
    run_args = stack_arguments(["--steps", str(steps), "--out", "/dev/null"])
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from pretrain.demo_corpora import build_demo_corpora

        build_demo_corpora(str(work / "data"))
        for r in range(rounds):
            for stage in stages:
                for i, value in enumerate(values if r % 2 == 0 else values[::-1]):
                    cfg = config(run_args, work / "data", work, "none", stage, work / f"r{r}-{stage}-{i}")
                    cfg["phases"] = [{"domain": "docs", "steps": steps}, {"domain": "docs", "steps": 1}]
                    cfg.setdefault(section, {})[name] = value
                    got = ours(run_args, cfg, work, 29760, phase=0)
                    runs.setdefault((stage, value), []).append(got)
                    print(
                        f"round {r + 1} ZeRO-{stage} {key}={value}: {got['s_per_step']:.4f} s/step",
                        flush=True,
                    )
    return runs


def report(runs: dict[tuple, list[dict]], key: str, command: str, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        f"Machine: {machine(False)}.",
        "",
        f"| ZeRO | {key} | s/step (median) | all rounds | data waiting (median) |",
        "|---|---|---|---|---|",
    ]
    for (stage, value), got in runs.items():
        steps = [g["s_per_step"] for g in got]
        wait = statistics.median(g["data_wait_share"] for g in got)
        rounds = ", ".join(f"{x:.4f}" for x in steps)
        shown = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"| {stage} | {shown} | {statistics.median(steps):.4f} | {rounds} | {wait:.2%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, defaults: dict | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="section.name, e.g. train.prefetch")
    parser.add_argument("--values", nargs="+", required=True, help="YAML values, e.g. 0 2 or true false")
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    values = [yaml.safe_load(v) for v in args.values]
    runs = measure(args.key, values, args.stages, args.rounds, args.steps)
    title = args.title or f"Training steps by {args.key} (CPU, 2 ranks, demo model, `none`)"
    command = f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(argv or [])}".strip()
    text = report(runs, args.key, command, title)
    out = args.out or Path(__file__).with_name(f"{args.key.replace('.', '_')}_effect.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
