"""MIGU: magnitude-based gradient masking (Du et al. 2024, arXiv 2406.17245), exact under ZeRO 0/1/2/3.

The rule, per selected linear layer with output h = x W^T (W: [d_out, d_in]) over all tokens of a step:

    n_i    = sum_tokens |h_i|                       (fp32, padding excluded, summed over all DP ranks)
    keep   = d_out - floor(T * d_out)               (T = method.threshold, the frozen fraction)
    m_i    = 1 if i is among the `keep` largest n_i else 0   (ties: the lower index wins)
    grad W <- m[:, None] * grad W                   (biases unmasked unless mask_bias)

L1-normalising n (n_i / sum_j n_j) does not change the ranking; it is only used for the statistics.
How the mask reaches each rank's gradient partition exactly is in `pretrain/methods/masking.py`.

Forward hooks add sum_tokens |h| into one flat fp32 buffer (a slot per layer); at the last micro-batch of
an optimizer step the buffer is summed over ranks with ONE all_reduce and the masks are chosen. With
accumulation the step's mask comes from the magnitudes of all its micro-batches on all ranks.

Activation checkpointing: a forward recomputed inside backward runs under an autograd graph task
(`torch._C._current_graph_task_id() != -1`) and is not counted; forwards in eval mode are not counted
either. Grad mode is no test: reentrant checkpointing runs the first, counted, forward under no_grad.
In phases before `start_phase`, `migu` only observes (magnitudes, top sets), so the overlap between the
first and second domain can be reported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import MethodConfig
from pretrain.methods.masking import GradientMask, top_mask

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def l1_normalise(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes / magnitudes.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class Migu(GradientMask):
    """Keep the units with the largest output magnitudes of the step; see the module docstring."""

    name = "migu"

    def __init__(self, cfg: MethodConfig, model: nn.Module, engine: Any = None, grad_accum: int = 1):
        super().__init__(cfg, model, engine, grad_accum)
        # this step's sum_tokens |h| of all layers, in one flat buffer: one all_reduce per step
        self.magnitudes = torch.zeros(self.size, device=self.device)
        self.handles: list[Any] = []
        self.token_mask: torch.Tensor | None = None
        self.previous_top: dict[str, torch.Tensor] = {}
        self.forwards = 0  # layer forwards recorded since the last boundary

    # -- phases
    def begin_phase(self, phase: int) -> None:
        super().begin_phase(phase)
        if not self.handles:  # migu observes magnitudes in every phase, also before it masks
            self._install_hooks()
        self.magnitudes.zero_()
        self.forwards = 0

    def _install_hooks(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._capture_token_mask, with_kwargs=True))
        for g in self.groups:
            slab = g.slab(self.magnitudes)
            for j, m in enumerate(g.modules):
                self.handles.append(m.register_forward_hook(_magnitude_hook(self, slab[j])))

    def _capture_token_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.token_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- per step
    def choose_masks(self) -> list[torch.Tensor]:
        """Sum the step's magnitudes over ranks (one collective) and keep each layer's top units."""
        if not self.forwards:  # all-zero magnitudes would silently keep the lowest-index units
            raise RuntimeError(
                "MIGU recorded no training forward pass in this step: is the model in eval mode? "
                "(call model.train() before training)"
            )
        self.forwards = 0
        if self.group is not None or (dist.is_initialized() and dist.get_world_size() > 1):
            dist.all_reduce(self.magnitudes, group=self.group)
        slabs = [g.slab(self.magnitudes) for g in self.groups]
        for g, slab in zip(self.groups, slabs, strict=True):
            g.slab(self.phase_magnitudes).add_(l1_normalise(slab))
        masks = [top_mask(slab, g.keep) for g, slab in zip(self.groups, slabs, strict=True)]
        self.magnitudes.zero_()
        return masks

    def discard_step(self) -> None:
        """Forget what this step's forwards recorded: the trainer skips it (a non-finite loss), and its
        magnitudes (NaN or inf) must neither choose a later mask nor enter the phase statistics."""
        self.magnitudes.zero_()
        self.forwards = 0

    # -- visibility
    def _reset_phase_stats(self) -> None:
        super()._reset_phase_stats()
        self.phase_magnitudes = torch.zeros(self.size, device=self.device)  # sum over steps of normalised n

    def end_phase(self, phase: int) -> dict[str, Any]:
        summary = super().end_phase(phase)
        if self.phase_steps:
            summary.update(self._magnitude_summary())
        return summary

    def _magnitude_summary(self) -> dict[str, Any]:
        """Quantiles of the phase-mean normalised magnitudes (x d_out: 1 = uniform), top sets, overlap."""
        quantiles, top, jaccard = {}, {}, {}
        q = torch.tensor(QUANTILES)
        # on the host, where the levels `q` are: a GPU rank crashed here (quantile on mixed devices). It
        # is a report, read as lists; the top sets kept for the next phase's overlap are host tensors too
        phase_magnitudes = self.phase_magnitudes.cpu()
        for g in self.groups:
            mean = g.slab(phase_magnitudes) / self.phase_steps
            sets = top_mask(mean, g.keep).bool()
            qs = torch.quantile(mean * g.d_out, q, dim=1).T
            for j, name in enumerate(g.names):
                quantiles[name] = [round(v, 5) for v in qs[j].tolist()]
                top[name] = encode_units(sets[j])
                if name in self.previous_top:
                    jaccard[name] = _jaccard(self.previous_top[name], sets[j])
                self.previous_top[name] = sets[j].clone()
        mean_jaccard = sum(jaccard.values()) / len(jaccard) if jaccard else None
        return {
            "quantiles": list(QUANTILES),
            "magnitude_quantiles": quantiles,
            "jaccard_with_previous": mean_jaccard,
            "jaccard_per_layer": jaccard,
            "top_units": top,
        }

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "magnitudes": self.magnitudes.clone(),
            "phase_magnitudes": self.phase_magnitudes.clone(),
            "previous_top": {k: v.clone() for k, v in self.previous_top.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.magnitudes.copy_(state["magnitudes"])  # in place: the hooks hold views of this buffer
        self.phase_magnitudes.copy_(state["phase_magnitudes"])
        self.previous_top = dict(state["previous_top"])


def _magnitude_hook(method: Migu, slot: torch.Tensor):
    """Forward hook adding sum_tokens |h_i| (fp32, padding excluded) into this layer's slot."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not module.training or torch._C._current_graph_task_id() != -1:
            return  # evaluation (eval mode), or a checkpointed forward recomputed inside backward
        h = output.detach().abs()
        tokens = method.token_mask
        if tokens is not None and tuple(h.shape[:-1]) == tuple(tokens.shape):
            h = h * tokens.unsqueeze(-1).to(h.dtype)
        slot.add_(h.sum(dim=tuple(range(h.ndim - 1)), dtype=torch.float32))
        method.forwards += 1

    return hook


def encode_units(units: torch.Tensor) -> str:
    """A top set as a hex bitmap (bit i = unit i, 4 units per hex digit): compact for wide layers."""
    bits = units.bool().tolist()
    bits += [False] * (-len(bits) % 4)
    return "".join(f"{b[0] * 8 + b[1] * 4 + b[2] * 2 + b[3]:x}" for b in zip(*[iter(bits)] * 4, strict=True))


def decode_units(hexbits: str, d_out: int) -> list[int]:
    """Sorted unit indices of an `encode_units` bitmap."""
    return [
        4 * i + k
        for i, c in enumerate(hexbits)
        for k in range(4)
        if int(c, 16) >> (3 - k) & 1 and 4 * i + k < d_out
    ]


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0
