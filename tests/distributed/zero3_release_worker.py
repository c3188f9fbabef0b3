"""One rank of two ZeRO-3 engines, each on a fresh model, that train three steps: the first without a
held-out evaluation, the second after one (launched by test_zero3_release.py; one launch for both, since
starting the ranks is most of the test's time). Rank 0 saves, per engine, which parameters are still
gathered after the third step's forward, before its backward: the coordinator's release decisions, which an
evaluation must not change. The memo is keyed by coordinator, so the first engine's entries cannot answer
for the second."""

from __future__ import annotations

import atexit
import gc
import json
from pathlib import Path

import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from worker_start import start_worker

from pretrain.config import RunConfig
from pretrain.distributed import DistInfo
from pretrain.engine import build_engine
from pretrain.evaluate import evaluate_domains
from pretrain.model import build_model

VOCAB, STEPS = 64, 3


def main() -> None:
    args, dist, cfg = start_worker()
    got = {
        mode: _kept_after_forward(cfg, dist, evaluate)
        for mode, evaluate in (("plain", False), ("evaluated", True))
    }
    if dist.is_main:
        Path(args.out).write_text(json.dumps(got))


def _kept_after_forward(cfg: RunConfig, dist: DistInfo, evaluate: bool) -> dict:
    engine = build_engine(cfg, build_model(cfg.model, VOCAB, cfg.train.seed), [STEPS], dist.world_size)
    g = torch.Generator().manual_seed(dist.rank)
    blocks = torch.randint(0, VOCAB, (8, cfg.train.seq_len), generator=g)
    if evaluate:  # two domains: two forwards, as the run's evaluation before phase 1
        evaluate_domains(engine, {"a": blocks, "b": blocks.flip(0)}, cfg.eval.batch_size, dist)
    for step in range(STEPS):
        batch = blocks[: cfg.train.micro_batch_size]
        loss = engine(input_ids=batch, labels=batch).loss
        if step == STEPS - 1:
            params = list(engine.module.named_parameters())
            kept = sorted(
                n for n, p in params if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist
            )
            persistent = sorted(n for n, p in params if p.ds_persist)
        engine.backward(loss)
        engine.step()
    names = [n for n, _ in engine.module.named_parameters()]
    return {"kept": kept, "persistent": persistent, "params": names}


if __name__ == "__main__":
    atexit.register(gc.freeze)  # a quick exit, as `python -m pretrain` (pretrain/__main__.py)
    main()
