"""The start every run-config worker shares (zero3_release_worker.py, universal_decay_worker.py): its
arguments, the process group, the run config."""

from __future__ import annotations

import argparse

from pretrain.config import RunConfig, load_config
from pretrain.distributed import DistInfo, init_distributed


def start_worker() -> tuple[argparse.Namespace, DistInfo, RunConfig]:
    """(`--config FILE --out FILE` as parsed, this rank, the config); the launcher adds --local_rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    dist = init_distributed()
    return args, dist, load_config(args.config)
