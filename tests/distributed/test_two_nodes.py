"""Two "nodes" on one machine: two torchrun launches (node rank 0 and 1, one CPU rank each) that meet by
c10d rendezvous on loopback, train a tiny run together and write one run directory.

The same run is launched twice: by plain `torchrun` commands, and by `launch/slurm.sbatch` with the
variables a 2-node SLURM allocation sets and stand-ins for `srun` and `scontrol` (one task a node).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, tiny_run_config, write_config

pytestmark = pytest.mark.distributed

TIMEOUT = 600


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _torchrun_node(node_rank: int, port: int, config: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", f"--node-rank={node_rank}", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
        "-m", "pretrain", "train", "--config", str(config), "--set", "train.log_every=1",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-5000:]}" for log in logs)
    assert codes == [0] * len(procs), f"exit codes {codes}\n{text}"


def assert_one_consistent_run(run: Path, world_size: int = 2) -> None:
    m = json.loads((run / "metrics.json").read_text())
    assert m["domains"] == ["news", "plays"] and m["phases"] == ["news", "plays"]
    assert len(m["eval_loss"]) == 3 and all(len(row) == 2 for row in m["eval_loss"])
    assert all(math.isfinite(loss) for row in m["eval_loss"] for loss in row)
    tag = (run / "checkpoints" / "latest").read_text().strip()
    ckpt = run / "checkpoints" / tag
    assert sorted(p.name for p in ckpt.glob("rank*_state.pt")) == [
        f"rank{r}_state.pt" for r in range(world_size)
    ]
    shards = sorted(p.name for p in ckpt.glob("*optim_states.pt"))  # ZeRO-2: one optimizer shard a rank
    assert len(shards) == world_size, shards


def test_two_torchrun_nodes_train_one_run(tmp_path):
    config = write_config(tiny_run_config(tmp_path, stage=2, steps=2), tmp_path / "run.yaml")
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [_torchrun_node(r, port, config, log) for r, log in zip((0, 1), logs, strict=True)]
    _wait_all(procs, logs)
    assert_one_consistent_run(tmp_path / "run")


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: start the command once a node of the allocation, as `srun --ntasks-per-node=1` would.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `scontrol show hostnames LIST` for a list of loopback names; anything else fails.
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<< "$3"
"""


def test_slurm_script_on_two_fake_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = write_config(tiny_run_config(tmp_path, stage=2, steps=2), tmp_path / "run.yaml")
    port = free_port()
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="127.0.0.1,localhost",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_GPUS_ON_NODE="1",
        MASTER_PORT=str(port),
    )
    log = tmp_path / "slurm.log"
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), str(config), "--set", "train.log_every=1"],
        cwd=tmp_path,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    _wait_all([proc], [log])
    assert "2 nodes x 1, rendezvous 127.0.0.1:" in log.read_text()
    assert_one_consistent_run(tmp_path / "run")
