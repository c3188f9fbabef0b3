"""MIGU: magnitude-based gradient masking (Du et al. 2024, arXiv 2406.17245), exact under ZeRO 0/1/2/3.

The rule, per selected linear layer with output h = x W^T (W: [d_out, d_in]) over all tokens of a step:

    n_i    = sum_tokens |h_i|                       (fp32, padding excluded, summed over all DP ranks)
    keep   = d_out - floor(T * d_out)               (T = method.threshold, the frozen fraction)
    m_i    = 1 if i is among the `keep` largest n_i else 0   (ties: the lower index wins)
    grad W <- m[:, None] * grad W                   (biases unmasked unless mask_bias)

L1-normalising n (n_i / sum_j n_j) does not change the ranking; it is only used for the statistics.
transformers' Conv1D stores W as [d_in, d_out], so its mask is on columns. `random` draws a random
mask with the same `keep` per layer from a seeded generator (identical on all ranks, no collective).

Mechanism: forward hooks add sum_tokens |h| into one flat fp32 buffer (a slot per layer); at the last
micro-batch of an optimizer step (`before_backward`) the buffer is summed over ranks with ONE all_reduce
and the masks are chosen; after that micro-batch's backward (`after_backward`), each rank multiplies its
own, already accumulated and reduced, gradient by the mask, before `engine.step()` reads it:
  ZeRO-0 fp32: `param.grad`; ZeRO-1/2 and the bf16 optimizer: the fragment DeepSpeed maps onto this
  rank's partition (`param._hp_mapping`); ZeRO-3: the param's gradient partition (the buffer
  `safe_get_local_grad` reads). A fragment is addressed by its flat offset in W, so the mask is sliced
  to the rows (or columns) it covers.
Why not tensor hooks on the weights: they see each micro-gradient before the step's mask exists (the
later micro-batches are not yet forwarded), so with gradient accumulation > 1 they cannot be exact. By
linearity, masking the accumulated and reduced gradient once equals masking every micro-gradient on
every rank with the same mask, so one mechanism serves accumulation 1 and >1 at every stage, touches only
1/world of the gradient, and costs one elementwise pass per optimizer step. With accumulation the step's
mask comes from the magnitudes of all its micro-batches on all ranks. Gradient clipping (inside
`engine.step()`) sees the masked gradient, as in the paper's code. bf16 works on CPU: ZeRO-0 uses
DeepSpeed's FP16_UnfusedOptimizer (`param.grad`), ZeRO-1 with fp32 accumulation the BF16_Optimizer.

Activation checkpointing: a forward recomputed inside backward runs under an autograd graph task
(`torch._C._current_graph_task_id() != -1`) and is not counted; forwards in eval mode are not counted
either. Grad mode is no test: reentrant checkpointing runs the first, counted, forward under no_grad.
In phases before `start_phase`, `migu` only observes (magnitudes, top sets), so the overlap between the
first and second domain can be reported; `none` installs no hook at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import MethodConfig

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


# ----------------------------------------------------------------------------------------------- the rule
def kept_count(d_out: int, threshold: float) -> int:
    """Units updated per layer: d_out - floor(T * d_out); the 1e-9 absorbs float error (0.29 * 100)."""
    frozen = min(math.floor(threshold * d_out + 1e-9), d_out - 1) if threshold > 0 else 0
    return d_out - frozen


def top_mask(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask [n, d] of the `keep` largest entries of each row; equal values: the lower index wins."""
    order = torch.sort(magnitudes, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(magnitudes, dtype=torch.float32).scatter_(-1, order[..., :keep], 1.0)


def random_mask(n: int, d_out: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random 0/1 mask [n, d_out] with exactly `keep` ones per row."""
    return top_mask(torch.rand(n, d_out, generator=generator), keep)


def l1_normalise(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes / magnitudes.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------------------ which layers
def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def select_layers(model: nn.Module, include: list[str], exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """Linear layers whose name matches an include pattern and no exclude pattern (re.search)."""
    types = _linear_types()
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types)
        and any(re.search(p, name) for p in include)
        and not any(re.search(p, name) for p in exclude)
    ]


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


def _mask_local_grad(param: nn.Parameter, mask_2d: torch.Tensor) -> None:
    """Multiply this rank's accumulated gradient of `param` (whatever holds it) by mask_2d (W's shape).

    mask_2d is a broadcast (expanded) fp32 view: in-place mul_ casts it into a bf16 gradient without copying.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the flat param, padded at the end
        optimizer = param._z3_optimizer
        grad = optimizer._get_fp32_grad_state_partition(param, release_swap_buffers=False)[0]
        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        numel = min(size, param.ds_numel - start)
        if numel > 0:
            grad.view(-1)[:numel].mul_(_mask_slice(mask_2d, start, numel))
        return
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2 and the bf16 optimizer: the fragment in this rank's partition
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
        if grad.numel() == param.numel():  # all of param is here, or the bf16 optimizer's full-size buffer
            grad.view(mask_2d.shape).mul_(mask_2d)
        else:
            address = mapping.lp_fragment_address
            grad.view(-1).mul_(_mask_slice(mask_2d, address.start, address.numel))
        return
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: no part of this param lives on this rank
        return
    if param.grad is not None:  # ZeRO-0 fp32 or plain torch
        param.grad.view(mask_2d.shape).mul_(mask_2d)


def _apply_layer_mask(module: nn.Module, mask: torch.Tensor, mask_bias: bool) -> None:
    d_in = module.nx if _is_conv1d(module) else module.in_features
    mask_2d = mask[None, :].expand(d_in, -1) if _is_conv1d(module) else mask[:, None].expand(-1, d_in)
    _mask_local_grad(module.weight, mask_2d)
    if mask_bias and module.bias is not None:
        _mask_local_grad(module.bias, mask[:, None])


# ------------------------------------------------------------------------------------------- the methods
class NoMethod:
    """`none`: plain sequential training; installs nothing, costs nothing."""

    name = "none"

    def begin_phase(self, phase: int) -> None:
        pass

    def before_backward(self, engine: Any = None) -> None:
        pass

    def after_backward(self, engine: Any = None) -> None:
        pass

    def discard_step(self) -> None:
        pass

    def end_phase(self, phase: int) -> dict[str, Any]:
        return {}

    def log(self, writer: Any, global_step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GradientMask:
    """`migu` (magnitude top set) and `random` (same kept fraction): see the module docstring."""

    def __init__(
        self, cfg: MethodConfig, model: nn.Module, engine: Any = None, seed: int = 0, grad_accum: int = 1
    ):
        self.name, self.cfg, self.model, self.engine = cfg.name, cfg, model, engine
        self.layers = select_layers(model, cfg.include, cfg.exclude)
        if not self.layers:
            raise ValueError(f"method {cfg.name}: no linear layer matches include={cfg.include}")
        self.groups = _group_layers(self.layers, cfg.threshold)
        self.group = getattr(engine, "data_parallel_group", None)
        self.grad_accum = engine.gradient_accumulation_steps() if engine is not None else grad_accum
        size = sum(len(g.names) * g.d_out for g in self.groups)
        self.device = next(model.parameters()).device
        # this step's sum_tokens |h| of all layers, in one flat buffer: one all_reduce per step
        self.magnitudes = torch.zeros(size, device=self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.masks: list[torch.Tensor] | None = None  # per group [n, d_out], this step's mask
        self.handles: list[Any] = []
        self.token_mask: torch.Tensor | None = None
        self.previous_top: dict[str, torch.Tensor] = {}
        self.phase, self.masking, self.micro_step = 0, False, 0
        self.forwards = 0  # layer forwards recorded since the last boundary
        self._reset_phase_stats()

    # -- phases
    def begin_phase(self, phase: int) -> None:
        self.phase = phase
        self.masking = phase >= self.cfg.start_phase
        observe = self.name == "migu"  # migu observes magnitudes in every phase, random only masks
        if observe and not self.handles:
            self._install_hooks()
        self.magnitudes.zero_()
        self.micro_step, self.masks, self.forwards = 0, None, 0
        self._reset_phase_stats()

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

    # -- per micro-step
    def is_boundary(self, engine: Any = None) -> bool:
        engine = engine if engine is not None else self.engine
        if engine is not None:
            return engine.is_gradient_accumulation_boundary()
        return (self.micro_step + 1) % self.grad_accum == 0

    def before_backward(self, engine: Any = None) -> None:
        """At the step's last micro-batch: sum magnitudes over ranks (one collective), choose the masks."""
        if not self.is_boundary(engine):
            return
        if self.name == "migu":
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
            self.masks = [top_mask(slab, g.keep) for g, slab in zip(self.groups, slabs, strict=True)]
            self.magnitudes.zero_()
        elif self.masking:
            draw = [random_mask(len(g.names), g.d_out, g.keep, self.generator) for g in self.groups]
            self.masks = [m.to(self.device) for m in draw]
        self.phase_steps += 1

    def after_backward(self, engine: Any = None) -> None:
        """At the boundary, mask each rank's accumulated gradient before engine.step() uses it."""
        boundary = self.is_boundary(engine)
        self.micro_step += 1
        if not boundary or not self.masking or self.masks is None:
            return
        for g, mask in zip(self.groups, self.masks, strict=True):
            for j, module in enumerate(g.modules):
                _apply_layer_mask(module, mask[j], self.cfg.mask_bias)
            g.slab(self.kept).add_(mask)
        self.masked_steps += 1

    def discard_step(self) -> None:
        """Forget what this step's forwards recorded: the trainer skips it (a non-finite loss), and its
        magnitudes (NaN or inf) must neither choose a later mask nor enter the phase statistics."""
        self.magnitudes.zero_()
        self.forwards = 0

    # -- visibility
    def _reset_phase_stats(self) -> None:
        self.phase_magnitudes = torch.zeros_like(self.magnitudes)  # sum over steps of normalised n
        self.kept = torch.zeros_like(self.magnitudes)  # how often each unit was updated
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
        summary: dict[str, Any] = {
            "phase": phase,
            "method": self.name,
            "masked": self.masking,
            "threshold": self.cfg.threshold,
            "steps": self.phase_steps,
            "kept_fraction": self.kept_fraction(),
            "expected_kept_fraction": {n: g.keep / g.d_out for g in self.groups for n in g.names},
        }
        if self.name == "migu" and self.phase_steps:
            summary.update(self._magnitude_summary())
        return summary

    def _magnitude_summary(self) -> dict[str, Any]:
        """Quantiles of the phase-mean normalised magnitudes (x d_out: 1 = uniform), top sets, overlap."""
        quantiles, top, jaccard = {}, {}, {}
        q = torch.tensor(QUANTILES)
        for g in self.groups:
            mean = g.slab(self.phase_magnitudes) / self.phase_steps
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

    def log(self, writer: Any, global_step: int) -> None:
        if writer is None or not self.masked_steps:
            return
        fractions = self.kept_fraction()
        for name, value in fractions.items():
            writer.add_scalar(f"migu/kept_fraction/{name}", value, global_step)
        writer.add_scalar("migu/kept_fraction_mean", sum(fractions.values()) / len(fractions), global_step)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "micro_step": self.micro_step,
            "magnitudes": self.magnitudes.clone(),
            "phase_magnitudes": self.phase_magnitudes.clone(),
            "kept": self.kept.clone(),
            "phase_steps": self.phase_steps,
            "masked_steps": self.masked_steps,
            "previous_top": {k: v.clone() for k, v in self.previous_top.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.begin_phase(state["phase"])
        self.micro_step = state["micro_step"]
        self.magnitudes.copy_(state["magnitudes"])  # in place: the hooks hold views of this buffer
        self.phase_magnitudes.copy_(state["phase_magnitudes"])
        self.kept.copy_(state["kept"])
        self.phase_steps, self.masked_steps = state["phase_steps"], state["masked_steps"]
        self.previous_top = dict(state["previous_top"])
        self.generator.set_state(state["generator"])


def _magnitude_hook(method: GradientMask, slot: torch.Tensor):
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


def build_method(
    cfg: MethodConfig, model: nn.Module, engine: Any = None, *, seed: int = 0, grad_accum: int = 1
) -> NoMethod | GradientMask:
    """The method for a run; call after deepspeed.initialize with model = engine.module.

    `engine=None` serves a plain torch loop (tests); `grad_accum` is then the micro-batches per step.
    `seed` seeds `random`'s masks (the same on every rank).
    """
    if cfg.name == "none":
        return NoMethod()
    return GradientMask(cfg, model, engine, seed=seed, grad_accum=grad_accum)
