"""Pre-tokenized training files: each file's documents tokenized once, read back by the training streams.

Every rank reads and tokenizes the whole global stream (pretrain.data.TrainStream: the global block order
that exact resume, the elastic re-cut and replay rest on), and one core tokenizes 228K-749K tokens/s
(benchmarks/tokenize_rate.md): 5.6-18 s of each rank's time per 4M-token step, which a few GPUs outrun
(benchmarks/cost_model.md). With `train.token_cache: DIR`, `python -m pretrain pretokenize --config
RUN.yaml` tokenizes every training file once, exactly as a stream does (the same pieces and tokenizer
calls), and the streams read the ids: the same blocks in the same order, at any world size and across a
resume, at 4.2M-8.1M tokens/s, 0.5-1 s a step (the same benchmark).

A file's cache is DIR/<key>/, the key hashing the file's path, its text field, the tokenizer and the
piece size:
- ids.bin: the token ids of its documents one after another (uint32, no EOS);
- docs.npy: per document [end of its ids in ids.bin, characters of its text] (the shuffle buffer counts
  characters);
- meta.json: the file's size and mtime when it was tokenized, and its bad records (on_bad_record: skip)
  with the documents before each, so that a stream counts each once as reading the text does (when the
  stream reaches it; reading the text counts it when it reads ahead to tokenize, up to 256 documents
  earlier).
A cache that is missing, or whose file has changed since, is an error naming the file and the command
before the run trains: nothing is rebuilt behind the user's back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.atomic import fsync_tree, replace_dir
from pretrain.config import ConfigError, RunConfig
from pretrain.data import PIECE_CHARS, DataError, Refusal, SkipCounter, _token_pieces, read_documents
from pretrain.tokenizer import fingerprint, resolve_tokenizer

FORMAT = 1
READ_TOKENS = 1 << 16  # the most ids handed to the packer at once: a huge document is not held whole


@dataclass(frozen=True)
class CachedDocument:
    """A document's token ids; its length is its text's, in characters, as the shuffle buffer counts."""

    ids: np.ndarray
    chars: int

    def __len__(self) -> int:
        return self.chars


def _remove_killed_builds(final: Path) -> None:
    """Half-built copies of `final` left by builds on this host whose process is gone (SIGKILL, a job's
    time limit): each holds up to a whole file's token ids, and no later build has its name. A build on
    another host (a shared cache directory) is never taken for dead."""
    ours = f"{final.name}.tmp-{socket.gethostname()}-"
    for tmp in final.parent.glob(f"{final.name}.tmp-*"):
        pid = tmp.name.removeprefix(ours)  # host `login` must not take host `login-2`'s builds for its own
        if tmp.name.startswith(ours) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class TokenCache:
    """The pre-tokenized files under `root` for one tokenizer."""

    def __init__(self, root: str | Path, tokenizer):
        self.root = Path(root)
        self.tokenizer = tokenizer
        self.tokenizer_hash = tokenizer_hash(tokenizer)

    def directory(self, path: str, text_field: str) -> Path:
        key = json.dumps([FORMAT, PIECE_CHARS, str(Path(path).resolve()), text_field, self.tokenizer_hash])
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:24]

    def check(self, files: Iterable[str], text_field: str) -> None:
        """Raise DataError naming the first file whose cache is missing or older than the file."""
        for path in files:
            self._meta(path, text_field)

    def _meta(self, path: str, text_field: str) -> tuple[Path, dict]:
        """The file's cache directory and its meta; DataError if missing or stale."""
        where = self.directory(path, text_field)
        fix = "run `python -m pretrain pretokenize --config RUN.yaml`"
        try:
            meta = json.loads((where / "meta.json").read_text())
        except FileNotFoundError:
            place = f"`train.token_cache` {self.root}"
            raise DataError(f"{path}: not pre-tokenized for this tokenizer in {place}; {fix}") from None
        except ValueError as err:  # torn by a crash: pretokenize builds it again
            raise DataError(f"{path}: its pre-tokenized cache {where} is unreadable ({err}); {fix}") from None
        if not isinstance(meta, dict) or not {"file", "tokens", "bad"} <= meta.keys():
            raise DataError(f"{path}: its pre-tokenized cache {where} is unreadable (meta.json); {fix}")
        if meta["file"] != _file_state(path):
            raise DataError(f"{path}: changed since it was pre-tokenized into {where}; {fix} again")
        return where, meta

    def build(self, files: Iterable[str], text_field: str, skip_bad: bool) -> list[dict]:
        """Tokenize the files whose cache is missing or stale; the meta of every file."""
        metas = []
        for path in files:
            try:
                metas.append({**self._meta(path, text_field)[1], "built_s": None})
            except DataError:
                metas.append(self._build_file(path, text_field, skip_bad))
        return metas

    def _build_file(self, path: str, text_field: str, skip_bad: bool) -> dict:
        start = time.perf_counter()
        final = self.directory(path, text_field)
        _remove_killed_builds(final)
        tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = _file_state(path)  # before reading: a file written meanwhile is stale at the next check
        chars: list[int] = []  # per document read so far
        bad = _BadRecords(chars) if skip_bad else None
        try:
            docs = _write_ids(read_documents([path], text_field, bad), chars, self.tokenizer, tmp)
        except BaseException:  # a bad record (on_bad_record: error), an interrupt: no half-written cache
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        np.save(tmp / "docs.npy", docs)
        meta = {"format": FORMAT, "file": state, "text_field": text_field, "documents": len(docs)}
        meta |= {"tokens": int(docs[-1, 0]) if len(docs) else 0, "bad": bad.records if bad else []}
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsync_tree(tmp)  # a node crash must not leave a cache that looks built
        replace_dir(tmp, final)
        return {**meta, "built_s": time.perf_counter() - start}

    def documents(self, files: Iterable[str], text_field: str, skip) -> Iterator[CachedDocument]:
        """read_documents' documents as token ids, with its bad-record counts (or its DataError)."""
        for path in files:
            where, meta = self._meta(path, text_field)
            ids = _ids(where / "ids.bin", meta["tokens"])
            bad = iter(meta["bad"])
            due = next(bad, None)
            start = 0
            for k, (end, chars) in enumerate(_rows(where / "docs.npy")):
                while due is not None and due[0] == k:
                    _bad_record(skip, due[1])
                    due = next(bad, None)
                yield CachedDocument(ids[start:end], chars)
                start = end
            for _, message in ([due] if due else []) + list(bad):
                _bad_record(skip, message)

    @staticmethod
    def pieces(docs: Iterable[CachedDocument]) -> Iterator[tuple[np.ndarray, bool]]:
        """(ids, ends its document) as data._token_pieces gives them, at most READ_TOKENS ids at once, as
        arrays (pack them with np.concatenate)."""
        for doc in docs:
            n = len(doc.ids)
            for a in range(0, max(n, 1), READ_TOKENS):
                yield doc.ids[a : a + READ_TOKENS], a + READ_TOKENS >= n


def _rows(path: Path, chunk: int = 1 << 16) -> Iterator[list[int]]:
    """docs.npy's [end, chars] rows, read `chunk` rows at a time from a memory map: as one list, a file of
    ten million documents held ~1.2 GB a reader, on every rank and for every replay source."""
    docs = np.load(path, mmap_mode="r")
    for a in range(0, len(docs), chunk):
        yield from np.asarray(docs[a : a + chunk]).tolist()


def tokenizer_hash(tokenizer) -> str:
    """A hash of everything that decides the ids (a fast tokenizer's whole definition), else its vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else fingerprint(tokenizer)["sha256"]
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def _file_state(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class _BadRecords:
    """A SkipCounter for read_documents that keeps each bad record with the documents read before it
    (`chars` has one entry per document read: _write_ids appends them)."""

    def __init__(self, chars: list[int]):
        self.records: list[list] = []
        self.chars = chars

    def add(self, message: str) -> None:
        self.records.append([len(self.chars), message])


def _write_ids(texts: Iterable[str], chars: list[int], tokenizer, out: Path) -> np.ndarray:
    """Tokenize `texts` as the stream does into out/ids.bin, appending each text's length to `chars` as it
    is read; [[end, characters], ...] per document."""
    ends: list[int] = []
    tokens = 0

    def remember(texts):
        for text in texts:
            chars.append(len(text))
            yield text

    with open(out / "ids.bin", "wb") as f:
        for ids, last in _token_pieces(remember(texts), tokenizer):
            np.asarray(ids, dtype=np.uint32).tofile(f)
            tokens += len(ids)
            if last:
                ends.append(tokens)
    return np.array([ends, chars], dtype=np.int64).T.reshape(-1, 2)


def _ids(path: Path, tokens: int) -> np.ndarray:
    if tokens == 0:
        return np.zeros(0, dtype=np.uint32)  # numpy cannot map an empty file
    return np.memmap(path, dtype=np.uint32, mode="r", shape=(tokens,))


def _bad_record(skip: SkipCounter | None, message: str) -> None:
    (skip if skip is not None else Refusal()).add(message)  # the run stops at it, as reading the text would


def training_files(cfg: RunConfig) -> list[tuple[list[str], str]]:
    """(files, text field) of each text domain a phase trains on and of each replay source."""
    domains = [cfg.domain(name) for name in dict.fromkeys(p.domain for p in cfg.phases)]
    texts = [(d.train, d.text_field) for d in domains if d.instruction is None]
    return texts + [(s.train, s.text_field) for s in cfg.replay.sources]


def open_token_cache(cfg: RunConfig, tokenizer) -> TokenCache | None:
    """The run's `train.token_cache` with every file it trains on checked (DataError if one is not in it);
    None when the key is not set."""
    if cfg.train.token_cache is None:
        return None
    cache = TokenCache(cfg.train.token_cache, tokenizer)
    for files, text_field in training_files(cfg):
        cache.check(files, text_field)
    return cache


def pretokenize(cfg: RunConfig) -> Iterator[tuple[str, dict]]:
    """Tokenize every file the run trains on into `train.token_cache` (those not there yet or changed):
    (file, its meta with `built_s`, None if it was up to date) as each is done."""
    if cfg.train.token_cache is None:
        raise ConfigError("key `train.token_cache`: set it to the directory the pre-tokenized files go to")
    cache = TokenCache(cfg.train.token_cache, resolve_tokenizer(cfg))
    skip_bad = cfg.train.on_bad_record == "skip"
    for files, text_field in training_files(cfg):
        for path in files:
            yield path, cache.build([path], text_field, skip_bad)[0]
