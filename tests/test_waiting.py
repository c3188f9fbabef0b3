"""Work rank 0 does alone (scoring tasks, converting a checkpoint) may outlast the process group's
timeout (DeepSpeed's default: 10 minutes) without killing the run: the other ranks wait in
`from_main` on a group of their own. Two real gloo processes; the default group's timeout is cut to 2 s
once both have joined (a short timeout from the start could expire in the rendezvous of a slow start)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import free_port

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from pretrain.distributed import broadcast_object, from_main

    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    dist.barrier()
    dist.distributed_c10d._get_default_group().set_timeout(timedelta(seconds=2))
    slow = lambda: (time.sleep(5), "scored")[1]  # rank 0's own work, well past the timeout
    if sys.argv[1] == "from_main":
        print("got", from_main(slow), flush=True)
        # as the pipeline ends (shutdown_distributed, without its barrier on the 2 s group): a rank that
        # exits with its groups alive now and then aborts in interpreter exit ("terminate called ...")
        dist.destroy_process_group()
    else:  # what the pipeline did before: the waiting ranks in a collective of the default group
        print("got", broadcast_object(slow() if dist.get_rank() == 0 else None), flush=True)
    """
)


def run_two_ranks(how: str) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, how],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_the_other_ranks_wait_for_rank_0_past_the_group_timeout():
    ranks = run_two_ranks("from_main")
    for rank in ranks:
        assert rank.returncode == 0, rank.stderr[-2000:]
        assert rank.stdout.split() == ["got", "scored"]

    # the control: the same wait in a collective of the default group fails on the waiting rank
    waiting = run_two_ranks("broadcast")[1]
    assert waiting.returncode != 0 and "Timed out" in waiting.stderr, waiting.stderr[-2000:]
