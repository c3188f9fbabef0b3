"""EWC's Fisher window in one process (ZeRO-0 fp32 layout: every rank holds the whole gradient), with the
trainer's hooks called as `Trainer.train_step` calls them; under DeepSpeed: tests/distributed/."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from pretrain.config import RegularisationConfig
from pretrain.methods.regularisation import Regularisation

STEPS = 10


def _phase(reg: Regularisation, model: nn.Module, phase: int, skipped: set[int]) -> dict:
    reg.begin_phase(phase)
    for step in range(1, STEPS + 1):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        if step in skipped:  # a non-finite loss under on_nonfinite: skip: no backward, the step counted
            reg.discard_step()
            reg.skip_step()
            continue
        reg.after_backward()
    return reg.end_phase(phase)


def test_skipped_steps_keep_the_fisher_window_on_the_phases_last_steps():
    # uncounted, three early skips moved the 3-step window past the phase's end: no Fisher, no pull
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    engine = SimpleNamespace(optimizer=None, is_gradient_accumulation_boundary=lambda: True)
    cfg = RegularisationConfig(kind="ewc", weight=1.0, fisher_steps=3)
    reg = Regularisation(cfg, model, engine, [STEPS, STEPS])
    assert _phase(reg, model, 1, skipped={2, 3, 4})["fisher_steps"] == 3  # steps 8-10
    assert reg.fisher and all(f.sum() > 0 for f in reg.fisher.values())
    reg.begin_phase(2)
    with torch.no_grad():
        model.weight.add_(1.0)
    model.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    before = model.weight.grad.clone()
    reg.after_backward()
    assert (model.weight.grad - before).abs().max() > 0 and reg.penalty > 0  # phase 1's domain is pulled
    # a skip inside the window leaves a step less of it, not a window shifted past the end
    assert _phase(reg, model, 2, skipped={9})["fisher_steps"] == 2
