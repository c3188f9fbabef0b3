"""What both reference stacks share with `pretrain train`: the run config's model (the same initial
weights), tokenizer, optimizer and DeepSpeed JSON, and the phase's blocks, tokenized once beforehand.

`stack_cost.py` writes the blocks (`write_blocks`); each stack's script is started by the deepspeed
launcher with `--config RUN.yaml --blocks BLOCKS.pt --steps N --out RESULT.json` and writes, on rank 0,
the seconds of its N optimizer steps and the tokens they trained. `--warmup W` steps run first, untimed:
ours is timed in its second phase, after the first phase's steps, so the references' clock too starts
warm, at the end of step W (a cold first step, with a GPU's first allocations and kernel choices, would
otherwise count against them and not against ours). The clock stops at the end of the last step, once
the accelerator has finished it (`clock`): the span `pretrain train` reports as a phase's `seconds`.
The clock is read at every step's end, as ours does (its loss is read each step, which waits for the
GPU too), for the median step beside the mean.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pretrain.config import RunConfig, load_config
from pretrain.data import heldout_blocks
from pretrain.model import build_model
from pretrain.tokenizer import resolve_tokenizer


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--blocks", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher appends it
    return parser.parse_args()


def setup(args: argparse.Namespace) -> tuple[RunConfig, torch.nn.Module, torch.Tensor]:
    """The run config, its initial model, and the blocks of all ranks."""
    cfg = load_config(args.config)
    model = build_model(cfg.model, len(resolve_tokenizer(cfg)), cfg.train.seed)
    return cfg, model, torch.load(args.blocks)


def clock() -> float:
    """Now, once the accelerator has finished what was queued: a GPU step returns before its kernels end."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def write_blocks(cfg: RunConfig, domain: str, steps: int, world_size: int, out: Path) -> Path:
    """The first blocks of `domain`'s train files, packed as `pretrain train` packs them: enough for
    `steps` optimizer steps on `world_size` ranks."""
    dom = next(d for d in cfg.domains if d.name == domain)
    n = steps * cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    blocks = heldout_blocks(dom.train, dom.text_field, resolve_tokenizer(cfg), cfg.train.seq_len, n)
    torch.save(blocks.repeat(-(-n // len(blocks)), 1)[:n], out)  # epochs over a short corpus, as ours
    return out


def report(args: argparse.Namespace, step_ends: list[float], tokens_per_step: int) -> None:
    """From the clock at the warm-up's end and at each timed step's end (`step_ends`, steps + 1 readings)."""
    if int(os.environ["RANK"]) == 0:
        steps, seconds = len(step_ends) - 1, step_ends[-1] - step_ends[0]
        result = {"seconds": seconds, "steps": steps, "tokens_per_s": steps * tokens_per_step / seconds}
        result["step_seconds_median"] = statistics.median(b - a for a, b in itertools.pairwise(step_ends))
        if torch.cuda.is_available():
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        Path(args.out).write_text(json.dumps(result))
