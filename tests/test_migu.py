"""MIGU's rule and bookkeeping in one process: masks, ties, thresholds, layers, padding, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from pretrain.config import ConfigError, MethodConfig
from pretrain.methods import NoMethod, build_method
from pretrain.methods.masking import kept_count, select_layers, top_mask
from pretrain.methods.migu import decode_units, encode_units


class Toy(nn.Module):
    """`model.layers.0.fc` (Linear or Conv1D) on given activations: magnitudes are easy to write down."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].fc = layer

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.layers[0].fc(x)


def migu(threshold: float = 0.7, **kw) -> MethodConfig:
    return MethodConfig(name="migu", threshold=threshold, start_phase=1, **kw)


# ------------------------------------------------------------------------------------------------ rule
@pytest.mark.parametrize(
    "d_out, threshold, keep",
    [(10, 0.7, 3), (100, 0.29, 71), (10, 0.0, 10), (10, 0.99, 1), (3, 0.5, 2), (1, 0.7, 1), (64, 0.7, 20)],
)
def test_kept_count_is_d_out_minus_floor_t_d_out(d_out, threshold, keep):
    assert kept_count(d_out, threshold) == keep


def test_patterns_that_match_no_layer_name_the_keys():
    with pytest.raises(ConfigError, match=r"key `method.include` \['nothing'\].*no trainable linear layer"):
        build_method(migu(include=["nothing"]), tiny_llama())


def test_top_mask_keeps_largest_and_breaks_ties_by_lower_index():
    m = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0]])
    assert top_mask(m, 1).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert top_mask(m, 2).tolist() == [[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]]
    assert top_mask(m, 4).sum().item() == 12


def test_mask_from_hand_made_activations_on_linear_rows():
    fc = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(4))  # h = x: the magnitudes are the column sums of |x|
    model = Toy(fc)
    method = build_method(migu(threshold=0.5), model)
    method.begin_phase(1)
    x = torch.tensor([[[1.0, -4.0, 0.5, 2.0], [1.0, 1.0, -3.0, -2.5]]])  # sums |x|: 2, 5, 3.5, 4.5
    model(x).sum().backward()
    assert method.magnitudes.tolist() == [2.0, 5.0, 3.5, 4.5]
    method.before_backward()
    assert method.masks[0].tolist() == [[0, 1, 0, 1]]
    method.after_backward()
    assert (fc.weight.grad.abs().sum(1) > 0).tolist() == [False, True, False, True]


def test_conv1d_mask_is_on_columns():
    conv = Conv1D(5, 3)  # weight [d_in=3, d_out=5]
    model = Toy(conv)
    method = build_method(migu(threshold=0.6), model)  # keep 5 - 3 = 2
    method.begin_phase(1)
    before = conv.weight.detach().clone()
    x = torch.randn(2, 6, 3)
    out = model(x)
    expected = top_mask(out.detach().abs().sum((0, 1))[None], 2)[0].bool()
    method.before_backward()
    out.pow(2).sum().backward()
    method.after_backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = (conv.weight.detach() != before).any(0)  # per column
    assert changed.tolist() == expected.tolist()
    assert conv.bias.grad.ne(0).all()  # biases are not masked by default


def test_mask_bias_masks_the_bias_too():
    model = Toy(nn.Linear(3, 6))
    method = build_method(migu(threshold=0.5, mask_bias=True), model)
    method.begin_phase(1)
    out = model(torch.randn(4, 3))
    method.before_backward()
    out.pow(2).sum().backward()
    method.after_backward()
    fc = model.model.layers[0].fc
    assert fc.bias.grad.ne(0).tolist() == method.masks[0][0].bool().tolist()


def test_padding_tokens_are_not_counted():
    fc = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(3))
    model = Toy(fc)
    method = build_method(migu(), model)
    method.begin_phase(1)
    x = torch.tensor([[[1.0, 2.0, 0.0], [100.0, 0.0, 0.0]], [[0.0, 1.0, 1.0], [0.0, 0.0, 7.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])  # the 100 is padding
    model(x, attention_mask=mask)
    assert method.magnitudes.tolist() == [1.0, 3.0, 8.0]


# ----------------------------------------------------------------------------------------- which layers
def test_default_selection_is_the_blocks_linears_and_patterns_change_it():
    model = tiny_llama()
    names = [n for n, _ in select_layers(model, MethodConfig().include, [])]
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in names
    with_head = [n for n, _ in select_layers(model, [r"\.layers\.\d+\.", r"^lm_head$"], [])]
    assert with_head[-1] == "lm_head" and len(with_head) == 15
    no_mlp = [n for n, _ in select_layers(model, MethodConfig().include, [r"\.mlp\."])]
    assert len(no_mlp) == 2 * 4 and not any(".mlp." in n for n in no_mlp)


def _hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def test_none_registers_no_hooks():
    model = tiny_llama()
    before = _hook_count(model)
    method = build_method(MethodConfig(name="none"), model)
    method.begin_phase(2)
    assert isinstance(method, NoMethod)
    assert _hook_count(model) == before == 0
    assert method.end_phase(2) == {}


def test_eval_mode_forwards_are_not_counted():
    model = tiny_llama()
    method = build_method(migu(), model)
    method.begin_phase(1)
    batch = torch.randint(0, 100, (2, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)
    assert method.magnitudes.abs().sum() == 0
    model.train()
    model(input_ids=batch)
    assert method.magnitudes.abs().sum() > 0


def test_a_step_without_training_forwards_is_an_error_not_a_lowest_index_mask():
    model = tiny_llama()
    method = build_method(migu(), model)
    method.begin_phase(2)
    model.eval()  # e.g. a checkpoint loaded with from_pretrained and never put back in train mode
    model(input_ids=torch.randint(0, 100, (2, 8))).logits.sum()
    with pytest.raises(RuntimeError, match="no training forward pass in this step: is the model in eval"):
        method.before_backward()


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.9])
def test_random_kept_fraction_is_exact_for_any_threshold(threshold):
    method = build_method(MethodConfig(name="random", threshold=threshold, start_phase=1), tiny_llama())
    method.begin_phase(1)
    for _ in range(2):
        method.before_backward()
        method.after_backward()
    fractions = method.end_phase(1)["kept_fraction"]
    assert fractions["model.layers.0.self_attn.q_proj"] == (32 - int(threshold * 32 + 1e-9)) / 32
    assert fractions["model.layers.1.mlp.gate_proj"] == (64 - int(threshold * 64 + 1e-9)) / 64


def test_random_keeps_the_same_fraction_with_seeded_identical_masks():
    cfg = MethodConfig(name="random", threshold=0.7, start_phase=1)
    a, b = build_method(cfg, tiny_llama(), seed=3), build_method(cfg, tiny_llama(), seed=3)
    assert _hook_count(a.model) == 0  # random needs no magnitudes
    for method in (a, b):
        method.begin_phase(1)
        for _ in range(3):
            method.before_backward()
            method.after_backward()
    for ga, ma, mb in zip(a.groups, a.masks, b.masks, strict=True):
        assert torch.equal(ma, mb)
        assert ma.sum(1).tolist() == [ga.keep] * len(ga.names)
    summary = a.end_phase(1)
    assert summary["kept_fraction"] == summary["expected_kept_fraction"]
    assert summary["kept_fraction"]["model.layers.0.mlp.up_proj"] == 20 / 64


# ------------------------------------------------------------------------------- checkpointing, training
def _magnitudes_after_one_backward(checkpointing: bool, reentrant: bool = False) -> torch.Tensor:
    model = tiny_llama()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    method = build_method(migu(), model, grad_accum=2)  # not a boundary: magnitudes stay in the buffer
    method.begin_phase(1)
    batch = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=batch, labels=batch).loss
    method.before_backward()
    after_forward = method.magnitudes.clone()
    loss.backward()
    method.after_backward()
    assert torch.equal(method.magnitudes, after_forward)  # nothing counted during backward
    return after_forward


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_count_the_recomputed_forward(reentrant):
    plain = _magnitudes_after_one_backward(checkpointing=False)
    checkpointed = _magnitudes_after_one_backward(checkpointing=True, reentrant=reentrant)
    torch.testing.assert_close(checkpointed, plain)


def _reference_magnitudes(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Written out for the test: n_i = sum over tokens of |h_i|, from a plain forward."""
    out, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        hook = lambda m, a, h, name=name: out.__setitem__(name, h.detach().abs().sum((0, 1)))  # noqa: E731
        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch)
    for h in handles:
        h.remove()
    return out


def test_sgd_step_changes_exactly_the_top_rows_and_their_count_matches_t():
    model = tiny_llama()
    cfg = MethodConfig(name="migu", threshold=0.7, start_phase=2)
    method = build_method(cfg, model)
    method.begin_phase(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in method.layers]
    reference = _reference_magnitudes(model, names, batch)
    modules = dict(model.named_modules())
    before = {n: modules[n].weight.detach().clone() for n in names}
    loss = model(input_ids=batch, labels=batch).loss
    method.before_backward()
    loss.backward()
    method.after_backward()
    optimizer.step()
    for name in names:
        changed = (modules[name].weight.detach() != before[name]).any(1)
        d_out = changed.numel()
        assert changed.sum().item() == d_out - int(0.7 * d_out + 1e-9), name
        expected = top_mask(reference[name][None], changed.sum().item())[0].bool()
        assert changed.tolist() == expected.tolist(), name
    assert (model.lm_head.weight.grad != 0).all(1).all()  # not selected: not masked


def test_grad_accumulation_mask_comes_from_all_micro_batches_of_the_step():
    model, reference_model = tiny_llama(), tiny_llama()
    method = build_method(migu(), model, grad_accum=2)
    method.begin_phase(1)
    g = torch.Generator().manual_seed(4)
    micro = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(2)]
    for batch in micro:
        loss = model(input_ids=batch, labels=batch).loss / 2
        method.before_backward()
        loss.backward()
        method.after_backward()
    # reference: magnitudes summed over both micro-batches, one mask, applied to the summed gradient
    names = [n for n, _ in method.layers]
    magnitudes = {n: 0 for n in names}
    for batch in micro:
        for n, v in _reference_magnitudes(reference_model, names, batch).items():
            magnitudes[n] = magnitudes[n] + v
        (reference_model(input_ids=batch, labels=batch).loss / 2).backward()
    ref_modules, modules = dict(reference_model.named_modules()), dict(model.named_modules())
    for n in names:
        mask = top_mask(magnitudes[n][None], kept_count(magnitudes[n].numel(), 0.7))[0]
        torch.testing.assert_close(modules[n].weight.grad, ref_modules[n].weight.grad * mask[:, None])


def test_phase_summary_is_json_with_top_sets_and_overlap():
    model = tiny_llama()
    method = build_method(MethodConfig(name="migu", threshold=0.7, start_phase=2), model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    summaries = []
    for phase in (1, 2):
        method.begin_phase(phase)
        for _ in range(2):
            batch = torch.randint(0, 100, (2, 16), generator=g)
            loss = model(input_ids=batch, labels=batch).loss
            method.before_backward()
            loss.backward()
            method.after_backward()
            optimizer.step()
            optimizer.zero_grad()
        summaries.append(json.loads(json.dumps(method.end_phase(phase))))
    first, second = summaries
    assert first["masked"] is False and first["kept_fraction"] == {}
    assert first["jaccard_with_previous"] is None
    assert second["masked"] is True and second["kept_fraction"] == second["expected_kept_fraction"]
    assert 0.0 <= second["jaccard_with_previous"] <= 1.0
    name = "model.layers.1.mlp.down_proj"
    units = decode_units(second["top_units"][name], 32)
    assert len(units) == kept_count(32, 0.7) and units == sorted(units)
    q = second["magnitude_quantiles"][name]
    assert q == sorted(q) and len(q) == len(second["quantiles"])


def test_encode_units_round_trip():
    units = torch.zeros(13, dtype=torch.bool)
    units[[0, 4, 5, 12]] = True
    assert decode_units(encode_units(units), 13) == [0, 4, 5, 12]


def test_state_dict_round_trip_restores_the_step_in_progress():
    model = tiny_llama()
    method = build_method(migu(), model, grad_accum=2)
    method.begin_phase(1)
    batch = torch.randint(0, 100, (2, 8))
    model(input_ids=batch, labels=batch)
    method.before_backward()
    method.after_backward()
    state = method.state_dict()
    other = build_method(migu(), model, grad_accum=2)
    other.load_state_dict(state)
    assert torch.equal(other.magnitudes, method.magnitudes) and other.micro_step == 1
    method.remove_hooks()
    model(input_ids=batch, labels=batch)  # the restored method's hooks write into its restored buffer
    assert torch.equal(other.magnitudes, 2 * method.magnitudes)


def test_a_discarded_step_leaves_no_trace_in_masks_or_phase_statistics():
    # probe 5: with train.on_nonfinite: skip, the skipped step's NaN magnitudes chose later masks
    model, clean = tiny_llama(), tiny_llama()
    poisoned, reference = build_method(migu(), model), build_method(migu(), clean)
    poisoned.begin_phase(1)
    reference.begin_phase(1)
    batch = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        model(input_ids=batch)  # the step the trainer skips: its loss is NaN
        model.model.layers[0].mlp.up_proj.weight[0, 0] = clean.model.layers[0].mlp.up_proj.weight[0, 0]
    assert poisoned.magnitudes.isnan().any()
    poisoned.discard_step()
    for method, m in ((poisoned, model), (reference, clean)):
        m(input_ids=batch, labels=batch).loss.backward()
        method.before_backward()
        method.after_backward()
    assert all(torch.equal(a, b) for a, b in zip(poisoned.masks, reference.masks, strict=True))
    summary = poisoned.end_phase(1)
    assert summary == reference.end_phase(1)
    assert all(v == v for q in summary["magnitude_quantiles"].values() for v in q)  # no NaN
