"""Training data: local corpora streamed as documents, tokenized on the fly and packed into fixed blocks.

A domain's documents are streamed in file order (nothing is loaded whole but a JSON array; a training
stream may shuffle that order with a seed: pretrain/shuffle.py),
tokenized in batches, each followed by EOS, and cut into blocks of exactly seq_len tokens. A document
longer than PIECE_CHARS is tokenized in pieces cut where the cut does not change its tokens, and packed
from the pieces as they come, so reading a corpus holds a bounded number of token ids whatever its
records' sizes (each record's text itself is still held whole: it is read as one string).
A stream resumed inside such a document tokenizes it again from its start: positions count tokens.
Formats:

- `.jsonl` / `.json`: one record per document, the text in `text_field` (a `.json` file may also be a
  JSON array of records);
- `.parquet`: one row per document, the text in column `text_field`;
- `.txt`: one document per paragraph (text between blank lines), so a book or a dump gets natural
  document boundaries and no single document has to be the whole file.

Documents that are empty or only whitespace are skipped. Bad input raises `DataError` naming the file,
the line or record, and the field; given a `SkipCounter`, bad records (a JSON line that does not parse, a
record without a string in the text field, undecodable bytes) are skipped and counted instead. Which
records are bad depends on the file alone, so every rank and every resumed run skips the same ones.
Missing files, unknown types and files whose records cannot be told apart (a broken JSON array or
Parquet file) are errors either way.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pretrain.config import CORPUS_SUFFIXES
from pretrain.shuffle import Shuffle, shuffled

if TYPE_CHECKING:  # token_cache builds on this module
    from pretrain.token_cache import TokenCache

_BUILDERS = CORPUS_SUFFIXES
_TOKENIZE_BATCH = 256  # texts per tokenizer call, within PIECE_CHARS: the fast tokenizer parallelises a call
# The most characters one tokenizer call gets, in all its texts; longer documents are cut into pieces of
# at most this many. A call holds ~100 bytes per character while it runs (its encodings): ~7 MB here,
# against ~10 GB for a 100 MB record tokenized whole (benchmarks/long_record.md). Tokenizing costs the
# same per character from 16K- to 64K-character pieces and more beyond (the sentencepiece-converted
# tokenizer merges a whole text as one word), and 64K keeps most ordinary documents (articles, web
# pages, source files) in one piece, tokenized exactly as before.
PIECE_CHARS = 1 << 16
SKIP_EXAMPLES = 5  # bad records logged and kept as examples; the rest are only counted


_MISSING = object()


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and, where known, line/record and field."""


@dataclass
class SkipCounter:
    """Bad records skipped instead of raising: how many, and the first few messages (file, line, why)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < SKIP_EXAMPLES:
            self.examples.append(message)
        if self.count <= SKIP_EXAMPLES:
            more = "; further bad records are counted, not logged" if self.count == SKIP_EXAMPLES else ""
            logging.getLogger("pretrain").warning("skipped bad record: %s%s", message, more)


class BadRecord(DataError):
    """A record that cannot be used, under `on_bad_record: error` (`skip` would pass over it)."""


class Refusal(SkipCounter):
    """The 'error' policy as a counter: the first bad record raises BadRecord, naming it."""

    def add(self, message: str) -> None:
        raise BadRecord(message)


def bad_record_counter(policy: str) -> SkipCounter | None:
    """A fresh counter if `train.on_bad_record` is 'skip'; None (the first bad record raises) if 'error'."""
    return SkipCounter() if policy == "skip" else None


# ---------------------------------------------------------------------------------------------- reading


def read_documents(
    files: list[str], text_field: str = "text", skip: SkipCounter | None = None
) -> Iterator[str]:
    """The non-empty documents of `files`, in order, streamed (see the module docstring for formats).

    Without `skip` the first bad record raises DataError; with it, each bad record read is counted there.
    """
    for path in files:
        yield from _file_documents(str(path), text_field, skip if skip is not None else Refusal())


def _text(builder: str, record: dict, text_field: str) -> str | None:
    """A record's document, None when it has no string in the text field."""
    if builder == "text":
        return record["text"].strip("\n")  # a run of 3+ newlines leaves newlines at a paragraph's ends
    text = record.get(text_field)
    return text if isinstance(text, str) else None


def _file_documents(path: str, text_field: str, skip: SkipCounter) -> Iterator[str]:
    """A file's documents, each bad record handed to `skip` (which counts it, or raises naming it).

    JSON is read with `json`: an array whole, JSON Lines line by line (which also names a bad line without
    re-reading the file; `datasets` failed a whole 10 MiB chunk for one bad line, or for a valid record whose
    types differed from the first chunk's, and then parsed the whole file into memory at once). Text and
    Parquet take the `datasets` path; a text file is read line by line from the first paragraph it fails
    on, the paragraphs before it delivered already and passed over.
    """
    builder = _builder(path)
    if builder == "json":
        if _is_json_lines(path):
            yield from _json_lines_by_line(path, text_field, skip)
        else:
            yield from _json_array_documents(path, text_field, skip)
        return
    n = 0  # records read through datasets
    try:
        for record in _dataset_records(path, builder, text_field):
            text = _text(builder, record, text_field)
            if text is None:  # a Parquet row without a string in the text field
                skip.add(f"{path}: {_bad_record(n, text_field, record)}")
            elif text.strip():
                yield text
            n += 1
        return
    except DataError:  # a bad record under the 'error' policy
        raise
    except Exception as err:  # pyarrow and unicode errors alike; only a text file can go on past the bad
        if builder != "text":  # line, the others are diagnosed here
            raise DataError(f"{path}: {_diagnose(path, builder) or f'cannot be read ({err})'}") from err
    yield from _paragraphs_by_line(path, skip, start=n)


def _json_lines_by_line(path: str, text_field: str, skip: SkipCounter) -> Iterator[str]:
    """The documents of a JSON Lines file (records are its non-blank lines), read with the json module,
    bad ones counted in `skip`."""
    record = -1
    with open(path, "rb") as f:
        # a lone CR ends a line too (old Mac files; datasets read them so): JSON holds no raw CR in a string
        lines = (line for raw in f for line in raw.splitlines() or [raw])
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, which datasets drops too
            if not raw.strip():
                continue
            record += 1
            text, why = _json_line_text(raw, text_field)
            if text is None:
                skip.add(f"{path}: line {number} (record {record + 1}): {why}")
            elif text.strip():
                yield text


def _json_array_documents(path: str, text_field: str, skip: SkipCounter) -> Iterator[str]:
    """A JSON array's documents, read with `json`: datasets (which loads an array whole too) drops a lone
    surrogate escape without a word, where a JSON Lines file names the record."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte order mark, as datasets read it too
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: {_diagnose(path, 'json') or f'cannot be read ({err})'}") from err
    for n, record in enumerate(records, start=1):
        text, why = _record_text(record, text_field)
        if text is None:
            skip.add(f"{path}: record {n}: {why}")
        elif text.strip():
            yield text


def _json_line_text(raw: bytes, text_field: str) -> tuple[str | None, str]:
    """(document, '') of one JSON line, or (None, why it has none)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    return _record_text(obj, text_field)


def _record_text(obj: object, text_field: str) -> tuple[str | None, str]:
    """(document, '') of one parsed JSON record, or (None, why it has none)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    text = obj.get(text_field, _MISSING)
    if not isinstance(text, str):
        return None, _describe_value(text, text_field)
    surrogate = lone_surrogate(text)
    return (None, f"field {text_field!r} {surrogate}") if surrogate else (text, "")


def lone_surrogate(text: str) -> str:
    """Why `text` cannot be tokenized, if it holds a lone surrogate (JSON allows the escape: a truncated
    emoji, "\\ud83d"); '' if it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        return f"holds a lone surrogate (\\u{code:04x} at character {err.start}), which is not text"
    return ""


def _paragraphs_by_line(path: str, skip: SkipCounter, start: int) -> Iterator[str]:
    """The documents of a text file from paragraph `start` on, split as datasets splits them (on blank
    lines, newlines translated), a paragraph with undecodable bytes counted in `skip`."""
    line, paragraph = 1, -1
    for piece in _split_text(path, "\n\n"):
        first_line, line = line, line + piece.count("\n") + 2
        if not piece:
            continue
        paragraph += 1
        if paragraph < start:
            continue
        try:
            piece.encode("utf-8")  # undecodable bytes were read as lone surrogates, which do not encode
        except UnicodeEncodeError as err:
            bad = first_line + piece.count("\n", 0, err.start)
            byte = ord(piece[err.start]) - 0xDC00
            skip.add(f"{path}: line {bad} (paragraph {paragraph + 1}): not valid UTF-8 (byte {byte:#04x})")
            continue
        text = piece.strip("\n")
        if text.strip():
            yield text


def _split_text(path: str, sep: str, chunk: int = 1 << 20) -> Iterator[str]:
    """The file's text split on `sep`, streamed; bytes that are not UTF-8 come as lone surrogates."""
    rest = ""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        while data := f.read(chunk):
            *pieces, rest = (rest + data).split(sep)
            yield from pieces
    yield rest


def _builder(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(
            f"{path}: unknown file type {suffix or '(none)'!r}; expected one of {sorted(_BUILDERS)}"
        )
    if not Path(path).is_file():
        raise DataError(f"{path}: file does not exist")
    return _BUILDERS[suffix]


def _dataset_records(path: str, builder: str, text_field: str) -> Iterator[dict]:
    import datasets  # deferred: importing datasets costs about a second

    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    # escaped: data_files are glob patterns, and `c[1].txt` read c1.txt
    ds = datasets.load_dataset(
        builder, data_files=[glob.escape(path)], split="train", streaming=True, **kwargs
    )
    if builder != "text" and ds.features is not None and text_field in ds.features:
        ds = ds.select_columns([text_field])  # other columns are never read: faster
    yield from ds


def _diagnose(path: str, builder: str) -> str | None:
    """The first line that does not decode, as 'line N: why', or where a JSON array does not parse; None
    if none (JSON Lines are read line by line and name their bad lines themselves)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
    if builder == "json":
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as err:
            return f"not a valid JSON array ({err.msg} at line {err.lineno}, column {err.colno})"
    return None


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _bad_record(index: int, field: str, record: dict) -> str:
    """Why row `index` (0-based) of a Parquet file has no usable text."""
    return f"record {index + 1}: {_describe_value(record.get(field, _MISSING), field)}"


def _describe_value(value: object, field: str) -> str:
    if value is _MISSING:
        return f"field {field!r} is missing"
    if value is None:
        return f"field {field!r} is null"
    return f"field {field!r} has type {type(value).__name__}, expected a string"


def _is_json_lines(path: str) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix == ".jsonl" or (suffix == ".json" and not _starts_with_bracket(path))


# ---------------------------------------------------------------------------------------------- packing


def pack_blocks(docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[list[int]]:
    """Token ids of consecutive documents, each followed by EOS, in blocks of exactly seq_len tokens.

    Blocks cross document boundaries (the EOS marks them); only the final partial block is dropped.
    """
    for block, _, _ in _pack(docs, seq_len, eos_id):
        yield block


def _pack(
    docs: Iterable[list[int]], seq_len: int, eos_id: int, doc: int = 0, offset: int = 0
) -> Iterator[tuple[list[int], int, int]]:
    """pack_blocks, each block with where the next one starts: (document index, token offset in it).

    `docs` starts at document `doc`, of which the first `offset` tokens are skipped: resuming there
    continues the packing exactly, without tokenizing the documents before it.
    """
    return _pack_pieces(((ids, True) for ids in docs), seq_len, eos_id, doc, offset)


def _join_lists(parts: list[Sequence[int]]) -> list[int]:
    joined: list[int] = []
    for part in parts:  # a block has few parts: faster than itertools.chain here
        joined.extend(part)
    return joined


def _pack_pieces(
    pieces: Iterable[tuple[Sequence[int], bool]],
    seq_len: int,
    eos_id: int,
    doc: int = 0,
    offset: int = 0,
    join: Callable[[list], Sequence[int]] = _join_lists,
) -> Iterator[tuple[Sequence[int], int, int]]:
    """_pack from documents that come in pieces: (token ids, whether the piece ends its document).

    A document's tokens are never gathered: each piece is packed as it comes. The position yielded is
    still the token offset in the whole document, and `offset` skips that many of its pieces' tokens.
    `join` makes one sequence of a block's parts (slices of pieces): lists by default; the pre-tokenized
    reader's pieces are numpy arrays, joined by np.concatenate without a Python int per token.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    parts: list[Sequence[int]] = []
    have = 0  # tokens in parts
    d, before = doc, 0  # the document being packed, and its tokens in the pieces before this one
    for ids, last in pieces:
        tokens = join([ids, [eos_id]]) if last else ids
        i = min(max(offset - before, 0), len(tokens)) if d == doc else 0
        while have + len(tokens) - i >= seq_len:
            take = seq_len - have
            parts.append(tokens[i : i + take])
            i += take
            yield join(parts), *((d, before + i) if i < len(tokens) or not last else (d + 1, 0))
            parts, have = [], 0
        if i < len(tokens):
            parts.append(tokens[i:])
            have += len(tokens) - i
        d, before = (d + 1, 0) if last else (d, before + len(ids))


def _token_pieces(texts: Iterable[str], tokenizer) -> Iterator[tuple[list[int], bool]]:
    """(token ids, ends its document) per piece of each document, in order (see _pieces).

    Pieces of several documents share a tokenizer call, up to _TOKENIZE_BATCH of them and PIECE_CHARS
    characters in all, so no call and no list of ids grows with a document's size.
    """
    batch: list[str] = []
    ends: list[bool] = []
    size = 0
    for text in texts:
        for piece, last in _pieces(text):
            if batch and (size + len(piece) > PIECE_CHARS or len(batch) == _TOKENIZE_BATCH):
                yield from zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends, strict=True)
                batch, ends, size = [], [], 0
            batch.append(piece)
            ends.append(last)
            size += len(piece)
    if batch:
        yield from zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends, strict=True)


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, is the last) of a document: the whole text if it has at most PIECE_CHARS characters.

    A longer one is cut before a single space between two non-space characters, the last such place
    within the limit. Byte-level BPE pre-tokenizers (GPT-2's regex and its kin) always start a pre-token
    there, and so does sentencepiece (split by whitespace, no dummy prefix, as pretrain.tokenizer trains
    it): no merge spans the cut, and the pieces' tokens are the whole text's. Only a stretch of
    PIECE_CHARS characters without such a space (minified code, base64, unspaced scripts) is cut hard
    at the limit, where the tokens next to the cut may differ from the whole text's.
    """
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _cut(text, start, start + PIECE_CHARS)
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _cut(text: str, start: int, end: int) -> int:
    """The last i in (start, end] where text[i] is a space between two non-space characters, else end."""
    i = text.rfind(" ", start + 1, min(end + 1, len(text) - 1))
    while i > start:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", start + 1, i)
    return end


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which marks document boundaries in packed blocks")
    return tokenizer.eos_token_id


def ids_tensor(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rows of token ids of one length (lists or arrays) as a long tensor [n, len]: through numpy, which
    converts a list of Python ints several times faster than torch.tensor does."""
    return torch.from_numpy(np.array(rows, dtype=np.int64))


def heldout_blocks(
    files: list[str],
    text_field: str,
    tokenizer,
    seq_len: int,
    max_blocks: int,
    skip: SkipCounter | None = None,
) -> torch.Tensor:
    """A domain's fixed evaluation set: its first max_blocks packed blocks [n, seq_len], same on all ranks.

    With `skip`, the bad records read on the way are skipped and counted (see read_documents).
    """
    pieces = _token_pieces(read_documents(files, text_field, skip), tokenizer)
    packed = _pack_pieces(pieces, seq_len, _eos_id(tokenizer))
    blocks = [block for block, _, _ in islice(packed, max_blocks)]
    if not blocks:
        raise DataError(
            f"held-out set smaller than one evaluation block of {seq_len} tokens: "
            + ", ".join(map(str, files))
        )
    return ids_tensor(blocks)


# ---------------------------------------------------------------------------------------------- streaming


def file_sizes(files: Sequence[str]) -> list[int]:
    return [os.path.getsize(f) for f in files]


class ResumableStream:
    """A stream's saved position (TrainStream's, instruct.ExampleStream's) and what a resume must match.

    A subclass sets `files`, `file_sizes` (taken when it starts: a file changed while it trains is caught
    too), `rank`, `world_size`, `seq_len`, `shuffle`, `skip`, `_skipped` (bad records counted into skip)
    and `_pos` (a frozen dataclass of ints); `_identity()` adds what else must match on resume.
    """

    _kind = "data stream"

    def _identity(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {
            **asdict(self._pos),
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "files": list(self.files),
            "file_sizes": self.file_sizes,
            **self._identity(),
            "shuffle": None if self.shuffle is None else [self.shuffle.seed, self.shuffle.buffer],
            "skipped": self._skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("rank", "world_size", "seq_len", "files", *self._identity(), "shuffle"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"{self._kind} state is for {key}={state.get(key)!r}, this stream has {mine[key]!r}: "
                    f"a resumed run needs the same {', '.join(['files', *self._identity()])}, sequence "
                    "length, ranks and shuffle"
                )
        check_unchanged(state, mine)
        self._pos = type(self._pos)(**{k: int(state[k]) for k in asdict(self._pos)})
        skipped = max(self._skipped, int(state.get("skipped", 0)))
        if self.skip is not None:
            self.skip.count += skipped - self._skipped
        self._skipped = skipped


def check_unchanged(saved: dict, now: dict) -> None:
    """DataError if a file's size differs from the one a stream's saved state recorded (none recorded in
    a checkpoint from before 2026-11-28): its position counts blocks of the files it read, so in an edited
    or regenerated corpus it would repeat or skip documents without a word."""
    sizes = now["file_sizes"]
    for path, then, size in zip(now["files"], saved.get("file_sizes") or sizes, sizes, strict=True):
        if then != size:
            raise DataError(
                f"{path}: {then} bytes when the run began to read it, {size} now: the stream's "
                "position counts the blocks it read, so in a changed file it would repeat or skip documents; "
                "put the file back as it was, or start a new run"
            )


@dataclass(frozen=True)
class _Position:
    """A block boundary of the endless stream: where packing resumes and whose blocks are whose.

    In epoch `epoch`, block n goes to rank (shift + n) % world_size, shift being (blocks of all earlier
    epochs) % world_size; packing resumes at block `block`, which starts `offset` tokens into document `doc`.
    """

    epoch: int = 0
    shift: int = 0
    block: int = 0
    doc: int = 0
    offset: int = 0


class TrainStream(ResumableStream):
    """This rank's batches [micro_batch_size, seq_len] of a domain's packed blocks, epoch after epoch.

    Sharding: the blocks of the endless stream (epoch after epoch) are numbered g = 0, 1, 2, ...; block g
    goes to rank g % world_size, and each rank's consecutive blocks form its batches. In the first epoch
    that is block b -> rank b % world_size. An epoch whose block count is not a multiple of the world size
    does not drop its incomplete final round: the round is completed with the first blocks of the next
    epoch, so all ranks take one batch per step forever, every block is seen as often as any other (give
    or take one), and the ranks' batches of one step are world_size * micro_batch_size consecutive blocks,
    all distinct because the corpus must hold at least that many. With `cache` (pretrain/token_cache.py)
    the documents' ids are read pre-tokenized: the same blocks. Iterate one iterator at a time:
    `state_dict()` is the position of the batches handed out so far.

    With `skip`, bad records are skipped (the same ones on every rank, in every epoch: document indices
    count delivered documents) and each is counted once per stream, the first time it is read, not again
    in later epochs. The state dict carries that count: loading it adds to `skip` what the saved stream
    had counted, and the records before the resume point, read again to get there, are not counted twice.
    """

    def __init__(
        self,
        files,
        text_field,
        tokenizer,
        seq_len,
        rank,
        world_size,
        micro_batch_size,
        skip: SkipCounter | None = None,
        min_blocks: int | None = None,
        shuffle: Shuffle | None = None,
        cache: TokenCache | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.files = [str(f) for f in files]
        self.file_sizes = file_sizes(self.files)  # at the start: a file changed while it trains is caught too
        self.text_field = text_field
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.eos_id = _eos_id(tokenizer)
        self.skip = skip
        self.shuffle = shuffle  # None: documents in file order
        self.cache = cache  # holding these files' ids; None: tokenize the text
        self._skipped = 0  # bad records counted into skip: the first ones any pass meets
        self._pos = _Position()
        self._check_size(min_blocks)

    def _check_size(self, min_blocks: int | None) -> None:
        # Reads only as far as one step of all ranks needs, so a large corpus costs nothing here.
        need = min_blocks or self.world_size * self.micro_batch_size
        what = f"{self.world_size} ranks x micro batch {self.micro_batch_size}"
        if min_blocks:
            what = f"{min_blocks} distinct blocks a micro-step"
        if sum(1 for _ in islice(self._blocks(_Position()), need)) < need:
            raise DataError(
                f"corpus too small for {what} "
                f"(fewer than {need} blocks of {self.seq_len} tokens): {', '.join(self.files)}"
            )

    def _blocks(self, pos: _Position) -> Iterator[tuple[int, Sequence[int], int, int]]:
        """(block number in the epoch, block, next doc, next offset) from `pos` to the end of the epoch."""
        skip = None if self.skip is None else _NewSkips(self)
        if self.cache is None:
            docs = read_documents(self.files, self.text_field, skip)
        else:
            docs = self.cache.documents(self.files, self.text_field, skip)
        if self.shuffle is not None:  # documents count in shuffled order: pos.doc is the same either way
            docs = shuffled(docs, self.shuffle, pos.epoch)
        docs = islice(docs, pos.doc, None)
        if self.cache is None:
            pieces, join = _token_pieces(docs, self.tokenizer), _join_lists
        else:
            pieces, join = self.cache.pieces(docs), np.concatenate
        packed = _pack_pieces(pieces, self.seq_len, self.eos_id, pos.doc, pos.offset, join)
        for n, (block, doc, offset) in enumerate(packed, start=pos.block):
            yield n, block, doc, offset

    def __iter__(self) -> Iterator[torch.Tensor]:
        pos, batch = self._pos, []
        while True:
            n = pos.block - 1
            for n, block, doc, offset in self._blocks(pos):
                if (pos.shift + n) % self.world_size != self.rank:
                    continue
                batch.append(block)
                if len(batch) == self.micro_batch_size:
                    # Recorded before the yield: the state names what the consumer has received.
                    self._pos = replace(pos, block=n + 1, doc=doc, offset=offset)
                    yield ids_tensor(batch)
                    batch = []
            pos = _Position(epoch=pos.epoch + 1, shift=(pos.shift + n + 1) % self.world_size)
            logging.getLogger(__name__).debug("rank %d: epoch %d of %s", self.rank, pos.epoch, self.files)


class _NewSkips:
    """One pass's view of a stream's SkipCounter that passes on only the bad records not counted yet.

    Every pass reads the files from their start and the same records are bad each time, so the k-th bad
    record of any pass is the same record: the ones up to the stream's count were counted already.
    """

    def __init__(self, stream: TrainStream):
        self.stream, self.seen = stream, 0

    def add(self, message: str) -> None:
        self.seen += 1
        if self.seen > self.stream._skipped:
            self.stream._skipped = self.seen
            self.stream.skip.add(message)


def reshard_stream_state(states: list[dict], rank: int, world_size: int) -> dict:
    """The state of rank `rank` of `world_size` continuing the streams whose ranks saved `states`.

    At a step boundary every rank has taken the same number of batches, so the last rank's position is the
    boundary after the last block any rank took (every rank reads every document alike). From there the
    new ranks share the blocks as at the start of a phase, the next block going to rank 0: each
    micro-step's blocks are the same consecutive blocks, none skipped or repeated.
    """
    last = states[-1]
    return {**last, "shift": -last["block"] % world_size, "rank": rank, "world_size": world_size}
