"""DeepSpeed set-up: merge the run config into the DeepSpeed JSON and build the engine.

The run config owns batch size, accumulation and clipping; the DeepSpeed JSON owns ZeRO and precision.
A DeepSpeed file that sets one of the run's keys to a different value is an error, not a silent override.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import torch

from pretrain import deepspeed_fixes
from pretrain.config import RUN_OWNED_DEEPSPEED_KEYS, ConfigError, RunConfig, TrainConfig, run_owned_conflicts
from pretrain.schedule import phase_schedule


def deepspeed_config(
    cfg: RunConfig, world_size: int, written: TrainConfig | None = None, check_global_batch: bool = True
) -> dict[str, Any]:
    """The DeepSpeed JSON with the run's batch keys; ConfigError if it contradicts the run config.

    `written`: the train section as the user wrote it, which the JSON's repeated keys are checked
    against when the run trains with another grad_accum (an elastic resume scales it).
    `check_global_batch`: False where this many ranks need not make the JSON's `train_batch_size` (an
    evaluation; a resume on other ranks, which keeps the checkpoint's global batch).
    """
    with open(cfg.deepspeed.config) as f:
        ds = json.load(f)
    t = cfg.train
    problems = run_owned_conflicts(ds, written or t, cfg.deepspeed.config)
    global_batch = t.global_batch(world_size)
    if check_global_batch and ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        problems.append(
            f"{cfg.deepspeed.config}: `train_batch_size` is {ds['train_batch_size']} but "
            f"train.micro_batch_size x train.grad_accum x {world_size} ranks = {global_batch}; "
            "leave it out (it is derived)"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    for key, field in RUN_OWNED_DEEPSPEED_KEYS.items():
        ds[key] = getattr(t, field)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two keys above and the world size
    ds.setdefault("zero_allow_untested_optimizer", True)  # adamw and sgd are plain torch optimizers
    return ds


# DeepSpeed's sections, for telling a misspelt one: its own constants (below) lack some of them.
_DEEPSPEED_SECTIONS = (
    "zero_optimization", "bf16", "fp16", "torch_autocast", "data_types", "activation_checkpointing", "aio",
    "checkpoint", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger", "autotuning",
    "data_efficiency", "pipeline",
)  # fmt: skip
# DeepSpeed's names for its sections' pydantic models, in its errors ("" where the location names it)
_DEEPSPEED_MODELS = {
    "DeepSpeedZeroConfig": "zero_optimization.",
    "DeepSpeedBF16Config": "bf16.",
    "DeepSpeedFP16Config": "fp16.",
    "DeepSpeedMonitorConfig": "",
}


def check_with_deepspeed(ds: dict[str, Any], path: str) -> None:
    """ConfigError, naming the file and the key, where DeepSpeed would refuse the JSON or ignore a key of it:
    a misspelt key in a section (`overlap_com`) failed inside deepspeed.initialize after the model loaded,
    a misspelt section (`zero_optimisation`) was ignored, and the run trained at ZeRO stage 0."""
    from deepspeed.runtime import config as ds_config
    from pydantic import ValidationError

    where = f"key `deepspeed.config`: {path}:"
    _refuse_near_misses(ds, where, ds_config)
    try:
        ds_config.DeepSpeedConfig(ds)
    except ValidationError as err:
        section = _DEEPSPEED_MODELS.get(err.title, f"{err.title}.")
        wrong = "; ".join(
            f"`{section}{'.'.join(map(str, e['loc']))}`: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ConfigError(f"{where} DeepSpeed refuses {wrong}") from err
    except (ds_config.DeepSpeedConfigError, AssertionError, ValueError, TypeError) as err:
        raise ConfigError(f"{where} DeepSpeed refuses it: {err}") from err


def _refuse_near_misses(ds: dict[str, Any], where: str, ds_config: Any) -> None:
    """A top-level key DeepSpeed does not know but one it knows nearly spells (DeepSpeed ignores it)."""
    known = set(_DEEPSPEED_SECTIONS) | {
        v for k, v in vars(ds_config).items() if k.isupper() and isinstance(v, str)
    }
    known |= set(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", ()))  # DeepSpeed names those itself
    for key in ds:
        close = [] if key in known else difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"{where} `{key}` is not a DeepSpeed setting (DeepSpeed would ignore it): did you mean "
                f"`{close[0]}`?"
            )


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype DeepSpeed trains the weights in: bf16 or fp16 when its JSON enables them, else fp32."""
    with open(cfg.deepspeed.config) as f:
        ds = json.load(f)
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds.get(key) or {}).get("enabled"):
            return dtype
    return torch.float32


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer over the parameters that train (with LoRA the adapters only: no state for the rest).

    The three Adam variants make the same AdamW update (decoupled weight decay); cpu_adam and fused_adam
    are DeepSpeed's kernels for an offloaded and a GPU optimizer step.
    """
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    # decay matrices only: norms and biases are conventionally left out
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # no empty group (LoRA has no 1-D parameter): ZeRO drops it, and the scheduler's per-group lrs would
    # no longer line up with the optimizer's groups
    groups = [g for g in groups if g["params"]]
    betas = tuple(t.betas)
    if t.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, adamw_mode=True)
    if t.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=t.lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=betas)


def build_engine(
    cfg: RunConfig,
    model: torch.nn.Module,
    phase_steps: list[int],
    world_size: int,
    load_universal: bool = False,
    written: TrainConfig | None = None,
):
    """The DeepSpeed engine with the run's optimizer and per-phase re-warming schedule.

    `load_universal`: its checkpoint will be loaded from DeepSpeed's universal format (pretrain/elastic.py).
    `written`: the train section as the user wrote it (see `deepspeed_config`).
    """
    import deepspeed

    deepspeed_fixes.apply()
    optimizer = build_optimizer(model, cfg)
    t = cfg.train
    shape = dict(kind=t.schedule, decay_fraction=t.decay_fraction, constant_ratio=t.constant_ratio)
    scheduler = phase_schedule(optimizer, phase_steps, t.warmup_steps, t.min_lr_ratio, **shape)
    ds = deepspeed_config(cfg, world_size, written)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )
    return engine


def build_eval_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int):
    """An engine for evaluation only: no optimizer state is allocated (ZeRO-3 still shards the weights)."""
    import deepspeed

    deepspeed_fixes.apply()
    engine, _, _, _ = deepspeed.initialize(model=model, config=eval_deepspeed_config(cfg, world_size))
    return engine


def eval_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config for an optimizer-free engine.

    ZeRO-1/2 partition optimizer state and gradients, which evaluation has none of (DeepSpeed asserts an
    optimizer at those stages); their weights are whole on every rank, as at stage 0, which evaluates
    the same. Stage 3 stays: it shards the weights themselves.
    """
    ds = deepspeed_config(cfg, world_size, check_global_batch=False)  # evaluation takes no optimizer step
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) in (1, 2):
        ds["zero_optimization"] = {"stage": 0}
    return ds
