"""LoRA (Hu et al. 2021) through peft: one set of adapters trains through all phases, the base stays frozen.

Each targeted linear layer W becomes W x + (alpha / r) B A x with A: [r, d_in] (random) and B: [d_out, r]
(zero, so the initial model is the base model exactly). Only A and B require gradients, so the optimizer
(`pretrain.engine.build_optimizer`) holds only them, and MIGU's layer selection (`select_layers`) finds
the adapters' own nn.Linear modules, `lora_A.default` and `lora_B.default`, and skips the frozen
`base_layer`: A's rows are masked by |x A^T|, B's by |x A^T B^T|, as in the published MIGU code.

A LoRA run is not a method of its own (`method.name` still picks the gradient rule): it changes which
parameters train, and what a phase's export is: the merged model W + (alpha / r) B A in plain
transformers format (`export_state`), computed from a copy of the weights, so training goes on unchanged,
and beside it the adapters themselves in peft's format (`save_adapters`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain.config import MIGU_ON_FRESH_ADAPTERS, ConfigError, LoraConfig, MethodConfig
from pretrain.logs import log

if TYPE_CHECKING:
    from peft import PeftModel

# peft is imported only where a LoRA run needs it: importing it costs seconds a process (it pulls in
# much of transformers), paid by every rank of every launch, LoRA or not

_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's own names
# an export's adapters, in a directory of their own: transformers' from_pretrained on a directory holding
# adapter_config.json would load the adapters onto their base, and the export is the merged model
ADAPTER_DIR = "adapter"


def apply_lora(cfg: LoraConfig | None, model: nn.Module) -> nn.Module:
    """The model with LoRA adapters on `cfg.target_modules` (peft), or the model itself when cfg is None."""
    if cfg is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    _check_targets(model, cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    wrapped = get_peft_model(model, peft_cfg)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info(
        "LoRA r=%d alpha=%g: %d of %d parameters train (%.2f%%)",
        cfg.r,
        cfg.alpha,
        trainable,
        total,
        100 * trainable / total,
    )
    return wrapped


def check_migu_on_adapters(model: nn.Module, method: MethodConfig) -> None:
    """MIGU from phase 1 may not mask fresh B matrices: B starts at zero, so every lora_B output is 0, the
    tie keeps the lowest-numbered rows, and the rest never get a gradient to leave zero: the "top" rows
    stay those rows all run. Checked on the model's own layer names (peft's, after `apply_lora`)."""
    from pretrain.methods.masking import select_layers

    if method.name != "migu" or method.start_phase != 1:
        return
    tied = [name for name, _ in select_layers(model, method.include, method.exclude) if ".lora_B." in name]
    if tied:
        raise ConfigError(
            MIGU_ON_FRESH_ADAPTERS.format(what=f"{len(tied)} adapter B matrices (first: {tied[0]})")
        )


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target names at least one layer, and only linear ones: peft would skip a name that matches
    nothing, and would adapt an embedding with parameters this module's merge does not handle."""
    problems = []
    for target in targets:
        hits = [m for name, m in model.named_modules() if name == target or name.endswith(f".{target}")]
        if not hits:
            problems.append(f"{target!r} matches no module")
        elif not all(isinstance(m, nn.Linear) for m in hits):
            problems.append(f"{target!r} is not a linear layer (LoRA here adapts nn.Linear only)")
    if problems:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"key `lora.target_modules`: {'; '.join(problems)}; the model's linear layers: {linear}"
        )


def export_state(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model to save_pretrained, its state): for a LoRA model, the base and the merged weights."""
    if not _is_peft(model):
        return model, state
    return model.get_base_model(), merged_state_dict(model, state)


def save_adapters(model: nn.Module, state: dict[str, torch.Tensor], export: Path) -> None:
    """A LoRA model's adapters in `export`/adapter as peft saves them (`PeftModel.from_pretrained`), at the
    dtype they trained in: the merged export rounds W + sBA to W's dtype, which in bf16 loses much of a
    small delta, and the checkpoints that also hold them are pruned by rotation. Nothing for other models."""
    if not _is_peft(model):
        return
    # save_embedding_layers=False: "auto" may look the base model up on the Hub to compare vocabularies
    model.save_pretrained(str(export / ADAPTER_DIR), state_dict=state, save_embedding_layers=False)


def merged_state_dict(model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the PeftModel's keys, e.g. gathered from ZeRO-3 shards) with each adapter merged into its
    base weight as peft's `merge_and_unload` does, W + (B @ A) * scaling, under the plain model's keys.

    The sum is formed in fp32 and rounded once to W's dtype; `state` and the model are left as they are.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    merged = dict(state)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if not isinstance(layer, LoraLinear):
            raise TypeError(f"{name}: only linear LoRA layers can be merged here, not {type(layer).__name__}")
        weight = f"{name}.base_layer.weight"
        for adapter in layer.active_adapters:
            a = merged.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = merged.pop(f"{name}.lora_B.{adapter}.weight").float()
            delta = (b @ a) * layer.scaling[adapter]
            delta = delta.T if layer.fan_in_fan_out else delta
            merged[weight] = (merged[weight].float() + delta).to(state[weight].dtype)
    return {_plain_key(key): value for key, value in merged.items()}


def _is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: no PeftModel was made in this process
    return peft is not None and isinstance(model, peft.PeftModel)


def _plain_key(key: str) -> str:
    """`base_model.model.X.base_layer.weight` -> `X.weight`"""
    if "lora_" in key:
        raise KeyError(f"{key}: an adapter tensor left over after merging")
    return key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
