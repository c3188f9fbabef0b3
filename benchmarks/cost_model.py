"""What MIGU, replay and EWC cost on a cluster, on paper: bytes sent, memory per rank, compute, data read.

Run (writes benchmarks/cost_model.md in seconds; no GPU, no training):
    python benchmarks/cost_model.py

The sizes come from the code, not from a formula: each Llama is built on PyTorch's meta device (shapes,
no memory) and pretrain's own MIGU selects its layers and sizes its magnitude buffer. The per-step
volumes are DeepSpeed ZeRO's (bf16 weights and gradients, fp32 master and Adam moments):
  ZeRO-2 gradients: reduce-scatter of 2P bytes; ZeRO-3 adds two all-gathers of 2P (forward, backward).
  A ring collective of B bytes moves 2B(N-1)/N per rank (all-reduce) or B(N-1)/N (reduce-scatter,
  all-gather).
  MIGU: one all-reduce of its fp32 buffer (sum of d_out over the masked layers) per optimizer step.
Memory per rank: ZeRO-2 2P (weights) + 2P/N (gradient partition) + 12P/N (fp32 master, m, v); ZeRO-3
16P/N. MIGU keeps three fp32 buffers of the masked units (magnitudes, masks, kept counts); EWC keeps fp32
anchors and Fisher of the rank's partition (8P/N) plus the Fisher sum during the last `fisher_steps`
(4P/N); L2 the anchors (4P/N).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.config import MethodConfig
from pretrain.methods.migu import Migu

OUT = Path(__file__).with_name("cost_model.md")
GPUS = (8, 64, 512)
GLOBAL_BATCH_TOKENS = 4 * 1024 * 1024  # a common pre-training step: 1024 sequences of 4096 tokens

# the public configs of these models' families (Llama 3 and SmolLM2)
MODELS = {
    "SmolLM2-135M": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "Llama-3-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "Llama-3-70B": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip
# tokens/s of one core through TrainStream, slowest and fastest (tokenizer, domain) pair measured by
# benchmarks/tokenize_rate.py (benchmarks/tokenize_rate.md)
TOKENIZE_RATES = (208_123, 606_577)
# the same, the stream reading the files pre-tokenized (train.token_cache), same file
CACHED_RATES = (22_696_718, 59_624_706)
# for the reader table only, assumed: an H100's dense bf16 peak and a typical model flops utilisation
GPU_FLOPS, MFU = 989e12, 0.4
# the demo's model (configs/demo.yaml), whose step-time costs were measured (benchmarks/method_cost.md)
DEMO = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=False,
)  # fmt: skip


def sizes(spec: dict) -> tuple[int, int, int]:
    """(parameters, masked output units, parameters of the masked layers) of the model as the code sees it."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**spec))
    params = sum(p.numel() for p in model.parameters())
    migu = Migu(MethodConfig(name="migu"), model)
    masked = sum(m.weight.numel() for _, m in migu.layers)
    return params, migu.size, masked


def gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB" if x >= 1e8 else f"{x / 1e6:.3g} MB"


def rows(name: str, spec: dict) -> list[str]:
    p, units, masked = sizes(spec)
    out = []
    for stage in (2, 3):
        for n in GPUS:
            ring = (n - 1) / n
            grads = 2 * p * ring * (3 if stage == 3 else 1)  # ZeRO-3: + all-gathers in forward and backward
            migu_bytes = 2 * 4 * units * ring
            states = (2 * p + 14 * p / n) if stage == 2 else 16 * p / n
            ewc = 8 * p / n
            out.append(
                f"| {name} | {p / 1e9:.3g}B | {stage} | {n} | {gb(grads)} | {migu_bytes / 1e6:.3g} MB "
                f"({migu_bytes / grads:.1e}) | {gb(states)} | {3 * 4 * units / 1e6:.3g} MB | "
                f"{gb(ewc)} (+{ewc / states:.0%}); +{gb(4 * p / n)} in the Fisher window | "
                f"{gb(4 * p / n)} |"
            )
    return out


def compute_rows() -> list[str]:
    out = []
    for name, spec in {**MODELS, "demo (configs/demo.yaml)": DEMO}.items():
        p, units, masked = sizes(spec)
        # per token: training ~6 flops per parameter; MIGU's hook: |h| and a sum, 2 flops per output unit
        flops = 2 * units / (6 * p)
        out.append(
            f"| {name} | {p / 1e6:,.1f}M | {units:,} | {masked / p:.0%} | {flops:.1e} | {3 * units:,} |"
        )
    return out


def data_rows() -> list[str]:
    return [f"| {n} | {GLOBAL_BATCH_TOKENS:,} | {GLOBAL_BATCH_TOKENS // n:,} | {n}x |" for n in GPUS]


def reader_rows() -> list[str]:
    """Per model and GPU count: the step's compute time at an assumed utilisation against the seconds one
    core needs to read the global step at the measured rates, tokenizing and pre-tokenized."""
    out = []
    for name, spec in MODELS.items():
        params = sizes(spec)[0]
        for n in GPUS:
            step = 6 * params * GLOBAL_BATCH_TOKENS / (n * GPU_FLOPS * MFU)
            cells = [f"{step:.2f}"]
            for rates in (TOKENIZE_RATES, CACHED_RATES):
                low, high = (GLOBAL_BATCH_TOKENS / r for r in (max(rates), min(rates)))
                bound = "yes" if low > step else "no" if high < step else "by the tokenizer"
                cells += [f"{low:.2f}-{high:.2f}", bound]
            out.append(f"| {name} | {n} | {' | '.join(cells)} |")
    return out


def report() -> str:
    lines = [
        "# Cost model: MIGU, EWC/L2 and replay on a cluster, on paper",
        "",
        "Written by `python benchmarks/cost_model.py` (seconds, no GPU); the method and assumptions are in",
        "its docstring. Sizes are read off the models built on PyTorch's meta device, with the layers and",
        "buffer that pretrain's MIGU selects (every linear layer in a transformer block). bf16 training,",
        f"AdamW; a global batch of {GLOBAL_BATCH_TOKENS:,} tokens per optimizer step.",
        "",
        "## Communication and memory per rank, per optimizer step",
        "",
        "| model | params | ZeRO | GPUs | ZeRO traffic / rank | MIGU all-reduce / rank (ratio) | "
        "model states / rank | MIGU buffers | EWC anchors + Fisher (vs states) | L2 anchors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in MODELS.items():
        lines += rows(name, spec)
    lines += [
        "",
        "MIGU's all-reduce is between 1.3e-4 (70B, ZeRO-3) and 4.6e-3 (135M, ZeRO-2) of ZeRO's own traffic,",
        "and its buffers are megabytes: it does not change how a job fits or scales. EWC is the method with",
        "a real memory cost: two fp32 copies of the rank's partition, +50% on ZeRO-3's model states at any",
        "GPU count (+75% during the Fisher window); at ZeRO-2 +27% at 8 GPUs, falling to +1% at 512, where",
        "the full bf16 weights on every rank dominate. L2 costs half of EWC. Both add one scalar all-reduce",
        "a step.",
        "",
        "## Compute: MIGU's hook against the training step",
        "",
        "| model | params | masked units (sum of d_out) | share of params in masked layers | "
        "hook flops / training flops | elements read by the hook per token |",
        "|---|---|---|---|---|---|",
        *compute_rows(),
        "",
        "In flops MIGU is free (under 4e-4 of the step for these models). What it costs is memory traffic:",
        "the hook reads every masked layer's output once more and writes an |h| copy before summing,",
        "elementwise work",
        "that a GPU runs at bandwidth, not at tensor-core speed. On the demo model on 2 CPU ranks that was",
        "measured at 1.02-1.06x the step time of `none` (benchmarks/method_cost.md,",
        "benchmarks/migu_overhead.md), where the flop model predicts 0.14%: on CPU the elementwise passes",
        "(and the hooks' Python calls) are what the step pays for.",
        "On one H200 (benchmarks/gpu_cost.md) 30-step windows gave 1.045 and 1.282 for the 1.0B model:",
        "the GPU overhead is not resolved by them; the flop ratio above is its floor.",
        "",
        "## Data read per rank",
        "",
        "Every rank reads and tokenizes its corpus from the start and keeps every N-th block (the global",
        "block order that makes elastic resume and replay exact), so each rank tokenizes the whole global",
        "batch, N times its own share:",
        "",
        "| GPUs | tokens tokenized per rank per step | tokens trained per rank per step | overhead |",
        "|---|---|---|---|",
        *data_rows(),
        "",
        "At 512 GPUs each rank must tokenize the full 4M tokens of every step while training on 8K.",
        f"One core tokenizes {min(TOKENIZE_RATES):,.0f}-{max(TOKENIZE_RATES):,.0f} tokens/s through the",
        "reader (benchmarks/tokenize_rate.md: the demo's and SmolLM2's tokenizers on the four demo domains),",
        "so a rank's read-ahead thread needs the seconds below for every step, whatever the GPU count,",
        "while the step's compute shrinks with the GPU count. Step compute here is 6 x params x tokens at",
        f"{MFU:.0%} of an H100's {GPU_FLOPS / 1e12:.0f} TFLOPS (assumed, not measured; attention ignored):",
        "",
        "| model | GPUs | step compute, s | one core tokenizing the step, s | reader-bound? | "
        "reading it pre-tokenized (`train.token_cache`), s | reader-bound? |",
        "|---|---|---|---|---|---|---|",
        *reader_rows(),
        "",
        'Wherever tokenizing takes longer than the step, the ranks wait for data ("by the tokenizer": the',
        "step falls inside the range the two tokenizers span). The reader hands the fast tokenizer up to",
        "256 texts a call, which Hugging Face tokenizers spread over the process's cores unless",
        "TOKENIZERS_PARALLELISM=false; the packing around the calls stays on one core. With both cores of",
        "the measuring machine the rate was 1.1-1.7x one core's (benchmarks/tokenize_rate_all_cores.md),",
        "so a rank's free cores shorten the seconds above by less than their count. With the training",
        "files pre-tokenized once (`python -m pretrain pretokenize`, `train.token_cache`) each rank still",
        "reads the whole global step, the factor N stays, but reads ids at "
        f"{min(CACHED_RATES):,.0f}-{max(CACHED_RATES):,.0f} tokens/s",
        "(the same benchmark): the last two columns.",
        "Replay reads its sources the same way, so it adds only its share to this.",
        "",
        "## Checked against the measured small cases",
        "",
        "- The EWC anchors of the 2-rank tests are each rank's partition: their sizes add up exactly to the",
        "  model's parameter count at ZeRO-1/2/3 (tests/distributed/test_migu_zero.py,",
        "  `test_anchors_are_each_ranks_own_partition`), as 4P/N per copy says.",
        "- MIGU's buffer is sized by the code above (`Migu.size`); its single all-reduce per step is the one",
        "  in `Migu.choose_masks`.",
        "- Step time: measured ratios are in benchmarks/method_cost.md (2 CPU ranks, demo model).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = report()
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
