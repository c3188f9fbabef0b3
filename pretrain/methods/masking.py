"""Gradient masking exact under ZeRO 0/1/2/3: the machinery `migu` and `random` share.

A masking method chooses, once per optimizer step, a 0/1 mask over the output units (rows of W: [d_out,
d_in]) of every selected linear layer, keeping `d_out - floor(T * d_out)` units (T = method.threshold),
and only the kept rows are updated. transformers' Conv1D stores W as [d_in, d_out], so its mask is on
columns. Biases stay unmasked unless mask_bias.

Mechanism: at the last micro-batch of an optimizer step (`before_backward`) the method chooses the masks;
after that micro-batch's backward (`after_backward`), each rank multiplies its own, already accumulated
and reduced, gradient by the mask, before `engine.step()` reads it (where that gradient lives at each
stage: pretrain/methods/partitions.py). A fragment is addressed by its flat offset in W, so the mask is
sliced to the rows (or columns) it covers.
Why not tensor hooks on the weights: they see each micro-gradient before the step's mask exists (the
later micro-batches are not yet forwarded), so with gradient accumulation > 1 they cannot be exact. By
linearity, masking the accumulated and reduced gradient once equals masking every micro-gradient on
every rank with the same mask, so one mechanism serves accumulation 1 and >1 at every stage, touches only
1/world of the gradient, and costs one elementwise pass per optimizer step. Gradient clipping (inside
`engine.step()`) sees the masked gradient, as in the paper's code. bf16 works on CPU: ZeRO-0 uses
DeepSpeed's FP16_UnfusedOptimizer (`param.grad`), ZeRO-1 with fp32 accumulation the BF16_Optimizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pretrain.config import ConfigError, MethodConfig
from pretrain.methods.base import MethodBase
from pretrain.methods.partitions import local_grad, refresh_grad_norm, settle_offloaded_grads

if TYPE_CHECKING:
    from pretrain.trackers import MetricsLogger


# ----------------------------------------------------------------------------------------------- the rule
def kept_count(d_out: int, threshold: float) -> int:
    """Units updated per layer: d_out - floor(T * d_out); the 1e-9 absorbs float error (0.29 * 100)."""
    frozen = min(math.floor(threshold * d_out + 1e-9), d_out - 1) if threshold > 0 else 0
    return d_out - frozen


def top_mask(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask [n, d] of the `keep` largest entries of each row; equal values: the lower index wins."""
    order = torch.sort(magnitudes, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(magnitudes, dtype=torch.float32).scatter_(-1, order[..., :keep], 1.0)


# ------------------------------------------------------------------------------------------ which layers
def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def select_layers(model: nn.Module, include: list[str], exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """Trainable linear layers whose name matches an include pattern and no exclude pattern (re.search).

    Frozen layers have no gradient to mask: with LoRA that leaves the adapters' own `lora_A.default` and
    `lora_B.default` (inside the blocks, so the default include finds them) and skips each `base_layer`.
    """
    types = _linear_types()
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types)
        and m.weight.requires_grad
        and any(re.search(p, name) for p in include)
        and not any(re.search(p, name) for p in exclude)
    ]


def masked_layers(model: nn.Module, cfg: MethodConfig) -> list[tuple[str, nn.Module]]:
    """`select_layers` for `method.*`; ConfigError if none matches. Called on the built model before
    DeepSpeed starts too (train.py): found only once the engine was built, it cost a large model's load."""
    layers = select_layers(model, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(
            f"key `method.include` {cfg.include} (with `method.exclude` {cfg.exclude}): no trainable "
            f"linear layer of the model matches, so {cfg.name} would mask nothing"
        )
    return layers


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.nf  # Conv1D: nf = d_out


def _is_conv1d(m: nn.Module) -> bool:
    return not isinstance(m, nn.Linear)


@dataclass
class _Group:
    """Layers with the same d_out: one contiguous [n, d_out] slab of the flat magnitude buffer."""

    names: list[str]
    modules: list[nn.Module]
    offset: int
    d_out: int
    keep: int

    def slab(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + len(self.names) * self.d_out].view(
            len(self.names), self.d_out
        )


def _group_layers(layers: list[tuple[str, nn.Module]], threshold: float) -> list[_Group]:
    by_width: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in layers:
        by_width.setdefault(_out_features(m), []).append((name, m))
    groups, offset = [], 0
    for d_out, members in by_width.items():
        names, modules = [n for n, _ in members], [m for _, m in members]
        groups.append(_Group(names, modules, offset, d_out, kept_count(d_out, threshold)))
        offset += len(members) * d_out
    return groups


# --------------------------------------------------------------------- the gradient each rank steps with
def _mask_slice(mask_2d: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Flat elements [start, start+numel) of an (expanded) mask shaped like W, copying only those rows."""
    cols = mask_2d.shape[1]
    r0, r1 = start // cols, (start + numel - 1) // cols + 1
    return mask_2d[r0:r1].reshape(-1)[start - r0 * cols : start - r0 * cols + numel]


def _mask_local_grad(param: nn.Parameter, mask: torch.Tensor, as_2d, engine: Any) -> None:
    """Multiply this rank's accumulated gradient of `param` (wherever it lives) by the row mask `mask`,
    laid out like the parameter by `as_2d`.

    as_2d gives a broadcast (expanded) fp32 view: in-place mul_ casts it into a bf16 gradient without
    copying. Under ZeRO-Offload the gradient is on the CPU: the row mask goes there, not a weight-sized view.
    """
    part = local_grad(param)
    if part is None:
        return
    mask_2d = as_2d(mask.to(part.flat.device))
    if part.numel == param.numel():  # all of it: broadcast the view rather than copy the mask
        part.flat.view(mask_2d.shape).mul_(mask_2d)
    else:
        part.flat.mul_(_mask_slice(mask_2d, part.start, part.numel))
    refresh_grad_norm(engine, param, part)


def _apply_layer_mask(module: nn.Module, mask: torch.Tensor, mask_bias: bool, engine: Any) -> None:
    d_in = module.nx if _is_conv1d(module) else module.in_features
    if _is_conv1d(module):
        _mask_local_grad(module.weight, mask, lambda m: m[None, :].expand(d_in, -1), engine)
    else:
        _mask_local_grad(module.weight, mask, lambda m: m[:, None].expand(-1, d_in), engine)
    if mask_bias and module.bias is not None:
        _mask_local_grad(module.bias, mask, lambda m: m[:, None], engine)


# ---------------------------------------------------------------------------------- the shared method
class GradientMask(MethodBase):
    """A method that masks each selected layer's gradient with a per-step mask of its output units.

    Subclasses say how a step's masks are chosen (`choose_masks`, called at the step's last micro-batch);
    this class applies them to each rank's gradient partition and counts what was kept.
    """

    name = "mask"

    def __init__(self, cfg: MethodConfig, model: nn.Module, engine: Any = None, grad_accum: int = 1):
        self.cfg, self.model, self.engine = cfg, model, engine
        self.layers = masked_layers(model, cfg)
        self.groups = _group_layers(self.layers, cfg.threshold)
        self.group = getattr(engine, "data_parallel_group", None)
        self.grad_accum = engine.gradient_accumulation_steps() if engine is not None else grad_accum
        self.size = sum(len(g.names) * g.d_out for g in self.groups)  # all layers' units, one flat buffer
        self.device = next(model.parameters()).device
        self.masks: list[torch.Tensor] | None = None  # per group [n, d_out], this step's mask
        self.phase, self.masking, self.micro_step = 0, False, 0
        self._reset_phase_stats()

    def choose_masks(self) -> list[torch.Tensor] | None:
        """This step's masks, one [n, d_out] per group (None: leave the gradient as it is)."""
        raise NotImplementedError

    # -- phases
    def begin_phase(self, phase: int) -> None:
        self.phase = phase
        self.masking = phase >= self.cfg.start_phase
        self.micro_step, self.masks = 0, None
        self._reset_phase_stats()

    # -- per micro-step
    def is_boundary(self, engine: Any = None) -> bool:
        engine = engine if engine is not None else self.engine
        if engine is not None:
            return engine.is_gradient_accumulation_boundary()
        return (self.micro_step + 1) % self.grad_accum == 0

    def before_backward(self, engine: Any = None) -> None:
        """At the step's last micro-batch: choose the masks."""
        if not self.is_boundary(engine):
            return
        masks = self.choose_masks()
        if masks is not None:
            self.masks = masks
        self.phase_steps += 1

    def after_backward(self, engine: Any = None) -> None:
        """At the boundary, mask each rank's accumulated gradient before engine.step() uses it."""
        boundary = self.is_boundary(engine)
        self.micro_step += 1
        if not boundary or not self.masking or self.masks is None:
            return
        settle_offloaded_grads(engine or self.engine)
        for g, mask in zip(self.groups, self.masks, strict=True):
            for j, module in enumerate(g.modules):
                _apply_layer_mask(module, mask[j], self.cfg.mask_bias, engine or self.engine)
            g.slab(self.kept).add_(mask)
        self.masked_steps += 1

    # -- visibility
    def _reset_phase_stats(self) -> None:
        self.kept = torch.zeros(self.size, device=self.device)  # how often each unit was updated
        self.phase_steps, self.masked_steps = 0, 0

    def kept_fraction(self) -> dict[str, float]:
        """Per layer: updated units / d_out, averaged over this phase's masked steps (= 1 - T up to floor)."""
        if not self.masked_steps:
            return {}
        out = {}
        for g in self.groups:
            fractions = g.slab(self.kept).double().sum(1) / (g.d_out * self.masked_steps)
            out.update(zip(g.names, fractions.tolist(), strict=True))
        return out

    def end_phase(self, phase: int) -> dict[str, Any]:
        return {
            "phase": phase,
            "method": self.name,
            "masked": self.masking,
            "threshold": self.cfg.threshold,
            "steps": self.phase_steps,
            "kept_fraction": self.kept_fraction(),
            "expected_kept_fraction": {n: g.keep / g.d_out for g in self.groups for n in g.names},
        }

    def log(self, trackers: MetricsLogger, global_step: int) -> None:
        if not self.masked_steps:
            return
        fractions = self.kept_fraction()
        scalars = {f"migu/kept_fraction/{name}": value for name, value in fractions.items()}
        scalars["migu/kept_fraction_mean"] = sum(fractions.values()) / len(fractions)
        trackers.scalars(scalars, global_step)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "micro_step": self.micro_step,
            "kept": self.kept.clone(),
            "phase_steps": self.phase_steps,
            "masked_steps": self.masked_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.begin_phase(state["phase"])
        self.micro_step = state["micro_step"]
        self.kept.copy_(state["kept"])
        self.phase_steps, self.masked_steps = state["phase_steps"], state["masked_steps"]
