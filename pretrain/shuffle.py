"""A seeded streaming shuffle of document order, so that a seed is a different sample of the corpus.

A shuffle buffer, as `datasets` shuffles iterable datasets: the first `buffer` documents fill it; with
each further document one drawn at random from the buffer is handed out; at the end the rest leaves in
random order. The order depends only on the documents, the seed and the epoch, never on the rank or
the world size: every rank shuffles the whole stream alike before taking its own blocks, so the global
block sequence is the same at every world size, and a resumed stream, which reads its epoch again from
the start, reproduces the same order up to where it stopped. The buffer holds at most `buffer` documents
and, past `max_chars` characters of text, hands documents out early, so a corpus of huge records does
not hold a thousand of them at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Shuffle:
    seed: int
    buffer: int = 1000
    max_chars: int = 1 << 26  # ~64M characters of text held at most (plus one document)


def shuffled(docs: Iterable[str], shuffle: Shuffle, epoch: int) -> Iterator[str]:
    """`docs` in the seeded order of `epoch` (a new order every epoch)."""
    rng = random.Random(f"pretrain-shuffle:{shuffle.seed}:{epoch}")  # str seeds are stable across processes
    held: list[str] = []
    chars = 0
    for doc in docs:
        held.append(doc)
        chars += len(doc)
        while len(held) > shuffle.buffer or (chars > shuffle.max_chars and len(held) > 1):
            i = rng.randrange(len(held))
            held[i], held[-1] = held[-1], held[i]
            out = held.pop()
            chars -= len(out)
            yield out
    rng.shuffle(held)
    yield from held
