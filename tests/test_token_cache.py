"""pretrain.token_cache: pre-tokenized files give the streams exactly the blocks, order, resume positions and
bad-record counts of tokenizing the text; a missing or stale cache is an error before training; the verb."""

from __future__ import annotations

import json
import socket
import subprocess
from itertools import islice

import pytest
from conftest import corpus, corpus_lines, run_single, tiny_run_config, write_config, write_jsonl

from pretrain import data, token_cache
from pretrain.cli import main as cli
from pretrain.data import DataError, SkipCounter, TrainStream
from pretrain.shuffle import Shuffle
from pretrain.token_cache import TokenCache
from pretrain.tokenizer import train_tokenizer

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    src = write_jsonl(
        tmp_path_factory.mktemp("src") / "a.jsonl",
        [{"text": t} for t in corpus_lines("news", 200) + corpus_lines("plays", 200)],
    )
    return train_tokenizer([([src], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 400, 400)


@pytest.fixture
def pieces(monkeypatch):
    """Documents over 300 characters are tokenized in pieces, and the cache hands out 7 ids at a time:
    both paths cut, and must still agree."""
    monkeypatch.setattr(data, "PIECE_CHARS", 300)
    monkeypatch.setattr(token_cache, "READ_TOKENS", 7)


@pytest.fixture
def files(tmp_path, pieces) -> list[str]:
    """Two files of play lines, a few documents joined into long ones (cut into pieces), one empty line."""
    lines = corpus_lines("plays", 90)
    docs = lines[:40] + [" ".join(lines[40:60]), " ".join(lines[60:75])] + lines[75:]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs[:30]] + [{"text": "  "}])
    return [a, write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs[30:]])]


def streams(files, tokenizer, cache, world=1, shuffle=None, skip=False):
    """(text stream, cached stream) per rank, each with its own SkipCounter if `skip`."""
    pairs = []
    for rank in range(world):
        args = (files, "text", tokenizer, SEQ_LEN, rank, world, 2)
        pairs.append(
            tuple(
                TrainStream(*args, SkipCounter() if skip else None, shuffle=shuffle, cache=c)
                for c in (None, cache)
            )
        )
    return pairs


def batches(stream, n: int) -> list[list[list[int]]]:
    return [b.tolist() for b in islice(iter(stream), n)]


@pytest.mark.parametrize("world", [1, 3])
# max_chars: the buffer also hands documents out by their characters, which a cached document must count
@pytest.mark.parametrize(
    "shuffle", [None, Shuffle(7, buffer=5, max_chars=300)], ids=["file-order", "shuffled"]
)
def test_cached_streams_give_the_text_streams_batches_over_epochs_and_a_resume(
    tmp_path, files, tokenizer, world, shuffle
):
    cache = TokenCache(tmp_path / "cache", tokenizer)
    cache.build(files, "text", skip_bad=False)
    for text, cached in streams(files, tokenizer, cache, world, shuffle):
        expected = batches(text, 60)  # about three epochs of these ~40-batch files on one rank
        it = iter(cached)
        assert [b.tolist() for b in islice(it, 23)] == expected[:23]
        resumed = streams(files, tokenizer, cache, world, shuffle)[text.rank][1]
        resumed.load_state_dict(cached.state_dict())  # mid-epoch, mid-document
        assert cached.state_dict()["offset"] or cached.state_dict()["doc"]
        assert batches(resumed, 37) == expected[23:]


def test_bad_records_are_counted_where_reading_the_text_counts_them(tmp_path, tokenizer, pieces):
    lines = corpus_lines("plays", 40)  # short lines: about 25 blocks an epoch
    bad = ["{not json", {"other": "no text"}, {"text": 3}]
    records = [{"text": t} for t in lines[:10]] + bad[:1] + [{"text": t} for t in lines[10:30]] + bad[1:]
    path = write_jsonl(tmp_path / "bad.jsonl", records + [{"text": t} for t in lines[30:]])
    cache = TokenCache(tmp_path / "cache", tokenizer)
    cache.build([path], "text", skip_bad=True)
    ((text, cached),) = streams([path], tokenizer, cache, skip=True)
    for n in (1, 5, 30):  # before, between and past the bad records, then over epochs
        assert batches(cached, n) == batches(text, n)
        position = {k: v for k, v in text.state_dict().items() if k != "skipped"}
        assert {k: v for k, v in cached.state_dict().items() if k != "skipped"} == position
    # counted once each, not again in later epochs (reading the text counts a record when it reads ahead
    # to tokenize, up to 256 documents before the stream reaches it; the cache when it reaches it)
    assert cached.skip == text.skip and text.skip.count == 3
    assert cached.state_dict() == text.state_dict()
    strict_cache = TokenCache(tmp_path / "strict", tokenizer)
    with pytest.raises(DataError, match="line 11"):  # on_bad_record: error pre-tokenizes nothing of it
        strict_cache.build([path], "text", skip_bad=False)
    assert list((tmp_path / "strict").iterdir()) == []
    strict = TrainStream([path], "text", tokenizer, SEQ_LEN, 0, 1, 1, None, min_blocks=1, cache=cache)
    with pytest.raises(DataError, match="line 11"):  # a run that stops at bad records stops here too
        batches(strict, 40)


def test_a_missing_or_stale_cache_names_the_file_and_the_command(tmp_path, files, tokenizer):
    cache = TokenCache(tmp_path / "cache", tokenizer)
    with pytest.raises(DataError, match=r"a\.jsonl: not pre-tokenized .* pretrain pretokenize"):
        cache.check(files, "text")
    cache.build(files, "text", skip_bad=False)
    cache.check(files, "text")
    with pytest.raises(DataError, match="not pre-tokenized"):  # the same files, another text field
        cache.check(files, "body")
    with open(files[1], "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl: changed since it was pre-tokenized"):
        cache.check(files, "text")
    built = cache.build(files, "text", skip_bad=False)
    assert [m["built_s"] is None for m in built] == [True, False]  # only the changed file again
    other = train_tokenizer([([files[0]], "text")], str(tmp_path / "tok2"), 360, 400)
    with pytest.raises(DataError, match="not pre-tokenized for this tokenizer"):
        TokenCache(tmp_path / "cache", other).check(files, "text")


@pytest.mark.parametrize("torn", ["", "[]", '{"format": 1}'])
def test_a_torn_cache_is_named_and_built_again(tmp_path, files, tokenizer, torn):
    """What a node crash can leave of meta.json: training names it, pretokenize builds it again."""
    cache = TokenCache(tmp_path / "cache", tokenizer)
    cache.build(files, "text", skip_bad=False)
    meta = cache.directory(files[0], "text") / "meta.json"
    whole = meta.read_text()
    meta.write_text(torn)
    with pytest.raises(DataError, match=r"a\.jsonl: its pre-tokenized cache .* is unreadable.*pretokenize"):
        cache.check(files, "text")
    assert [m["built_s"] is None for m in cache.build(files, "text", skip_bad=False)] == [False, True]
    assert meta.read_text() == whole
    cache.check(files, "text")


def test_a_build_removes_what_killed_builds_left_and_nothing_else(tmp_path, files, tokenizer):
    # a SIGKILLed pretokenize left its half-built copy (up to a file's ids) for good: the next had its own
    cache = TokenCache(tmp_path / "cache", tokenizer)
    final, host = cache.directory(files[0], "text"), socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = {
        "killed": final.with_name(f"{final.name}.tmp-{host}-{dead.pid}"),
        "running": final.with_name(f"{final.name}.tmp-{host}-1"),  # pid 1 lives: a build still going
        "elsewhere": final.with_name(f"{final.name}.tmp-otherhost-{dead.pid}"),  # not ours to judge
        "host-2": final.with_name(f"{final.name}.tmp-{host}-2-{dead.pid}"),  # host `{host}-2`'s, not ours
    }
    for tmp in left.values():
        tmp.mkdir(parents=True)
        (tmp / "ids.bin").write_bytes(b"\0" * 64)
    cache.build(files, "text", skip_bad=False)
    assert [name for name, tmp in left.items() if tmp.exists()] == ["running", "elsewhere", "host-2"]
    cache.check(files, "text")


def test_pretokenize_verb_builds_once_and_needs_the_key(tmp_path, capsys):
    cfg = tiny_run_config(tmp_path, train={"token_cache": str(tmp_path / "cache")})
    path = write_config(cfg, tmp_path / "run.yaml")
    cli(["pretokenize", "--config", str(path)])
    first = capsys.readouterr().out
    assert first.count("tokenized in") == 2 and corpus("news")[0] in first
    ids = sorted((tmp_path / "cache").glob("*/ids.bin"))
    mtimes = [p.stat().st_mtime_ns for p in ids]
    cli(["pretokenize", "--config", str(path)])
    assert capsys.readouterr().out.count("up to date") == 2
    assert [p.stat().st_mtime_ns for p in ids] == mtimes and len(ids) == 2
    with pytest.raises(SystemExit) as exit_:
        cli(["pretokenize", "--config", str(write_config(tiny_run_config(tmp_path), tmp_path / "no.yaml"))])
    assert exit_.value.code == 2 and "key `train.token_cache`" in capsys.readouterr().err


def test_a_run_from_the_cache_trains_on_the_same_blocks(tmp_path):
    """One process, two phases, the second replaying the first's domain: the same losses to the last bit
    with the cache as without (the same blocks in the same order, through TrainStream and ReplayStream);
    and a run whose files are not pre-tokenized stops before it writes anything in its directory."""
    tok = {"path": str(tmp_path / "tokenizer")}
    losses = {}
    for name, train in (("text", {}), ("cached", {"token_cache": str(tmp_path / "cache")})):
        cfg = tiny_run_config(tmp_path / name, steps=4, train=train, tokenizer=tok, replay={"share": 0.25})
        if name == "cached":
            missing = run_single(["train", "--config", str(write_config(cfg, tmp_path / "missing.yaml"))])
            assert missing.returncode == 2 and "not pre-tokenized" in missing.stderr, missing.stderr[-2000:]
            assert not any((tmp_path / name / "run").iterdir())  # no config, checkpoint or metrics
            cli(["pretokenize", "--config", str(write_config(cfg, tmp_path / "pre.yaml"))])
        proc = run_single(["train", "--config", str(write_config(cfg, tmp_path / f"{name}.yaml"))])
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "run" / "metrics.json").read_text())
        losses[name] = [phase["losses"] for phase in metrics["train"]]
    assert losses["cached"] == losses["text"] and len(losses["text"]) == 2
