"""The trainer's throughput meter: tokens/s and the share of time spent waiting for data.

Time comes from a clock the test advances by hand, so the arithmetic is exact and the test does not
depend on how fast the machine is.
"""

from __future__ import annotations

import pytest
import torch

import pretrain.train as train_module
from pretrain.train import ThroughputMeter, TimedBatches


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(train_module.time, "perf_counter", c)
    return c


def test_waiting_for_batches_is_measured_per_interval_and_per_phase(clock):
    def slow_batches():
        while True:
            clock.now += 0.25  # reading and tokenizing
            yield torch.zeros(2, 4, dtype=torch.long)

    batches = TimedBatches(slow_batches())
    meter = ThroughputMeter(tokens_per_step=8, batches=batches)
    for loss in (1.0, 3.0):  # two steps: 0.25 s waiting + 0.75 s computing each
        next(batches)
        clock.now += 0.75
        meter.add(loss)
    first = meter.flush()
    assert first == {"loss": 2.0, "tokens_per_s": 8.0, "data_wait_share": 0.25}
    next(batches)  # a step that waits 0.25 s and computes 0.25 s
    clock.now += 0.25
    meter.add(5.0)
    assert meter.flush()["data_wait_share"] == 0.5
    totals = meter.totals()
    assert totals["data_wait_seconds"] == 0.75 and totals["seconds"] == 2.5
    assert totals["data_wait_share"] == 0.3 and totals["tokens_per_s"] == 24 / 2.5
    # steps of 1.0, 1.0 and 0.5 s, each from the previous step's end (the first from the phase's start)
    assert totals["step_seconds_median"] == 1.0 and totals["step_seconds_max"] == 1.0


def test_the_median_step_leaves_out_a_stall_that_the_mean_and_the_longest_show(clock):
    meter = ThroughputMeter(tokens_per_step=8)
    for seconds in (0.5, 0.5, 3.0, 0.5):  # the third step ends with a checkpoint
        clock.now += seconds
        meter.add(1.0)
    totals = meter.totals()
    assert totals["seconds"] / 4 == 1.125
    assert totals["step_seconds_median"] == 0.5 and totals["step_seconds_max"] == 3.0


def test_a_stream_that_ends_still_counts_its_wait(clock):
    def two():
        for _ in range(2):
            clock.now += 1.0
            yield torch.zeros(1)
        clock.now += 0.5

    batches = TimedBatches(two())
    assert len(list(batches)) == 2 and batches.waited == 2.5
