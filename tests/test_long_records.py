"""Long records: a document longer than PIECE_CHARS is tokenized in pieces, packed as a stream, and gives
the same blocks, the same resume positions and the same held-out set as tokenizing it whole."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
from conftest import smollm2_gguf, texts_jsonl

import pretrain.data as data
from pretrain.data import (
    PIECE_CHARS,
    TrainStream,
    _pack,
    _pack_pieces,
    _pieces,
    _token_pieces,
    heldout_blocks,
    pack_blocks,
)
from pretrain.demo_corpora import code_documents, docs_documents
from pretrain.tokenizer import MAX_SENTENCE_CHARS, _balanced_sentences, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 128
LONG_CHARS = 4 * PIECE_CHARS + 12_345  # five pieces, the last one short


def mixed_text(chars: int) -> str:
    """At least `chars` characters of the standard library's source and its help topics, alternating:
    indented code, runs of spaces, prose, punctuation and some non-ASCII."""
    parts, size = [], 0
    for code, doc in zip(code_documents(), itertools.cycle(docs_documents())):
        parts += [code, doc]
        size += len(code) + len(doc)
        if size >= chars:
            break
    return "".join(parts)[:chars]


SHORT = [doc for doc in itertools.islice(docs_documents(), 40) if 200 < len(doc) < 4000][:12]
LONG = mixed_text(LONG_CHARS)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """The project's own kind of tokenizer: a sentencepiece BPE trained by pretrain.tokenizer."""
    src = tmp_path_factory.mktemp("src")
    texts = list(itertools.islice(code_documents(), 60)) + list(itertools.islice(docs_documents(), 60))
    files = texts_jsonl(src / "sample.jsonl", texts)
    return train_tokenizer([([files], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 1000, 300)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """A byte-level BPE (GPT-2's pre-tokenizer regex): SmolLM2's, read from its GGUF file."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


TOKENIZERS = ["sentencepiece_tokenizer", "smollm2_tokenizer"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Short documents, one long record in the middle (document 6), short documents again."""
    return texts_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl", [*SHORT[:6], LONG, *SHORT[6:]])


def whole_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Every document tokenized whole, as the reader did before it cut long ones."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def ids_in_pieces(tokenizer, text: str) -> list[int]:
    return [i for ids, _ in _token_pieces([text], tokenizer) for i in ids]


class SpyTokenizer:
    """Passes calls on to a tokenizer and records how many characters each call held."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.calls.append(sum(map(len, texts)))
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


# ---------------------------------------------------------------------------------------------- cutting


def test_a_document_within_the_limit_is_one_piece_as_it_is():
    text = "x" * PIECE_CHARS
    assert [(p is text, last) for p, last in _pieces(text)] == [(True, True)]


def test_cuts_fall_before_the_last_single_space_between_non_spaces(monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 40)
    text = mixed_text(20_000)
    pieces = list(_pieces(text))
    assert "".join(p for p, _ in pieces) == text
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    start, hard = 0, 0
    for piece, _ in pieces[:-1]:
        window = text[start : start + 42]  # the most a piece can hold, and the two characters after it
        places = [i for i in range(1, 41) if window[i] == " " and not window[i - 1].isspace()]
        places = [i for i in places if not window[i + 1].isspace()]
        want = places[-1] if places else 40  # cut hard at the limit only where there is no place
        assert len(piece) == want, f"cut {window[: len(piece)]!r} | {window[len(piece) :]!r}"
        start, hard = start + len(piece), hard + (not places)
    assert 0 < hard < len(pieces) / 10  # indented code has stretches of 40 without a single space


def test_a_stretch_without_a_space_is_cut_hard_at_the_limit(monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 100)
    text = "a b " + "x" * 250 + "  y"
    assert [len(p) for p, _ in _pieces(text)] == [3, 100, 100, 54]  # after "a b", no place to cut in 100
    assert "".join(p for p, _ in _pieces(text)) == text


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("seq_len", [1, 3, 7, 16])
def test_pieces_pack_like_whole_documents_and_resume_at_every_boundary(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 40))] for _ in range(30)]

    def pieces(first: int = 0):
        """The documents from `first` on, each cut at random places (empty pieces too)."""
        for ids in docs[first:]:
            cuts = sorted(rng.randrange(0, len(ids) + 1) for _ in range(rng.randrange(0, 4)))
            bounds = [0, *cuts, len(ids)]
            for k, (a, b) in enumerate(itertools.pairwise(bounds)):
                yield ids[a:b], k == len(bounds) - 2

    full = list(_pack(docs, seq_len, 0))
    assert list(_pack_pieces(pieces(), seq_len, 0)) == full
    for i, (_, doc, offset) in enumerate(full):
        rest = list(_pack_pieces(pieces(doc), seq_len, 0, doc, offset))
        assert rest == full[i + 1 :], f"resuming after block {i} at doc {doc} +{offset}"


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_long_document_tokenizes_as_it_would_whole(name, request):
    tokenizer = request.getfixturevalue(name)
    pieces = list(_pieces(LONG))
    assert len(pieces) == 5
    assert all(p[-1] != " " and n[0] == " " for (p, _), (n, _) in itertools.pairwise(pieces))  # no hard cut
    assert ids_in_pieces(tokenizer, LONG) == whole_ids(tokenizer, [LONG])[0]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_hundreds_of_cuts_in_code_and_prose_are_all_exact(name, request, monkeypatch):
    """A small limit puts a cut every ~1000 characters: each must leave the tokens as they were.

    (Below ~1000 this text has stretches without a single space between non-spaces: lists of quoted
    names, one per indented line. Those would be cut hard.)"""
    tokenizer = request.getfixturevalue(name)
    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    pieces = [p for p, _ in _pieces(LONG)]
    assert len(pieces) > 250 and max(map(len, pieces)) <= 1000
    assert all(p[-1] != " " and n[0] == " " for p, n in itertools.pairwise(pieces))  # no hard cut
    assert ids_in_pieces(tokenizer, LONG) == whole_ids(tokenizer, [LONG])[0]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_hard_cut_keeps_the_text(name, request, monkeypatch):
    """Where a hard cut has to fall the tokens next to it may differ, but no character is lost or added."""
    tokenizer = request.getfixturevalue(name)
    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = "base64: " + "".join(random.Random(0).choices(alphabet, k=3500))
    assert [len(p) for p, _ in _pieces(text)] == [7, 1000, 1000, 1000, 501]
    ids = ids_in_pieces(tokenizer, text)
    assert tokenizer.decode(ids) == text == tokenizer.decode(whole_ids(tokenizer, [text])[0])


# ---------------------------------------------------------------------------------------------- memory bound


def test_the_tokenizer_never_gets_more_than_the_piece_limit(corpus, sentencepiece_tokenizer):
    spy = SpyTokenizer(sentencepiece_tokenizer)
    stream = TrainStream([corpus], "text", spy, SEQ_LEN, 0, 1, 4)
    for _ in itertools.takewhile(lambda _: stream.state_dict()["doc"] <= 6, stream):
        pass
    heldout_blocks([corpus], "text", spy, SEQ_LEN, max_blocks=10_000)
    assert max(spy.calls) <= PIECE_CHARS
    assert sum(spy.calls) >= 2 * len(LONG)  # the long record was read, by the stream and the held-out set


# ---------------------------------------------------------------------------------------------- streams


def stream_batches(corpus, tokenizer, state: dict | None = None, until_doc: int = 8):
    """(state after the batch, batch) of a one-rank stream, from `state` until it reaches `until_doc`."""
    stream = TrainStream([corpus], "text", tokenizer, SEQ_LEN, 0, 1, 2)
    if state is not None:
        stream.load_state_dict(state)
    out = []
    for batch in stream:
        out.append((stream.state_dict(), batch))
        if out[-1][0]["doc"] >= until_doc:
            return out


def test_a_stream_resumed_inside_a_long_record_continues_exactly(corpus, sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    full = stream_batches(corpus, tok)
    first_piece = len(tok(next(_pieces(LONG))[0], add_special_tokens=False)["input_ids"])
    inside = [i for i, (state, _) in enumerate(full) if state["doc"] == 6 and state["offset"] > first_piece]
    assert len(inside) > 100, "the long record should span many batches past its first piece"
    for i in (inside[0], inside[len(inside) // 2], inside[-1]):
        rest = stream_batches(corpus, tok, full[i][0])
        assert len(rest) == len(full) - i - 1
        for (state, batch), (want_state, want) in zip(rest, full[i + 1 :], strict=True):
            assert torch.equal(batch, want) and state == want_state, f"resumed at {full[i][0]}"


def test_the_stream_equals_packing_whole_documents(corpus, sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    want = list(pack_blocks(whole_ids(tok, [*SHORT[:6], LONG, *SHORT[6:]]), SEQ_LEN, tok.eos_token_id))
    stream = TrainStream([corpus], "text", tok, SEQ_LEN, 0, 1, 2)
    got = [block.tolist() for batch in itertools.islice(stream, len(want) // 2) for block in batch]
    assert got == want[: len(got)] and len(got) >= len(want) - 1  # an odd last block goes with the next epoch


@pytest.mark.parametrize("name", TOKENIZERS)
def test_heldout_with_one_huge_record_is_exact(corpus, name, request):
    tok = request.getfixturevalue(name)
    want = list(pack_blocks(whole_ids(tok, [*SHORT[:6], LONG, *SHORT[6:]]), SEQ_LEN, tok.eos_token_id))
    assert heldout_blocks([corpus], "text", tok, SEQ_LEN, max_blocks=10_000).tolist() == want
    assert heldout_blocks([corpus], "text", tok, SEQ_LEN, max_blocks=50).tolist() == want[:50]


# ---------------------------------------------------------------------------------------- tokenizer sample


def test_the_tokenizer_sample_takes_only_the_start_of_a_long_record(tmp_path):
    path = texts_jsonl(tmp_path / "a.jsonl", [SHORT[0], LONG, SHORT[1]])
    sample = list(_balanced_sentences([([path], "text")], 10))
    assert len(sample) == 3 and max(map(len, sample)) <= MAX_SENTENCE_CHARS
    assert LONG.startswith(sample[1]) and sample[0] == SHORT[0]
