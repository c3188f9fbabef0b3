"""One rank: an engine trains two steps and checkpoints, the checkpoint is converted to DeepSpeed's
universal format, and a fresh engine loads it through load_elastic, as a resume on other ranks does
(launched by test_resume.py). Rank 0 writes each engine's per-group weight decay."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from worker_start import start_worker

from pretrain.checkpoint import checkpoint_dir, save_checkpoint
from pretrain.elastic import Elastic, load_elastic, universal_checkpoint
from pretrain.engine import build_engine
from pretrain.model import build_model

VOCAB, TAG = 64, "step-2"


def main() -> None:
    args, dist, cfg = start_worker()
    run = Path(cfg.output_dir)
    saved = build_engine(cfg, build_model(cfg.model, VOCAB, cfg.train.seed), [4], dist.world_size)
    tokens = torch.randint(
        0,
        VOCAB,
        (cfg.train.micro_batch_size, cfg.train.seq_len),
        generator=torch.Generator().manual_seed(dist.rank),
    )
    for _ in range(2):
        saved.backward(saved(input_ids=tokens, labels=tokens).loss)
        saved.step()
    save_checkpoint(saved, run, TAG, {}, {"stream": None}, dist, keep=2)
    if dist.is_main:
        universal_checkpoint(checkpoint_dir(run) / TAG)
    torch.distributed.barrier()
    model = build_model(cfg.model, VOCAB, cfg.train.seed)
    loaded = build_engine(cfg, model, [4], dist.world_size, load_universal=True)
    load_elastic(loaded, run, Elastic(TAG, dist.world_size, cfg.train.grad_accum, cfg, True), dist)
    if dist.is_main:
        decay = {
            name: [g["weight_decay"] for g in e.optimizer.param_groups]
            for name, e in (("saved", saved), ("loaded", loaded))
        }
        Path(args.out).write_text(json.dumps(decay))


if __name__ == "__main__":
    main()
