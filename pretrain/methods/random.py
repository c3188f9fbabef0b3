"""`random`: MIGU's ablation. Each step keeps a uniformly random set of the same size per layer.

The masks come from a generator seeded by the run seed, identical on every rank, so no collective is
needed; the masking itself is MIGU's (`pretrain/methods/masking.py`), exact under ZeRO 0-3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import MethodConfig
from pretrain.methods.masking import GradientMask, top_mask


def random_mask(n: int, d_out: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random 0/1 mask [n, d_out] with exactly `keep` ones per row."""
    return top_mask(torch.rand(n, d_out, generator=generator), keep)


class RandomMask(GradientMask):
    name = "random"

    def __init__(
        self, cfg: MethodConfig, model: nn.Module, engine: Any = None, seed: int = 0, grad_accum: int = 1
    ):
        super().__init__(cfg, model, engine, grad_accum)
        self.generator = torch.Generator().manual_seed(seed)

    def choose_masks(self) -> list[torch.Tensor] | None:
        if not self.masking:  # nothing to observe before start_phase: no draw, so the sequence is fixed
            return None
        draw = [random_mask(len(g.names), g.d_out, g.keep, self.generator) for g in self.groups]
        return [m.to(self.device) for m in draw]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
