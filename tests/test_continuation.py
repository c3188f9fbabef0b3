"""pretrain.continuation: a domain trained again in a later phase takes the blocks right after those its
earlier phase trained on, on any number of ranks, with or without replay in either phase."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from conftest import corpus_lines, global_blocks, texts_jsonl

from pretrain.continuation import continue_stream, stream_end, stream_position
from pretrain.data import DataError, SkipCounter, TrainStream
from pretrain.replay import ReplayStream, locate, replay_count
from pretrain.tokenizer import train_tokenizer

SEQ_LEN = 16
SHARE = Fraction(1, 4)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """plays: 60 lines, about a hundred blocks, so the phases below cross an epoch end."""
    d = tmp_path_factory.mktemp("continuation")
    files = {name: texts_jsonl(d / f"{name}.jsonl", corpus_lines(name, 60)) for name in ("news", "plays")}
    tok = train_tokenizer([([f], "text") for f in files.values()], str(d / "tok"), 400, 400)
    return files, tok


def _plain(corpora, rank, world, micro=2, skip=None) -> TrainStream:
    files, tok = corpora
    return TrainStream([files["plays"]], "text", tok, SEQ_LEN, rank, world, micro, skip)


def _replay(corpora, rank, world, micro=2) -> ReplayStream:
    files, tok = corpora
    own, sources = ([files["plays"]], "text", None), {"news": ([files["news"]], "text", None)}
    return ReplayStream(own, sources, SHARE, tok, SEQ_LEN, rank, world, micro)


def _end(streams) -> dict:
    """As the trainer keeps it: every rank's state gathered, the end through a checkpoint (JSON-like)."""
    return json.loads(json.dumps(stream_end([stream_position(s.state_dict()) for s in streams])))


def _continued(make, corpora, world: int, end: dict) -> list:
    streams = [make(corpora, r, world) for r in range(world)]
    for s in streams:
        continue_stream(s, end)
    return streams


@pytest.mark.parametrize(("old", "new"), [(2, 2), (2, 3), (3, 1)])
@pytest.mark.parametrize("micro_steps", [5, 40])  # 40 x 2 blocks x 2-3 ranks: past the first epoch's end
def test_a_later_phase_takes_the_blocks_after_the_earlier_one(corpora, old, new, micro_steps):
    first = [_plain(corpora, r, old) for r in range(old)]
    taken = global_blocks(first, micro_steps)
    later = global_blocks(_continued(_plain, corpora, new, _end(first)), 30)
    whole = global_blocks([_plain(corpora, 0, 1, micro=1)], len(taken) + len(later))
    assert taken + later == whole


def test_replay_in_either_phase_continues_the_domains_own_blocks(corpora):
    """Phase 1 plain, phase 2 with replay (its own blocks go on from phase 1's), phase 3 plain again (from
    the last of phase 2's own blocks): the replayed blocks come between, the domain's own never repeat."""
    own = global_blocks([_plain(corpora, 0, 1, micro=1)], 400)
    first = [_plain(corpora, r, 2) for r in range(2)]
    taken = global_blocks(first, 7)  # 28 blocks
    replayed = _continued(_replay, corpora, 3, _end(first))
    mixed = global_blocks(replayed, 10)  # 60 blocks, 15 of them replayed
    ours = [b for i, b in enumerate(mixed) if locate(i, SHARE, 1)[0] is None]
    assert len(ours) == 60 - replay_count(60, SHARE) == 45
    assert taken + ours == own[:73]
    third = global_blocks(_continued(_plain, corpora, 2, _end(replayed)), 6)
    assert third == own[73:97]


def test_bad_records_are_counted_once_over_the_phases(corpora, tmp_path):
    files, tok = corpora
    lines = open(files["plays"], encoding="utf-8").read().splitlines()
    dirty = tmp_path / "plays.jsonl"
    dirty.write_text("\n".join(lines[:2] + ['{"text": 7}'] + lines[2:]) + "\n")
    first = TrainStream([str(dirty)], "text", tok, SEQ_LEN, 0, 1, 2, SkipCounter())
    global_blocks([first], 3)
    assert first.skip.count == 1
    later = TrainStream([str(dirty)], "text", tok, SEQ_LEN, 0, 1, 2, SkipCounter())
    continue_stream(later, _end([first]))
    global_blocks([later], 3)
    assert later.skip.count == 1  # the domain's count so far: phase 1's record, not met again


@pytest.mark.parametrize("make", [_plain, _replay])
def test_a_domain_file_changed_between_its_phases_is_refused(corpora, tmp_path, make):
    # a resume checked the sizes but the next phase of the domain did not: it went on mid-corpus in the
    # regenerated file, repeating or skipping documents without a word
    files, tok = corpora
    copy = tmp_path / "plays.jsonl"
    copy.write_text(open(files["plays"], encoding="utf-8").read())
    mine = ({**files, "plays": str(copy)}, tok)
    first = [make(mine, r, 2) for r in range(2)]
    global_blocks(first, 3)
    end = _end(first)
    _continued(make, mine, 2, end)  # unchanged: goes on
    with copy.open("a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    with pytest.raises(DataError, match=r"plays\.jsonl: \d+ bytes when the run began to read it"):
        _continued(make, mine, 2, end)
