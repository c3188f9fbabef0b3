"""The model: a Llama built from scratch, a local transformers checkpoint, or a local GGUF file.

Everything loads from local disk (`local_files_only`); nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pretrain.checkpoint import export_dir
from pretrain.config import ModelConfig, RunConfig


class ModelError(ValueError):
    """A model that cannot be used with this run (missing file, vocabulary mismatch)."""


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)  # identical initial weights on every rank, and across reruns
    if cfg.source == "scratch":
        model = LlamaForCausalLM(_scratch_config(cfg, vocab_size))
    else:
        model = _load_local(cfg)
    _check_vocabulary(model, vocab_size, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()  # from_pretrained returns eval mode: dropout off and MIGU's hooks would see nothing


def past_context(model: PreTrainedModel, seq_len: int) -> str | None:
    """Why `seq_len` goes past what a loaded model was trained on (None if it does not): positions it never
    saw train without any error. Not refused: context extension is continual pre-training too."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return None
    return (
        f"train.seq_len {seq_len} is longer than the model's max_position_embeddings {limit}: it trains on "
        "positions it never saw (to extend its context on purpose, give its config.json a rope_scaling)"
    )


def model_for_row(cfg: RunConfig, run_dir: str | Path, row: int) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) of a row of the evaluation matrix: row 0 the initial model, rebuilt from the
    config (a scratch model from its seed, a checkpoint from its path), row N the export of phase N."""
    tokenizer = row_tokenizer(cfg, run_dir, row)
    return row_model(cfg, run_dir, row, len(tokenizer)), tokenizer


def row_model(cfg: RunConfig, run_dir: str | Path, row: int, vocab_size: int) -> PreTrainedModel:
    if row == 0:
        return build_model(cfg.model, vocab_size, cfg.train.seed)
    hf = ModelConfig(source="hf", path=str(export_dir(run_dir, row)), gradient_checkpointing=False)
    return build_model(hf, vocab_size, cfg.train.seed)


def row_tokenizer(cfg: RunConfig, run_dir: str | Path, row: int):
    """The tokenizer of a row: the run's own for row 0 (never a newly trained one), the export's for row N."""
    from pretrain.tokenizer import load_tokenizer, resolve_tokenizer

    return resolve_tokenizer(cfg, train=False) if row == 0 else load_tokenizer(str(export_dir(run_dir, row)))


def _scratch_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )


def _load_local(cfg: ModelConfig) -> PreTrainedModel:
    try:
        return _from_pretrained(Path(cfg.path), cfg.source)
    except (OSError, ValueError) as err:  # no weights, no config.json, a model type transformers lacks
        raise ModelError(f"model {cfg.path}: cannot be loaded ({err})") from err


def _from_pretrained(path: Path, source: str) -> PreTrainedModel:
    kwargs = {"local_files_only": True, "dtype": torch.float32}
    if source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        # transformers de-quantizes GGUF weights to `dtype` on load but keeps the quantizer attached,
        # which makes save_pretrained refuse; the weights we train and export are plain tensors.
        model.hf_quantizer = None
        model.config.quantization_config = None
        return model
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def _check_vocabulary(model: PreTrainedModel, vocab_size: int, cfg: ModelConfig) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise ModelError(
            f"model {cfg.path or 'scratch'} has {rows} embedding rows but the tokenizer has {vocab_size} "
            "tokens: use the model's own tokenizer (tokenizer.source: model) or a matching one"
        )
