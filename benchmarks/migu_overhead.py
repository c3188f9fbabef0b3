"""Step time of MIGU against `none` on the same engine, model and data, at ZeRO-2 and ZeRO-3 (not a test).

Run with 2 CPU ranks (writes benchmarks/migu_overhead.md):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/migu_overhead.py
or on one GPU in bf16, with the models of stack_cost.py (`--out` names the table):
    deepspeed --num_gpus 1 benchmarks/migu_overhead.py --gpu --bf16 --model 1b --out gpu_migu_overhead.md

Model (default): Llama, hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 2048, seq 256, micro-batch 4
per rank, grad accumulation 1, AdamW, fp32. Per stage, one engine; rounds alternate `none` and `migu` blocks
of steps (the order flips every round) so drift of the machine hits both alike. A `none` block has no hook
installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if "--gpu" not in sys.argv:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "medium": dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=2048, seq=256, micro_batch=4),
    # the model and batch of configs/demo.yaml
    "demo": dict(hidden=128, intermediate=384, layers=4, heads=4, vocab=2048, seq=128, micro_batch=8),
}


def _stack_cost_model(name: str) -> dict:
    """stack_cost.py's model `name` (its GPU models), with the 8,192-token vocabulary it trains them with."""
    from stack_cost import MODELS as STACK_COST_MODELS

    model, train = STACK_COST_MODELS[name]
    return dict(
        hidden=model["hidden_size"],
        intermediate=model["intermediate_size"],
        layers=model["num_layers"],
        heads=model["num_heads"],
        kv_heads=model["num_kv_heads"],
        vocab=8192,
        seq=train["seq_len"],
        micro_batch=train["micro_batch_size"],
    )


MODELS |= {name: _stack_cost_model(name) for name in ("135m", "1b")}
MODEL = dict(MODELS["medium"])


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=MODEL["vocab"],
        hidden_size=MODEL["hidden"],
        intermediate_size=MODEL["intermediate"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL.get("kv_heads", MODEL["heads"]),
        max_position_embeddings=MODEL["seq"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


HOOK_SECONDS = [0.0]  # time spent inside MIGU's forward hooks, summed


def time_the_hooks() -> None:
    """Wrap MIGU's forward hooks with a clock, to report MIGU's own work apart from the machine's noise."""
    import pretrain.methods.migu as migu

    original = migu._magnitude_hook

    def timed(method, slot):
        hook = original(method, slot)

        def wrapped(*args):
            start = time.perf_counter()
            hook(*args)
            HOOK_SECONDS[0] += time.perf_counter() - start

        return wrapped

    migu._magnitude_hook = timed


def timed_steps(engine, method, batches, steps: int) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Wall time per step, and the parts spent in the method: (hooks, before_backward, after_backward).

    On a GPU the parts are host time (the kernels they queue run later, inside the step's wall time)."""
    from deepspeed.accelerator import get_accelerator

    times, own = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        HOOK_SECONDS[0] = 0.0
        start = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        t0 = time.perf_counter()
        method.before_backward(engine)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        method.after_backward(engine)
        t3 = time.perf_counter()
        engine.step()
        get_accelerator().synchronize()  # a GPU step ends when its kernels do, not when they are queued
        times.append(time.perf_counter() - start)
        own.append((HOOK_SECONDS[0], t1 - t0, t3 - t2))
    return times, own


def bench_stage(stage: int, args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """Per method, the step times of each round's block; `migu_own`: MIGU's own seconds per step."""
    import deepspeed
    import torch.distributed as dist

    from pretrain import deepspeed_fixes
    from pretrain.config import MethodConfig
    from pretrain.methods import build_method

    deepspeed_fixes.apply()  # as pretrain.engine builds a run's engines
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {
        "train_micro_batch_size_per_gpu": MODEL["micro_batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": args.bf16},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    methods = {
        "none": build_method(MethodConfig(name="none"), engine.module, engine),
        "migu": build_method(MethodConfig(name="migu", start_phase=1), engine.module, engine),
    }
    g = torch.Generator().manual_seed(dist.get_rank())
    shape = (MODEL["micro_batch"], MODEL["seq"])
    device = engine.device
    batches = [torch.randint(0, MODEL["vocab"], shape, generator=g).to(device) for _ in range(4)]
    times: dict[str, list[list[float]]] = {"none": [], "migu": [], "migu_own": []}

    def run(name: str, steps: int, keep: bool) -> None:
        if name == "migu":
            methods["migu"].begin_phase(1)  # installs the hooks
        result, own = timed_steps(engine, methods[name], batches, steps)
        if name == "migu":
            methods["migu"].remove_hooks()  # `none` blocks run with no hook at all
        if keep:
            times[name].append(result)
            if name == "migu":
                times["migu_own"].append(own)

    for name in ("none", "migu"):
        run(name, args.warmup, keep=False)
    for r in range(args.rounds):
        for name in ("none", "migu") if r % 2 == 0 else ("migu", "none"):
            run(name, args.block, keep=True)
    engine.destroy()
    return times


def device_name() -> str:
    return f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""


def report(results: dict[int, dict[str, list[list[float]]]], args: argparse.Namespace) -> str:
    import torch.distributed as dist

    ranks = dist.get_world_size()
    where = f"{ranks} GPU rank{'s' * (ranks > 1)}" if args.gpu else f"CPU, {ranks} ranks"
    launch = ("" if args.gpu else "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 ") + f"deepspeed --num_gpus {ranks}"
    options = f" --model {args.model} --warmup {args.warmup} --rounds {args.rounds} --block {args.block}"
    options += f" --stages {args.stages}" + " --gpu" * args.gpu + " --bf16" * args.bf16
    lines = [
        f"# MIGU step-time overhead ({where})",
        "",
        "Command:",
        "",
        "```",
        f"{launch} benchmarks/migu_overhead.py{options}" + (f" --out {args.out.name}" if args.gpu else ""),
        "```",
        "",
        f"Model: Llama {MODEL}; AdamW, {'bf16' if args.bf16 else 'fp32'}, grad accumulation 1,",
        "gradient clipping 1.0; MIGU T=0.7 on all linear layers of the blocks. Each stage: one engine,",
        f"{args.warmup} warm-up steps per method, then {args.rounds} rounds of {args.block} steps per",
        "method, alternating order. Times are rank 0's wall time per optimizer step (forward, backward, step"
        + (", then a wait for the GPU)." if args.gpu else ")."),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}{device_name()};",
        f"load average {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other jobs share the",
        "cores: ratios within a few percent of 1 are noise; the per-round ratio pairs blocks run back to",
        "back). MIGU's own time (its forward hooks, before_backward with the all_reduce and top-k,",
        "after_backward with the masking) is clocked inside each step (medians); before_backward includes",
        "waiting in the all_reduce for the slower rank, which `none` spends in backward's reduction instead.",
        "",
        "| ZeRO | none median (s) | migu median (s) | ratio of medians | ratio of means "
        "| median of per-round ratios | MIGU's own s/step: hooks, before_backward, after_backward "
        "| 1 + own / none median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, t in results.items():
        own = [x for block in t.pop("migu_own") for x in block]
        parts = [statistics.median(p) for p in zip(*own, strict=True)]
        flat = {k: [x for block in v for x in block] for k, v in t.items()}
        med = {k: statistics.median(v) for k, v in flat.items()}
        mean = {k: statistics.fmean(v) for k, v in flat.items()}
        rounds = statistics.median(
            statistics.fmean(m) / statistics.fmean(n) for m, n in zip(t["migu"], t["none"], strict=True)
        )
        lines.append(
            f"| {stage} | {med['none']:.4f} | {med['migu']:.4f} | {med['migu'] / med['none']:.3f} "
            f"| {mean['migu'] / mean['none']:.3f} | {rounds:.3f} "
            f"| {parts[0]:.4f}, {parts[1]:.4f}, {parts[2]:.4f} "
            f"| {1 + sum(parts) / med['none']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("migu_overhead.md"))
    parser.add_argument("--model", choices=sorted(MODELS), default="medium")
    parser.add_argument("--gpu", action="store_true", help="GPU ranks (else CPU ranks, DS_ACCELERATOR=cpu)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    MODEL.update(MODELS[args.model])
    import deepspeed
    import torch.distributed as dist

    args.load_before = os.getloadavg()[0]
    time_the_hooks()
    deepspeed.init_distributed(auto_mpi_discovery=False)
    stages = [int(s) for s in args.stages.split(",")]
    results = {s: bench_stage(s, args) for s in stages}
    if dist.get_rank() == 0:
        text = report(results, args)
        args.out.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
