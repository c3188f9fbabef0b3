"""Resuming on a different number of ranks (a job requeued on fewer or more nodes).

Three things are per rank in a checkpoint, and each is re-cut for the new world size:
- DeepSpeed's ZeRO partitions of weights and optimizer state: converted once to DeepSpeed's universal
  checkpoint (`ds_to_universal`, written into the checkpoint's own directory, so it is rotated with it),
  which any world size loads. ZeRO-0 keeps whole copies, which load as they are.
- the data streams: their blocks are numbered globally, so the new ranks continue from the same block
  (pretrain.data.reshard_stream_state, pretrain.replay.reshard_replay_state);
- a method's own partitions (EWC's anchors and Fisher): re-cut from all old ranks' parts.
The global batch stays as it was (train.grad_accum is scaled by old/new ranks), so every optimizer step
takes the same blocks as the uninterrupted run would and the phases keep their step counts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import checkpoint_dir, checkpoint_meta, restore_rng
from pretrain.config import RunConfig
from pretrain.data import reshard_stream_state
from pretrain.distributed import DistInfo, from_main
from pretrain.instruct import is_example_state, reshard_example_state
from pretrain.replay import reshard_replay_state
from pretrain.rundir import RunDirError

UNIVERSAL = "universal"


@dataclass
class Elastic:
    """A resume from `tag`, written by `old_world` ranks, on another number of ranks."""

    tag: str
    old_world: int
    old_accum: int  # the gradient accumulation the checkpoint was trained with
    cfg: RunConfig  # the run config with grad_accum scaled to keep the global batch
    universal: bool  # load DeepSpeed's universal checkpoint (ZeRO 1-3) rather than the original

    def changes(self, world: int) -> list[dict[str, Any]]:
        """What the resume changed, as metrics.json's `config_changes` records it."""
        out = [{"key": "world_size", "from": self.old_world, "to": world}] if self.old_world != world else []
        if self.old_accum != self.cfg.train.grad_accum:
            out.append({"key": "train.grad_accum", "from": self.old_accum, "to": self.cfg.train.grad_accum})
        return out


def saved_world_size(run_dir: Path, tag: str) -> int:
    return len(list((checkpoint_dir(run_dir) / tag).glob("rank*_state.pt")))


def plan_elastic(cfg: RunConfig, run_dir: Path, tag: str, dist: DistInfo) -> Elastic | None:
    """None when `tag` was written by this many ranks with the config's global batch; else the resume's
    plan, the universal checkpoint made (once, by rank 0) if ZeRO partitions need one.

    The same number of ranks can need a plan too: a run resumed on fewer ranks trains (and checkpoints)
    with a scaled grad_accum that config.yaml does not hold, so its next resume on those ranks must scale
    it again, or the global batch would silently go back to the config's."""
    old = saved_world_size(run_dir, tag)
    global_batch = _global_batch(cfg, run_dir, tag, old)
    if old == dist.world_size and global_batch == cfg.train.global_batch(old):
        return None
    run_cfg = _keep_global_batch(cfg, global_batch, tag, old, dist.world_size)
    tag_dir = checkpoint_dir(run_dir) / tag
    # ZeRO 1-3 partition the optimizer state by rank: another number of ranks loads it converted
    universal = old != dist.world_size and any(tag_dir.glob("*optim_states.pt"))
    if universal:
        failure = from_main(lambda: _convert(tag_dir))
        if failure:
            raise RunDirError(failure)
    old_accum = global_batch // (cfg.train.micro_batch_size * old)
    return Elastic(tag, old, old_accum, run_cfg, universal)


def _convert(tag_dir: Path) -> str | None:
    """Why the universal checkpoint of `tag_dir` could not be made; None once it is there."""
    try:
        universal_checkpoint(tag_dir)
    except RuntimeError as err:
        return str(err)
    return None


def _global_batch(cfg: RunConfig, run_dir: Path, tag: str, old_world: int) -> int:
    """Sequences per optimizer step when `tag` was written (before marks held it: the config's, unscaled)."""
    saved = checkpoint_meta(run_dir, tag).get("global_batch")
    return saved or cfg.train.global_batch(old_world)


def _keep_global_batch(cfg: RunConfig, global_batch: int, tag: str, old: int, new: int) -> RunConfig:
    per_micro_step = cfg.train.micro_batch_size * new
    if global_batch % per_micro_step:
        fits = [w for w in range(1, global_batch + 1) if global_batch % (cfg.train.micro_batch_size * w) == 0]
        raise RunDirError(
            f"checkpoint {tag} was trained by {old} ranks with a global batch of {global_batch} sequences; "
            f"{new} ranks x train.micro_batch_size {cfg.train.micro_batch_size} cannot make that up by "
            f"gradient accumulation: resume on {', '.join(map(str, fits))} ranks"
        )
    accum = global_batch // per_micro_step
    if accum > 1 and cfg.train.on_nonfinite == "skip":
        # the config's own check (skip needs grad_accum 1) would be bypassed by the scaled grad_accum: a
        # NaN at a later micro-step would leave the earlier ones' gradients for the next step to apply
        raise RunDirError(
            f"checkpoint {tag} was trained by {old} ranks with a global batch of {global_batch} sequences; "
            f"{new} ranks make it up with train.grad_accum {accum}, and key `train.on_nonfinite`: 'skip' "
            f"needs grad_accum 1: resume on {global_batch // cfg.train.micro_batch_size} ranks, or with "
            "--set train.on_nonfinite=stop"
        )
    train = dataclasses.replace(cfg.train, grad_accum=accum)
    return dataclasses.replace(cfg, train=train)


def universal_checkpoint(tag_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of `tag_dir`, converted on first use and kept in it."""
    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    tmp = tag_dir / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier conversion that died midway
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir)]
    # --inject_missing_state: the version mark DeepSpeed's converter expects from Megatron clients
    cmd += ["--output_folder", str(tmp), "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"converting checkpoint {tag_dir} to DeepSpeed's universal format failed "
            f"(exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
        )
    os.replace(tmp, out)
    return out


def load_elastic(engine, run_dir: Path, plan: Elastic, dist: DistInfo) -> tuple[dict, dict, list[dict]]:
    """(client_state, stream state of this rank, every old rank's method state) loaded into the engine."""
    tag_dir = checkpoint_dir(run_dir) / plan.tag
    load_dir, tag = (tag_dir, UNIVERSAL) if plan.universal else (checkpoint_dir(run_dir), plan.tag)
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every optimizer group saved group 0's settings
    # (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): norms and biases, which
    # build_optimizer leaves undecayed, would decay from here on, and every later checkpoint would say so.
    # The decay a resume cannot change (train.weight_decay) is put back as build_optimizer set it.
    decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
    path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    for group, kept in zip(engine.optimizer.param_groups, decay, strict=True):
        group["weight_decay"] = kept
    if path is None:
        raise RuntimeError(f"checkpoint {load_dir / tag} could not be loaded")
    old = [
        torch.load(tag_dir / f"rank{r}_state.pt", map_location="cpu", weights_only=False)
        for r in range(plan.old_world)
    ]
    restore_rng(old[min(dist.rank, plan.old_world - 1)])
    return client, _reshard_stream([s["stream"] for s in old], dist), [s.get("method", {}) for s in old]


def _reshard_stream(states: list[dict | None], dist: DistInfo) -> dict | None:
    if states[-1] is None:  # saved at a phase's end: the next phase's stream starts afresh
        return None
    reshard = reshard_replay_state if "replay" in states[-1] else reshard_stream_state
    if is_example_state(states[-1]):
        reshard = reshard_example_state
    return reshard(states, dist.rank, dist.world_size)
