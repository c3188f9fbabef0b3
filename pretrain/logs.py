"""Rank-aware logging: concise lines and a progress bar on rank 0, quiet elsewhere.

The numbers for TensorBoard, W&B and MLflow go through pretrain/trackers.
"""

from __future__ import annotations

import logging
import os

from tqdm import tqdm

log = logging.getLogger("pretrain")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(level)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-shard bars on every save are noise
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(total: int, desc: str, rank: int) -> tqdm:
    # Off when not a terminal unless asked for: a log file full of bars is noise.
    quiet = rank != 0 or (not os.isatty(2) and not os.environ.get("PRETRAIN_PROGRESS"))
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)
