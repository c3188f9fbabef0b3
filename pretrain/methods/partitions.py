"""Where this rank's share of a parameter lives under ZeRO 0/1/2/3: its gradient and its fp32 weights.

Methods that act on gradients or weights (masking, regularisation) touch only what this rank owns:
  ZeRO-0 fp32: all of `param.grad` and `param` (every rank holds a full copy);
  ZeRO-1/2 and the bf16 optimizer: the fragment DeepSpeed maps onto this rank's partition
    (`param._hp_mapping`: gradient fragment, fp32 master fragment, flat offset in the parameter);
  ZeRO-3: the parameter's partition (gradient and fp32 master), padding at the end excluded.
The gradient is the accumulated, reduced one between the step's last backward and `engine.step()`.
With ZeRO-Offload it lies on the CPU beside the fp32 master, and DeepSpeed has already taken its norm
for clipping: a method that changes it calls `refresh_grad_norm` so that clipping sees the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Part:
    """Flat elements [start, start + numel) of a flattened parameter; `replicated`: every rank holds them."""

    flat: torch.Tensor
    start: int
    replicated: bool = False

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def narrow(self, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of the parameter, which must lie inside this part."""
        if start < self.start or start + numel > self.start + self.numel:
            inside = f"[{self.start}, {self.start + self.numel})"
            raise ValueError(f"[{start}, {start + numel}) is not inside {inside}")
        return self.flat.narrow(0, start - self.start, numel)


def _zero3_range(param: nn.Parameter) -> tuple[int, int]:
    """(start, numel) of this rank's ZeRO-3 partition in the flat parameter; numel 0 if it is all padding."""
    size = param.ds_tensor.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    return start, max(0, min(size, param.ds_numel - start))


def local_grad(param: nn.Parameter) -> Part | None:
    """This rank's accumulated gradient of `param` (None: no part of it lives on this rank)."""
    if hasattr(param, "ds_id"):
        start, numel = _zero3_range(param)
        grad = param._z3_optimizer._get_fp32_grad_state_partition(param, release_swap_buffers=False)[0]
        return Part(grad.view(-1)[:numel], start) if numel else None
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
        if grad.numel() == param.numel():  # all of param is here, or the bf16 optimizer's full-size buffer
            return Part(grad.view(-1), 0)
        return Part(grad.view(-1), mapping.lp_fragment_address.start)
    if hasattr(param, "_hp_mapping") or param.grad is None:  # ZeRO-1/2: none of this param is here
        return None
    return Part(param.grad.view(-1), 0, replicated=True)


def local_weight(param: nn.Parameter) -> Part | None:
    """This rank's fp32 (master) weights of `param`: what the optimizer updates."""
    if hasattr(param, "ds_id"):
        start, numel = _zero3_range(param)
        # where the optimizer keeps it, beside local_grad's gradient (the CPU under ZeRO-Offload):
        # get_local_fp32_param copies it to the GPU, and the methods then mixed devices
        weight = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)[0]
        return Part(weight.view(-1)[:numel], start) if numel else None
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        return Part(mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start)
    if hasattr(param, "_hp_mapping"):
        return None
    if param.dtype != torch.float32:  # ZeRO-0 in 16 bits keeps its fp32 master inside the optimizer
        raise ValueError(
            f"no fp32 master weights for a {param.dtype} parameter at ZeRO stage 0: use ZeRO stage 1 or more"
        )
    return Part(param.detach().view(-1), 0, replicated=True)


def _offloaded(opt: object) -> bool:
    """Whether the optimizer keeps gradients on the CPU (ZeRO-1/2: cpu_offload, ZeRO-3: offload_optimizer)."""
    return bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False))


def settle_offloaded_grads(engine: object) -> None:
    """Wait for ZeRO-Offload's copies of the reduced gradient to the CPU before a method reads or changes it.

    ZeRO-1/2 copies each gradient into pinned CPU memory with non_blocking=True and waits for the copies
    only in its own step(); with `overlap_comm: false` nothing waits at the end of backward, so a method's
    in-place change of the CPU gradient (L2/EWC's pull) could land before the copy and be overwritten by
    it. The step waits for the same copies anyway: this moves the wait. Nothing to wait for on the CPU.
    """
    if _offloaded(getattr(engine, "optimizer", None)):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()  # every stream: the copies may be queued on more than one


def refresh_grad_norm(engine: object, param: nn.Parameter, part: Part | None = None) -> None:
    """Recompute the gradient norm ZeRO-Offload cached for `param` when it copied the reduced gradient to
    the CPU (before any method changed it), from this rank's changed part: gradient clipping uses it."""
    opt = getattr(engine, "optimizer", None)
    if not _offloaded(opt):
        return
    part = part if part is not None else local_grad(param)
    if part is not None:
        from deepspeed.runtime.zero.utils import get_norm_dtype

        opt.norm_for_param_grads[opt.get_param_id(param)] = part.flat.to(get_norm_dtype()).norm(2)
