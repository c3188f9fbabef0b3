"""Instruction examples: labelled records rendered as prompt + answer, one right-padded row each, the loss
on the answer only.

A record of a JSON Lines file, e.g. {"text": ..., "label": ...}, is filled into the domain's templates
(`instruction.prompt`, `instruction.answer`: literal text and `{field}` placeholders naming record fields;
`{{`/`}}` are literal braces) and becomes prompt tokens + answer tokens + EOS, right-padded to seq_len:

    input_ids       p1 ..  pk   a1 .. am  EOS  PAD ..
    labels        -100 .. -100  a1 .. am  EOS  -100 ..
    attention_mask   1 ..   1    1 ..  1   1    0 ..

transformers shifts the labels (the logits at t predict labels[t + 1]), so a1 is predicted from pk and
the EOS from am: the answer and its end are trained, the prompt and the padding are not. The attention
mask also tells MIGU which tokens are real (its magnitudes exclude padding). Prompt and answer are
tokenized apart, without special tokens, so an answer has the same tokens whatever its prompt. Too long:
the prompt loses its beginning (its end, next to the answer, is kept); the answer is never cut, and an
answer whose tokens and EOS leave no room for one prompt token is a bad record (train.on_bad_record).

`ExampleStream` has TrainStream's contract (pretrain/data.py) with examples for blocks: the examples of
the endless stream are numbered g = 0, 1, 2, ... over epochs and example g goes to rank g % world_size,
so the global sequence is the same at every world size; the order within an epoch is the seeded shuffle
of pretrain/shuffle.py; `state_dict` is exact across a resume and `reshard_example_state` continues it
on another number of ranks. Each rank tokenizes the prompts of its own examples only, and the answers of
all (to drop one too long for seq_len before examples are numbered, alike on every rank; an answer is
the short part of an example, a label in the continual-learning tasks).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING

import torch

from pretrain.data import (
    BadRecord,
    DataError,
    Refusal,
    ResumableStream,
    SkipCounter,
    _NewSkips,
    file_sizes,
    ids_tensor,
    lone_surrogate,
)
from pretrain.shuffle import Shuffle, shuffled

if TYPE_CHECKING:
    from pretrain.config import InstructionConfig

IGNORE = -100  # the label transformers' loss ignores
_TOKENIZE_BATCH = 256  # examples per tokenizer call
_MISSING = object()


# ---------------------------------------------------------------------------------------------- templates


def template_problem(template: str) -> str | None:
    """Why `template` cannot be filled from a record's fields; None if it can."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        return f"{template!r} is not a template ({err}); write a literal brace as {{{{ or }}}}"
    if not template.strip():
        return "the template is empty"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or "." in name or "[" in name:
            return (
                f"placeholder {{{name}}} in {template!r}: name a record field, e.g. {{text}} "
                "(no positional, attribute or index placeholders)"
            )
        if spec or conversion:
            return f"placeholder {{{name}}} in {template!r}: a format spec or conversion is not supported"
    return None


def render(template: str, record: dict) -> tuple[str | None, str]:
    """(the filled template, '') or (None, why the record cannot fill it)."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = record.get(name, _MISSING)
        if value is _MISSING:
            return None, f"field {name!r} is missing"
        if value is None or not isinstance(value, str | int | float):
            kind = "null" if value is None else f"of type {type(value).__name__}"
            return None, f"field {name!r} is {kind}, expected a string or a number"
        out.append(str(value))
    return "".join(out), ""


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    where: str  # "file: line N", for messages

    def __len__(self) -> int:  # characters held: the shuffle buffer's cap counts them
        return len(self.prompt) + len(self.answer)


def read_examples(
    files: list[str], instruction: InstructionConfig, skip: SkipCounter | None = None
) -> Iterator[Example]:
    """The rendered examples of JSON Lines `files`, in order. A bad record (not JSON, not an object, a
    template's field missing or not a string/number, an empty prompt) raises DataError naming the file,
    the line and the field, or is counted in `skip` and passed over."""
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue
                where = f"{path}: line {number}"
                example, why = _example(raw, instruction, where)
                if example is not None:
                    yield example
                elif skip is None:
                    raise BadRecord(f"{where}: {why}")
                else:
                    skip.add(f"{where}: {why}")


def _example(raw: bytes, instruction: InstructionConfig, where: str) -> tuple[Example | None, str]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    prompt, why = render(instruction.prompt, record)
    if prompt is None:
        return None, f"{why} (instruction.prompt)"
    answer, why = render(instruction.answer, record)
    if answer is None:
        return None, f"{why} (instruction.answer)"
    if not prompt.strip():
        return None, "the prompt is empty or only whitespace"
    for part, text in (("prompt", prompt), ("answer", answer)):
        if surrogate := lone_surrogate(text):
            return None, f"the {part} {surrogate} (instruction.{part})"
    return Example(prompt, answer, where), ""


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Examples:
    """A batch of example rows [n, seq_len]: token ids, labels (IGNORE off the answer), attention mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def of(cls, rows: list[tuple[list[int], list[int], list[int]]]) -> Examples:
        ids, labels, mask = zip(*rows, strict=True)
        return cls(*map(ids_tensor, (ids, labels, mask)))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: slice) -> Examples:
        return Examples(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def to(self, device) -> Examples:
        return Examples(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))


def model_inputs(batch: torch.Tensor | Examples) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments for a training batch: packed text blocks train on every token."""
    if isinstance(batch, Examples):
        return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask}
    return {"input_ids": batch, "labels": batch}


def fitting(
    examples: Iterable[Example], tokenizer, seq_len: int, skip: SkipCounter | None
) -> Iterator[Example]:
    """The examples whose answer and EOS leave room for a prompt token in `seq_len`. The others are bad
    records (counted in `skip`; without one the first raises, naming it), dropped before examples are
    numbered, so every rank, at any world size, numbers the same examples alike."""
    skip = skip if skip is not None else Refusal()
    it = iter(examples)
    while chunk := list(islice(it, _TOKENIZE_BATCH)):
        answers = tokenizer([e.answer for e in chunk], add_special_tokens=False)["input_ids"]
        for e, answer in zip(chunk, answers, strict=True):
            if len(answer) + 1 < seq_len:
                yield e
            else:
                skip.add(_too_long(e.where, len(answer), seq_len))


def _too_long(where: str, answer: int, seq_len: int) -> str:
    return (
        f"{where}: the answer is {answer} tokens and EOS, which leaves no room for the prompt in "
        f"train.seq_len {seq_len}; raise train.seq_len (an answer is never cut)"
    )


def encode_row(
    prompt: list[int], answer: list[int], eos_id: int, pad_id: int, seq_len: int, where: str = "an example"
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, attention_mask) of one example; see the module docstring."""
    answer = [*answer, eos_id]
    room = seq_len - len(answer)
    if room < 1:
        raise DataError(_too_long(where, len(answer) - 1, seq_len))
    prompt = prompt[-room:]
    ids, pad = prompt + answer, seq_len - len(prompt) - len(answer)
    labels = [IGNORE] * len(prompt) + answer + [IGNORE] * pad
    return ids + [pad_id] * pad, labels, [1] * len(ids) + [0] * pad


def encode_examples(
    numbered: Iterable[tuple[int, Example]], tokenizer, seq_len: int
) -> Iterator[tuple[int, tuple[list[int], list[int], list[int]]]]:
    """(n, row) for each (n, example), tokenized a batch of examples per tokenizer call."""
    eos_id, pad_id = special_ids(tokenizer)
    it = iter(numbered)
    while chunk := list(islice(it, _TOKENIZE_BATCH)):
        prompts = tokenizer([e.prompt for _, e in chunk], add_special_tokens=False)["input_ids"]
        answers = tokenizer([e.answer for _, e in chunk], add_special_tokens=False)["input_ids"]
        for (n, e), p, a in zip(chunk, prompts, answers, strict=True):
            yield n, encode_row(p, a, eos_id, pad_id, seq_len, e.where)


def special_ids(tokenizer) -> tuple[int, int]:
    """(EOS, padding) ids; padding is EOS where the tokenizer has no pad token (it is masked anyway)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which ends every instruction example's answer")
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id, tokenizer.eos_token_id if pad is None else pad


def heldout_examples(
    files: list[str],
    instruction: InstructionConfig,
    tokenizer,
    seq_len: int,
    max_examples: int,
    skip: SkipCounter | None = None,
) -> Examples:
    """An instruction domain's fixed evaluation set: its first max_examples examples, in file order."""
    fit = fitting(read_examples(files, instruction, skip), tokenizer, seq_len, skip)
    examples = enumerate(islice(fit, max_examples))
    rows = [row for _, row in encode_examples(examples, tokenizer, seq_len)]
    if not rows:
        raise DataError(f"held-out set without an example: {', '.join(map(str, files))}")
    return Examples.of(rows)


# ---------------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class _Position:
    """In epoch `epoch`, example n goes to rank (shift + n) % world_size, shift being (examples of all
    earlier epochs) % world_size; the stream resumes at example `example` of the epoch."""

    epoch: int = 0
    shift: int = 0
    example: int = 0


class ExampleStream(ResumableStream):
    """This rank's batches (Examples of micro_batch_size rows) of an instruction domain, epoch after epoch.

    As TrainStream with one example per block: an epoch's incomplete last round is completed from the next
    epoch, and `skip` counts each bad record once per stream, across epochs and resumes.
    """

    _kind = "example stream"

    def __init__(
        self,
        files,
        instruction: InstructionConfig,
        tokenizer,
        seq_len: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        skip: SkipCounter | None = None,
        shuffle: Shuffle | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.files = [str(f) for f in files]
        self.file_sizes = file_sizes(self.files)  # at the start: a file changed while it trains is caught too
        self.instruction = instruction
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.skip = skip
        self.shuffle = shuffle
        self._skipped = 0  # bad records counted into skip (see data._NewSkips)
        self._pos = _Position()
        special_ids(tokenizer)
        self._check_size()

    def _check_size(self) -> None:
        need = self.world_size * self.micro_batch_size
        if sum(1 for _ in islice(self._numbered(_Position()), need)) < need:
            raise DataError(
                f"too few examples for {self.world_size} ranks x micro batch {self.micro_batch_size} "
                f"(fewer than {need}): {', '.join(self.files)}"
            )

    def _numbered(self, pos: _Position) -> Iterator[tuple[int, Example]]:
        """(number in the epoch, example) from `pos` to the end of the epoch."""
        skip = None if self.skip is None else _NewSkips(self)
        examples = fitting(
            read_examples(self.files, self.instruction, skip), self.tokenizer, self.seq_len, skip
        )
        if self.shuffle is not None:
            examples = shuffled(examples, self.shuffle, pos.epoch)
        return enumerate(islice(examples, pos.example, None), start=pos.example)

    def __iter__(self) -> Iterator[Examples]:
        pos, batch = self._pos, []
        while True:
            end = [pos.example]  # the epoch's example count, once its examples are all read

            def mine(pos=pos, end=end) -> Iterator[tuple[int, Example]]:
                for n, example in self._numbered(pos):
                    end[0] = n + 1
                    if (pos.shift + n) % self.world_size == self.rank:
                        yield n, example

            for n, row in encode_examples(mine(), self.tokenizer, self.seq_len):
                batch.append(row)
                if len(batch) == self.micro_batch_size:
                    self._pos = replace(pos, example=n + 1)  # before the yield: what was handed out
                    yield Examples.of(batch)
                    batch = []
            pos = _Position(epoch=pos.epoch + 1, shift=(pos.shift + end[0]) % self.world_size)

    def _identity(self) -> dict:
        return {"instruction": [self.instruction.prompt, self.instruction.answer]}


def is_example_state(state: dict) -> bool:
    return "example" in state and "instruction" in state


def reshard_example_state(states: list[dict], rank: int, world_size: int) -> dict:
    """The state of rank `rank` of `world_size` continuing the example streams that saved `states`.

    As data.reshard_stream_state: at a step boundary the last rank holds the last example any rank took,
    and from the next one on the new ranks share the examples as at a phase's start, the next to rank 0.
    """
    last = states[-1]
    return {**last, "shift": -last["example"] % world_size, "rank": rank, "world_size": world_size}
