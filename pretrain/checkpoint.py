"""Checkpoints of the full training state, written atomically, and transformers exports of each phase.

A checkpoint is DeepSpeed's (weights, optimizer, scheduler, ZeRO shards) plus one small file per rank
with what only that rank knows: its RNG state and its position in its data stream. It becomes the one
to resume from only when every rank has finished writing it: DeepSpeed's own `latest` is written by
rank 0 without waiting for the others, so we save with `save_latest=False` and, after a barrier, rank 0
replaces `latest` by an atomic rename. Older checkpoints are pruned only after that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.distributed import DistInfo, barrier

LATEST = "latest"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    engine,
    run_dir: Path,
    tag: str,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    dist: DistInfo,
    keep: int,
) -> None:
    root = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank_state = {**rank_state, "torch_rng": torch.get_rng_state()}
    torch.save(rank_state, root / tag / f"rank{dist.rank}_state.pt")
    _fault_point(f"crash_saving:{tag}")
    barrier()
    if dist.is_main:
        _write_atomic(root / LATEST, tag)
        _prune(root, keep)
    barrier()


def latest_tag(run_dir: Path) -> str | None:
    marker = checkpoint_dir(run_dir) / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def load_checkpoint(engine, run_dir: Path, dist: DistInfo) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(client_state, this rank's state) of the newest complete checkpoint, loaded into the engine."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
    rank_state = torch.load(root / tag / f"rank{dist.rank}_state.pt", weights_only=False)
    torch.set_rng_state(rank_state.pop("torch_rng"))
    return client_state, rank_state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    tags = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    current = (root / LATEST).read_text().strip()
    for old in [p for p in tags if p.name != current][: max(0, len(tags) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _fault_point(name: str) -> None:
    # Fault injection for the crash-during-save test: PRETRAIN_FAULT=<name> kills the process here.
    if os.environ.get("PRETRAIN_FAULT") == name:
        os._exit(86)


def export_phase(engine, tokenizer, out_dir: Path, is_main: bool) -> None:
    """A standalone transformers model (config, safetensors, tokenizer) of the current weights."""
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 holds a shard per rank: every rank takes part in gathering the full state dict.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(str(out_dir), state_dict=state)
        tokenizer.save_pretrained(str(out_dir))
    barrier()
