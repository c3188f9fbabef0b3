"""pretrain.data: each format, bad-input errors, skipping bad records, packing, rank sharding, epochs,
resume, held-out set."""

from __future__ import annotations

import json
import logging
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import corpus_lines, global_blocks, texts_jsonl

from pretrain.data import (
    DataError,
    SkipCounter,
    TrainStream,
    _pack,
    heldout_blocks,
    pack_blocks,
    read_documents,
    reshard_stream_state,
)
from pretrain.tokenizer import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    files = texts_jsonl(src / "a.jsonl", corpus_lines("news", 200) + corpus_lines("plays", 200))
    return train_tokenizer([([files], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 400, 400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """60 lines of a play: about a hundred 16-token blocks, whose count is no multiple of 2, 3, 4 or 6."""
    return texts_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl", corpus_lines("plays", 60))


@pytest.fixture(scope="module")
def blocks(corpus, tokenizer) -> list[list[int]]:
    """The single-rank block sequence of one epoch: the reference for sharding and resume."""
    ids = tokenizer(list(read_documents([corpus])), add_special_tokens=False)["input_ids"]
    out = list(pack_blocks(ids, SEQ_LEN, tokenizer.eos_token_id))
    assert len(out) % 12 not in (0, 6), f"pick a corpus whose {len(out)} blocks leave an incomplete round"
    return out


def stream(corpus, tokenizer, rank=0, world=1, micro=2) -> TrainStream:
    return TrainStream([corpus], "text", tokenizer, SEQ_LEN, rank, world, micro)


def take(it, n: int) -> list[torch.Tensor]:
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- packing


def test_pack_blocks_marks_document_ends_and_keeps_every_token():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [], [10, 11]]
    assert list(pack_blocks(docs, 4, eos_id=0)) == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0], [0, 10, 11, 0]]
    assert list(pack_blocks(docs, 5, eos_id=0)) == [[1, 2, 3, 0, 4], [0, 5, 6, 7, 8], [9, 0, 0, 10, 11]]


@pytest.mark.parametrize("seq_len", [1, 2, 3, 7, 16, 64])
def test_pack_blocks_drops_only_the_final_partial_block(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 30))] for _ in range(40)]
    stream_ = [t for d in docs for t in [*d, 0]]
    out = list(pack_blocks(docs, seq_len, eos_id=0))
    assert all(len(b) == seq_len for b in out)
    assert len(out) == len(stream_) // seq_len  # every complete block, so less than one block is dropped
    assert [t for b in out for t in b] == stream_[: len(out) * seq_len]


def test_pack_resumes_exactly_from_every_block_boundary():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 12))] for _ in range(30)]
    full = list(_pack(docs, 5, 0))
    for i, (_, doc, offset) in enumerate(full):
        rest = [b for b, _, _ in _pack(docs[doc:], 5, 0, doc, offset)]
        assert rest == [b for b, _, _ in full[i + 1 :]], f"resuming after block {i} at doc {doc} +{offset}"


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_reads_the_field_and_skips_empty_documents(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"body": "one", "text": "x"}\n\n{"body": ""}\n{"body": " \\n"}\n{"body": "two\\nlines"}\n'
    )
    assert list(read_documents([str(path)], text_field="body")) == ["one", "two\nlines"]


def test_json_array_and_files_in_order(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "first"}, {"text": "second"}]).encode())  # a BOM
    lines = texts_jsonl(tmp_path / "b.jsonl", ["third"])
    assert list(read_documents([lines, str(arr)])) == ["third", "first", "second"]


def test_txt_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Para one,\nstill one.\n\n\nPara two.\n\n   \n\nPara three\n")
    assert list(read_documents([str(path)])) == ["Para one,\nstill one.", "Para two.", "Para three"]


def test_parquet_reads_the_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["alpha", "", "gamma"]}), path)
    assert list(read_documents([str(path)], text_field="content")) == ["alpha", "gamma"]


BAD_INPUTS = [
    ("missing.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', ["line 3", "record 2", "'text'", "missing"]),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', ["line 2", "'text'", "null"]),
    ("number.jsonl", b'{"text": "a"}\n{"text": 5}\n', ["line 2", "'text'", "int", "expected a string"]),
    ("list.jsonl", b'{"text": "a"}\n{"text": ["b"]}\n', ["line 2", "'text'", "list"]),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b}\n{"text": "c"}\n', ["line 2", "not valid JSON"]),
    ("bytes.jsonl", b'{"text": "a"}\n{"text": "b\xff"}\n', ["line 2", "UTF-8"]),
    ("bytes.txt", b"fine\n\nstill fine\nbad \xfe here\n", ["line 4", "UTF-8"]),
    ("array.json", b'[{"text": "a"}, {"other": "b"}]', ["record 2", "'text'", "missing"]),
    ("unknown.csv", b"text\na\n", ["unknown file type", ".csv"]),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_line_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        list(read_documents([str(path)]))
    for part in [str(path), *expected]:
        assert part in str(err.value)


def test_bad_parquet_names_record_and_field(tmp_path):
    nulls, numbers = tmp_path / "nulls.parquet", tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    for path, expected in [(nulls, ["record 2", "'text'", "null"]), (numbers, ["record 1", "int"])]:
        with pytest.raises(DataError) as err:
            list(read_documents([str(path)]))
        for part in [str(path), *expected]:
            assert part in str(err.value)
    with pytest.raises(DataError, match="'body' is missing"):
        list(read_documents([str(nulls)], text_field="body"))


# ---------------------------------------------------------------------------------------------- streams


@pytest.mark.parametrize(("world", "micro"), [(1, 2), (2, 2), (3, 2), (3, 1)])
def test_ranks_share_the_block_sequence_without_overlap_across_epochs(
    corpus, tokenizer, blocks, world, micro
):
    """Rank r's k-th block is block k*world+r of the endless stream: epoch 1 repeats the blocks after N."""
    n = len(blocks)
    steps = 2 * n // (world * micro) + 2  # past the end of the second epoch
    seen: dict[int, list[int]] = {}
    for rank in range(world):
        batches = take(iter(stream(corpus, tokenizer, rank, world, micro)), steps)
        assert all(b.shape == (micro, SEQ_LEN) and b.dtype == torch.long for b in batches)
        for step, batch in enumerate(batches):
            for row, block in enumerate(batch.tolist()):
                g = (step * micro + row) * world + rank
                assert g not in seen
                seen[g] = block
    assert sorted(seen) == list(range(steps * micro * world))  # no gap, no overlap
    assert [seen[g] for g in range(n)] == blocks  # the first epoch is the single-rank sequence
    assert [seen[g] for g in range(n, 2 * n)] == blocks  # and then it starts again


def test_every_rank_keeps_getting_batches_for_many_epochs(corpus, tokenizer, blocks):
    steps = 4 * len(blocks) // 6 + 1
    for rank in range(3):
        batches = take(iter(stream(corpus, tokenizer, rank, 3, 2)), steps)
        assert len(batches) == steps
    assert stream(corpus, tokenizer, 0, 3, 2)._pos.epoch == 0


@pytest.mark.parametrize("consumed", [0, 1, 4, 7, 8, 9, 13])
def test_resume_continues_with_the_very_next_batch(corpus, tokenizer, blocks, consumed):
    # 2 ranks x 2 blocks: an epoch of N blocks lasts N/4 steps, so these points straddle epoch ends
    first = stream(corpus, tokenizer, rank=1, world=2)
    it = iter(first)
    take(it, consumed)
    state = first.state_dict()
    expected = take(it, 5)
    resumed = stream(corpus, tokenizer, rank=1, world=2)
    resumed.load_state_dict(state)
    got = take(iter(resumed), 5)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_state_dict_is_a_snapshot_with_epoch_and_block(corpus, tokenizer, blocks):
    s = stream(corpus, tokenizer, rank=0, world=2)
    it = iter(s)
    before = s.state_dict()
    take(it, len(blocks) // 4 + 1)  # into the second epoch
    after = s.state_dict()
    assert (before["epoch"], before["block"]) == (0, 0)
    assert after["epoch"] == 1 and after["block"] > 0
    assert s.state_dict() == after and before["epoch"] == 0


def test_resume_refuses_a_corpus_file_changed_since_the_checkpoint(tmp_path, tokenizer):
    # the position counts blocks: in a regenerated or appended corpus it resumed at other documents
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 9}) + "\n" for i in range(40)))
    first = stream(str(path), tokenizer)
    take(iter(first), 3)
    state = first.state_dict()
    stream(str(path), tokenizer).load_state_dict(state)  # unchanged: resumes
    with path.open("a") as f:
        f.write(json.dumps({"text": "appended"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl: \d+ bytes when the run began to read it, \d+ now"):
        stream(str(path), tokenizer).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "file_sizes"}  # a checkpoint from before sizes were kept
    stream(str(path), tokenizer).load_state_dict(old)


def test_resume_refuses_another_world_size(corpus, tokenizer):
    state = stream(corpus, tokenizer, rank=0, world=2).state_dict()
    with pytest.raises(DataError, match="world_size"):
        stream(corpus, tokenizer, rank=0, world=1).load_state_dict(state)


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("consumed", [1, 5, 9])
def test_a_resume_on_another_world_size_continues_the_global_block_sequence(
    corpus, tokenizer, blocks, old, new, consumed
):
    """Elastic resume: the new ranks take exactly the blocks the old ranks would have taken next, also
    across epoch ends (the points straddle them; 3 ranks do not divide an epoch, so rounds cross it)."""
    micro = 2
    before = [stream(corpus, tokenizer, r, old, micro) for r in range(old)]
    taken = global_blocks(before, consumed)
    states = [s.state_dict() for s in before]
    after = [stream(corpus, tokenizer, r, new, micro) for r in range(new)]
    for r, s in enumerate(after):
        s.load_state_dict(reshard_stream_state(states, r, new))
    rounds = 3 * len(blocks) // (new * micro)  # past two more epoch ends
    continued = taken + global_blocks(after, rounds)
    whole = global_blocks([stream(corpus, tokenizer, 0, 1, 1)], len(continued))
    assert continued == whole


def test_corpus_too_small_for_the_ranks(tmp_path, tokenizer, blocks, corpus):
    with pytest.raises(DataError, match="corpus too small for 4 ranks x micro batch") as err:
        TrainStream([corpus], "text", tokenizer, SEQ_LEN, 0, 4, len(blocks) // 4 + 1)
    assert corpus in str(err.value)
    TrainStream([corpus], "text", tokenizer, SEQ_LEN, 0, 1, len(blocks))  # exactly enough is fine


# ---------------------------------------------------------------------------------------------- held-out


def test_heldout_is_the_first_blocks_every_time(corpus, tokenizer, blocks):
    a = heldout_blocks([corpus], "text", tokenizer, SEQ_LEN, max_blocks=5)
    b = heldout_blocks([corpus], "text", tokenizer, SEQ_LEN, max_blocks=5)
    assert a.dtype == torch.long and a.shape == (5, SEQ_LEN)
    assert torch.equal(a, b) and a.tolist() == blocks[:5]
    everything = heldout_blocks([corpus], "text", tokenizer, SEQ_LEN, max_blocks=10_000)
    assert everything.tolist() == blocks


def test_heldout_smaller_than_one_block(tmp_path, tokenizer):
    path = texts_jsonl(tmp_path / "tiny.jsonl", ["a few words"])
    with pytest.raises(DataError, match="held-out set smaller than one evaluation block") as err:
        heldout_blocks([path], "text", tokenizer, 512, max_blocks=4)
    assert path in str(err.value)


# ---------------------------------------------------------------------------------------------- skipping

SKIPPABLE = [
    ("broken.jsonl", b'{"text": "b}', ["line 2", "not valid JSON"]),
    ("missing.jsonl", b'{"body": "b"}', ["line 2", "'text'", "missing"]),
    ("null.jsonl", b'{"text": null}', ["line 2", "'text'", "null"]),
    ("number.jsonl", b'{"text": 5}', ["line 2", "'text'", "int"]),
    ("list.jsonl", b'{"text": ["b"]}', ["line 2", "'text'", "list"]),
    ("object.jsonl", b"[1, 2]", ["line 2", "expected a JSON object, got list"]),
    ("bytes.jsonl", b'{"text": "b\xff"}', ["line 2", "UTF-8"]),
]


@pytest.mark.parametrize(("name", "bad", "expected"), SKIPPABLE, ids=[b[0] for b in SKIPPABLE])
def test_skip_drops_each_kind_of_bad_json_line_and_keeps_the_rest(tmp_path, name, bad, expected):
    path = tmp_path / name
    path.write_bytes(b'{"text": "a"}\n' + bad + b'\n{"text": "c"}\n\n{"text": "d"}\n')
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == ["a", "c", "d"]
    assert skip.count == 1 and len(skip.examples) == 1
    for part in [str(path), *expected]:
        assert part in skip.examples[0]


def test_skip_in_text_json_array_and_parquet(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"one,\r\nstill one\r\n\r\n\r\ntwo \xfe\nbad\n\n  \n\nthree\n")
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"text": "four"}, {"other": "x"}, {"text": "five"}]))
    par = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["six", None, "seven"]}), par)
    skip = SkipCounter()
    got = list(read_documents([str(txt), str(arr), str(par)], skip=skip))
    assert got == ["one,\nstill one", "three", "four", "five", "six", "seven"]
    assert skip.count == 3
    assert f"{txt}: line 5 (paragraph 2): not valid UTF-8 (byte 0xfe)" == skip.examples[0]
    assert f"{arr}: record 2" in skip.examples[1] and "'text'" in skip.examples[1]
    assert f"{par}: record 2" in skip.examples[2] and "null" in skip.examples[2]


def _big_jsonl(path, late_record: str):
    """Ordinary records, then `late_record`, then two more (one with escapes). (datasets read JSON in 10 MiB
    chunks with the columns' types fixed by the first; JSON Lines are read line by line now, and these
    keep what that path got wrong: a late bad type named, a late new key read.)"""
    line = json.dumps({"text": "ordinary words " * 60}) + "\n"
    n = 200
    tail = [late_record, json.dumps({"text": 'after\n"quoted" caf\u00e9'}), json.dumps({"text": "last"})]
    path.write_text(line * n + "\n".join(tail) + "\n")
    return str(path), n


def test_a_late_bad_type_is_named_not_turned_into_json_text(tmp_path):
    path, n = _big_jsonl(tmp_path / "big.jsonl", '{"text": 2024}')
    with pytest.raises(
        DataError, match=rf"big.jsonl: line {n + 1} \(record {n + 1}\): field 'text' has type int"
    ):
        list(read_documents([path]))
    skip = SkipCounter()
    docs = list(read_documents([path], skip=skip))
    assert len(docs) == n + 2 and docs[-2:] == ['after\n"quoted" café', "last"]  # not JSON-encoded
    assert skip.count == 1 and f"line {n + 1}" in skip.examples[0]


def test_a_late_valid_record_with_new_keys_is_read(tmp_path):
    path, n = _big_jsonl(tmp_path / "big.jsonl", json.dumps({"text": "fine", "url": "https://x"}))
    docs = list(read_documents([path]))
    assert len(docs) == n + 3 and docs[-3:] == ["fine", 'after\n"quoted" café', "last"]


def test_a_lone_surrogate_escape_is_a_bad_record_named_by_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n{"text": "cut emoji \\ud83d"}\n{"text": "c"}\n')
    with pytest.raises(
        DataError, match=r"line 2 \(record 2\): field 'text' holds a lone surrogate \(\\ud83d"
    ):
        list(read_documents([str(path)]))
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == ["a", "c"] and skip.count == 1


def test_a_json_array_names_a_lone_surrogate_and_a_record_that_is_not_an_object(tmp_path):
    """datasets read an array dropping a lone surrogate silently ("cut emoji "): it is a bad record."""
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a"}, {"text": "cut emoji \\ud83d"}, "b", {"text": "ok \\ud83d\\ude00"}]')
    with pytest.raises(DataError, match=r"a\.json: record 2: field 'text' holds a lone surrogate \(\\ud83d"):
        list(read_documents([str(path)]))
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == ["a", "ok \U0001f600"]
    assert skip.count == 2 and "record 3: expected a JSON object, got str" in skip.examples[1]


def test_skip_leaves_clean_files_as_they_are(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("Para one,\nstill one.\n\n\nPara two.\n\n   \n\nPara three\n")
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"text": "x"}\n\n{"text": " "}\n{"text": "y\\nz"}\n')
    skip = SkipCounter()
    files = [str(txt), str(lines)]
    assert list(read_documents(files, skip=skip)) == list(read_documents(files))
    assert skip == SkipCounter()


def test_skip_counts_all_keeps_five_examples_and_logs_five_warnings(tmp_path, caplog):
    rows = [json.dumps({"text": f"good {i}"}) if i % 3 else f'{{"text": {i}}}' for i in range(30)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(rows) + "\n")
    skip = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        got = list(read_documents([str(path)], skip=skip))
    assert got == [f"good {i}" for i in range(30) if i % 3]
    assert skip.count == 10
    assert [e.split(": ")[1] for e in skip.examples] == [f"line {n} (record {n})" for n in (1, 4, 7, 10, 13)]
    warnings = [r for r in caplog.records if r.name == "pretrain" and r.levelno == logging.WARNING]
    assert len(warnings) == 5 and all("skipped bad record" in r.getMessage() for r in warnings)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_skip_after_datasets_fails_mid_file_delivers_each_record_once(tmp_path, monkeypatch, newline):
    """datasets fails at a bad paragraph after delivering those before it: none is repeated or lost. The
    by-line reading splits paragraphs as datasets does, whatever ends the lines (both read in Python's
    universal-newline mode: a lone CR ends a line too)."""
    import pretrain.data as data

    texts = [f"doc {i}\nline 2" for i in range(40)]
    paragraphs = [t.encode().replace(b"\n", newline) for t in texts]
    paragraphs[25] = b"bad \xfe byte"
    path = tmp_path / "a.txt"
    path.write_bytes((newline * 2).join(paragraphs) + newline)
    real = data._dataset_records

    def fails_after_20(path_, builder, text_field):
        for i, record in enumerate(real(path_, builder, text_field)):
            if i == 20:
                raise ValueError("chunk failed")
            yield record

    monkeypatch.setattr(data, "_dataset_records", fails_after_20)
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == texts[:25] + texts[26:]
    assert skip.count == 1 and "line 76 (paragraph 26)" in skip.examples[0]


def test_json_lines_ended_by_a_lone_cr_are_lines(tmp_path):
    # read line by line on \n alone, such a file was one bad line: refused, or under skip lost whole
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\r" for i in range(4)))
    assert list(read_documents([str(path)])) == [f"doc {i}" for i in range(4)]
    path.write_bytes(b'{"text": "a"}\r{"text": 7}\r\n{"text": "c"}\r\r{"text": "d"}')
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == ["a", "c", "d"]
    assert skip.count == 1 and "line 2 (record 2)" in skip.examples[0]


def test_a_file_name_with_glob_characters_is_read_as_named(tmp_path):
    # datasets takes data_files as glob patterns: `c[1].txt` read c1.txt, `x*.txt` every x-file
    for name, text in {"c[1].txt": "bracket", "c1.txt": "plain", "x*.txt": "star", "xa.txt": "xa"}.items():
        (tmp_path / name).write_text(f"from {text}\n")
    assert list(read_documents([str(tmp_path / "c[1].txt")])) == ["from bracket"]
    assert list(read_documents([str(tmp_path / "x*.txt")])) == ["from star"]


def test_skip_reads_a_file_with_a_bom_line_by_line_alike(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "a"}\n{"text": \n{"text": "c"}\n'
    )  # read line by line from line 1
    skip = SkipCounter()
    assert list(read_documents([str(path)], skip=skip)) == ["a", "c"]
    assert skip.count == 1 and "line 2 (record 2)" in skip.examples[0]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [("array.json", b'[{"text": "a"}, {"text": ', "not a valid JSON array"), ("a.csv", b"a\n", "unknown")],
)
def test_skip_still_raises_when_records_cannot_be_told_apart(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        list(read_documents([str(path)], skip=SkipCounter()))


@pytest.fixture(scope="module")
def dirty_corpus(tmp_path_factory) -> tuple[str, str, int]:
    """(corpus with bad lines, the same corpus without them, number of bad lines): the same real texts."""
    root = tmp_path_factory.mktemp("dirty")
    good = [json.dumps({"text": t}).encode() for t in corpus_lines("plays", 60)]
    bad = [b'{"text": "cut', b'{"body": "x"}', b'{"text": "b\xfe"}', b'{"text": 7}', b"[]"]
    dirty = list(good)
    for k, line in enumerate(bad):
        dirty.insert(1 + 13 * k, line)
    (root / "dirty.jsonl").write_bytes(b"\n".join(dirty) + b"\n")
    (root / "clean.jsonl").write_bytes(b"\n".join(good) + b"\n")
    return str(root / "dirty.jsonl"), str(root / "clean.jsonl"), len(bad)


@pytest.mark.parametrize(("world", "micro"), [(1, 2), (2, 2), (3, 1)])
def test_stream_with_skip_equals_the_stream_without_the_bad_lines(dirty_corpus, tokenizer, world, micro):
    dirty, clean, n_bad = dirty_corpus
    ids = tokenizer(list(read_documents([clean])), add_special_tokens=False)["input_ids"]
    n = len(list(pack_blocks(ids, SEQ_LEN, tokenizer.eos_token_id)))
    steps = 3 * n // (world * micro) + 1  # into the fourth epoch
    for rank in range(world):
        skip = SkipCounter()
        got = take(iter(TrainStream([dirty], "text", tokenizer, SEQ_LEN, rank, world, micro, skip)), steps)
        expected = take(iter(stream(clean, tokenizer, rank, world, micro)), steps)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert skip.count == n_bad  # once each, though every epoch reads them again


def test_stream_without_skip_still_raises_on_bad_lines(dirty_corpus, tokenizer):
    with pytest.raises(DataError, match="line 2"):
        stream(dirty_corpus[0], tokenizer)


@pytest.mark.parametrize("consumed", [0, 3, 9, 14])
def test_resume_with_skip_is_exact_and_counts_each_bad_record_once(
    dirty_corpus, tokenizer, consumed, monkeypatch
):
    monkeypatch.setattr("pretrain.data._TOKENIZE_BATCH", 4)  # read little ahead: counts grow as it goes
    dirty, clean, n_bad = dirty_corpus
    steps = len(heldout_blocks([clean], "text", tokenizer, SEQ_LEN, 10_000)) // 4 + 1  # past an epoch end
    first_skip = SkipCounter()
    first = TrainStream([dirty], "text", tokenizer, SEQ_LEN, 1, 2, 2, first_skip)
    it = iter(first)
    take(it, consumed)
    state, counted = first.state_dict(), first_skip.count
    assert 0 < counted and (counted < n_bad or consumed > 0)
    expected = take(it, steps)
    skip = SkipCounter()
    resumed = TrainStream([dirty], "text", tokenizer, SEQ_LEN, 1, 2, 2, skip)
    resumed.load_state_dict(state)
    assert skip.count == counted  # what the saved stream counted, the re-read ones not again
    got = take(iter(resumed), steps)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert skip.count == first_skip.count == n_bad  # all of them, once


def test_heldout_with_skip_equals_heldout_without_the_bad_lines(dirty_corpus, tokenizer):
    dirty, clean, n_bad = dirty_corpus
    skip = SkipCounter()
    got = heldout_blocks([dirty], "text", tokenizer, SEQ_LEN, max_blocks=10_000, skip=skip)
    assert torch.equal(got, heldout_blocks([clean], "text", tokenizer, SEQ_LEN, max_blocks=10_000))
    assert skip.count == n_bad
    with pytest.raises(DataError, match="line 2"):
        heldout_blocks([dirty], "text", tokenizer, SEQ_LEN, max_blocks=10_000)
