"""Model sources: a scratch Llama, a local transformers directory, and a real GGUF checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smollm2_gguf, tiny_llama

from pretrain.config import ModelConfig
from pretrain.model import ModelError, build_model, past_context


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, **kw)


def test_scratch_model_is_seeded_and_sized():
    a, b = build_model(_tiny(), 300, seed=7), build_model(_tiny(), 300, seed=7)
    assert a.config.num_hidden_layers == 2 and a.get_input_embeddings().num_embeddings == 300
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, build_model(_tiny(), 300, seed=8).lm_head.weight)


def test_local_directory_round_trip_and_vocabulary_check(tmp_path):
    model = build_model(_tiny(), 300, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(ModelConfig(source="hf", path=str(tmp_path / "ckpt")), 300, seed=1)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.training  # from_pretrained gives eval mode; a model built to train must not stay there
    with pytest.raises(ModelError, match="300 embedding rows but the tokenizer has 400 tokens"):
        build_model(ModelConfig(source="hf", path=str(tmp_path / "ckpt")), 400, seed=0)


def test_a_directory_without_weights_or_config_is_a_model_error_naming_it(tmp_path):
    # a checkpoint or export copied short was a transformers traceback (OSError, ValueError)
    ckpt = tmp_path / "ckpt"
    build_model(_tiny(), 300, seed=0).save_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"model {ckpt}: cannot be loaded"):
        build_model(ModelConfig(source="hf", path=str(ckpt)), 300, seed=0)
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelError, match=f"model {ckpt}: cannot be loaded"):
        build_model(ModelConfig(source="hf", path=str(ckpt)), 300, seed=0)


def test_real_gguf_checkpoint_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = build_model(ModelConfig(source="gguf", path=str(gguf)), len(tok), seed=0)
    ids = tok(
        "The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # a pretrained model knows English: far below the uniform loss ln(vocab) of an untrained one
    assert loss < 0.5 * math.log(len(tok))
    # the de-quantized weights export as a plain transformers model (what export/phase-N holds)
    model.save_pretrained(tmp_path / "export")
    again = build_model(ModelConfig(source="hf", path=str(tmp_path / "export")), len(tok), seed=0)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_a_seq_len_past_a_loaded_models_context_is_named():
    model = tiny_llama()
    limit = model.config.max_position_embeddings
    assert past_context(model, limit) is None
    assert f"train.seq_len {limit + 1} is longer than the model's max_position_embeddings {limit}" in (
        past_context(model, limit + 1) or ""
    )
