"""Continual-learning methods, one module each, behind the `Method` protocol the trainer calls.

`method.name` chooses the gradient rule: `none` (plain sequential training), `migu` (magnitude-based
gradient masking, Du et al. 2024) or `random` (the same kept fraction, chosen at random: MIGU's ablation).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.config import MethodConfig
from pretrain.methods.base import Method, NoMethod
from pretrain.methods.migu import Migu
from pretrain.methods.random import RandomMask

__all__ = ["Method", "NoMethod", "Migu", "RandomMask", "build_method"]


def build_method(
    cfg: MethodConfig, model: nn.Module, engine: Any = None, *, seed: int = 0, grad_accum: int = 1
) -> Method:
    """The method for a run; call after deepspeed.initialize with model = engine.module.

    `engine=None` serves a plain torch loop (tests); `grad_accum` is then the micro-batches per step.
    `seed` seeds `random`'s masks (the same on every rank).
    """
    if cfg.name == "none":
        return NoMethod()
    if cfg.name == "migu":
        return Migu(cfg, model, engine, grad_accum=grad_accum)
    return RandomMask(cfg, model, engine, seed=seed, grad_accum=grad_accum)
