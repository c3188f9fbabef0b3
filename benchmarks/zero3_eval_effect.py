"""Does an in-run evaluation slow the training steps after it? (not a test)

Run (writes benchmarks/zero3_eval_effect.md; about ten minutes on 2 CPU cores):
    python benchmarks/zero3_eval_effect.py --rounds 2

stack_cost.py found our loop at ZeRO-3 on 2 CPU ranks at about 0.7 of the bare DeepSpeed loop's tokens/s,
and at ZeRO-2 close to it. This isolates the one difference that matters there: `pretrain train` with
`none` on the demo model, one phase of 60 steps on docs at ZeRO-2 and ZeRO-3, with the held-out
evaluation of row 0 before the phase (eval.inline: true, the default) and without it (false).
benchmarks/config_effect.py does the measuring.
"""

from __future__ import annotations

import sys
from pathlib import Path

from config_effect import main

if __name__ == "__main__":
    args = ["--key", "eval.inline", "--values", "true", "false", "--stages", "2", "3", *sys.argv[1:]]
    title = "Training steps after an in-run evaluation (CPU, 2 ranks, demo model, `none`)"
    main(args, defaults={"title": title, "out": Path(__file__).with_name("zero3_eval_effect.md")})
