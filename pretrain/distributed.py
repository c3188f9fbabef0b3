"""Process-group set-up and the few collectives the pipeline needs.

The same entry point runs under the `deepspeed` launcher, `torchrun` and as a plain process: all three
are reduced to the env:// rendezvous (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long the other ranks wait for work that rank 0 does alone (scoring tasks with lm-eval, converting a
# checkpoint to the universal format): DeepSpeed's process group gives up on a collective after 10 minutes
# (DEEPSPEED_TIMEOUT), which such work outlasts on a big model, and the run would die with it.
MAIN_WORK_TIMEOUT = timedelta(days=1)
_main_work_group = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> None:
    """Point DeepSpeed at the CPU when no GPU is visible, before deepspeed is imported anywhere."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> DistInfo:
    """Join (or, for a plain process, create) the default process group."""
    if "RANK" not in os.environ:  # a plain `python -m pretrain ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() != "cpu":
        # each rank on its own GPU before any collective: object broadcasts (the run directory's plan,
        # before the engine exists) and staged reductions use the current device, else GPU 0 on every rank
        get_accelerator().set_device(local_rank)
    if not dist.is_initialized():
        own = shm_buffer(os.environ["RANK"])
        # A stale buffer of an earlier run on this port would be mapped by the peers with its old flags.
        # Safe: peers open it only after the rendezvous, which waits for this rank.
        own.unlink(missing_ok=True)
        deepspeed.init_distributed(auto_mpi_discovery=False)
        barrier()  # every rank has mapped every buffer now, so the names can go
        own.unlink(missing_ok=True)  # else each run leaves 66 MiB per rank in RAM-backed /dev/shm
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


_SHM = Path("/dev/shm") / "deepspeed_allreduce_buffer"  # as named in DeepSpeed's ops/csrc/cpu/comm/shm.cpp


def shm_buffer(rank: int | str) -> Path:
    """DeepSpeed's CPU shared-memory all-reduce buffer of `rank` in this process group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return _SHM.with_name(f"{_SHM.name}_{os.getuid()}_{addr}_{port}_{rank}")


def shm_buffers_on_port(port: int | str) -> list[Path]:
    """Every rank's buffer of any process group that met on `port`, whoever made it."""
    return list(_SHM.parent.glob(f"{_SHM.name}_*_{port}_*"))


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done. Exiting with it alive, a rank now and then
    aborted during interpreter exit ("terminate called without an active exception", no Python frame
    on the stack) after all its work was written."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `t` over the ranks of `group`, in place, wherever `t` lives: NCCL (GPU ranks) takes no CPU
    tensor, so a tensor elsewhere goes through a copy on the collective device and back."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    staged = t.to(collective_device())
    dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
    if staged is not t:
        t.copy_(staged)
    return t


def collective_device() -> torch.device:
    """The device whose tensors this rank's default process group reduces: its accelerator's (the CPU
    on CPU ranks)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def from_main(work: Callable[[], T]) -> T:
    """`work()` run on rank 0 alone and its value returned on every rank; the others wait for it up to
    MAIN_WORK_TIMEOUT, on a gloo group of their own, instead of the default group's timeout. An error on
    rank 0 ends its process, and the launcher then stops the waiting ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    global _main_work_group
    if _main_work_group is None:  # a collective: every rank is here together, before rank 0's work
        _main_work_group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
    box = [work() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_main_work_group)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s value on every rank (e.g. a decision only rank 0 can take)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
