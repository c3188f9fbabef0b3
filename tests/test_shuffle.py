"""pretrain.shuffle and shuffled training streams: a seed is a different sample, the same at every world
size and across a resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import corpus_lines

from pretrain.data import DataError, TrainStream
from pretrain.shuffle import Shuffle, shuffled
from pretrain.tokenizer import train_tokenizer

SEQ_LEN = 16
DOCS = [f"document {i}" for i in range(200)]


def test_a_shuffle_is_a_permutation_fixed_by_seed_and_epoch():
    a = list(shuffled(DOCS, Shuffle(seed=1, buffer=50), epoch=0))
    assert sorted(a) == sorted(DOCS) and a != DOCS
    assert a == list(shuffled(DOCS, Shuffle(seed=1, buffer=50), epoch=0))
    assert a != list(shuffled(DOCS, Shuffle(seed=2, buffer=50), epoch=0))
    assert a != list(shuffled(DOCS, Shuffle(seed=1, buffer=50), epoch=1))


def test_a_document_moves_at_most_a_buffer_early():
    """A buffer of B documents hands out document i, at the earliest, as the (i - B)-th: once read."""
    out = list(shuffled(DOCS, Shuffle(seed=3, buffer=10), epoch=0))
    assert all(out.index(doc) >= i - 10 for i, doc in enumerate(DOCS))
    assert max(i - out.index(doc) for i, doc in enumerate(DOCS)) > 0


def test_the_buffer_holds_at_most_max_chars_plus_one_document():
    docs = ["x" * (100 + 37 * (i % 5)) for i in range(300)]
    read = 0

    def counted():
        nonlocal read
        for doc in docs:
            read += 1
            yield doc

    out, held_chars = [], []
    for doc in shuffled(counted(), Shuffle(seed=0, buffer=1000, max_chars=2000), epoch=0):
        out.append(doc)
        held_chars.append(sum(len(d) for d in docs[:read]) - sum(len(d) for d in out))
    assert sorted(out) == sorted(docs)
    assert max(held_chars) <= 2000 + max(len(d) for d in docs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Short real documents (a line of a play each) and a tokenizer trained on them."""
    tmp = tmp_path_factory.mktemp("shuffle")
    lines = corpus_lines("plays", 120)
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tok = train_tokenizer([([str(path)], "text")], str(tmp / "tok"), 400, 400)
    return str(path), tok


def global_blocks(setup, world: int, steps: int, shuffle: Shuffle | None, micro: int = 2) -> list[list[int]]:
    """The blocks of `steps` steps of all ranks, in the global order (block g is rank g % world's)."""
    path, tok = setup
    streams = [
        TrainStream([path], "text", tok, SEQ_LEN, r, world, micro, shuffle=shuffle) for r in range(world)
    ]
    per_rank = [[b for batch in _take(s, steps) for b in batch.tolist()] for s in streams]
    return [per_rank[g % world][g // world] for g in range(world * micro * steps)]


def _take(stream: TrainStream, n: int) -> list[torch.Tensor]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_shuffled_stream_is_the_same_global_sequence_at_every_world_size(setup):
    """Across the first epoch's end too: the corpus has about 60 blocks, 6 steps x 12 blocks is 72."""
    shuffle = Shuffle(seed=5, buffer=30)
    one = global_blocks(setup, 1, 36, shuffle)
    assert global_blocks(setup, 2, 18, shuffle) == one
    assert global_blocks(setup, 3, 12, shuffle) == one
    plain = global_blocks(setup, 1, 36, None)
    assert one != plain and sorted(one[:20]) != sorted(plain[:20])  # another sample, not only other order


def test_seeds_give_other_batches(setup):
    a = global_blocks(setup, 2, 3, Shuffle(seed=1, buffer=30))
    assert a == global_blocks(setup, 2, 3, Shuffle(seed=1, buffer=30))
    assert a != global_blocks(setup, 2, 3, Shuffle(seed=2, buffer=30))


@pytest.mark.parametrize("consumed", [0, 3, 14, 17])
def test_shuffled_stream_resumes_with_the_very_next_batch(setup, consumed):
    """14 and 17 steps of 2 ranks x 2 blocks are past the first epoch, whose order is another."""
    path, tok = setup
    shuffle = Shuffle(seed=9, buffer=30)
    first = TrainStream([path], "text", tok, SEQ_LEN, 1, 2, 2, shuffle=shuffle)
    it = iter(first)
    for _ in range(consumed):
        next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = TrainStream([path], "text", tok, SEQ_LEN, 1, 2, 2, shuffle=shuffle)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 5), expected, strict=True))


def test_resume_refuses_another_shuffle(setup):
    path, tok = setup
    state = TrainStream([path], "text", tok, SEQ_LEN, 0, 1, 2, shuffle=Shuffle(seed=1)).state_dict()
    with pytest.raises(DataError, match="shuffle"):
        TrainStream([path], "text", tok, SEQ_LEN, 0, 1, 2, shuffle=Shuffle(seed=2)).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle"):
        TrainStream([path], "text", tok, SEQ_LEN, 0, 1, 2).load_state_dict(state)


def test_an_empty_or_tiny_stream_comes_out_whole():
    assert list(shuffled([], Shuffle(seed=0), epoch=0)) == []
    assert sorted(shuffled(DOCS[:3], Shuffle(seed=0), epoch=0)) == sorted(DOCS[:3])
