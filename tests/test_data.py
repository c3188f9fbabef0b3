"""pretrain.data: each format, bad-input errors, packing, rank sharding, epochs, resume, held-out set."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pretrain.data import (
    DataError,
    TrainStream,
    _pack,
    heldout_blocks,
    pack_blocks,
    read_documents,
)
from pretrain.tokenizer import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 16


def shared_texts(task: str, n: int) -> list[str]:
    """The first n texts of a shared benchmark task (real English); skip when the data is not there."""
    roots = [Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")]
    for root in roots:
        path = root / "data" / "cl_benchmark" / task / "train.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]
    pytest.skip(f"shared benchmark data not found under {[str(r) for r in roots]}")


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> str:
    path.write_text("".join(json.dumps({field: t, "label": "x"}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    files = write_jsonl(src / "a.jsonl", shared_texts("agnews", 200) + shared_texts("sst2", 200))
    return train_tokenizer([([files], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 400, 400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A real-text corpus of a few dozen 16-token blocks, whose count is no multiple of 2, 3, 4 or 6."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl", shared_texts("sst2", 60))


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
    arr.write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    lines = write_jsonl(tmp_path / "b.jsonl", ["third"])
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


def test_resume_refuses_another_world_size(corpus, tokenizer):
    state = stream(corpus, tokenizer, rank=0, world=2).state_dict()
    with pytest.raises(DataError, match="world_size"):
        stream(corpus, tokenizer, rank=0, world=1).load_state_dict(state)


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
    path = write_jsonl(tmp_path / "tiny.jsonl", ["a few words"])
    with pytest.raises(DataError, match="held-out set smaller than one evaluation block") as err:
        heldout_blocks([path], "text", tokenizer, 512, max_blocks=4)
    assert path in str(err.value)
