"""Step time of MIGU against `none` on the same engine, model and data, at ZeRO-2 and ZeRO-3 (not a test).

Run with 2 CPU ranks (writes benchmarks/migu_overhead.md):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/migu_overhead.py

Model: Llama, hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 2048, seq 256, micro-batch 4 per rank,
grad accumulation 1, AdamW, fp32. Per stage, one engine; rounds alternate `none` and `migu` blocks of steps
(the order flips every round) so drift of the machine hits both alike. A `none` block has no hook installed.
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

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "medium": dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=2048, seq=256, micro_batch=4),
    # the model and batch of configs/demo.yaml
    "demo": dict(hidden=128, intermediate=384, layers=4, heads=4, vocab=2048, seq=128, micro_batch=8),
}
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
    """Wall time per step, and the parts spent in the method: (hooks, before_backward, after_backward)."""
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
        times.append(time.perf_counter() - start)
        own.append((HOOK_SECONDS[0], t1 - t0, t3 - t2))
    return times, own


def bench_stage(stage: int, warmup: int, rounds: int, block: int) -> dict[str, list[list[float]]]:
    """Per method, the step times of each round's block; `migu_own`: MIGU's own seconds per step."""
    import deepspeed
    import torch.distributed as dist

    from pretrain.config import MethodConfig
    from pretrain.methods import build_method

    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {
        "train_micro_batch_size_per_gpu": MODEL["micro_batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    methods = {
        "none": build_method(MethodConfig(name="none"), engine.module, engine),
        "migu": build_method(MethodConfig(name="migu", start_phase=1), engine.module, engine),
    }
    g = torch.Generator().manual_seed(dist.get_rank())
    shape = (MODEL["micro_batch"], MODEL["seq"])
    batches = [torch.randint(0, MODEL["vocab"], shape, generator=g) for _ in range(4)]
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
        run(name, warmup, keep=False)
    for r in range(rounds):
        for name in ("none", "migu") if r % 2 == 0 else ("migu", "none"):
            run(name, block, keep=True)
    engine.destroy()
    return times


def report(results: dict[int, dict[str, list[list[float]]]], args: argparse.Namespace) -> str:
    lines = [
        "# MIGU step-time overhead (CPU, 2 ranks)",
        "",
        "Command:",
        "",
        "```",
        "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/migu_overhead.py"
        + (f" --model {args.model} --warmup {args.warmup} --rounds {args.rounds} --block {args.block}"),
        "```",
        "",
        f"Model: Llama {MODEL}; AdamW, fp32, grad accumulation 1, gradient clipping 1.0; MIGU T=0.7 on all",
        f"linear layers of the blocks. Each stage: one engine, {args.warmup} warm-up steps per method, then",
        f"{args.rounds} rounds of {args.block} steps per method, alternating order. Times are rank 0's wall",
        "time per optimizer step (forward, backward, step).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other jobs share the cores: ratios",
        "within a few percent of 1 are noise; the per-round ratio pairs blocks run back to back). MIGU's own",
        "time (its forward hooks, before_backward with the all_reduce and top-k, after_backward with the",
        "masking) is clocked inside each step (medians); before_backward includes waiting in the all_reduce",
        "for the slower rank, which `none` spends in backward's reduction instead.",
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
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    MODEL.update(MODELS[args.model])
    import deepspeed
    import torch.distributed as dist

    args.load_before = os.getloadavg()[0]
    time_the_hooks()
    deepspeed.init_distributed(auto_mpi_discovery=False)
    stages = [int(s) for s in args.stages.split(",")]
    results = {s: bench_stage(s, args.warmup, args.rounds, args.block) for s in stages}
    if dist.get_rank() == 0:
        text = report(results, args)
        args.out.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
