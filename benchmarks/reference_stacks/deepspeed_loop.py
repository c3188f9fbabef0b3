"""The minimal DeepSpeed training loop, a reference stack for stack_cost.py (see common.py): the run's
model, optimizer and DeepSpeed JSON, pre-tokenized blocks, forward / backward / step and nothing else."""

from __future__ import annotations

import deepspeed
import torch.distributed as dist
from common import arguments, clock, report, setup

from pretrain.engine import build_optimizer, deepspeed_config


def main(sync_loss: bool = False) -> None:
    """`sync_loss`: read each micro-batch's loss on the host before backward, as our trainer does for the
    ranks' agreement on a stop or a non-finite loss: the difference between the two loops is its cost."""
    args = arguments()
    deepspeed.init_distributed()
    cfg, model, blocks = setup(args)
    ds = deepspeed_config(cfg, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    blocks = blocks[dist.get_rank() :: dist.get_world_size()]  # rank r trains blocks r, r + W, ...
    step_ends = [] if args.warmup else [clock()]  # the clock starts at the end of step `warmup`
    for i in range((args.warmup + args.steps) * accum):
        batch = blocks[i * micro : (i + 1) * micro].to(engine.device)
        loss = engine(input_ids=batch, labels=batch).loss
        if sync_loss:
            loss.item()  # on a GPU the host waits here for the forward before it queues backward
        engine.backward(loss)
        engine.step()
        if (i + 1) % accum == 0 and (i + 1) // accum >= max(args.warmup, 1):
            step_ends.append(clock())
    report(args, step_ends, micro * accum * cfg.train.seq_len * dist.get_world_size())


if __name__ == "__main__":
    main()
