"""Learning-rate schedule that re-warms and re-decays in every phase (Ibrahim et al. 2024).

Continual pre-training on a new domain starts from a decayed model; re-warming to the peak and decaying
again within each phase is the recipe that recovers plasticity without a full restart.
"""

from __future__ import annotations

import bisect
import math

import torch


def phase_lr_factor(
    step: int, phase_starts: list[int], phase_steps: list[int], warmup: int, min_ratio: float
) -> float:
    """Multiplier of the peak lr at global optimizer step `step` (0-based)."""
    phase = max(0, bisect.bisect_right(phase_starts, step) - 1)
    local, length = step - phase_starts[phase], phase_steps[phase]
    warm = min(warmup, max(length - 1, 0))
    if local < warm:
        return (local + 1) / (warm + 1)
    progress = min(1.0, (local - warm) / max(1, length - warm - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def phase_schedule(
    optimizer: torch.optim.Optimizer, phase_steps: list[int], warmup: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    starts = [sum(phase_steps[:i]) for i in range(len(phase_steps))]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: phase_lr_factor(step, starts, phase_steps, warmup, min_ratio)
    )


def set_peak_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make `lr` the peak of a (resumed) schedule from its current step on.

    A loaded scheduler keeps the peak it was saved with (`base_lrs`), and the optimizer the lr of the
    step it stopped at; both are set to what the new peak gives at that step.
    """
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
