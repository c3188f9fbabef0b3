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
from pretrain.instruct import IGNORE, Examples, heldout_examples
from pretrain.results import RunResults


@torch.no_grad()
def evaluate_domains(
    engine, heldout: dict[str, torch.Tensor | Examples], batch_size: int, dist: DistInfo
) -> dict:
    """{"loss": {domain: mean token loss}, "perplexity": {...}, "tokens": {...}}.

    A text domain's loss is over every token of its blocks; an instruction domain's over the answer
    tokens (and EOS) of its examples: how well it answers, not how well it predicts the prompts."""
    was_training = engine.module.training
    engine.eval()
    out = {"loss": {}, "perplexity": {}, "tokens": {}}
    for name, blocks in heldout.items():
        loss_sum, tokens = _score_shard(engine, blocks, batch_size, dist)
        loss = loss_sum / tokens
        out["loss"][name] = loss
        out["perplexity"][name] = math.inf if loss >= 700 else math.exp(loss)  # NaN stays NaN
        out["tokens"][name] = int(tokens)
    engine.train(was_training)
    return out


def _score_shard(
    engine, blocks: torch.Tensor | Examples, batch_size: int, dist: DistInfo
) -> tuple[float, float]:
    mine = blocks[dist.rank :: dist.world_size]
    # Every rank runs the same number of forwards: ZeRO-3 gathers parameters collectively in forward.
    per_rank = math.ceil(len(blocks) / dist.world_size)
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, per_rank, batch_size):
        batch = mine[start : start + batch_size]
        if len(batch) == 0:
            _logits(engine, blocks[:1].to(engine.device))  # keeps the collective count in step
            continue
        totals += _token_loss_sum(engine, batch.to(engine.device))
    all_reduce_sum(totals)
    return totals[0].item(), totals[1].item()


def _token_loss_sum(engine, batch: torch.Tensor | Examples) -> torch.Tensor:
    """(summed loss, tokens scored) of a batch: every next token of a text block, the answer tokens of
    an example (its labels; IGNORE elsewhere)."""
    logits = _logits(engine, batch)[:, :-1].float()
    targets = (batch.labels if isinstance(batch, Examples) else batch)[:, 1:]
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE, reduction="sum")
    return torch.tensor([loss.item(), (flat != IGNORE).sum().item()], dtype=torch.float64)


def _logits(engine, batch: torch.Tensor | Examples) -> torch.Tensor:
    if isinstance(batch, Examples):
        return engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return engine(input_ids=batch).logits


def load_heldout(cfg: RunConfig, tokenizer, results: RunResults) -> dict[str, torch.Tensor | Examples]:
    """Every domain's fixed evaluation blocks (an instruction domain's: its first eval.max_blocks
    examples); bad records skipped under that policy count in `results`."""
    heldout = {}
    seq_len, most = cfg.train.seq_len, cfg.eval.max_blocks
    for d in cfg.domains:
        skip = bad_record_counter(cfg.train.on_bad_record)
        if d.instruction is not None:
            heldout[d.name] = heldout_examples(d.heldout, d.instruction, tokenizer, seq_len, most, skip)
        else:
            heldout[d.name] = heldout_blocks(d.heldout, d.text_field, tokenizer, seq_len, most, skip)
        results.count_skipped("heldout", d.name, skip)
    return heldout
