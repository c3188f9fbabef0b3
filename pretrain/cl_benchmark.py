"""Continual-learning benchmark tasks for lm-evaluation-harness, and a converter from the original layout.

A task directory holds `test.jsonl` (and usually `train.jsonl`): one `{"text", "label"}` record a line,
and `labels.json`, the task's label strings. `task_config` makes it an lm-eval multiple-choice task
(templates/cl_multiple_choice.yaml with the directory's name, test file and labels filled in; the answer
is the label the model scores highest; `instruction_fields` scores it with an instruction domain's prompt
and answer templates instead, the text a phase trained on), `write_task_yaml` writes that task as a file
for `lm_eval --tasks` or `eval.tasks`. `convert` turns the benchmark's original layout (per split a JSON
list of `{"sentence", "label"}`, and labels.json, as the MIGU repository's CL_Benchmark/ has it) into ours.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Any

import yaml

from pretrain.atomic import foreign_file, replace_dir, write_text_atomic
from pretrain.data import lone_surrogate
from pretrain.instruct import template_problem

TEMPLATE = Path(__file__).parent / "templates" / "cl_multiple_choice.yaml"
LABELS = "labels.json"
SPLITS = ("train", "dev", "test")


class TaskDataError(ValueError):
    """A task directory or original-layout file that cannot be used; the message names the file."""


def is_task_dir(path: str | Path) -> bool:
    return (Path(path) / LABELS).is_file()


def task_name(directory: str | Path) -> str:
    """The lm-eval task name of a directory: `cl_<name>`, so it never collides with lm-eval's own tasks
    (its `copa` is SuperGLUE's, with another prompt)."""
    return f"cl_{Path(directory).resolve().name}"


def task_config(directory: str | Path, instruction: tuple[str, str] | None = None) -> dict[str, Any]:
    """The lm-eval task config of a benchmark directory; TaskDataError if its files cannot be used.
    `instruction`: (prompt, answer) templates to score it with (instruction_fields) instead of the plain
    "{text}\nAnswer: {label}"."""
    directory = Path(directory).resolve()
    labels = read_labels(directory / LABELS)
    test = directory / "test.jsonl"
    check_records(test, labels)
    config = {
        "task": task_name(directory),
        **yaml.safe_load(TEMPLATE.read_text()),
        "dataset_kwargs": {"data_files": {"test": str(test)}},
        "doc_to_choice": labels,
    }
    return config | (instruction_fields(*instruction, labels) if instruction else {})


def instruction_fields(prompt: str, answer: str, labels: list[str]) -> dict[str, Any]:
    """The task's text as an instruction domain renders it (pretrain/instruct.py): the context is the
    prompt template filled from the record, each choice the answer template filled with that label, so a
    phase is scored on the text it trained on. The prompt may use {text} only (the label would give the
    answer away), the answer {label} only."""
    for template, fields in ((prompt, {"text"}), (answer, {"label"})):
        problem = template_problem(template)
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        if problem or not used or used - fields:
            raise TaskDataError(
                f"instruction template {template!r} cannot score a benchmark task: "
                f"{problem or f'its placeholders must be {sorted(fields)}, got {sorted(used)}'}"
            )
    (before, _, _, _), *rest = string.Formatter().parse(answer)
    after = "".join(literal for literal, *_ in rest)
    if any(name is not None for _, name, _, _ in rest):
        raise TaskDataError(f"answer template {answer!r}: {{label}} must appear once")
    return {
        "doc_to_text": _jinja(prompt),
        "target_delimiter": before,  # lm-eval scores target_delimiter + choice after the context
        "doc_to_choice": [label + after for label in labels],
        "doc_to_target": "label" if not after else "{{label}}" + _jinja_literal(after),
    }


def _jinja(template: str) -> str:
    """A Python format template of named fields as the Jinja template lm-eval renders."""
    return "".join(
        _jinja_literal(literal) + ("" if name is None else "{{" + name + "}}")
        for literal, name, _, _ in string.Formatter().parse(template)
    )


def _jinja_literal(text: str) -> str:
    return "{% raw %}" + text + "{% endraw %}" if "{" in text else text


def task_yaml_header(directory: str | Path) -> str:
    """The first line of the task YAML written for `directory`: tells it from a user's file of the name."""
    return f"# lm-eval task for {Path(directory).resolve()} (pretrain tasks yaml)\n"


def write_task_yaml(
    directory: str | Path, out_dir: str | Path, instruction: tuple[str, str] | None = None
) -> Path:
    """Write the directory's task as `out_dir/cl_<name>.yaml`, whole or not at all; a file of that name
    this function did not write for the same directory is refused, its own rewritten."""
    config = task_config(directory, instruction)
    out = Path(out_dir) / f"{config['task']}.yaml"
    _refuse_taken_yaml(out, directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out, task_yaml_header(directory) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    return out


def convert_task(source: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """`convert` the original-layout task `source` into `out_dir/<its name>`, then write its task YAML
    into out_dir; return both. The YAML's name is checked first: refused after the conversion, it would
    leave a converted directory that blocks every rerun."""
    task_dir = Path(out_dir) / Path(source).resolve().name
    _refuse_taken_yaml(Path(out_dir) / f"{task_name(task_dir)}.yaml", task_dir)
    convert(source, task_dir)
    return task_dir, write_task_yaml(task_dir, out_dir)


def _refuse_taken_yaml(out: Path, directory: str | Path) -> None:
    if foreign_file(out, task_yaml_header(directory)):
        raise TaskDataError(f"{out} exists and holds something else: remove it or choose another --out")


def read_labels(path: Path) -> list[str]:
    """labels.json: a JSON list of distinct, non-empty strings."""
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: a task directory needs its label list")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path} is not JSON: {err}") from err
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise TaskDataError(f"{path}: expected a non-empty JSON list of label strings, got {labels!r:.200}")
    if len(set(labels)) != len(labels):
        raise TaskDataError(f"{path}: labels must be distinct, got {labels}")
    return labels


def check_records(path: Path, labels: list[str]) -> int:
    """The number of `{"text", "label"}` records in a JSON Lines file; TaskDataError naming the line of a
    bad one (a label outside labels.json would silently score 0 in the harness)."""
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist")
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _utf8(raw, path, number)
            if line.strip():
                _check_record(_json_line(line, path, number), labels, f"{path}:{number}")
                count += 1
    if not count:
        raise TaskDataError(f"{path} holds no records")
    return count


def _utf8(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from err


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{path}:{number}: not JSON ({err})") from err


def _check_record(record: Any, labels: list[str], where: str, text: str = "text") -> None:
    if not isinstance(record, dict) or not isinstance(record.get(text), str):
        raise TaskDataError(f"{where}: expected an object with a string {text!r}, got {record!r:.200}")
    if why := lone_surrogate(record[text]):  # valid JSON, but no text: writing it out fails
        raise TaskDataError(f"{where}: {text!r} {why}")
    if record.get("label") not in labels:
        raise TaskDataError(f"{where}: label {record.get('label')!r} is not one of labels.json {labels}")


def convert(source: str | Path, out: str | Path) -> Path:
    """One task of the original layout (`SPLIT.json`: a JSON list of {"sentence", "label"}, for the splits
    train, dev, test that exist; labels.json) as a task directory `out` (new or empty): `SPLIT.jsonl` of
    {"text", "label"} records in the same order, and labels.json. Every file is checked before any is
    written."""
    source, out = Path(source), Path(out)
    labels = read_labels(source / LABELS)
    if not (source / "test.json").is_file():
        raise TaskDataError(f"{source}: no test.json (the split the task is scored on)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TaskDataError(f"{out} exists and is not an empty directory: choose another output")
    splits = {
        s: _original_records(source / f"{s}.json", labels) for s in SPLITS if (source / f"{s}.json").is_file()
    }
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a failure leaves no half task
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, records in splits.items():
        lines = (
            json.dumps({"text": r["sentence"], "label": r["label"]}, ensure_ascii=False) for r in records
        )
        (tmp / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    (tmp / LABELS).write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    replace_dir(tmp, out)  # absent or empty, as checked above
    return out


def _original_records(path: Path, labels: list[str]) -> list[dict[str, str]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskDataError(f"{path} is not JSON: {err}") from err
    if not isinstance(records, list):
        raise TaskDataError(f"{path}: expected a JSON list of {{'sentence', 'label'}} records")
    for i, record in enumerate(records):
        _check_record(record, labels, f"{path} record {i}", text="sentence")
    return records
