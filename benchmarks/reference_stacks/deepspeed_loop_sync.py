"""The minimal DeepSpeed loop of deepspeed_loop.py with one change: each loss is read on the host before
backward (`loss.item()`), as our trainer reads it for the ranks' per-micro-step agreement. On a GPU the
host then waits for the forward before it queues backward; the two loops' difference is that wait's cost
(on CPU ranks there is nothing to wait for)."""

from __future__ import annotations

from deepspeed_loop import main

if __name__ == "__main__":
    main(sync_loss=True)
