"""Held-out evaluation: mean token loss and perplexity of every domain, the work split over ranks.

Each rank scores every world_size-th block and the sums are all-reduced, so the result is the same on
every rank and independent of the world size up to float summation order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import RunConfig
from pretrain.data import bad_record_counter, heldout_blocks
from pretrain.distributed import DistInfo, all_reduce_sum
from pretrain.results import RunResults


@torch.no_grad()
def evaluate_domains(engine, heldout: dict[str, torch.Tensor], batch_size: int, dist: DistInfo) -> dict:
    """{"loss": {domain: mean token loss}, "perplexity": {...}, "tokens": {...}}."""
    was_training = engine.module.training
    engine.eval()
    out = {"loss": {}, "perplexity": {}, "tokens": {}}
    for name, blocks in heldout.items():
        loss_sum, tokens = _score_shard(engine, blocks, batch_size, dist)
        loss = loss_sum / tokens
        out["loss"][name] = loss
        out["perplexity"][name] = math.exp(loss) if loss < 700 else math.inf
        out["tokens"][name] = int(tokens)
    engine.train(was_training)
    return out


def _score_shard(engine, blocks: torch.Tensor, batch_size: int, dist: DistInfo) -> tuple[float, float]:
    mine = blocks[dist.rank :: dist.world_size]
    # Every rank runs the same number of forwards: ZeRO-3 gathers parameters collectively in forward.
    per_rank = math.ceil(len(blocks) / dist.world_size)
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, per_rank, batch_size):
        batch = mine[start : start + batch_size]
        if len(batch) == 0:
            engine(input_ids=blocks[:1].to(engine.device))  # keeps the collective count in step
            continue
        totals += _token_loss_sum(engine, batch.to(engine.device))
    all_reduce_sum(totals)
    return totals[0].item(), totals[1].item()


def _token_loss_sum(engine, batch: torch.Tensor) -> torch.Tensor:
    logits = engine(input_ids=batch).logits[:, :-1].float()
    targets = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return torch.tensor([loss.item(), targets.numel()], dtype=torch.float64)


def load_heldout(cfg: RunConfig, tokenizer, results: RunResults) -> dict[str, torch.Tensor]:
    """Every domain's fixed evaluation blocks; bad records skipped under that policy count in `results`."""
    heldout = {}
    for d in cfg.domains:
        skip = bad_record_counter(cfg.train.on_bad_record)
        heldout[d.name] = heldout_blocks(
            d.heldout, d.text_field, tokenizer, cfg.train.seq_len, cfg.eval.max_blocks, skip
        )
        results.count_skipped("heldout", d.name, skip)
    return heldout
