"""One rank of a MIGU run under DeepSpeed (launched by test_migu_zero.py with the `deepspeed` launcher).

For one ZeRO stage it trains a tiny Llama several steps per case (optimizer, accumulation, precision,
LoRA adapters on it), each rank on its own micro-batches, and saves the masks of every step (per rank) and
the final fp32 weights (rank 0). The data and model helpers are shared with the single-process reference
in the test. A case with regularisation trains two phases: phase 1 unmasked (its end sets the anchors
and, for ewc, the Fisher), phase 2 masked with the pull; each rank also saves the size of its anchors.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: lora_checks, when launched alone

from conftest import tiny_llama  # noqa: E402  (after the path above; the same model as the unit tests)

STEPS, MICRO_BATCH, SEQ, VOCAB, WORLD, LR = 3, 2, 16, 100, 2, 0.05
REG_WEIGHT, FISHER_STEPS = 10.0, 2  # lr x weight = 0.5: a pull that shows within 3 steps, yet stable


class Case(NamedTuple):
    optimizer: str
    grad_accum: int
    bf16: bool
    clip: float
    fp32_grad_accum: bool = False  # bf16 with fp32 accumulation: DeepSpeed's BF16_Optimizer, ZeRO-1 only
    reg: str = "none"  # regularisation.kind
    lora: bool = False  # LoRA adapters (pretrain.methods.lora) on the tiny Llama: MIGU masks their rows
    # ZeRO-Offload (stage 2; stage 3 also the parameters) with overlap_comm and small buckets; adamw is
    # then DeepSpeedCPUAdam, as train.optimizer cpu_adam builds it
    offload: bool = False

    def runs_at(self, stage: int) -> bool:
        if self.offload:
            return stage in (2, 3)
        return stage == 1 or not self.fp32_grad_accum


CASES = {
    "sgd_accum1": Case("sgd", 1, False, 0.0),
    "sgd_accum2": Case("sgd", 2, False, 0.0),
    "adamw_accum2_clip": Case("adamw", 2, False, 0.05),
    "sgd_accum2_bf16": Case("sgd", 2, True, 0.0),
    "sgd_accum2_bf16_fp32acc": Case("sgd", 2, True, 0.0, fp32_grad_accum=True),
    "sgd_accum2_l2": Case("sgd", 2, False, 0.0, reg="l2"),
    "sgd_accum1_clip_ewc": Case("sgd", 1, False, 0.5, reg="ewc"),
    "lora_sgd_accum2": Case("sgd", 2, False, 0.0, lora=True),
    "sgd_accum2_clip_offload": Case("sgd", 2, False, 0.5, offload=True),
    "sgd_accum1_clip_ewc_offload": Case("sgd", 1, False, 0.5, reg="ewc", offload=True),
}
BUCKET = 2000  # elements: far below a layer, so reductions overlap the backward in many small pieces
# r = 16: a layer keeps 16 - floor(0.7 * 16) = 5 adapter rows a step, so 3 steps leave some never kept
LORA_R, LORA_ALPHA = 16, 16.0


def build_model(case: Case) -> torch.nn.Module:
    """The case's model: the tiny Llama, or LoRA adapters on it with B drawn at random.

    B starts at zero in a fresh adapter: then A has no gradient and B's outputs no magnitude to rank in the
    first step. Random values, as B has after a phase of training, make both rules act from step one.
    """
    model = tiny_llama()
    if not case.lora:
        return model
    from lora_checks import with_random_b

    from pretrain.config import LoraConfig
    from pretrain.methods.lora import apply_lora

    return with_random_b(apply_lora(LoraConfig(r=LORA_R, alpha=LORA_ALPHA), model), seed=3, scale=0.1)


def batches(grad_accum: int, steps: int = STEPS) -> torch.Tensor:
    """[step, micro, rank, batch, seq] token ids: every rank sees different data."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (steps, grad_accum, WORLD, MICRO_BATCH, SEQ), generator=g)


def optimizer_for(name: str, model: torch.nn.Module, offload: bool = False) -> torch.optim.Optimizer:
    """The case's optimizer; offloaded AdamW is DeepSpeedCPUAdam with the same hyperparameters."""
    params = [p for p in model.parameters() if p.requires_grad]  # as build_optimizer: LoRA's adapters only
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR)
    adamw = torch.optim.AdamW(params, lr=LR * 0.1, weight_decay=0.0)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        d = adamw.defaults
        return DeepSpeedCPUAdam(params, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=0.0)
    return adamw


def offload_config(stage: int, optimizer: str) -> dict:
    """ZeRO-Offload settings merged into the case's DeepSpeed config."""
    zero = {"offload_optimizer": {"device": "cpu"}, "overlap_comm": True, "reduce_bucket_size": BUCKET}
    zero["allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"] = BUCKET
    if stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    # torch SGD under offload: DeepSpeed insists on DeepSpeedCPUAdam unless told otherwise
    return {"zero": zero, "zero_force_ds_cpu_optimizer": optimizer == "adamw"}


def method_config():
    from pretrain.config import MethodConfig

    return MethodConfig(name="migu", threshold=0.7, start_phase=2)


def reg_config(kind: str):
    from pretrain.config import RegularisationConfig

    return RegularisationConfig(kind=kind, weight=REG_WEIGHT, fisher_steps=FISHER_STEPS)


def run_case(name: str, stage: int, out: Path) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain import deepspeed_fixes
    from pretrain.methods import build_methods

    deepspeed_fixes.apply()  # as pretrain.engine builds a run's engines
    case = CASES[name]
    opt_name, grad_accum, bf16, clip, fp32_grad_accum, reg = case[:6]
    rank = dist.get_rank()
    model = build_model(CASES[name])
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if fp32_grad_accum:
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    if grad_accum > 1:  # ZeRO-3: partition all params; accumulation 1 keeps small ones persistent (default)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if case.offload:
        offload = offload_config(stage, opt_name)
        ds_config["zero_optimization"].update(offload["zero"])
        ds_config["zero_force_ds_cpu_optimizer"] = offload["zero_force_ds_cpu_optimizer"]
    optimizer = optimizer_for(opt_name, model, case.offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    method = build_methods(method_config(), reg_config(reg), engine.module, engine, [STEPS, STEPS])
    rule = method.methods[-1] if reg != "none" else method
    phases = (1, 2) if reg != "none" else (2,)
    data, masks = batches(grad_accum, STEPS * len(phases)), []
    for phase in phases:
        method.begin_phase(phase)
        for step in range(STEPS * (phase - phases[0]), STEPS * (phase - phases[0] + 1)):
            for micro in range(grad_accum):
                batch = data[step, micro, rank]
                loss = engine(input_ids=batch, labels=batch).loss
                method.before_backward(engine)
                engine.backward(loss)
                method.after_backward(engine)
                engine.step()
            if phase == 2:
                masks.append(torch.cat([m.flatten() for m in rule.masks]))
        if phase == 1:
            method.end_phase(1)
    torch.save(torch.stack(masks), out / f"{name}.masks.rank{rank}.pt")
    if reg != "none":
        anchors = method.methods[0].anchors
        torch.save(sum(a.numel() for a in anchors.values()), out / f"{name}.anchors.rank{rank}.pt")
    # ZeRO-0 bf16 runs DeepSpeed's FP16_UnfusedOptimizer: its fp32 masters sit beside the bf16 params
    opt, masters = engine.optimizer, {}
    if isinstance(opt, FP16_UnfusedOptimizer):
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            masters.update({id(lp): hp for lp, hp in zip(lps, hps, strict=True)})
    weights = {}
    for pname, p in engine.module.named_parameters():
        if hasattr(p, "ds_id") and not p.requires_grad:  # ZeRO-3, frozen (LoRA's base): no optimizer copy
            with deepspeed.zero.GatheredParameters([p]):
                weights[pname] = p.detach().float().clone()
            continue
        full = safe_get_full_fp32_param(p)  # gathers ZeRO-1/2/3 partitions; None without a fragment mapping
        weights[pname] = (full if full is not None else masters.get(id(p), p)).detach().float().clone()
    summary = method.end_phase(2)  # on every rank: ewc's Fisher is a collective
    if rank == 0:
        torch.save({"weights": weights, "summary": summary}, out / f"{name}.pt")
    engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.distributed import init_distributed, shutdown_distributed

    init_distributed()
    for name in args.cases.split(","):
        if CASES[name].runs_at(args.stage):
            run_case(name, args.stage, args.out)
    shutdown_distributed()


if __name__ == "__main__":
    atexit.register(gc.freeze)  # a quick exit, as `python -m pretrain` (pretrain/__main__.py)
    main()
