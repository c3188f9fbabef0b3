"""Learning-rate schedules for continual pre-training, as a multiplier of the peak lr per global step.

- `rewarm_cosine` (default): every phase re-warms linearly to the peak and cosine-decays to
  `min_lr_ratio` (Ibrahim et al. 2024: re-warming and re-decaying recovers plasticity without a restart).
- `constant`: warm up once, at the start of the run, then the peak throughout.
- `wsd` (warmup-stable-decay): every phase warms up, holds the peak, and decays linearly to
  `min_lr_ratio` over its last `decay_fraction` of steps: one cool-down per phase.
- `infinite`: warm up once, cosine cool-down to `constant_ratio` over the rest of phase 1, hold that
  through the later phases, and anneal linearly to `min_lr_ratio` over the last `decay_fraction` of the
  last phase: no re-warming between phases (Ibrahim et al. 2024's infinite schedule).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Literal

import torch

Kind = Literal["rewarm_cosine", "constant", "wsd", "infinite"]


def phase_lr_factor(
    step: int,
    phase_starts: list[int],
    phase_steps: list[int],
    warmup: int,
    min_ratio: float,
    kind: Kind = "rewarm_cosine",
    decay_fraction: float = 0.2,
    constant_ratio: float = 0.5,
) -> float:
    """Multiplier of the peak lr at global optimizer step `step` (0-based)."""
    phase = max(0, bisect.bisect_right(phase_starts, step) - 1)
    local, length = step - phase_starts[phase], phase_steps[phase]
    if kind in ("rewarm_cosine", "wsd"):  # every phase warms up again
        warm = min(warmup, max(length - 1, 0))
        if local < warm:
            return (local + 1) / (warm + 1)
        if kind == "wsd":
            return _linear_tail(1.0, min_ratio, local, length, decay_fraction)
        return _cosine(1.0, min_ratio, local - warm, length - warm)
    once = min(warmup, max(phase_steps[0] - 1, 0))  # constant and infinite warm up in phase 1 only
    if step < once:
        return (step + 1) / (once + 1)
    if kind == "constant":
        return 1.0
    return _infinite(phase, local, phase_steps, once, min_ratio, decay_fraction, constant_ratio)


def _infinite(phase, local, phase_steps, once, min_ratio, decay_fraction, constant_ratio) -> float:
    """Past the warm-up: cool down in phase 1, hold the plateau, anneal at the end of the last phase."""
    length = phase_steps[phase]
    tail = _tail(length, decay_fraction) if phase == len(phase_steps) - 1 else 0
    if local >= length - tail:
        return _linear_tail(constant_ratio, min_ratio, local, length, decay_fraction)
    if phase == 0:
        return _cosine(1.0, constant_ratio, local - once, length - tail - once)
    return constant_ratio


def _cosine(high: float, low: float, done: int, length: int) -> float:
    progress = min(1.0, done / max(1, length - 1))
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _tail(length: int, fraction: float) -> int:
    return max(1, round(length * fraction))


def _linear_tail(level: float, low: float, local: int, length: int, fraction: float) -> float:
    """`level`, then a linear decay to `low` over the last `fraction` of the phase (its last step: low)."""
    tail = _tail(length, fraction)
    start = length - tail
    if local < start:
        return level
    return level + (low - level) * (local - start + 1) / tail


def phase_schedule(
    optimizer: torch.optim.Optimizer, phase_steps: list[int], warmup: int, min_ratio: float, **shape: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of phase_lr_factor; `shape`: its kind, decay_fraction and constant_ratio."""
    starts = [sum(phase_steps[:i]) for i in range(len(phase_steps))]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: phase_lr_factor(step, starts, phase_steps, warmup, min_ratio, **shape)
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
