"""The run's tokenizer: a sentencepiece BPE trained on the domains' train files, or a model's own, or a dir.

A trained tokenizer's directory carries a mark (`pretrain_tokenizer.json`: vocabulary size and
fingerprint, the files it consists of), written with the rest in one rename of a finished directory. Only
a marked directory is reused or replaced; a directory holding anything else is refused, never written to.

The trained tokenizer round-trips any text exactly: byte fallback encodes characters it has no piece
for, normalization is the identity (no NFKC, whitespace kept as is: code indentation survives) and no
dummy space is prepended. It is saved as a transformers `LlamaTokenizer` (tokenizer.model,
tokenizer.json, tokenizer_config.json) that `AutoTokenizer` loads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.atomic import fsync_dir, replace_dir
from pretrain.config import ConfigError, InstructionConfig, RunConfig
from pretrain.data import SkipCounter, bad_record_counter, read_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # ids 0-3, in this order
MAX_SENTENCE_CHARS = 2048  # longer documents are cut: bounds the training text at max_sentences x this
# The mark of a complete tokenizer trained by this project; it lists the directory's files.
_MARK = "pretrain_tokenizer.json"


def train_tokenizer(
    files_by_domain: list[tuple[list[str], str | InstructionConfig]],
    out_dir: str,
    vocab_size: int,
    max_sentences: int,
    skip: SkipCounter | None = None,
    replace: bool = True,
) -> PreTrainedTokenizerBase:
    """Train a sentencepiece BPE on a balanced sample of the domains; save and return it as transformers'.

    Deterministic: the sample is the first documents of each domain, taken in turn, and training is
    single-threaded. The tokenizer is built in a temporary sibling directory and moved in when complete.
    With `skip`, bad records are skipped and counted there instead of raising DataError. With
    `replace=False`, a tokenizer another process finished at `out_dir` meanwhile is kept and returned.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    refuse_foreign_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        sentences = _balanced_sentences(files_by_domain, max_sentences, skip)
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=sentences, **_trainer_args(tmp, vocab_size))
        except RuntimeError as err:
            raise _training_error(err, vocab_size) from err
        tokenizer = _to_transformers(tmp)
        tokenizer.save_pretrained(str(tmp))
        _write_mark(tmp, tokenizer, _training_set(files_by_domain, max_sentences))
        if not _move_into(tmp, out, replace):
            log.warning("%s: another process finished a tokenizer there first; this one is dropped", out)
            refuse_foreign_dir(out)
            return _reuse(str(out), vocab_size, _training_set(files_by_domain, max_sentences))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained a %d-token BPE tokenizer in %s", vocab_size, out)
    return load_tokenizer(str(out))


def _trainer_args(model_dir: Path, vocab_size: int) -> dict:
    ids = {f"{name}_id": i for i, name in enumerate(SPECIAL)}
    pieces = {f"{name}_piece": piece for name, piece in SPECIAL.items()}
    return dict(
        model_prefix=str(model_dir / "tokenizer"),
        model_type="bpe",  # transformers 5 mis-converts unigram models
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,  # the rarest characters go to byte pieces, not to the vocabulary
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes; sentences are cut to the char limit before
        input_sentence_size=0,  # use every sentence given: the sample is already bounded
        num_threads=1,  # the merges are then independent of thread scheduling
        minloglevel=2,
        **ids,
        **pieces,
    )


def _balanced_sentences(
    files_by_domain: list[tuple[list[str], str | InstructionConfig]],
    max_sentences: int,
    skip: SkipCounter | None = None,
) -> Iterator[str]:
    """Up to max_sentences pieces of text, one document from each domain in turn until all run dry. A
    domain is (files, text field), or (files, InstructionConfig) for an instruction domain, whose examples
    are read as the model sees them, prompt and answer (its records have no text field to read)."""
    streams = [_sentences(_documents(files, field, skip)) for files, field in files_by_domain]
    count = 0
    while streams and count < max_sentences:
        for stream in list(streams):
            sentence = next(stream, None)
            if sentence is None:
                streams.remove(stream)
            elif count < max_sentences:
                count += 1
                yield sentence


def _documents(files: list[str], field: str | InstructionConfig, skip: SkipCounter | None) -> Iterator[str]:
    if isinstance(field, str):
        return read_documents(files, field, skip)
    from pretrain.instruct import read_examples

    return (example.prompt + example.answer for example in read_examples(files, field, skip))


def _sentences(docs: Iterator[str]) -> Iterator[str]:
    """A document's first MAX_SENTENCE_CHARS characters, cut at a line end where there is one."""
    for doc in docs:
        if len(doc) > MAX_SENTENCE_CHARS:
            cut = doc.rfind("\n", 0, MAX_SENTENCE_CHARS)
            doc = doc[: cut + 1] if cut > 0 else doc[:MAX_SENTENCE_CHARS]
        yield doc


def _training_error(err: RuntimeError, vocab_size: int) -> Exception:
    need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(err))
    if need:
        return ConfigError(
            f"key `tokenizer.vocab_size`: {vocab_size} is too small for these corpora; sentencepiece "
            f"needs at least {need.group(2)} (256 byte pieces, {len(SPECIAL)} special tokens and the "
            "characters that cover 99.95% of the text), plus room for merges"
        )
    most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(err))
    if most:
        return ConfigError(
            f"key `tokenizer.vocab_size`: {vocab_size} is more than these corpora can fill; sentencepiece "
            f"makes at most {most.group(1)} pieces of them (lower it, or raise tokenizer.max_sentences)"
        )
    return ConfigError(f"sentencepiece could not train a {vocab_size}-token tokenizer: {err}")


def _to_transformers(model_dir: Path):
    """LlamaTokenizer from model_dir/tokenizer.model, checked piece by piece against sentencepiece."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    # from_pretrained converts tokenizer.model; the constructor LlamaTokenizer(vocab_file=...) would
    # silently build a 3-token tokenizer.
    tokenizer = LlamaTokenizer.from_pretrained(
        str(model_dir), pad_token=SPECIAL["pad"], add_prefix_space=False, local_files_only=True
    )
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    _check_same_vocabulary(tokenizer, sp)
    return tokenizer


def _check_same_vocabulary(tokenizer, sp) -> None:
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = tokenizer.get_vocab()
    wrong = [(i, p) for i, p in enumerate(pieces) if vocab.get(p) != i]
    if len(tokenizer) != len(pieces) or wrong or tokenizer.eos_token_id != sp.eos_id():
        raise RuntimeError(
            f"the transformers tokenizer does not match the sentencepiece model: {len(tokenizer)} vs "
            f"{len(pieces)} tokens, {len(wrong)} pieces at other ids (first: {wrong[:3]}), eos id "
            f"{tokenizer.eos_token_id} vs {sp.eos_id()}"
        )


def fingerprint(tokenizer) -> dict[str, object]:
    """Size and a hash of the token -> id map: equal exactly when two tokenizers number tokens alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"size": len(tokenizer), "sha256": digest}


def _training_set(
    files_by_domain: list[tuple[list[str], str | InstructionConfig]], max_sentences: int
) -> dict:
    """What a tokenizer is trained from: each domain's files (with their sizes) and the sample's size."""
    domains = [[[str(Path(f).resolve()), _size(f)] for f in files] for files, _ in files_by_domain]
    return {"domains": domains, "max_sentences": max_sentences}


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _write_mark(tmp: Path, tokenizer, trained_on: dict) -> None:
    files = sorted(p.name for p in tmp.iterdir()) + [_MARK]
    mark = {"trained_by": "pretrain", "files": files, **fingerprint(tokenizer), "trained_on": trained_on}
    (tmp / _MARK).write_text(json.dumps(mark, indent=2))


def _mark(path: Path) -> dict | None:
    try:
        mark = json.loads((path / _MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("files"), list) else None


def holds_tokenizer(path: str) -> bool:
    """True if `path` holds a complete tokenizer trained by this project, and nothing else."""
    mark = _mark(Path(path))
    if mark is None:
        return False
    present = {p.name for p in Path(path).iterdir()}
    return present == set(mark["files"])


def refuse_foreign_dir(out: Path) -> None:
    """ConfigError unless `out` is absent, empty, or one of this project's complete tokenizers."""
    if not out.exists() or holds_tokenizer(str(out)):
        return
    if not out.is_dir():
        raise ConfigError(f"tokenizer directory {out} is a file; choose another tokenizer.path")
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ConfigError(
            f"tokenizer directory {out} holds files that are not a tokenizer this project trained "
            f"({shown}); it is left untouched. To use the tokenizer there, set tokenizer.source: path; "
            "to train one, set tokenizer.path to a new or empty directory"
        )


def _move_into(tmp: Path, out: Path, replace: bool) -> bool:
    """Put the finished directory at `out` by renames: absent, empty, or (`replace`) our own earlier
    tokenizer. Without `replace`, False if `out` holds anything by now: another run training into the same
    path finished first, and its tokenizer may already number a checkpoint's tokens."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; give it an ordinary directory's mode
    if replace:
        replace_dir(tmp, out)  # empty, or our own complete tokenizer (refuse_foreign_dir let it through)
        return True
    try:
        os.rename(tmp, out)  # onto nothing or an empty directory only, in one step: the first one wins
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return False
    fsync_dir(out.parent)
    return True


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A saved transformers tokenizer; it must have an EOS token (packing marks document ends with it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {path}: {err}") from err
    return _with_eos(tokenizer, path)


def _with_eos(tokenizer, path: str):
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer in {path} has no EOS token; packed training blocks need one to mark where "
            "documents end (set eos_token in its tokenizer_config.json)"
        )
    return tokenizer


def resolve_tokenizer(cfg: RunConfig, train: bool = True) -> PreTrainedTokenizerBase:
    """The run's tokenizer by `tokenizer.source`: train (or reuse the trained one), the model's, or a dir.
    With train=False (an evaluation of a run) a trained tokenizer that is not there is an error."""
    tok = cfg.tokenizer
    if tok.source == "path":
        return load_tokenizer(tok.path)
    if tok.source == "model":
        return _model_tokenizer(cfg)
    path = tok.path or str(Path(cfg.output_dir) / "tokenizer")
    domains = [(d.train, d.instruction or d.text_field) for d in cfg.domains]
    if holds_tokenizer(path) or _unmarked_of_a_run(path, cfg):
        return _reuse(path, tok.vocab_size, _training_set(domains, tok.max_sentences))
    if not train:  # a new one would number tokens otherwise than the one the run trained with
        raise ConfigError(
            f"no trained tokenizer in {path} (tokenizer.source train), where the run trained its own: "
            "an evaluation never trains one; put the run's tokenizer back there, or set tokenizer.path"
        )
    skip = bad_record_counter(cfg.train.on_bad_record)
    # replace=False: the path was empty when looked at; a run that trained into it since keeps its own
    return train_tokenizer(domains, path, tok.vocab_size, tok.max_sentences, skip, replace=False)


def _unmarked_of_a_run(path: str, cfg: RunConfig) -> bool:
    """A run started before tokenizers were marked (2026-11-26) trained its tokenizer into `path` without
    a mark: its resume (or eval job) reuses it, never writes into it. A new run still refuses the directory,
    and the checkpoint's tokenizer fingerprint refuses a resume with another tokenizer."""
    from pretrain.checkpoint import latest_tag

    run = Path(cfg.output_dir)
    # an attempt that died before its first checkpoint has its metrics set aside as metrics.attempt-N.json
    started = any(run.glob("metrics*.json")) or latest_tag(run) is not None
    return started and _mark(Path(path)) is None and (Path(path) / "tokenizer_config.json").is_file()


def _reuse(path: str, vocab_size: int, asked: dict):
    tokenizer = load_tokenizer(path)
    if len(tokenizer) != vocab_size:  # sentencepiece BPE yields exactly vocab_size pieces or fails
        raise ConfigError(
            f"key `tokenizer.vocab_size`: {path} already holds a tokenizer of {len(tokenizer)} tokens, the "
            f"config asks for {vocab_size}; delete that directory to train a new one, or set tokenizer.path"
        )
    trained_on = (_mark(Path(path)) or {}).get("trained_on")
    if trained_on is not None and trained_on != asked:  # reused all the same: runs may share a vocabulary
        log.warning(
            "the tokenizer in %s was trained on other files or another tokenizer.max_sentences than this "
            "config names; it is reused as it is. To train one on these, delete it or set tokenizer.path",
            path,
        )
    log.info("using the tokenizer already trained in %s", path)
    return tokenizer


def _model_tokenizer(cfg: RunConfig):
    path = Path(cfg.model.path)
    if cfg.model.source != "gguf":
        return load_tokenizer(str(path))
    return gguf_tokenizer(path)


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file `path`; it must have an EOS token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the tokenizer of {path}: {err}") from err
    return _with_eos(tokenizer, str(path))
