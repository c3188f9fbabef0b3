"""Checkpoint rotation and naming, on directories laid out as DeepSpeed and save_checkpoint leave them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from pretrain.checkpoint import (
    COMPLETE,
    LATEST,
    _fresh_tag,
    _writer,
    export_phase,
    is_complete,
    load_checkpoint,
    prune,
    rng_state,
    save_checkpoint,
)
from pretrain.distributed import DistInfo

ONE = DistInfo(rank=0, world_size=1, local_rank=0)


def _checkpoint(root, tag, when, complete=True, step=None):
    """A checkpoint directory written at time `when` (its mark too, with `step`), complete or left by a
    crash."""
    path = root / tag
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (path / COMPLETE).write_text(json.dumps({"tag": tag, **({"global_step": step} if step else {})}))
        os.utime(path / COMPLETE, (when, when))
    os.utime(path, (when, when))
    return path


def _latest(root, tag):
    (root / LATEST).write_text(tag)


def test_rotation_counts_only_complete_checkpoints(tmp_path):
    # probe 6: an unfinished directory newer than every complete one used to count as one to keep
    for i, tag in enumerate(["step-2", "step-4", "step-6"]):
        _checkpoint(tmp_path, tag, when=1000 + i)
    _checkpoint(tmp_path, "step-8", when=2000, complete=False)  # a crash (or a full disk) while saving
    _latest(tmp_path, "step-6")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-4", "step-6"]


def test_rotation_counts_copies_of_one_step_once_and_keeps_the_newest(tmp_path):
    # a NaN stop retried twice: its copies of step 249 pushed step-200 out, nothing left to roll back to
    for i, (tag, step) in enumerate([("step-100", 100), ("step-200", 200), ("step-249-stop", 249)]):
        _checkpoint(tmp_path, tag, when=1000 + i, step=step)
    _checkpoint(tmp_path, "step-249-stop-2", when=2000, step=249)
    _latest(tmp_path, "step-249-stop-2")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-200", "step-249-stop-2"]


def test_rotation_never_deletes_the_checkpoint_latest_names(tmp_path):
    _checkpoint(tmp_path, "phase-1", when=1000)
    for i, tag in enumerate(["step-12", "step-14"]):
        _checkpoint(tmp_path, tag, when=3000 + i)
    _latest(tmp_path, "phase-1")  # e.g. older by its time stamps after a copy; it is still the one to resume
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["phase-1", "step-14"]


def test_rotation_leaves_directories_it_did_not_write(tmp_path):
    # an output_dir reused from another tool: its folders under checkpoints/ are no unfinished saves of ours
    _checkpoint(tmp_path, "checkpoint-500", when=500, complete=False)  # a Hugging Face Trainer checkpoint
    (tmp_path / "step-2-notes").mkdir()
    for i, tag in enumerate(["step-2", "step-4", "step-4-stop-2", "phase-1"]):
        _checkpoint(tmp_path, tag, when=1000 + i)
    _checkpoint(tmp_path, "step-6-stop", when=2000, complete=False)  # ours, unfinished
    _latest(tmp_path, "phase-1")
    prune(tmp_path, keep=2)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == ["checkpoint-500", "phase-1", "step-2-notes", "step-4-stop-2"]
    assert (tmp_path / "checkpoint-500" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"


def test_a_checkpoint_from_before_marks_counts_when_latest_names_it(tmp_path):
    _checkpoint(tmp_path, "step-2", when=1000, complete=False)
    _latest(tmp_path, "step-2")
    _checkpoint(tmp_path, "step-4", when=2000, complete=False)
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-2"]


def test_a_save_never_reuses_the_name_of_latest_or_of_a_complete_checkpoint(tmp_path):
    # probe 4: a resumed run that stops again at the same step wrote into the checkpoint `latest` named
    _checkpoint(tmp_path, "step-2-stop", when=1000)
    _latest(tmp_path, "step-2-stop")
    assert _fresh_tag(tmp_path, "step-2-stop") == "step-2-stop-2"
    _checkpoint(tmp_path, "step-2-stop-2", when=1001)
    assert _fresh_tag(tmp_path, "step-2-stop") == "step-2-stop-3"
    assert is_complete(tmp_path / "step-2-stop") and (tmp_path / "step-2-stop" / COMPLETE).is_file()


def test_an_unfinished_directory_of_the_name_is_cleared_before_writing(tmp_path):
    stale = _checkpoint(tmp_path, "phase-2", when=1000, complete=False)
    _latest(tmp_path, "step-6")
    assert _fresh_tag(tmp_path, "phase-2") == "phase-2"
    assert not stale.exists()  # no stale shard of the crashed save can mix into the new one


class _Engine:
    """What save/load_checkpoint ask of DeepSpeed's engine: shards written into (and read from) the tag."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        shards = Path(root) / tag / "zero"
        shards.mkdir(parents=True)
        for rank in range(2):
            (shards / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"shard" * 1000)

    def load_checkpoint(self, root, tag):
        return str(Path(root) / tag), {}


def test_every_file_is_on_disk_before_the_checkpoint_is_marked_complete(tmp_path, monkeypatch):
    """Pruning follows the mark: a node crash after it must not find shards that never reached the disk
    (DeepSpeed's torch.save does not fsync)."""
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(_Engine(), tmp_path, "step-2", {}, {"stream": None}, ONE, keep=1)
    tag = tmp_path / "checkpoints" / "step-2"
    marked = next(i for i, path in enumerate(synced) if path.endswith(f".{COMPLETE}.tmp"))
    # rank 0's: its shard, the shards' folder, its rank file; the other rank's shard is that rank's to flush
    mine = {
        str(tag / "zero" / "zero_pp_rank_0_optim_states.pt"),
        str(tag / "zero"),
        str(tag / "rank0_state.pt"),
    }
    assert mine <= set(synced[:marked]) and str(tag / "zero" / "zero_pp_rank_1_optim_states.pt") not in synced


@pytest.mark.parametrize(
    ("name", "rank"),
    [
        ("zero_pp_rank_3_mp_rank_00_optim_states.pt", 3),
        ("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", 12),
        ("zero_pp_rank_5_mp_rank_00_model_states.pt", 5),  # ZeRO-3: every rank its shard of the weights
        ("mp_rank_00_model_states.pt", 0),
        ("rank7_state.pt", 7),
        ("complete.json", 0),
    ],
)
def test_each_checkpoint_file_is_flushed_by_the_rank_that_wrote_it(name, rank):
    assert _writer(name) == rank


def test_a_rank_state_saved_on_another_device_loads_onto_the_host(tmp_path):
    """Tensors saved by the rank on GPU 5 (EWC's anchors) load on a host without that GPU (or onto
    another rank's device): the method moves them where its partition is."""
    tagged = [True]
    entry = (0, lambda storage: "cuda:5" if tagged[0] else None, lambda storage, location: None)
    torch.serialization._package_registry.insert(0, entry)  # torch.save then names the storage cuda:5
    try:
        state = {"stream": None, "method": {"anchors": torch.ones(3)}, **rng_state()}
        (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
        torch.save(state, tmp_path / "checkpoints" / "step-2" / "rank0_state.pt")
    finally:
        tagged[0] = False
        torch.serialization._package_registry.remove(entry)
    (tmp_path / "checkpoints" / LATEST).write_text("step-2")
    _, loaded = load_checkpoint(_Engine(), tmp_path, ONE)
    assert loaded["method"]["anchors"].device.type == "cpu" and loaded["method"]["anchors"].sum() == 3


def test_an_export_is_seen_whole_or_not_at_all(tmp_path):
    """An eval job takes every export/phase-N directory for a finished export: one that failed (or was
    killed) midway must leave the earlier attempt's export as it was, and no half-written directory."""
    from types import SimpleNamespace

    model = tiny_llama()
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    out = tmp_path / "export" / "phase-1"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"an earlier attempt's export")

    def fail(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_phase(engine, SimpleNamespace(save_pretrained=fail), out, is_main=True)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    export_phase(engine, SimpleNamespace(save_pretrained=lambda path: None), out, is_main=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["phase-1"]  # no leftovers beside it
