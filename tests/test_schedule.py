"""The per-phase re-warming schedule: every phase warms up to the peak and decays again."""

from __future__ import annotations

import pytest
import torch

from pretrain.schedule import phase_lr_factor, phase_schedule


def test_each_phase_rewarms_and_decays():
    starts, steps = [0, 10], [10, 10]
    factors = [phase_lr_factor(s, starts, steps, warmup=3, min_ratio=0.1) for s in range(20)]
    for phase in (0, 10):
        assert factors[phase] == pytest.approx(0.25)  # first step of warm-up
        assert factors[phase + 3] == pytest.approx(1.0)  # peak after warm-up
        assert factors[phase + 9] == pytest.approx(0.1)  # decayed to the floor at the phase end
        decay = factors[phase + 3 : phase + 10]
        assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_scheduler_drives_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = phase_schedule(opt, [4, 4], warmup=1, min_ratio=0.0)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[4] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0) and lrs[3] == pytest.approx(0.0)
