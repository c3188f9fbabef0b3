"""Wall time and peak memory of reading a corpus with one long record through TrainStream (not a test).

    .venv/bin/python benchmarks/long_record.py                        # records of 10 MB and 100 MB
    .venv/bin/python benchmarks/long_record.py --sizes 10 --code DIR  # the reader of another checkout

Per size N, a JSON Lines corpus: 40 ordinary records (`help()` topics, up to 62 KB), one record of N MB
(the standard library's source and help topics, alternating, repeated), the other 39 topics. A
sentencepiece BPE of 2048 tokens is trained once as pretrain.tokenizer trains the project's. Each size
is read in a fresh process, so peaks do not mix: a one-rank TrainStream (seq_len 1024, micro-batch 8)
from its start until its position has passed the long record. Reported: wall time of that read, peak
RSS (ru_maxrss), the RSS before it (interpreter, torch, datasets, tokenizer), tokens read and a SHA-256
of the batches (equal digests: the same blocks before and after a change); and,
in another process, the peak RSS of only reading the documents' text (no tokenizing): the floor that
`datasets` handing over each record as one string sets.
`--code DIR` imports `pretrain` from DIR (e.g. a worktree at an older commit) to compare before/after.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = 40  # ordinary records before the long one (of pydoc's 79 help topics), the rest after it
SEQ_LEN, MICRO_BATCH = 1024, 8


def long_text(chars: int) -> str:
    from pretrain.demo_corpora import code_documents, docs_documents

    unit = "".join(itertools.chain.from_iterable(zip(code_documents(), docs_documents(), strict=False)))
    return (unit * (chars // len(unit) + 1))[:chars]


def write_corpus(path: Path, megabytes: int) -> None:
    from pretrain.demo_corpora import docs_documents

    topics = [t for t in docs_documents() if t.strip()]
    before, after = topics[:BEFORE], topics[BEFORE:]
    texts = [*before, long_text(megabytes * 10**6), *after]
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def tokenizer_dir(work: Path) -> Path:
    from pretrain.demo_corpora import code_documents, docs_documents
    from pretrain.tokenizer import holds_tokenizer, train_tokenizer

    out = work / "tokenizer"
    if not holds_tokenizer(str(out)):
        sample = work / "sample.jsonl"
        texts = [*itertools.islice(code_documents(), 100), *itertools.islice(docs_documents(), 100)]
        sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        train_tokenizer([([str(sample)], "text")], str(out), 2048, 1000)
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_once(corpus: str, tokenizer: str, text_only: bool) -> dict:
    """In this process: read the corpus until the stream is past the long record (document BEFORE), or
    with `text_only` only its documents' text, untokenized."""
    import pretrain.data
    from pretrain.data import TrainStream, read_documents
    from pretrain.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    import datasets  # noqa: F401  (imported before the baseline, as the first read would)

    base = rss_mb()
    start = time.perf_counter()
    if text_only:
        chars = sum(len(text) for text in read_documents([corpus]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak), "chars": chars}
    stream = TrainStream([corpus], "text", tok, SEQ_LEN, 0, 1, MICRO_BATCH)
    batches, digest = 0, hashlib.sha256()
    for batch in stream:
        batches += 1
        digest.update(batch.numpy().tobytes())
        state = stream.state_dict()
        if state["doc"] > BEFORE or state["epoch"] > 0:
            break
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "rss_before_mb": round(base),
        "tokens": batches * MICRO_BATCH * SEQ_LEN,
        "sha256": digest.hexdigest()[:12],
        "code": str(Path(pretrain.data.__file__).resolve()),
    }


def run_child(cmd: list[str]) -> dict | str:
    """The JSON result of a reading process, or why it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_commit(code: Path) -> str:
    cmd = ["git", "-C", str(code), "log", "-1", "--format=%h %s"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip()[:90] or "(not a git checkout)"


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import tokenizers
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, "
        f"torch {torch.__version__}, tokenizers {tokenizers.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="long record sizes, MB")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose `pretrain` reads")
    work = Path("/tmp/long_record_bench")
    parser.add_argument("--work", type=Path, default=work, help="where corpora and tokenizer are kept")
    parser.add_argument(
        "--limit-gib", type=float, help="address-space limit of each read: it fails, not the OOM killer"
    )
    parser.add_argument("--read", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--text-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    if args.read:
        if args.limit_gib:
            limit = int(args.limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(read_once(*args.read, args.text_only)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(args.work)
    print(f"code: {args.code.resolve()} at {git_commit(args.code)}\nmachine: {machine()}\n")
    columns = ["long record", "wall time", "peak RSS", "RSS before reading", "tokens read"]
    columns += ["batches' SHA-256", "peak RSS, text only"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for size in args.sizes:
        corpus = args.work / f"long_{size}mb.jsonl"
        if not corpus.is_file():
            write_corpus(corpus, size)
        cmd = [sys.executable, __file__, "--code", str(args.code), "--read", str(corpus), str(tok)]
        cmd += ["--limit-gib", str(args.limit_gib)] if args.limit_gib else []
        r, text = run_child(cmd), run_child([*cmd, "--text-only"])
        if isinstance(r, str):
            print(f"| {size} MB | {r} ||||||", flush=True)
            continue
        assert Path(r["code"]).is_relative_to(args.code.resolve()), f"read with {r['code']}"
        text_peak = text if isinstance(text, str) else f"{text['peak_rss_mb'] / 1024:.2f} GiB"
        print(
            f"| {size} MB | {r['seconds']} s | {r['peak_rss_mb'] / 1024:.2f} GiB | "
            f"{r['rss_before_mb'] / 1024:.2f} GiB | {r['tokens']:,} | {r['sha256']} | {text_peak} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
