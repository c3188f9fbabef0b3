"""The optimizer the run config asks for: its kind, its hyperparameters, and the same AdamW update.

cpu_adam and fused_adam are DeepSpeed's compiled kernels (`make install` builds them once); on these CPU
ranks both run, so each is checked against torch's AdamW on the same gradient.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_run_config

from pretrain.config import ConfigError, validate
from pretrain.engine import build_optimizer, check_with_deepspeed, deepspeed_config
from pretrain.model import build_model

ZERO2_OFFLOAD = str(REPO / "configs" / "deepspeed" / "zero2_offload.json")


def _config(tmp_path, optimizer: str):
    raw = tiny_run_config(tmp_path)
    raw["train"].update(optimizer=optimizer, lr=1e-2, betas=[0.8, 0.9], weight_decay=0.1)
    if optimizer == "cpu_adam":  # needs ZeRO-Offload (the config refuses it without)
        raw["deepspeed"] = {"config": ZERO2_OFFLOAD}
    return validate(raw)


def _stepped(tmp_path, optimizer: str) -> dict[str, torch.Tensor]:
    cfg = _config(tmp_path, optimizer)
    model = build_model(cfg.model, 64, seed=0)
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name, kind",
    [("adamw", "AdamW"), ("cpu_adam", "DeepSpeedCPUAdam"), ("fused_adam", "FusedAdam"), ("sgd", "SGD")],
)
def test_each_optimizer_has_the_run_hyperparameters(tmp_path, name, kind):
    cfg = _config(tmp_path, name)
    opt = build_optimizer(build_model(cfg.model, 64, seed=0), cfg)
    assert type(opt).__name__ == kind
    decays = [g["weight_decay"] for g in opt.param_groups]
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    if name == "sgd":
        assert decays == [0.1]
        return
    assert decays == [0.1, 0.0]  # matrices decay; norms (1-D) do not
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in opt.param_groups)


@pytest.mark.parametrize("name", ["cpu_adam", "fused_adam"])
def test_deepspeed_adam_kernels_make_the_adamw_update(tmp_path, name):
    """Three steps with weight decay 0.1 and lr 1e-2 from the same gradients: equal to torch's AdamW up to
    fp32 rounding (the kernels order the same operations differently; a weight moves ~lr a step, so 1e-6
    is ~1e-4 of a step). Adam with L2 decay instead of decoupled decay would differ by ~lr * wd * |w|."""
    reference, got = _stepped(tmp_path, "adamw"), _stepped(tmp_path, name)
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


SHIPPED = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_deepspeed_takes_every_shipped_json_as_the_run_completes_it(tmp_path, path):
    raw = tiny_run_config(tmp_path)
    raw["deepspeed"] = {"config": str(path)}
    if "offload" in path.name:
        raw["train"]["optimizer"] = "cpu_adam"
    cfg = validate(raw)
    check_with_deepspeed(deepspeed_config(cfg, world_size=2), str(path))


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (
            {"zero_optimisation": {"stage": 3}},
            r"`zero_optimisation` is not a DeepSpeed.*`zero_optimization`\?",
        ),
        ({"bf_16": {"enabled": True}}, r"`bf_16` is not a DeepSpeed setting.*`bf16`\?"),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            r"refuses `zero_optimization.overlap_com`",
        ),
        ({"bf16": {"enable": True}}, r"refuses `bf16.enable`"),
        ({"wandb": {"enable": True}}, r"refuses `wandb.enable`"),
        ({"sparse_gradients": True}, r"DeepSpeed refuses it: .*sparse_gradients"),  # removed: its own words
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, r"DeepSpeed refuses it"),
        (
            {"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
            r"`zero_optimization.reduce_bucket_size`",
        ),
    ],
)
def test_a_misspelt_deepspeed_key_is_named_before_the_model_loads(tmp_path, ds, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    raw = tiny_run_config(tmp_path)
    raw["deepspeed"] = {"config": str(path)}
    with pytest.raises(ConfigError, match=rf"key `deepspeed.config`: {path}: .*{expected}"):
        check_with_deepspeed(deepspeed_config(validate(raw), world_size=2), str(path))
