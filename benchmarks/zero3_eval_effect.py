"""Does an in-run evaluation slow the training steps after it? (not a test)

Run (prints a table and writes benchmarks/zero3_eval_effect.md; a few minutes on 2 CPU cores):
    python benchmarks/zero3_eval_effect.py --rounds 2

stack_cost.py found our loop at ZeRO-3 on 2 CPU ranks at about 0.7 of the bare DeepSpeed loop's tokens/s,
and at ZeRO-2 close to it. This isolates the one difference that matters there: `pretrain train` with
`none` on the demo model, one phase of 60 steps on docs at ZeRO-2 and ZeRO-3, with the held-out
evaluation of row 0 before the phase (eval.inline: true, the default) and without it (false). The time
is the phase's seconds per step from metrics.json; rounds alternate the variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from stack_cost import arguments as stack_arguments
from stack_cost import config, machine, ours

STEPS = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("zero3_eval_effect.md"))
    args = parser.parse_args()
    run_args = stack_arguments(["--steps", str(STEPS), "--out", str(args.out)])
    times: dict[tuple[int, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from pretrain.demo_corpora import build_demo_corpora

        build_demo_corpora(str(work / "data"))
        for r in range(args.rounds):
            for stage in (2, 3):
                for inline in (True, False) if r % 2 == 0 else (False, True):
                    cfg = config(
                        run_args, work / "data", work, "none", stage, work / f"r{r}-{stage}-{inline}"
                    )
                    cfg["phases"] = [{"domain": "docs", "steps": STEPS}, {"domain": "docs", "steps": 1}]
                    cfg["eval"]["inline"] = inline
                    got = ours(run_args, cfg, work, 29760)
                    times.setdefault((stage, inline), []).append(got["s_per_step"])
                    print(f"round {r + 1} ZeRO-{stage} eval.inline={inline}: {got['s_per_step']:.4f} s/step")
    lines = [
        "# Training steps after an in-run evaluation (CPU, 2 ranks, demo model, `none`)",
        "",
        f"Command: `python benchmarks/zero3_eval_effect.py --rounds {args.rounds}`",
        f"Machine: {machine(False)}.",
        "",
        "| ZeRO | eval.inline | s/step (median) | all rounds |",
        "|---|---|---|---|",
    ]
    for (stage, inline), t in sorted(times.items()):
        rounds = ", ".join(f"{x:.4f}" for x in t)
        lines.append(f"| {stage} | {str(inline).lower()} | {statistics.median(t):.4f} | {rounds} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
