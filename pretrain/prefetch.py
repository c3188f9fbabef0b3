"""A training stream's batches made ahead in a background thread (`train.prefetch`).

The training loop asks for the next batch only once a step has ended, and on a GPU that step's device
work has ended too (the loop reads the loss), so reading and tokenizing a batch in the loop leaves the
device idle: on one H200 that was 2-8% of the step (benchmarks/gpu_cost.md). A thread that keeps up to
`depth` batches ready overlaps that work with the step, as far as reading and tokenizing leave the GIL
free (the `tokenizers` library encodes a batch in Rust; not measured on a GPU yet). On 2 CPU ranks it cut
data waiting from 1.48% to 0.26% of the step (benchmarks/train_prefetch_effect.md).

The batches are the stream's own, in its order: only when they are made changes. What a checkpoint
records is the stream's state as of the last batch handed out, taken in the thread right after that
batch was made, never the read-ahead. The thread makes at most `limit` batches, the phase's remaining
micro-batches: reading past a phase's end would make batches only to throw them away (in the test suite's
2-3-step phases, as many as the phase trains on) and count their bad records in the wrong phase.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()  # the stream ended (training streams are endless; a finite one ends the iteration)
_LIMIT = object()  # `limit` batches were made


class Prefetched:
    """`stream`'s first `limit` batches (all, if None), up to `depth` made ahead by a daemon thread started
    on the first `iter()`.

    `stream` has `state_dict()` and is iterable; load its state before wrapping it. An error the thread
    meets (a bad record under `on_bad_record: error`) is raised by the `next()` that reaches it, and so is
    asking for more than `limit` batches (a miscounted phase, not an end of data). Call `close()` when done
    with it: it stops the thread."""

    def __init__(self, stream, depth: int, limit: int | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth {depth}: at least 1 (without read-ahead, use the stream)")
        self.stream = stream
        self.limit = limit
        self._state = stream.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state_dict(self) -> dict[str, Any]:
        """The stream's state after the last batch handed out (before any: its state when wrapped)."""
        return self._state

    def __iter__(self) -> Iterator:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
            self._thread.start()
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END or item is _LIMIT:
            self._queue.put(item)  # every later next() ends too
            if item is _LIMIT:
                raise RuntimeError(f"asked for more than the {self.limit} batches this read-ahead makes")
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def close(self) -> None:
        """Stop the thread (it ends after the batch it is making) and drop the batches made ahead."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                self._drain()
                self._thread.join(timeout=0.05)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _produce(self) -> None:
        try:
            made = 0
            for batch in itertools.islice(self.stream, self.limit):
                if not self._put((batch, self.stream.state_dict())):
                    return
                made += 1
            self._put(_LIMIT if made == self.limit else _END)
        except BaseException as err:  # handed to the consumer, whose next() raises it
            self._put(err)

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False
