"""Continual-learning methods, one module each, behind the `Method` protocol the trainer calls.

`method.name` chooses the gradient rule: `none` (plain sequential training), `migu` (magnitude-based
gradient masking, Du et al. 2024) or `random` (the same kept fraction, chosen at random: MIGU's ablation).
`regularisation.kind` (`l2`, `ewc`) adds a pull toward the previous phase's weights and combines with any
rule; replay (pretrain/replay.py) acts on the data, not here. Adding a method: pretrain/methods/base.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.config import MethodConfig, RegularisationConfig
from pretrain.methods.base import Method, MethodBase, MethodStack, NoMethod
from pretrain.methods.migu import Migu
from pretrain.methods.random import RandomMask
from pretrain.methods.regularisation import Regularisation

__all__ = [
    "Method",
    "MethodBase",
    "MethodStack",
    "NoMethod",
    "Migu",
    "RandomMask",
    "Regularisation",
    "build_method",
    "build_methods",
]


def build_methods(
    cfg: MethodConfig,
    regularisation: RegularisationConfig,
    model: nn.Module,
    engine: Any,
    phase_steps: list[int],
    *,
    seed: int = 0,
) -> Method:
    """A run's methods as one, in the order their hooks must run; call after deepspeed.initialize."""
    rule = build_method(cfg, model, engine, seed=seed)
    if regularisation.kind == "none":
        return rule
    return MethodStack([Regularisation(regularisation, model, engine, phase_steps), rule])


def build_method(
    cfg: MethodConfig, model: nn.Module, engine: Any = None, *, seed: int = 0, grad_accum: int = 1
) -> Method:
    """`method.name`'s gradient rule; `engine=None` serves a plain torch loop (tests), with `grad_accum`
    micro-batches per step. `seed` seeds `random`'s masks (the same on every rank)."""
    if cfg.name == "none":
        return NoMethod()
    if cfg.name == "migu":
        return Migu(cfg, model, engine, grad_accum=grad_accum)
    return RandomMask(cfg, model, engine, seed=seed, grad_accum=grad_accum)
