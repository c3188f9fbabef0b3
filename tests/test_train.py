"""The training loop's pieces that need no engine (the loop itself runs in tests/distributed/)."""

from __future__ import annotations

import pytest
import torch

from pretrain.data import BadRecord, DataError
from pretrain.results import RunResults
from pretrain.train import _next_batch, _unread_message, row_scored


def _batches(error: Exception):
    yield torch.ones((2, 4), dtype=torch.long)
    raise error


@pytest.mark.parametrize(
    "error",
    [
        BadRecord("c.jsonl: line 7 (record 7): not valid JSON"),
        DataError("c.jsonl changed since it was pre-tokenized"),
        FileNotFoundError(2, "No such file", "c.jsonl"),
    ],
)
def test_a_batch_that_cannot_be_read_gives_a_stand_in_and_the_reason(error):
    # a rank that raised here left the others in the step's collective: it forwards a stand-in instead
    batches = _batches(error)
    batch, unread = _next_batch(batches)
    assert unread is None and batch.shape == (2, 4)
    stand_in, unread = _next_batch(batches)
    assert unread is error and stand_in.dtype == torch.long and stand_in.ndim == 2
    message = _unread_message(unread)  # one process: its own reason
    assert message.startswith(f"rank 0 could not read its next batch: {error}.")
    # skipping is the way on past a bad record only, not past a changed or missing file
    assert ("--set train.on_bad_record=skip" in message) == isinstance(error, BadRecord)


def test_other_errors_are_not_taken_for_unreadable_data():
    # a bug in the stream is no bad record: it must not be checkpointed past as one
    with pytest.raises(KeyError):
        batches = _batches(KeyError("position"))
        _next_batch(batches)
        _next_batch(batches)


def test_a_row_is_scored_when_every_configured_task_has_a_score():
    # a resume at a phase's checkpoint scores the row unless metrics.json has it; a task dropped from
    # eval.tasks on an earlier resume leaves an empty cell in later rows, which must not ask for a scoring
    results = RunResults(domains=["a"], phases=["a", "a"], method={})
    results.set_accuracy(1, {"accuracy": {"t1": 0.5, "t2": 0.25}})
    results.set_accuracy(2, {"accuracy": {"t1": 0.75}})  # t2 dropped on a resume
    assert results.accuracy[2] == [0.75, None]
    assert row_scored(results, 2, ["t1"]) and not row_scored(results, 2, ["t1", "t2"])
    assert not row_scored(results, 3, ["t1"])  # not there at all (a kill while scoring it)
    assert row_scored(results, 1, ["t1", "t2"]) and not row_scored(results, 1, ["t1", "t3"])  # t3 added
