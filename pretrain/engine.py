"""DeepSpeed set-up: merge the run config into the DeepSpeed JSON and build the engine.

The run config owns batch size, accumulation and clipping; the DeepSpeed JSON owns ZeRO and precision.
A DeepSpeed file that sets one of the run's keys to a different value is an error, not a silent override.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pretrain.config import ConfigError, RunConfig
from pretrain.schedule import phase_schedule

_RUN_OWNED = {
    "train_micro_batch_size_per_gpu": lambda t: t.micro_batch_size,
    "gradient_accumulation_steps": lambda t: t.grad_accum,
    "gradient_clipping": lambda t: t.grad_clip,
}


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    with open(cfg.deepspeed.config) as f:
        ds = json.load(f)
    for key, value_of in _RUN_OWNED.items():
        value = value_of(cfg.train)
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"{cfg.deepspeed.config}: `{key}` is {ds[key]} but the run config gives {value}; "
                "set it in the run config (train.*) only"
            )
        ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two keys above and the world size
    ds.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is a plain torch one
    return ds


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # decay matrices only: norms and biases are conventionally left out
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


def build_engine(cfg: RunConfig, model: torch.nn.Module, phase_steps: list[int], world_size: int):
    """The DeepSpeed engine with the run's optimizer and per-phase re-warming schedule."""
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    scheduler = phase_schedule(optimizer, phase_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine


def build_eval_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int):
    """An engine for evaluation only: no optimizer state is allocated (ZeRO-3 still shards the weights)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=deepspeed_config(cfg, world_size))
    return engine
