"""Replay: which blocks are replayed (exact share, any world size), where they come from, resume."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from conftest import corpus_lines, texts_jsonl, tiny_run_config

from pretrain.config import validate
from pretrain.data import SkipCounter, TrainStream
from pretrain.replay import (
    ReplayStream,
    locate,
    phase_share,
    replay_count,
    replay_sources,
    replay_summary,
    reshard_replay_state,
)
from pretrain.results import RunResults
from pretrain.tokenizer import train_tokenizer

SEQ_LEN = 16


@pytest.mark.parametrize("share", [Fraction(1, 100), Fraction(1, 20), Fraction(1, 4), Fraction(7, 9)])
def test_every_prefix_holds_the_share_to_one_block(share):
    replayed = 0
    for n in range(1, 2001):
        replayed += locate(n - 1, share, sources=3)[0] is not None
        assert replayed == replay_count(n, share) == n * share.numerator // share.denominator
        assert abs(replayed - n * share) < 1


def test_replay_blocks_take_the_sources_in_turn_and_the_domain_keeps_its_order():
    where = [locate(i, Fraction(1, 4), sources=2) for i in range(16)]
    assert [w for w in where if w[0] is not None] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [w[1] for w in where if w[0] is None] == list(range(12))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    files = {
        name: texts_jsonl(d / f"{name}.jsonl", corpus_lines(name, 60)) for name in ("news", "plays", "docs")
    }
    tok = train_tokenizer([([f], "text") for f in files.values()], str(d / "tok"), 400, 400)
    return files, tok


def _blocks(files, tok, name) -> list[list[int]]:
    """A corpus's blocks in stream order, over several epochs."""
    it = iter(TrainStream([files[name]], "text", tok, SEQ_LEN, 0, 1, 1))
    return [next(it)[0].tolist() for _ in range(400)]


def _replay(files, tok, rank, world, micro=2, share=Fraction(1, 4)) -> ReplayStream:
    sources = {n: ([files[n]], "text", None) for n in ("news", "docs")}
    return ReplayStream(([files["plays"]], "text", None), sources, share, tok, SEQ_LEN, rank, world, micro)


def _global_sequence(files, tok, world, micro_steps, micro=2) -> list[list[int]]:
    """The phase's blocks in global order: micro-step by micro-step, rank r's i-th block at i * W + r."""
    iters = [iter(_replay(files, tok, r, world, micro)) for r in range(world)]
    out = []
    for _ in range(micro_steps):
        batches = [next(it).tolist() for it in iters]
        out += [batches[r][i] for i in range(micro) for r in range(world)]
    return out


def test_the_global_block_sequence_is_the_same_for_every_world_size(corpora):
    files, tok = corpora
    one = _global_sequence(files, tok, world=1, micro_steps=24, micro=6)  # 144 blocks
    assert _global_sequence(files, tok, world=2, micro_steps=24, micro=3) == one
    assert _global_sequence(files, tok, world=3, micro_steps=24, micro=2) == one
    own, news, docs = (_blocks(files, tok, n) for n in ("plays", "news", "docs"))
    expected = []
    for i in range(144):
        source, index = locate(i, Fraction(1, 4), 2)
        expected.append((own, news, docs)[0 if source is None else source + 1][index])
    assert one == expected  # the replayed blocks are the sources' own blocks, in their stream order
    assert sum(b in news[:20] or b in docs[:20] for b in one) >= 36  # a quarter of 144 from the sources


def test_a_resumed_replay_stream_continues_exactly(corpora):
    files, tok = corpora
    whole = _replay(files, tok, rank=1, world=2)
    it = iter(whole)
    reference = [next(it) for _ in range(30)]
    first = _replay(files, tok, rank=1, world=2)
    it = iter(first)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it (torch.save of plain data)
    resumed = _replay(files, tok, rank=1, world=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert all(torch.equal(next(it), ref) for ref in reference[11:])


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 3), (3, 2)])
def test_a_resume_on_another_world_size_continues_the_global_block_sequence(corpora, old, new):
    files, tok = corpora
    micro, consumed = 2, 5
    before = [_replay(files, tok, r, old, micro) for r in range(old)]
    iters = [iter(s) for s in before]
    taken = []
    for _ in range(consumed):
        batches = [next(it).tolist() for it in iters]
        taken += [batches[r][i] for i in range(micro) for r in range(old)]
    states = [s.state_dict() for s in before]
    after = [_replay(files, tok, r, new, micro) for r in range(new)]
    for r, s in enumerate(after):
        s.load_state_dict(reshard_replay_state(states, r, new))
    iters, rounds = [iter(s) for s in after], 40
    for _ in range(rounds):
        batches = [next(it).tolist() for it in iters]
        taken += [batches[r][i] for i in range(micro) for r in range(new)]
    whole = _global_sequence(files, tok, world=1, micro_steps=len(taken) // micro, micro=micro)
    assert taken == whole


def test_a_state_of_another_share_or_world_is_refused(corpora):
    files, tok = corpora
    state = _replay(files, tok, rank=0, world=2).state_dict()
    with pytest.raises(ValueError, match="replay share"):
        _replay(files, tok, rank=0, world=2, share=Fraction(1, 10)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        _replay(files, tok, rank=0, world=1).load_state_dict(state)


def test_phase_sources_and_share_from_the_config(tmp_path):
    cfg = tiny_run_config(tmp_path, domains=("news", "plays", "docs"))
    cfg["phases"].append({"domain": "news", "steps": 2, "replay_share": 0.05})
    general = cfg["domains"][2]["train"]
    cfg["replay"] = {"share": 0.01, "sources": [{"name": "general", "train": general}]}
    run = validate(cfg)
    assert [s.name for s in replay_sources(run, 1)] == ["general"]
    assert [s.name for s in replay_sources(run, 3)] == ["news", "plays", "general"]
    assert [s.name for s in replay_sources(run, 4)] == ["plays", "docs", "general"]  # not its own domain
    assert phase_share(run, 2) == Fraction(1, 100) and phase_share(run, 4) == Fraction(1, 20)
    run.replay.sources = []
    assert phase_share(run, 1) == 0  # nothing earlier to replay


def test_summary_counts_the_replayed_tokens_per_source():
    summary = replay_summary(Fraction(1, 100), ["news", "general"], blocks=1000, seq_len=32)
    assert summary["replay_blocks"] == 10 and summary["share_used"] == 0.01
    assert summary["tokens"] == {"news": 5 * 32, "general": 5 * 32}
    odd = replay_summary(Fraction(1, 20), ["a", "b", "c"], blocks=100, seq_len=8)
    assert odd["tokens"] == {"a": 16, "b": 16, "c": 8}


def test_bad_records_of_a_replay_source_are_counted_under_its_name(corpora, tmp_path):
    files, tok = corpora
    lines = open(files["news"], encoding="utf-8").read().splitlines()
    news = tmp_path / "news.jsonl"
    news.write_text("\n".join(lines[:3] + ['{"text": 7}'] + lines[3:]) + "\n")
    sources = {"news": ([str(news)], "text", SkipCounter()), "docs": ([files["docs"]], "text", SkipCounter())}
    own = ([files["plays"]], "text", SkipCounter())
    stream = ReplayStream(own, sources, Fraction(1, 2), tok, SEQ_LEN, 0, 1, 2)
    it = iter(stream)
    for _ in range(20):
        next(it)
    assert {name: s.count for name, s in stream.source_skips().items()} == {"news": 1, "docs": 0}
    results = RunResults(domains=["news", "docs", "plays"], phases=["news", "docs", "plays"], method={})
    results.count_skipped("train", "news", SkipCounter(count=1))  # phase 1 met the same record
    for name, skip in stream.source_skips().items():
        results.count_skipped("train", name, skip)
    assert results.skipped_records["train"] == {"news": 1, "docs": 0}  # one bad record, met twice
