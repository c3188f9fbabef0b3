"""Is a plain transformers model the merged form of a peft LoRA model? Checks with bounds from fp32 rounding.

Merging in fp32 computes fl(W + fl(fl(B @ A) * s)) for W + s B A. With u = 2^-24 and gamma_n = n u / (1 - n u)
(Higham, Accuracy and Stability of Numerical Algorithms, 3.1), the r-term products of B @ A err by at most
gamma_r |B| |A|, the scaling and the sum add one rounding each, so elementwise

    |merged - (W + s B A)| <= gamma_{r+2} (|W| + s |B| |A|)        (the merge bound)

Every other tensor must be copied bitwise. The logits are compared in float64, where the forward itself
rounds ~1e-16 and the difference left is what the fp32 merged weights' rounding (within the merge bound)
does to them: to first order sum_k |dz_k| = sum_k sign(dz_k) dz_k = grad S . dW with S = sum_k sign(dz_k) z_k,
so sum_k |dz_k| <= sum |grad S| * bound. The check allows twice that (second-order terms are ~u^2).
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora import Linear as LoraLinear

U = 2.0**-24  # fp32 unit roundoff


def with_random_b(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """`model` with every LoRA B drawn at random, in place: a fresh B is zero, a trained one is not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def merge_targets(peft_model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({plain weight key: W + s B A in float64}, {plain weight key: the merge bound})."""
    state = peft_model.state_dict()
    exact, bounds = {}, {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        w = state[f"{name}.base_layer.weight"].double()
        a, b = (state[f"{name}.lora_{m}.default.weight"].double() for m in "AB")
        s, r = layer.scaling["default"], a.shape[0]
        key = f"{name}.weight".removeprefix("base_model.model.")
        exact[key] = w + s * (b @ a)
        bounds[key] = gamma(r + 2) * (w.abs() + s * (b.abs() @ a.abs()))
    return exact, bounds


def assert_weights_merged(peft_model, merged_model) -> None:
    """The merged model holds W + s B A within the merge bound, and every other tensor bitwise."""
    exact, bounds = merge_targets(peft_model)
    base = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
    merged = merged_model.state_dict()
    assert merged.keys() == {k.replace(".base_layer.", ".") for k in base if "lora_" not in k}
    for key, value in merged.items():
        if key in exact:
            error = (value.double() - exact[key]).abs()
            assert bool((error <= bounds[key]).all()), f"{key}: off by {(error - bounds[key]).max()}"
        else:
            assert torch.equal(value, base[key]), key


def logit_gap_and_bound(peft_model, merged_model, input_ids: torch.Tensor) -> tuple[float, float, float]:
    """(sum |dz| between the two models' float64 logits, the first-order bound of it from the merge bound,
    sum |dz| between the peft model with and without its adapters: what an unmerged export would show)."""
    _, bounds = merge_targets(peft_model)
    peft64, merged64 = copy.deepcopy(peft_model).double().eval(), copy.deepcopy(merged_model).double().eval()
    with torch.no_grad():
        z_peft = peft64(input_ids=input_ids).logits
        with peft64.disable_adapter():
            z_base = peft64(input_ids=input_ids).logits
    z = merged64(input_ids=input_ids).logits
    gap = z.detach() - z_peft
    (gap.sign() * z).sum().backward()  # S; its gradient weighs each weight's rounding by its effect
    params = dict(merged64.named_parameters())
    bound = sum((params[k].grad.abs() * b).sum().item() for k, b in bounds.items())
    return gap.abs().sum().item(), bound, (z_base - z_peft).abs().sum().item()


def assert_export_is_merged(peft_model, merged_model, input_ids: torch.Tensor) -> None:
    """Weights within the merge bound, and the same logits as the peft model within what that allows."""
    assert_weights_merged(peft_model, merged_model)
    gap, bound, adapters = logit_gap_and_bound(peft_model, merged_model, input_ids)
    assert gap <= 2 * bound, f"logits differ by {gap} in all, more than twice the rounding bound {bound}"
    assert adapters > 1000 * bound, "the adapters barely change the logits: the check could not fail"
