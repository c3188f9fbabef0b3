"""LoRA (pretrain/methods/lora.py), in one process: what trains, what MIGU masks, the merged export.

The same properties under real 2-rank DeepSpeed: tests/distributed/test_migu_zero.py (ZeRO 0-3, MIGU on
the adapters against a single-process reference, base bit-identical) and test_resume.py (the pipeline at
ZeRO-3: base bit-identical, the merged export, kill -9 and --resume).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from lora_checks import assert_export_is_merged, with_random_b
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pretrain.checkpoint import export_phase
from pretrain.config import LLAMA_PROJECTIONS, ConfigError, LoraConfig, MethodConfig, ModelConfig
from pretrain.engine import build_optimizer
from pretrain.methods.lora import apply_lora, merged_state_dict
from pretrain.methods.masking import select_layers

VOCAB = 300


def tiny_model(**kw):
    from pretrain.model import build_model

    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, **kw)
    return build_model(cfg, VOCAB, seed=0)


def trained_lora(cfg: LoraConfig | None = None, **model_kw):
    """A LoRA model whose B is no longer zero (as after some training), so merging has something to add."""
    return with_random_b(apply_lora(cfg or LoraConfig(), tiny_model(**model_kw)), seed=1, scale=0.05)


def adapter_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def run_config(optimizer: str):
    train = SimpleNamespace(optimizer=optimizer, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    return SimpleNamespace(train=train)


def test_a_run_without_lora_does_not_import_peft():
    # peft costs every rank seconds of start-up (it imports much of transformers); apply_lora imports it
    code = "import sys, pretrain.train; assert 'peft' not in sys.modules, 'peft imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_migu_from_phase_1_may_not_mask_fresh_b_matrices():
    """A fresh lora_B is zero: MIGU's first masks would tie, and its untouched rows never leave zero. The
    check reads the model's own names: it was made on a made-up q_proj name before the model existed,
    so excluding q_proj's B let k_proj's and the others' through, and a run targeting v_proj alone that
    excluded v_proj's B was refused."""
    from pretrain.methods.lora import check_migu_on_adapters

    everywhere = apply_lora(LoraConfig(), tiny_model())
    for exclude in ([], [r"q_proj\.lora_B"]):
        with pytest.raises(ConfigError, match=r"start_phase` 1 with `lora`: MIGU would mask \d+ adapter B"):
            check_migu_on_adapters(everywhere, MethodConfig(name="migu", start_phase=1, exclude=exclude))
    for method in (
        MethodConfig(name="migu", start_phase=1, exclude=["lora_B"]),
        MethodConfig(name="migu", start_phase=2),
        MethodConfig(name="random", start_phase=1),
    ):
        check_migu_on_adapters(everywhere, method)
    v_only = apply_lora(LoraConfig(target_modules=["v_proj"]), tiny_model())
    check_migu_on_adapters(v_only, MethodConfig(name="migu", start_phase=1, exclude=[r"v_proj\.lora_B"]))


def test_without_a_lora_section_the_model_is_untouched():
    model = tiny_model()
    assert apply_lora(None, model) is model


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_only_the_adapters_train_and_the_optimizer_holds_only_them(optimizer):
    model = apply_lora(LoraConfig(r=4), tiny_model())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(model)
    assert len(trainable) == 2 * len(LLAMA_PROJECTIONS) * 2  # A and B, 7 projections, 2 blocks
    opt = build_optimizer(model, run_config(optimizer))
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert all(group["params"] for group in opt.param_groups)  # no empty group (ZeRO would drop it)


def test_a_fresh_adapter_is_the_base_model_exactly():
    """B starts at zero: the initial LoRA model computes the base model's logits bitwise (row 0 of the
    evaluation matrix is the same with and without LoRA)."""
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    base = tiny_model().eval()
    lora = apply_lora(LoraConfig(), tiny_model()).eval()
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, lora(input_ids=x).logits)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj", "attn_out"], "'attn_out' matches no module"),
        (["embed_tokens"], "'embed_tokens' is not a linear layer"),
    ],
)
def test_bad_target_modules_are_a_config_error_naming_the_key(targets, expected):
    with pytest.raises(ConfigError) as err:
        apply_lora(LoraConfig(target_modules=targets), tiny_model())
    assert "key `lora.target_modules`" in str(err.value) and expected in str(err.value)
    assert "'down_proj'" in str(err.value)  # the message lists the model's linear layers


def test_migu_selects_the_adapters_and_skips_the_frozen_base_layers():
    """Under the default include (`\\.layers\\.\\d+\\.`) MIGU hooks lora_A (output x A^T) and lora_B
    (output x A^T B^T) of every projection, and no base_layer: it has no gradient to mask."""
    model = apply_lora(LoraConfig(), tiny_model())
    selected = [name for name, _ in select_layers(model, MethodConfig().include, [])]
    assert {f"{n}.weight" for n in selected} == adapter_names(model)
    assert not any("base_layer" in n for n in selected)


def test_merge_equals_peft_merge_and_unload_and_leaves_the_model_as_it_was():
    model = trained_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model, model.state_dict())
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys() == tiny_model().state_dict().keys()
    for key, value in merged.items():
        assert torch.equal(value, reference[key]), key  # fp32: the same operations as peft's merge
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert adapter_names(model)  # still a LoRA model: nothing was merged into it or unloaded


def test_export_is_the_merged_model_in_transformers_format(tmp_path):
    """export_phase at ZeRO 0-2 (the weights whole on rank 0): plain keys, readable by from_pretrained,
    the peft model's logits; the ZeRO-3 gather is covered by tests/distributed/test_resume.py."""
    model = trained_lora(LoraConfig(r=4, alpha=8))
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    tokenizer = SimpleNamespace(save_pretrained=lambda path: None)
    export_phase(engine, tokenizer, tmp_path / "phase-1", is_main=True)
    assert "peft" not in (tmp_path / "phase-1" / "config.json").read_text()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "phase-1", local_files_only=True)
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    assert_export_is_merged(model, exported, x)
    # and the adapters as trained, unrounded by a merge: peft's own loading of them onto the base
    # reproduces the trained model's weights and, by the same operations, its logits bit for bit
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "phase-1" / "adapter")
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    """model.gradient_checkpointing (non-reentrant) works with LoRA: no combination to refuse."""
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model = trained_lora(gradient_checkpointing=checkpointing)
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() == adapter_names(model)
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0 and torch.equal(grad, grads[1][name]), name
