"""Hugging Face `Trainer` with its DeepSpeed integration, a reference stack for stack_cost.py (see
common.py): the stack MIGU's published code trains with. The run's model and DeepSpeed JSON, Trainer's
own AdamW with the run's lr, betas, weight decay and clipping, pre-tokenized blocks.

`use_cpu=True` matters on CPU ranks: without it every rank is given the same batches (Trainer sees no
distributed set-up it knows), which halves the data a step trains on without any error."""

from __future__ import annotations

import tempfile

import deepspeed
import torch
import torch.distributed as dist
from common import arguments, clock, report, setup
from transformers import Trainer, TrainerCallback, TrainingArguments

from pretrain.engine import deepspeed_config, model_dtype


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class StepClock(TrainerCallback):
    """The clock at the end of optimizer step `warmup` (if 0, the loop's start) and of each later step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup == 0:
            self.step_ends.append(clock())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= max(self.warmup, 1):
            self.step_ends.append(clock())


def main() -> None:
    args = arguments()
    deepspeed.init_distributed()
    cfg, model, blocks = setup(args)
    world = dist.get_world_size()
    t = cfg.train
    timer = StepClock(args.warmup)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            use_cpu=not torch.cuda.is_available(),
            bf16=model_dtype(cfg) == torch.bfloat16,  # Trainer refuses a DeepSpeed JSON that differs
            deepspeed=deepspeed_config(cfg, world),
            per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.grad_accum,
            max_steps=args.warmup + args.steps,
            learning_rate=t.lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.betas[0],
            adam_beta2=t.betas[1],
            max_grad_norm=t.grad_clip,
            warmup_steps=t.warmup_steps,
            lr_scheduler_type="constant_with_warmup",
            seed=t.seed,
            save_strategy="no",
            report_to=[],
            logging_steps=10**9,
            disable_tqdm=True,
            dataloader_drop_last=True,
        )
        # Trainer's own distributed sampler gives each rank its share of the blocks
        Trainer(model=model, args=training, train_dataset=Blocks(blocks), callbacks=[timer]).train()
    report(args, timer.step_ends, t.micro_batch_size * t.grad_accum * t.seq_len * world)


if __name__ == "__main__":
    main()
