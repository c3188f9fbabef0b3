"""pretrain.tokenizer: training a sentencepiece BPE, its transformers form, loading, resolving by config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import corpus_lines

from pretrain.config import (
    ConfigError,
    DomainConfig,
    InstructionConfig,
    PhaseConfig,
    RunConfig,
    TokenizerConfig,
)
from pretrain.tokenizer import (
    _balanced_sentences,
    _check_same_vocabulary,
    _write_mark,
    holds_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
    train_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 400
ROUND_TRIP = [
    "Hello world.",
    "  two leading spaces, two  inside and a trailing one ",
    "def f(x):\n    return x  # indented code\n\n\ttab",
    "émoji 🎉, 中文, Ελληνικά, ﬁ ligature and a non-breaking\u00a0space",
    "digits 1234567890 and symbols <>{}[]|~^`",
]


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> list[tuple[list[str], str]]:
    """Three domains of 150 short records each: lines of real news, plays and Python docs."""
    src = tmp_path_factory.mktemp("corpora")
    out = []
    for name in ("news", "plays", "docs"):
        path = src / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_lines(name, 150)))
        out.append(([str(path)], "text"))
    return out


@pytest.fixture(scope="module")
def trained(domains, tmp_path_factory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(domains, str(out), VOCAB, 400), out


def test_trained_tokenizer_round_trips_any_text(trained):
    tok, _ = trained
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text


def test_trained_tokenizer_is_complete_and_matches_sentencepiece(trained):
    tok, out = trained
    assert len(tok) == VOCAB  # not the 3-token tokenizer LlamaTokenizer(vocab_file=...) would build
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == ("</s>", 2, 3, 0)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = tok.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(sp.get_piece_size()))
    for text in ROUND_TRIP:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert holds_tokenizer(str(out))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temporary dir removed


def test_saved_tokenizer_loads_back_identically(trained):
    tok, out = trained
    again = load_tokenizer(str(out))
    assert len(again) == len(tok) and again.eos_token_id == tok.eos_token_id
    batch = again(ROUND_TRIP, add_special_tokens=False)["input_ids"]
    assert batch == tok(ROUND_TRIP, add_special_tokens=False)["input_ids"]


def test_training_is_deterministic_and_replaces_stale_files(domains, trained, tmp_path):
    tok, _ = trained
    out = tmp_path / "tok"
    train_tokenizer(domains, str(out), VOCAB + 100, 400)  # a stale, different tokenizer in the same place
    again = train_tokenizer(domains, str(out), VOCAB, 400)
    assert again.get_vocab() == tok.get_vocab()
    assert len(load_tokenizer(str(out))) == VOCAB


def test_sample_takes_domains_in_turn_up_to_the_bound(tmp_path):
    def domain(name, n):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
        return [str(path)], "text"

    doms = [domain("a", 5), domain("b", 1), domain("c", 3)]
    assert list(_balanced_sentences(doms, 6)) == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert len(list(_balanced_sentences(doms, 100))) == 9


def test_too_small_a_vocabulary_is_a_config_error(domains, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size`: 256 is too small.*needs at least \d+"):
        train_tokenizer(domains, str(tmp_path / "tok"), 256, 400)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "hello world"}\n')
    with pytest.raises(ConfigError, match=r"vocab_size`: 2000 is more than.*at most \d+ pieces"):
        train_tokenizer([([str(tiny)], "text")], str(tmp_path / "tok"), 2000, 400)


def test_load_tokenizer_requires_an_eos_token(trained, tmp_path):
    tok, _ = trained
    config = json.loads((trained[1] / "tokenizer_config.json").read_text())
    broken = tmp_path / "no-eos"
    tok.save_pretrained(str(broken))
    (broken / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(ConfigError, match="no EOS token"):
        load_tokenizer(str(broken))
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))


def run_config(tmp_path: Path, domains, **tokenizer) -> RunConfig:
    files, field = domains[0]
    return RunConfig(
        output_dir=str(tmp_path / "run"),
        domains=[DomainConfig(name="d", train=files, heldout=files, text_field=field)],
        phases=[PhaseConfig(domain="d", steps=1)],
        tokenizer=TokenizerConfig(**{"vocab_size": VOCAB, "max_sentences": 150, **tokenizer}),
    )


def test_resolve_trains_once_then_reuses(domains, tmp_path, monkeypatch, caplog):
    cfg = run_config(tmp_path, domains)
    first = resolve_tokenizer(cfg)
    assert holds_tokenizer(str(tmp_path / "run" / "tokenizer")) and len(first) == VOCAB

    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer already there must be reused")

    monkeypatch.setattr("pretrain.tokenizer.train_tokenizer", no_training)
    with caplog.at_level("WARNING", logger="pretrain.tokenizer"):
        assert resolve_tokenizer(cfg).get_vocab() == first.get_vocab()
        assert not caplog.records  # the files and sample it was trained on
        for other in (run_config(tmp_path, domains, max_sentences=120), run_config(tmp_path, domains[1:])):
            caplog.clear()
            assert resolve_tokenizer(other).get_vocab() == first.get_vocab()  # reused: runs may share one
            assert "was trained on other files or another tokenizer.max_sentences" in caplog.text
    cfg.tokenizer.vocab_size = VOCAB + 8
    with pytest.raises(ConfigError, match="already holds a tokenizer of 400 tokens"):
        resolve_tokenizer(cfg)


def test_a_tokenizer_another_run_finished_first_at_the_path_is_kept_not_replaced(
    trained, domains, tmp_path, monkeypatch, caplog
):
    # two runs training into one tokenizer.path: the later rename replaced the earlier's directory, whose
    # tokenizer (other pieces here: trained on 400 sentences, not 150) may already number its checkpoints
    theirs, out = trained
    path = tmp_path / "run" / "tokenizer"

    def the_other_run_finishes_meanwhile(*args):
        _write_mark(*args)
        shutil.copytree(out, path)

    monkeypatch.setattr("pretrain.tokenizer._write_mark", the_other_run_finishes_meanwhile)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with caplog.at_level("WARNING", logger="pretrain.tokenizer"):
        tok = resolve_tokenizer(run_config(tmp_path, domains))
    assert "finished a tokenizer there first" in caplog.text
    assert tok.get_vocab() == theirs.get_vocab()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer"]  # our copy removed


def test_an_instruction_domain_is_read_as_its_examples_for_the_tokenizer(domains, tmp_path):
    # it was read through text_field, which its records need not have: training failed on "field 'text'
    # is missing" (or, skipping bad records, left the domain out)
    lines = corpus_lines("plays", 150)
    qa = tmp_path / "qa.jsonl"
    pairs = zip(lines, lines[1:], strict=False)
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    instruction = InstructionConfig(prompt="Q: {question}\nA:", answer=" {answer}")
    sample = list(_balanced_sentences([([str(qa)], instruction)], 2))
    assert sample == [f"Q: {lines[0]}\nA: {lines[1]}", f"Q: {lines[1]}\nA: {lines[2]}"]
    cfg = run_config(tmp_path, domains)
    cfg.domains.append(DomainConfig(name="qa", train=[str(qa)], heldout=[str(qa)], instruction=instruction))
    assert len(resolve_tokenizer(cfg)) == VOCAB


def test_resolve_path_and_model_sources(trained, domains, tmp_path):
    tok, out = trained
    by_path = resolve_tokenizer(run_config(tmp_path, domains, source="path", path=str(out)))
    cfg = run_config(tmp_path, domains, source="model")
    cfg.model.source, cfg.model.path = "hf", str(out)
    by_model = resolve_tokenizer(cfg)
    assert by_path.get_vocab() == by_model.get_vocab() == tok.get_vocab()
    assert not (tmp_path / "run").exists()  # nothing trained


def test_a_transformers_tokenizer_that_differs_from_sentencepiece_is_refused(trained, domains, tmp_path):
    tok, out = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    _check_same_vocabulary(tok, sp)
    other = train_tokenizer(domains, str(tmp_path / "other"), VOCAB, 150)  # same size, other pieces
    with pytest.raises(RuntimeError, match="does not match the sentencepiece model"):
        _check_same_vocabulary(other, sp)


def _foreign_tokenizer(path: Path) -> dict[str, bytes]:
    """A directory holding someone else's sentencepiece tokenizer files; returns their bytes."""
    path.mkdir(parents=True)
    files = {"tokenizer.model": b"\x0a\x0bnot ours", "tokenizer_config.json": b'{"model_max_length": 2048}'}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def test_a_directory_with_someone_elses_tokenizer_is_refused_and_left_untouched(domains, tmp_path):
    # probe 7: training into it replaced their tokenizer.model and tokenizer_config.json
    theirs = tmp_path / "their-tokenizer"
    files = _foreign_tokenizer(theirs)
    with pytest.raises(ConfigError, match=r"holds files that are not a tokenizer this project trained"):
        train_tokenizer(domains, str(theirs), VOCAB, 150)
    cfg = run_config(tmp_path, domains, path=str(theirs))  # `pretrain tokenizer` and `train` resolve this
    with pytest.raises(ConfigError, match=r"tokenizer.model, tokenizer_config.json.*tokenizer.source: path"):
        resolve_tokenizer(cfg)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_run_from_before_tokenizers_were_marked_reuses_its_own(trained, domains, tmp_path):
    """Its tokenizer has no mark: a new run refuses the directory; the run's resume (metrics.json there)
    reuses it, as its checkpoints were trained with it, and writes nothing into it."""
    _, out = trained
    cfg = run_config(tmp_path, domains)
    old = tmp_path / "run" / "tokenizer"
    old.mkdir(parents=True)
    for p in out.iterdir():
        if p.name != "pretrain_tokenizer.json":
            (old / p.name).write_bytes(p.read_bytes())
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(ConfigError, match="not a tokenizer this project trained"):
        resolve_tokenizer(cfg)
    (tmp_path / "run" / "metrics.attempt-1.json").write_text("{}")  # restarted: its first attempt died early
    assert len(resolve_tokenizer(cfg)) == VOCAB
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files


def test_extra_files_in_a_trained_tokenizer_directory_make_it_someone_elses(trained, domains, tmp_path):
    _, out = trained
    mine = tmp_path / "tok"
    mine.mkdir()
    for p in out.iterdir():
        (mine / p.name).write_bytes(p.read_bytes())
    assert holds_tokenizer(str(mine))
    (mine / "notes.txt").write_text("a user's file")
    assert not holds_tokenizer(str(mine))
    with pytest.raises(ConfigError, match=r"notes.txt"):
        train_tokenizer(domains, str(mine), VOCAB, 150)
    assert (mine / "notes.txt").read_text() == "a user's file"


def test_an_empty_directory_is_trained_into(domains, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    tok = train_tokenizer(domains, str(empty), VOCAB, 150)
    assert holds_tokenizer(str(empty)) and len(tok) == VOCAB
    assert oct(empty.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's private mode


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
