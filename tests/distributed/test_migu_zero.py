"""MIGU is exact under DeepSpeed: a 2-rank run at ZeRO 0, 1, 2 and 3 equals a single-process reference.

One `deepspeed` launch per stage trains every case of migu_worker.CASES (SGD and AdamW with clipping,
accumulation 1 and 2, bf16 with bf16 or fp32 accumulation, LoRA adapters, and at stages 2-3 ZeRO-Offload
with overlap_comm in small buckets: SGD with clipping, EWC with clipping); the reference below is the
paper's rule written out over the full batch (for LoRA: A's rows by |x A^T|, B's rows by |x A^T B^T|, as
the published code hooks lora_A and lora_B). bf16 runs are checked for exact masking, not against the
fp32 reference.
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache, partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_ok, run_deepspeed

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("migu_worker.py")
_spec = importlib.util.spec_from_file_location("migu_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

FP32_CASES = [name for name, case in worker.CASES.items() if not case.bf16 and case.reg == "none"]
REG_CASES = [name for name, case in worker.CASES.items() if case.reg != "none"]
LORA_CASES = [name for name, case in worker.CASES.items() if case.lora]
BF16_CASES = [name for name, case in worker.CASES.items() if case.bf16]
THRESHOLD = worker.method_config().threshold


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda s: f"zero{s}")
def stage_run(request, tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp(f"migu_zero{request.param}")
    proc = run_deepspeed([str(WORKER), "--stage", str(request.param), "--out", str(out)], module=False)
    assert_ok(proc)
    return request.param, out


def outputs(stage_run: tuple[int, Path], case: str) -> Path:
    stage, out = stage_run
    if not worker.CASES[case].runs_at(stage):
        pytest.skip(f"{case} does not apply to ZeRO-{stage}")
    return out


def masked_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The default selection: every trainable nn.Linear inside a transformer block (`model.layers.N.`);
    with LoRA these are the adapters' lora_A and lora_B, not the frozen base layers."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n and m.weight.requires_grad
    }


def top_units(n: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 mask of the d_out - floor(T * d_out) largest n_i (equal n_i: the lower index first)."""
    d_out = n.numel()
    keep = d_out - math.floor(threshold * d_out)
    order = sorted(range(d_out), key=lambda i: (-n[i].item(), i))
    mask = torch.zeros(d_out)
    mask[order[:keep]] = 1.0
    return mask


def record_outputs(layers: dict[str, torch.nn.Linear], n: dict[str, torch.Tensor]) -> list:
    """Hooks adding sum_tokens |h_i| of each layer's output h into n[name]."""

    def record(module, x, h, slot):
        slot += h.detach().abs().sum((0, 1))

    return [m.register_forward_hook(partial(record, slot=n[name])) for name, m in layers.items()]


def record_adapter_outputs(model: torch.nn.Module, n: dict[str, torch.Tensor]) -> list:
    """Hooks on each LoRA layer adding |x A^T| into n[<layer>.lora_A.default] and |x A^T B^T| into
    n[<layer>.lora_B.default], from the layer's input x (dropout 0: the adapters see x itself)."""
    from peft.tuners.lora import Linear as LoraLinear

    def record(module, args, output, name):
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        xa = F.linear(args[0].detach(), a.detach())
        n[f"{name}.lora_A.default"] += xa.abs().sum((0, 1))
        n[f"{name}.lora_B.default"] += F.linear(xa, b.detach()).abs().sum((0, 1))

    return [
        m.register_forward_hook(partial(record, name=name))
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear)
    ]


@cache
def reference(case: str, reg_weight: float = worker.REG_WEIGHT) -> tuple[dict[str, torch.Tensor], list]:
    """Plain single-process MIGU: the full batch is both ranks' micro-batches of the step.

    A regularised case first trains phase 1 unmasked, then phase 2 masked on loss + the penalty
    reg_weight/2 * sum F (w - anchor)^2, differentiated by autograd (not the method's own gradient rule).
    """
    opt_name, grad_accum, _, clip, _, reg, lora = worker.CASES[case][:7]
    model = worker.build_model(worker.CASES[case])
    optimizer = worker.optimizer_for(opt_name, model)
    params = dict(model.named_parameters())
    if reg == "none":
        data = worker.batches(grad_accum)
        return _reference_phase(model, optimizer, data, grad_accum, clip, masked=True, lora=lora), None
    data = worker.batches(grad_accum, 2 * worker.STEPS)
    squares = _reference_phase(model, optimizer, data[: worker.STEPS], grad_accum, clip, masked=False)
    anchors = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.ones_like(p) for n, p in params.items()}
    if reg == "ewc":  # the mean g^2 of the phase's last FISHER_STEPS steps, scaled to mean 1 overall
        mean = sum(s.sum() for s in squares.values()) / sum(s.numel() for s in squares.values())
        fisher = {n: s / mean for n, s in squares.items()}

    def penalty() -> torch.Tensor:
        return reg_weight / 2 * sum((fisher[n] * (p - anchors[n]) ** 2).sum() for n, p in params.items())

    weights, masks = _reference_phase(model, optimizer, data[worker.STEPS :], grad_accum, clip, True, penalty)
    return (weights, masks), anchors


def _reference_phase(model, optimizer, data, grad_accum, clip, masked, penalty=None, lora=False):
    """STEPS steps; masked: (final weights, masks per step); else the mean g^2 of the last FISHER_STEPS."""
    layers = masked_layers(model)
    all_masks, squares = [], {}
    for step in range(len(data)):
        n = {name: torch.zeros(m.out_features) for name, m in layers.items()}  # n_i = sum_tokens |h_i|
        hooks = record_adapter_outputs(model, n) if lora else record_outputs(layers, n)
        optimizer.zero_grad()
        for micro in range(grad_accum):
            for rank in range(worker.WORLD):
                batch = data[step, micro, rank]
                loss = model(input_ids=batch, labels=batch).loss  # each rank's mean over its micro-batch
                (loss / (worker.WORLD * grad_accum)).backward()  # DeepSpeed averages ranks and micro-steps
        for h in hooks:
            h.remove()
        if not masked and step >= len(data) - worker.FISHER_STEPS:
            for name, p in model.named_parameters():
                squares[name] = squares.get(name, 0) + p.grad.square() / worker.FISHER_STEPS
        if penalty is not None:
            penalty().backward()
        if masked:
            masks = {name: top_units(n[name], THRESHOLD) for name in layers}
            for name, m in layers.items():
                m.weight.grad *= masks[name][:, None]  # rows of W; biases (none in Llama) stay unmasked
            all_masks.append(masks)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    if not masked:
        return squares
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return weights, all_masks


def _ordered_masks(method_masks: list[dict[str, torch.Tensor]], case: str) -> torch.Tensor:
    """The reference's masks in the method's flat layout (layers grouped by d_out, in model order)."""
    from pretrain.methods.masking import _group_layers

    model = worker.build_model(worker.CASES[case])
    groups = _group_layers(list(masked_layers(model).items()), THRESHOLD)
    return torch.stack([torch.cat([step[n] for g in groups for n in g.names]) for step in method_masks])


def adam_step_bound(steps: int, beta1: float, beta2: float) -> float:
    """Largest |m_hat| / sqrt(v_hat) after `steps` Adam steps, over all gradient sequences.

    m_hat = sum a_i g_i and v_hat = sum b_i g_i^2 (bias-corrected weights); by Cauchy-Schwarz
    |m_hat| <= sqrt(sum a_i^2 / b_i) * sqrt(v_hat). The update lr * m_hat / (sqrt(v_hat) + eps) is smaller.
    """
    t = steps
    a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) for i in range(1, t + 1)]
    b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2**t) for i in range(1, t + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b, strict=True)))


def weight_tolerance(case: str) -> dict[str, float]:
    """assert_close tolerances for a case's weights against the reference: what the arithmetic allows.

    Both runs compute the same micro-batch gradients but add the WORLD x grad_accum of them in another order
    (the reference by micro-batch; ZeRO per rank, then across ranks), so a step's gradient differs by a few
    ulps (2^-23 ~ 1.2e-7 relative to the terms). SGD passes that on linearly, lr * |dg| ~ 1e-8 a step here:
    far inside rtol 1e-5 + atol 1e-6, which a wrong row moved (by lr * |g|) still fails.
    AdamW steps by lr * m_hat / (sqrt(v_hat) + eps): for a gradient near eps = 1e-8 (a token first seen in
    the last step, a unit just kept) the slope is lr / eps = 5e5 per unit of gradient, and once a weight
    differs the next gradients differ by more than ulps, so ulps bound nothing. What does: a step moves a
    weight by at most lr * adam_step_bound(t) (1, 1.0014, 1.0036), so the runs differ by at most twice the
    sum, ~6 lr = 0.03 after 3 steps. That is as large as a masking bug (a wrong row moves ~lr a step), so
    AdamW's weights are held to that bound only, and its check is what stays exact: masks equal to the
    reference's, and rows that move exactly when kept (test_rows_move_exactly_when_kept).
    """
    optimizer_name = worker.CASES[case].optimizer
    if optimizer_name == "sgd":
        return {"rtol": 1e-5, "atol": 1e-6}
    defaults = worker.optimizer_for(optimizer_name, worker.build_model(worker.CASES[case])).defaults
    beta1, beta2 = defaults["betas"]
    steps = range(1, worker.STEPS + 1)
    return {"rtol": 0.0, "atol": 2 * defaults["lr"] * sum(adam_step_bound(t, beta1, beta2) for t in steps)}


@pytest.mark.parametrize("case", FP32_CASES)
def test_weights_and_masks_equal_the_single_process_reference(stage_run, case):
    out = outputs(stage_run, case)
    result = torch.load(out / f"{case}.pt")
    (ref_weights, ref_masks), _ = reference(case)
    masks = torch.load(out / f"{case}.masks.rank0.pt")
    assert torch.equal(masks, _ordered_masks(ref_masks, case))
    tolerance = weight_tolerance(case)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(result["weights"][name], ref, **tolerance, msg=name)
    model = worker.build_model(worker.CASES[case])
    init = dict(model.named_parameters())  # the run did move: the comparison is not vacuous
    assert all(not torch.equal(ref_weights[f"{n}.weight"], init[f"{n}.weight"]) for n in masked_layers(model))


def rows_moved_and_kept(
    weights: dict[str, torch.Tensor], masks: torch.Tensor, init_dtype: torch.dtype, case: str
):
    """Per masked layer: (rows that differ from their initial value, rows some step kept), as lists of bool.

    `init_dtype` is the precision the run's parameters started in (bf16 runs round the fp32 init).
    """
    from pretrain.methods.masking import _group_layers

    model = worker.build_model(worker.CASES[case])
    ever_kept = masks.amax(0)
    offset, out = 0, {}
    for g in _group_layers(list(masked_layers(model).items()), THRESHOLD):
        for name, module in zip(g.names, g.modules, strict=True):
            init = module.weight.detach().to(init_dtype).float()
            moved = (weights[f"{name}.weight"] != init).any(1)
            out[name] = moved.tolist(), ever_kept[offset : offset + g.d_out].bool().tolist()
            offset += g.d_out
    return out


@pytest.mark.parametrize("case", FP32_CASES)
def test_rows_move_exactly_when_kept(stage_run, case):
    """A row never kept has a zero gradient at every step: SGD and AdamW (m = v = 0, update 0 / eps) leave
    it bitwise unchanged, while every kept row moves. Exact at any summation order."""
    out = outputs(stage_run, case)
    weights = torch.load(out / f"{case}.pt")["weights"]
    masks = torch.load(out / f"{case}.masks.rank0.pt")
    for name, (moved, kept) in rows_moved_and_kept(weights, masks, torch.float32, case).items():
        assert moved == kept, name
        assert 0 < sum(kept) < len(kept), name  # some rows kept, some never: the check has both kinds


@pytest.mark.parametrize("case", list(worker.CASES))
def test_masks_identical_on_all_ranks_with_kept_fraction_one_minus_t(stage_run, case):
    out = outputs(stage_run, case)
    rank0 = torch.load(out / f"{case}.masks.rank0.pt")
    rank1 = torch.load(out / f"{case}.masks.rank1.pt")
    assert torch.equal(rank0, rank1)
    summary = torch.load(out / f"{case}.pt")["summary"]
    assert summary["kept_fraction"] == summary["expected_kept_fraction"]
    layer = "model.layers.0.mlp.up_proj"
    if worker.CASES[case].lora:  # the adapter's B has up_proj's 64 output units
        layer = f"base_model.model.{layer}.lora_B.default"
    assert summary["kept_fraction"][layer] == 20 / 64  # 64 - floor(0.7 * 64)


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_leaves_every_base_weight_bit_identical(stage_run, case):
    """Only the adapters train: every frozen tensor (embeddings, norms, each base_layer, lm_head) ends
    bitwise as it started, at every ZeRO stage, and every adapter matrix moved."""
    out = outputs(stage_run, case)
    weights = torch.load(out / f"{case}.pt")["weights"]
    init = dict(worker.build_model(worker.CASES[case]).named_parameters())
    frozen = [name for name, p in init.items() if not p.requires_grad]
    assert len(frozen) == 1 + 2 * 9 + 2  # embeddings; per block 7 base layers, 2 norms; final norm, lm_head
    for name in frozen:
        assert torch.equal(weights[name], init[name].detach()), name
    for name in (n for n, p in init.items() if p.requires_grad):
        assert not torch.equal(weights[name], init[name].detach()), name


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_sgd_changes_exactly_the_rows_ever_kept(stage_run, case):
    """bf16 activations give other masks than the fp32 reference; the masking itself must still be exact."""
    out = outputs(stage_run, case)
    weights = torch.load(out / f"{case}.pt")["weights"]
    masks = torch.load(out / f"{case}.masks.rank0.pt")
    for name, (moved, kept) in rows_moved_and_kept(weights, masks, torch.bfloat16, case).items():
        assert moved == kept, name


@pytest.mark.parametrize("case", REG_CASES)
def test_regularised_phase_equals_the_autograd_reference(stage_run, case):
    """The pull added to each rank's gradient partition equals differentiating loss + penalty in one
    process (SGD: the tolerance of test_weights_and_masks_equal_the_single_process_reference), under the
    same masks; and it keeps the weights measurably closer to the phase-1 anchors than no pull does."""
    out = outputs(stage_run, case)
    result = torch.load(out / f"{case}.pt")
    (ref_weights, ref_masks), anchors = reference(case)
    assert torch.equal(torch.load(out / f"{case}.masks.rank0.pt"), _ordered_masks(ref_masks, case))
    for name, ref in ref_weights.items():
        torch.testing.assert_close(result["weights"][name], ref, **weight_tolerance(case), msg=name)
    (free, _), _ = reference(case, reg_weight=0.0)

    def distance(weights):
        return math.sqrt(sum((weights[n] - a).square().sum().item() for n, a in anchors.items()))

    assert distance(result["weights"]) < 0.8 * distance(free)  # 0.67 (l2) and 0.58 (ewc) in the reference
    assert result["summary"]["reg_penalty_mean"] > 0


@pytest.mark.parametrize("case", REG_CASES)
def test_anchors_are_each_ranks_own_partition(stage_run, case):
    """ZeRO-1/2/3: the two ranks' anchors split the model's weights between them, nobody holds a full
    copy (up to a parameter split at the partition border); ZeRO-0: each rank has all of them."""
    stage, out = stage_run[0], outputs(stage_run, case)
    sizes = [torch.load(out / f"{case}.anchors.rank{r}.pt") for r in range(worker.WORLD)]
    total = sum(p.numel() for p in worker.tiny_llama().parameters())
    if stage == 0:
        assert sizes == [total] * worker.WORLD
    else:
        assert sum(sizes) == total
        assert all(abs(s - total / worker.WORLD) <= total * 0.1 for s in sizes), sizes
