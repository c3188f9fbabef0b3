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
        # the ramp leaves the phase two steps at least, so that a short phase still ends at the floor
        warm = min(warmup, max(length - 2, 0))
        if local < warm:
            return (local + 1) / (warm + 1)
        if kind == "wsd":
            return _linear_tail(1.0, min_ratio, local, length, decay_fraction, earliest=warm)
        return _cosine(1.0, min_ratio, local - warm, length - warm)
    # constant and infinite warm up in phase 1 only; infinite leaves phase 1 two steps at least, to reach
    # the peak and to cool down from it
    once = min(warmup, max(phase_steps[0] - (2 if kind == "infinite" else 1), 0))
    if step < once:
        return (step + 1) / (once + 1)
    if kind == "constant":
        return 1.0
    return _infinite(phase, local, phase_steps, once, min_ratio, decay_fraction, constant_ratio)


def _infinite(phase, local, phase_steps, once, min_ratio, decay_fraction, constant_ratio) -> float:
    """Past the warm-up: cool down in phase 1, hold the plateau, anneal at the end of the last phase."""
    length = phase_steps[phase]
    warm = once if phase == 0 else 0
    start = _tail_start(length, decay_fraction, warm) if phase == len(phase_steps) - 1 else length
    if local >= start:
        return _linear_tail(constant_ratio, min_ratio, local, length, decay_fraction, earliest=warm)
    if phase == 0:
        return _cosine(1.0, constant_ratio, local - once, start - once)
    return constant_ratio


def _cosine(high: float, low: float, done: int, length: int) -> float:
    # a one-step decay is its end: a one-step phase (or a phase 1 the warm-up fills) ends at `low`
    progress = min(1.0, done / (length - 1)) if length > 1 else 1.0
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _tail_start(length: int, fraction: float, earliest: int) -> int:
    """The first step of a phase's decay tail (its last `fraction`, at least one step), not before
    `earliest`: a tail reaching back into the warm-up would cut the ramp short with a drop."""
    return min(max(length - max(1, round(length * fraction)), earliest), length - 1)


def _linear_tail(
    level: float, low: float, local: int, length: int, fraction: float, earliest: int = 0
) -> float:
    """`level`, then a linear decay to `low` over the phase's tail (`_tail_start`; its last step: low)."""
    start = _tail_start(length, fraction, earliest)
    if local < start:
        return level
    # the scheduler's factor one step past the run's end (never used for a step) stays at `low`
    return level + (low - level) * min(1.0, (local - start + 1) / (length - start))


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
