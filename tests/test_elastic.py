"""Resume on another number of ranks: the global batch kept, partitions re-cut, conversion failures named.

The resumed runs themselves (2 -> 1 and 1 -> 2 ranks) are in tests/distributed/test_resume.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_config

from pretrain.checkpoint import COMPLETE, checkpoint_dir
from pretrain.config import validate
from pretrain.distributed import DistInfo
from pretrain.elastic import _keep_global_batch, plan_elastic, universal_checkpoint
from pretrain.methods.regularisation import recut
from pretrain.rundir import RunDirError


def _cfg(tmp_path, micro: int, accum: int):
    raw = tiny_run_config(tmp_path)
    raw["train"].update(micro_batch_size=micro, grad_accum=accum)
    return validate(raw)


@pytest.mark.parametrize(("old", "new", "accum"), [(2, 1, 4), (1, 2, 1), (2, 4, 1), (4, 2, 4)])
def test_the_global_batch_is_kept_by_gradient_accumulation(tmp_path, old, new, accum):
    cfg = _cfg(tmp_path, micro=2, accum=2)
    global_batch = 2 * 2 * old
    kept = _keep_global_batch(cfg, global_batch, "step-6", old, new)
    assert kept.train.micro_batch_size * kept.train.grad_accum * new == global_batch
    assert kept.train.grad_accum == accum
    assert cfg.train.grad_accum == 2  # the user's config is left as written


def test_a_global_batch_the_new_ranks_cannot_make_up_names_the_world_sizes_that_can(tmp_path):
    cfg = _cfg(tmp_path, micro=2, accum=1)
    with pytest.raises(RunDirError, match=r"global batch of 12 sequences.*resume on 1, 2, 3, 6 ranks"):
        _keep_global_batch(cfg, 12, "step-6", 6, 4)


def test_fewer_ranks_that_need_accumulation_are_refused_under_the_skip_policy(tmp_path):
    # `skip` needs grad_accum 1 (config.validate); the grad_accum a resume scales must not get round it
    raw = tiny_run_config(tmp_path, train={"micro_batch_size": 2, "on_nonfinite": "skip"})
    with pytest.raises(RunDirError, match=r"grad_accum 2.*`train.on_nonfinite`.*resume on 4 ranks"):
        _keep_global_batch(validate(raw), 8, "step-6", 4, 2)
    raw["train"]["on_nonfinite"] = "stop"  # what the message offers
    assert _keep_global_batch(validate(raw), 8, "step-6", 4, 2).train.grad_accum == 2


def _checkpoint(run_dir, tag: str, ranks: int, global_batch: int) -> None:
    """A checkpoint's files as plan_elastic reads them: one state per rank, the mark with its batch."""
    tag_dir = checkpoint_dir(run_dir) / tag
    tag_dir.mkdir(parents=True)
    for r in range(ranks):
        (tag_dir / f"rank{r}_state.pt").write_bytes(b"")
    (tag_dir / COMPLETE).write_text(json.dumps({"global_step": 6, "global_batch": global_batch}))


def test_a_second_resume_on_the_same_fewer_ranks_keeps_the_checkpoints_global_batch(tmp_path):
    """2 ranks x accumulation 1 resumed on 1 rank train with accumulation 2, which config.yaml does not
    hold: the checkpoints that 1-rank run writes must resume on 1 rank with accumulation 2 again."""
    cfg = _cfg(tmp_path, micro=2, accum=1)
    one_rank = DistInfo(rank=0, world_size=1, local_rank=0)
    _checkpoint(tmp_path, "step-8", ranks=1, global_batch=4)  # written by the 1-rank resume
    plan = plan_elastic(cfg, tmp_path, "step-8", one_rank)
    assert plan is not None and plan.cfg.train.grad_accum == 2
    assert not plan.universal  # same ranks: ZeRO's partitions load as they were written
    assert plan.changes(1) == []  # nothing changed against the checkpoint
    _checkpoint(tmp_path, "step-10", ranks=1, global_batch=2)  # the config's own global batch
    assert plan_elastic(cfg, tmp_path, "step-10", one_rank) is None


@pytest.mark.parametrize(("old", "new"), [(3, 2), (2, 3), (1, 2), (2, 1)])
def test_partitions_are_re_cut_from_every_old_ranks_part(old, new):
    flat = torch.arange(11, dtype=torch.float32) * 0.5

    def ranges(world):  # ZeRO-3-like: equal shares, the last one short
        size = -(-flat.numel() // world)
        return [(r * size, min(size, flat.numel() - r * size)) for r in range(world)]

    pieces = [(start, flat[start : start + n].clone()) for start, n in ranges(old)]
    for start, n in ranges(new):
        assert torch.equal(recut(pieces, flat.numel(), start, n), flat[start : start + n])


def test_a_failed_conversion_names_the_checkpoint_and_leaves_nothing_behind(tmp_path):
    tag_dir = tmp_path / "step-6"
    tag_dir.mkdir()
    (tag_dir / "rank0_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="step-6 to DeepSpeed's universal format failed"):
        universal_checkpoint(tag_dir)
    assert sorted(p.name for p in tag_dir.iterdir()) == ["rank0_state.pt"]


def test_a_checkpoint_is_converted_once(tmp_path, monkeypatch):
    """A converted checkpoint keeps its universal/ directory: a later resume does not convert again."""
    import pretrain.elastic as elastic

    tag_dir = tmp_path / "step-6"
    (tag_dir / "universal").mkdir(parents=True)

    def convert(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(elastic.subprocess, "run", convert)
    assert universal_checkpoint(tag_dir) == tag_dir / "universal"
