"""Checkpoints of the full training state, written atomically, and transformers exports of each phase.

A checkpoint is DeepSpeed's (weights, optimizer, scheduler, ZeRO shards) plus one small file per rank
with what only that rank knows: its RNG state and its position in its data stream. It becomes the one
to resume from only when every rank has finished writing it: DeepSpeed's own `latest` is written by
rank 0 without waiting for the others, so we save with `save_latest=False` and, after a barrier, rank 0
writes the checkpoint's completeness mark (`complete.json`: step, world size, tokenizer fingerprint)
and then replaces `latest` by an atomic rename. Rotation counts only marked checkpoints, deletes
unmarked leftovers of crashed saves, and never deletes the one `latest` names. A save never writes into
a complete checkpoint: a tag that exists already (a second stop at the same step) gets a suffix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.atomic import fsync_tree, replace_dir, write_text_atomic
from pretrain.distributed import DistInfo, barrier, broadcast_object
from pretrain.fault_injection import crash_self, fault_at
from pretrain.methods.lora import export_state, save_adapters

LATEST = "latest"
COMPLETE = "complete.json"


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
    meta: dict[str, Any] | None = None,
) -> str:
    """Write checkpoint `tag` (or a fresh variant of it) on every rank; return the tag written."""
    root = checkpoint_dir(run_dir)
    tag = broadcast_object(_fresh_tag(root, tag) if dist.is_main else None)
    barrier()  # rank 0 may have removed an unfinished directory of that name
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank_state = {**rng_state(), **rank_state}  # a stop passes the state its step started with
    torch.save(rank_state, root / tag / f"rank{dist.rank}_state.pt")
    if fault_at("crash_saving", tag):
        crash_self()
    # DeepSpeed does not: on disk before the mark that lets older ones be pruned. Each rank its own files
    # (on a shared filesystem only the writer's flush counts, and every rank opening every file of a
    # large job's checkpoint would load its metadata servers)
    fsync_tree(root / tag, mine=lambda name: _writer(name) == dist.rank, dirs=dist.is_main)
    barrier()
    if dist.is_main:
        mark = {"tag": tag, "world_size": dist.world_size, **(meta or {})}
        write_text_atomic(root / tag / COMPLETE, json.dumps(mark, indent=2))
        write_text_atomic(root / LATEST, tag)
        prune(root, keep)
    barrier()
    return tag


def _writer(name: str) -> int:
    """The rank that writes checkpoint file `name`: DeepSpeed's `zero_pp_rank_R_...` and `mp_rank_00_...`
    (rank 0), our `rankR_state.pt`; rank 0 for any other."""
    found = re.search(r"rank_?(\d+)_", name)
    return int(found.group(1)) if found else 0


def _fresh_tag(root: Path, tag: str) -> str:
    """`tag`, or `tag-2`, `tag-3`, ... if a complete checkpoint (or `latest`) holds that name already.

    An unfinished directory of the name (a crashed save) is removed, so no stale shard mixes in.
    """
    current = _read_latest(root)
    name, n = tag, 1
    while name == current or is_complete(root / name):
        n += 1
        name = f"{tag}-{n}"
    if (root / name).exists():
        shutil.rmtree(root / name)
    return name


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def latest_tag(run_dir: Path) -> str | None:
    return _read_latest(checkpoint_dir(run_dir))


def _read_latest(root: Path) -> str | None:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def checkpoint_meta(run_dir: Path, tag: str) -> dict[str, Any]:
    """The completeness mark of a checkpoint; empty for one written before marks existed."""
    path = checkpoint_dir(run_dir) / tag / COMPLETE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_checkpoint(engine, run_dir: Path, dist: DistInfo) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(client_state, this rank's state) of the newest complete checkpoint, loaded into the engine."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
    # on the host: the rank that saved it may have had another GPU index than this one
    rank_state = torch.load(root / tag / f"rank{dist.rank}_state.pt", map_location="cpu", weights_only=False)
    restore_rng(rank_state)
    return client_state, rank_state


def rng_state() -> dict[str, Any]:
    """This process's random state: the CPU generator's and, on a GPU, the device's (dropout on a GPU
    draws from it, and DeepSpeed saves neither)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def restore_rng(rank_state: dict[str, Any]) -> None:
    torch.set_rng_state(rank_state["torch_rng"])
    if rank_state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["cuda_rng"])


# The names save_checkpoint gives: phase-N, step-N, step-N-stop, each maybe with _fresh_tag's -K.
_TAG = re.compile(r"(phase-\d+|step-\d+(-stop)?)(-\d+)?")


def prune(root: Path, keep: int) -> None:
    """Keep the complete checkpoints of the `keep` newest states and the one `latest` names; delete the
    rest, and every unfinished directory (a crashed or out-of-space save), which can never be resumed from.

    A state is a global step: a stop repeated at one step (a NaN retried, a requeued job stopped again
    before its first step) saves the same state under a new name, and counted as states of their own the
    copies pushed every earlier checkpoint out, leaving nothing to roll back to. The newest copy is kept.
    """
    current = _read_latest(root)
    dirs = [p for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]  # others are not ours
    # A checkpoint from before completeness marks is complete if `latest` names it.
    complete = [p for p in dirs if is_complete(p) or p.name == current]
    kept, states = set(), set()
    for path in sorted(complete, key=_saved_at, reverse=True):
        state = _state(path)
        if path.name == current or (state not in states and len(states) < keep):
            kept.add(path.name)
            states.add(state)
    for old in dirs:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _state(path: Path) -> object:
    """The global step a checkpoint holds, from its mark; its own name where no mark says (older ones)."""
    try:
        return json.loads((path / COMPLETE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return path.name


def _saved_at(path: Path) -> float:
    mark = path / COMPLETE
    return (mark if mark.is_file() else path).stat().st_mtime


def export_dir(run_dir: str | Path, phase: int) -> Path:
    """Where phase `phase`'s standalone model is exported (the eval job's row `phase`)."""
    return Path(run_dir) / "export" / f"phase-{phase}"


def export_phase(engine, tokenizer, out_dir: Path, is_main: bool) -> None:
    """A standalone transformers model (config, safetensors, tokenizer) of the current weights.

    With LoRA it is the merged model in the base model's format, merged from the gathered copy, and the
    adapters in peft's format in its `adapter/` directory.
    """
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 holds a shard per rank: every rank takes part in gathering the full state dict.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if is_main else None
    if is_main:
        # written beside, then renamed: an eval job (or a crash) never meets a half-written export
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapters(engine.module, state, tmp)
        model, state = export_state(engine.module, state)
        model.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    barrier()
