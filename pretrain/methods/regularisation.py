"""Parameter regularisation toward the previous phase's weights, on each rank's own ZeRO partition.

    R(w) = weight/2 * sum_i F_i (w_i - a_i)^2      a: the weights at the end of the previous phase
    l2  (L2-SP, Li et al. 2018): F_i = 1
    ewc (Kirkpatrick et al. 2017, online as Schwarz et al. 2018): F <- decay * F + F_phase, where F_phase
        is the diagonal empirical Fisher of the phase just finished, the mean of g_i^2 over its last
        `fisher_steps` optimizer steps (g: the step's loss gradient, before the pull and any mask),
        scaled to mean 1 over all regularised weights so that `weight` means the same as for l2.

Instead of adding R to the loss (which at ZeRO-3 would need the full weights), its gradient
weight * F * (w - a) is added to each rank's reduced gradient partition before `engine.step()`: the
same update, and clipping sees it as it would see the loss term's gradient. Anchors and Fisher are
fp32 copies of this rank's partition only (pretrain/methods/partitions.py), checkpointed per rank. The
pull starts in phase 2. It runs before a gradient mask, so MIGU masks the regularised gradient, as it
masks the gradient of loss + penalty in the paper's combination.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import RegularisationConfig
from pretrain.distributed import all_reduce_sum
from pretrain.methods.base import MethodBase
from pretrain.methods.partitions import local_grad, local_weight, refresh_grad_norm, settle_offloaded_grads


class Regularisation(MethodBase):
    name = "regularisation"

    def __init__(self, cfg: RegularisationConfig, model: nn.Module, engine: Any, phase_steps: list[int]):
        self.cfg, self.engine, self.phase_steps = cfg, engine, phase_steps
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.group = getattr(engine, "data_parallel_group", None)
        # disjoint shares (ZeRO-1/2/3) are summed over ranks; full copies (ZeRO-0) are not. Fixed by the
        # engine, so found once here rather than by walking the parameters every step
        self.partitioned = any(not part.replicated for _, part in self._weights())
        self.anchors: dict[str, torch.Tensor] = {}  # this rank's partition, fp32
        self.fisher: dict[str, torch.Tensor] = {}  # ewc: accumulated importance, same layout
        self.fisher_sum: dict[str, torch.Tensor] = {}  # ewc: this phase's sum of g^2 so far
        self.phase, self.step, self.fisher_steps_seen = 0, 0, 0
        self.penalty, self.penalty_sum, self.penalty_steps = 0.0, 0.0, 0

    # -- phases
    def begin_phase(self, phase: int) -> None:
        self.phase, self.step, self.fisher_steps_seen = phase, 0, 0
        self.fisher_sum = {}
        self.penalty, self.penalty_sum, self.penalty_steps = 0.0, 0.0, 0

    def end_phase(self, phase: int) -> dict[str, Any]:
        """The weights now are the next phase's anchor; for ewc, this phase's Fisher joins the estimate."""
        if self.cfg.kind == "ewc":
            self._accumulate_fisher()
        self.anchors = {name: part.flat.detach().float().clone() for name, part in self._weights()}
        summary = {"phase": phase, "regularisation": self.cfg.kind, "reg_weight": self.cfg.weight}
        if self.penalty_steps:
            summary["reg_penalty_mean"] = self.penalty_sum / self.penalty_steps
            summary["reg_penalty_last"] = self.penalty
        if self.cfg.kind == "ewc":
            summary["fisher_steps"] = self.fisher_steps_seen
        return summary

    # -- per step
    def skip_step(self) -> None:
        """A step the trainer skipped (a non-finite loss) is a step of the phase all the same: uncounted,
        each one moved EWC's Fisher window (the phase's last fisher_steps) past the phase's end, and as
        many skips as fisher_steps left the phase with no Fisher, its domain unprotected, without a word."""
        self.step += 1

    def after_backward(self, engine: Any = None) -> None:
        engine = engine if engine is not None else self.engine
        if not engine.is_gradient_accumulation_boundary():
            return
        self.step += 1
        settle_offloaded_grads(engine)
        scale = _loss_scale(engine)  # fp16 gradients are still multiplied by the loss scale here
        window_start = self.phase_steps[self.phase - 1] - self.cfg.fisher_steps
        collect = self.cfg.kind == "ewc" and self.step > window_start and self._collect_fisher(scale)
        terms = []  # (w - anchor) . pull of each part, on its device (a GPU one: no host sync per part)
        # one part at a time, as the loop always took them: listing every part first made this in-place
        # add fail at ZeRO-3 with offload ("a leaf Variable that requires grad"), cause not traced
        for name, param, weight, grad in self._weights_and_grads():
            # ewc without a Fisher yet (every step of the last phase was skipped) has nothing to protect
            if name in self.anchors and (self.cfg.kind == "l2" or name in self.fisher):
                diff = weight.float() - self.anchors[name]
                pull = diff * self.fisher[name] if self.cfg.kind == "ewc" else diff
                terms.append(torch.dot(pull, diff).double())
                grad.add_(pull.mul_(self.cfg.weight * scale))
                refresh_grad_norm(engine, param)
        self.fisher_steps_seen += collect
        if self.anchors:
            penalty = torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
            self._record_penalty(0.5 * self.cfg.weight * penalty)

    def _collect_fisher(self, scale: float) -> bool:
        """Add this step's g^2 to the phase's Fisher sum, unless some rank's gradient is not finite (an
        fp16 overflow, which DeepSpeed skips): one inf would make the whole Fisher NaN and zero."""
        # the check first, on the gradients themselves: squaring them all before it held a second fp32
        # copy of this rank's gradient partition at once
        flags = [(~grad.isfinite()).any() for *_, grad in self._weights_and_grads()]  # one sync below
        bad = (torch.stack(flags).any() if flags else torch.tensor(False)).double().reshape(1)
        if self.partitioned:
            all_reduce_sum(bad, self.group)
        if bad.item():
            return False
        for name, _, _, grad in self._weights_and_grads():
            g2 = (grad.float() / scale).square()
            self.fisher_sum[name] = self.fisher_sum[name].add_(g2) if name in self.fisher_sum else g2
        return True

    def _record_penalty(self, local: torch.Tensor) -> None:
        if self.partitioned:
            all_reduce_sum(local, self.group)
        self.penalty = local.item()
        self.penalty_sum += self.penalty
        self.penalty_steps += 1

    def scalars(self) -> dict[str, float]:
        return {"reg_penalty": self.penalty} if self.anchors else {}

    # -- this rank's parts
    def _weights(self):
        for name, p in self.params:
            part = local_weight(p)
            if part is not None:
                yield name, part

    def _weights_and_grads(self):
        """(name, parameter, fp32 weights, gradient over the same elements) of each part on this rank."""
        for name, p in self.params:
            weight = local_weight(p)
            if weight is not None:
                yield name, p, weight.flat, local_grad(p).narrow(weight.start, weight.numel)

    def _accumulate_fisher(self) -> None:
        """F <- decay * F + F_phase / mean(F_phase), the mean taken over every rank's share."""
        if not self.fisher_steps_seen:
            return
        phase_fisher = {n: s / self.fisher_steps_seen for n, s in self.fisher_sum.items()}
        fishers = phase_fisher.values()
        totals = torch.tensor([sum(f.sum().item() for f in fishers), sum(f.numel() for f in fishers)])
        totals = totals.double()
        if self.partitioned:
            all_reduce_sum(totals, self.group)
        mean = (totals[0] / totals[1]).item() if totals[1] else 0.0
        for name, f in phase_fisher.items():
            f = f / mean if mean > 0 else torch.ones_like(f)
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None else old.mul_(self.cfg.fisher_decay).add_(f)
        self.fisher_sum = {}

    # -- resume: everything here is this rank's own partition
    def rank_state_dict(self) -> dict[str, Any]:
        return {
            # where each part lies in its flat parameter: what a resume on another world size re-cuts by
            "starts": {name: part.start for name, part in self._weights()},
            "phase": self.phase,
            "step": self.step,
            "fisher_steps_seen": self.fisher_steps_seen,
            "anchors": self.anchors,
            "fisher": self.fisher,
            "fisher_sum": self.fisher_sum,
            "penalty": (self.penalty, self.penalty_sum, self.penalty_steps),
        }

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """The state as saved; its tensors, loaded on the host (the saving rank's GPU may be another
        one now, or absent), go where this rank's parts are."""
        self.phase, self.step = state["phase"], state["step"]
        self.fisher_steps_seen = state["fisher_steps_seen"]
        device = {name: part.flat.device for name, part in self._weights()}
        for key in ("anchors", "fisher", "fisher_sum"):
            setattr(self, key, {name: t.to(device[name]) for name, t in state[key].items()})
        self.penalty, self.penalty_sum, self.penalty_steps = state["penalty"]

    def reshard_rank_state(self, states: list[dict[str, Any]]) -> None:
        """This rank's parts of the anchors and Fishers that the old ranks' parts make up together."""
        if any("starts" not in s for s in states):
            raise ValueError("regularisation state saved without part offsets: resume on the same ranks")
        self.load_rank_state_dict({**states[0], "anchors": {}, "fisher": {}, "fisher_sum": {}})
        numels = {name: getattr(p, "ds_numel", p.numel()) for name, p in self.params}
        for key in ("anchors", "fisher", "fisher_sum"):
            target = getattr(self, key)
            for name, part in self._weights():
                pieces = [(s["starts"][name], s[key][name]) for s in states if name in s[key]]
                if pieces:
                    target[name] = recut(pieces, numels[name], part.start, part.numel).to(part.flat.device)


def _loss_scale(engine: Any) -> float:
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", 1.0)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else 1.0


def recut(pieces: list[tuple[int, torch.Tensor]], numel: int, start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of a flat tensor of `numel` elements given as (offset, piece)s."""
    whole = torch.zeros(numel, dtype=pieces[0][1].dtype)
    for offset, piece in pieces:
        whole[offset : offset + piece.numel()] = piece
    return whole[start : start + length].clone()
