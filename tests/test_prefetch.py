"""pretrain.prefetch: a stream's batches made ahead in a thread are the stream's own, and what a checkpoint
records is the position of the batches handed out, never the read-ahead."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import corpus_lines, texts_jsonl

from pretrain.data import DataError, TrainStream
from pretrain.prefetch import Prefetched
from pretrain.tokenizer import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return texts_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl", corpus_lines("plays", 60))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer([([corpus], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 400, 400)


def stream(corpus, tokenizer, rank=0, world=2) -> TrainStream:
    return TrainStream([corpus], "text", tokenizer, SEQ_LEN, rank, world, 2)


def reference(corpus, tokenizer, n: int) -> list[tuple[torch.Tensor, dict]]:
    """The first n batches of a stream read in the loop, each with the state just after it."""
    plain = stream(corpus, tokenizer)
    it = iter(plain)
    return [(next(it), plain.state_dict()) for _ in range(n)]


def wait_until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_same_batches_and_states_while_the_thread_reads_ahead(corpus, tokenizer):
    expected = reference(corpus, tokenizer, 40)  # past the end of the first epoch (about 25 batches)
    inner = stream(corpus, tokenizer)
    feed = Prefetched(inner, depth=3)
    start = feed.state_dict()
    assert start == inner.state_dict() and start["block"] == 0
    it = iter(feed)
    try:
        for i, (batch, state) in enumerate(expected):
            assert torch.equal(next(it), batch), i
            assert feed.state_dict() == state, i
            if i == 5:  # 3 more queued and a fourth made, waiting for room: the stream is 4 batches ahead
                assert wait_until(lambda: inner.state_dict() == expected[9][1])
                assert feed.state_dict() == state != inner.state_dict()
    finally:
        feed.close()


@pytest.mark.parametrize("taken", [0, 1, 7, 30])
def test_a_stream_resumed_from_the_feeds_state_continues_with_the_next_batch(corpus, tokenizer, taken):
    expected = reference(corpus, tokenizer, taken + 5)
    feed = Prefetched(stream(corpus, tokenizer), depth=2)
    it = iter(feed)
    for _ in range(taken):
        next(it)
    state = feed.state_dict()
    feed.close()
    resumed = stream(corpus, tokenizer)
    resumed.load_state_dict(state)
    got = iter(resumed)
    assert all(torch.equal(next(got), batch) for batch, _ in expected[taken:])


@pytest.mark.parametrize("limit", [0, 1, 5])
def test_the_thread_makes_no_batch_past_its_limit(corpus, tokenizer, limit):
    """A phase's read-ahead stops at the phase's last micro-batch: the stream itself ends where the
    limit-th batch left it, however long the thread is given, and asking for more is an error."""
    expected = reference(corpus, tokenizer, limit + 3)
    inner = stream(corpus, tokenizer)
    start = inner.state_dict()
    feed = Prefetched(inner, depth=3, limit=limit)
    it = iter(feed)
    try:
        got = [next(it) for _ in range(limit)]
        assert all(torch.equal(g, b) for g, (b, _) in zip(got, expected, strict=False))
        assert wait_until(lambda: not feed._thread.is_alive())
        assert inner.state_dict() == (expected[limit - 1][1] if limit else start)
        with pytest.raises(RuntimeError, match=f"more than the {limit} batches"):
            next(it)
    finally:
        feed.close()


class Failing:
    """Two batches, then the error a bad record raises in the stream."""

    def __init__(self):
        self.made = 0

    def state_dict(self) -> dict:
        return {"made": self.made}

    def __iter__(self):
        for i in range(2):
            self.made += 1
            yield torch.tensor([i])
        raise DataError("train.jsonl: line 51: unterminated string")


def test_an_error_in_the_thread_is_raised_by_the_next_that_reaches_it():
    feed = Prefetched(Failing(), depth=4)
    it = iter(feed)
    assert [next(it).item(), next(it).item()] == [0, 1] and feed.state_dict() == {"made": 2}
    with pytest.raises(DataError, match="line 51"):
        next(it)
    feed.close()


def test_a_finite_stream_ends_the_iteration():
    class Finite(Failing):
        def __iter__(self):
            yield from (torch.tensor([i]) for i in range(3))

    feed = Prefetched(Finite(), depth=2)
    assert [b.item() for b in feed] == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(feed)


def test_close_stops_a_thread_waiting_for_room(corpus, tokenizer):
    feed = Prefetched(stream(corpus, tokenizer), depth=1)
    next(iter(feed))
    thread = feed._thread
    # the next batch is made and queued; the thread waits with the one after it for room
    assert wait_until(lambda: feed._queue.full())
    assert thread.is_alive()
    feed.close()
    assert not thread.is_alive()
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_depth_must_be_positive(corpus, tokenizer):
    with pytest.raises(ValueError, match="prefetch depth 0"):
        Prefetched(stream(corpus, tokenizer), depth=0)
