"""Continual-learning benchmark directories as lm-eval tasks, and the converter from the original layout,
on the vendored slice (tests/data/cl_benchmark: its README names source and licence)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import REPO

from pretrain.cl_benchmark import TEMPLATE, TaskDataError, convert, task_config, write_task_yaml
from pretrain.cli import main

DATA = REPO / "tests" / "data" / "cl_benchmark"
COPA, DBPEDIA = DATA / "copa", DATA / "dbpedia"


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def original_layout(target, source=COPA, splits=("train", "test")):
    """The benchmark as the MIGU repository ships it: per split a JSON list of {"sentence", "label"}."""
    target.mkdir(parents=True)
    for split in splits:
        rows = [{"sentence": r["text"], "label": r["label"]} for r in records(source / f"{split}.jsonl")]
        (target / f"{split}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    (target / "labels.json").write_text((source / "labels.json").read_text())
    return target


def test_a_directory_is_the_template_with_its_name_test_file_and_labels():
    config = task_config(DBPEDIA)
    template = yaml.safe_load(TEMPLATE.read_text())
    assert {k: config[k] for k in template} == template  # every key of the template, unchanged
    assert template["output_type"] == "multiple_choice" and template["doc_to_target"] == "label"
    assert config["task"] == "cl_dbpedia"
    assert config["doc_to_choice"] == json.loads((DBPEDIA / "labels.json").read_text())
    assert config["dataset_kwargs"] == {"data_files": {"test": str(DBPEDIA / "test.jsonl")}}


def test_the_written_yaml_is_the_same_task_for_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    path = write_task_yaml(COPA, tmp_path)
    assert path == tmp_path / "cl_copa.yaml"
    assert write_task_yaml(COPA, tmp_path) == path  # the same content again: fine
    task = TaskManager(include_defaults=False).load(str(path))["tasks"]["cl_copa"]
    docs = list(task.test_docs())
    assert docs == records(COPA / "test.jsonl")  # all 40 records, in file order
    assert task.doc_to_choice(docs[0]) == ["A", "B"]
    assert task.doc_to_text(docs[0]) == docs[0]["text"] + "\nAnswer:"
    path.write_text("task: mine\n")
    with pytest.raises(TaskDataError, match="exists and holds something else"):
        write_task_yaml(COPA, tmp_path)
    assert path.read_text() == "task: mine\n"


def test_a_task_yaml_it_wrote_is_rewritten_with_new_templates(tmp_path):
    plain = write_task_yaml(COPA, tmp_path)
    prompted = write_task_yaml(COPA, tmp_path, ("Q: {text}\nPick:", " {label}"))
    assert prompted == plain and yaml.safe_load(prompted.read_text())["doc_to_text"].startswith("Q: ")
    assert [p.name for p in tmp_path.iterdir()] == ["cl_copa.yaml"]  # written whole: no temporary left
    other = shutil.copytree(COPA, tmp_path / "elsewhere" / "copa")  # another task of the same name
    with pytest.raises(TaskDataError, match="exists and holds something else"):
        write_task_yaml(other, tmp_path)


def test_an_instruction_prompted_task_scores_the_text_its_phase_trained_on(tmp_path):
    """With an instruction domain's templates, lm-eval's requests are exactly what pretrain/instruct.py
    renders for training: the context is the filled prompt (a literal brace kept), each continuation the
    answer filled with that label, and the gold choice the record's label."""
    from lm_eval.tasks import TaskManager

    from pretrain.instruct import render

    prompt, answer = "Q {{x}}: {text}\nPick A or B:", " ({label})."
    path = write_task_yaml(COPA, tmp_path, (prompt, answer))
    task = TaskManager(include_defaults=False).load(str(path))["tasks"]["cl_copa"]
    docs = list(task.test_docs())
    assert {d["label"] for d in docs[:4]} == {"A", "B"}
    for doc in docs[:4]:
        requests = task.construct_requests(doc, task.doc_to_text(doc))
        assert [r.args for r in requests] == [
            (render(prompt, doc)[0], render(answer, {"label": label})[0]) for label in ("A", "B")
        ]
        # the gold choice: accuracy 1 exactly when the record's label scores highest
        assert task.process_results(doc, [(-1.0, False), (-2.0, False)])["acc"] == (doc["label"] == "A")
        assert task.process_results(doc, [(-2.0, False), (-1.0, False)])["acc"] == (doc["label"] == "B")
    for bad, message in (
        (("{label}: {text}", " {label}"), r"placeholders must be \['text'\], got \['label', 'text'\]"),
        (("{text}", " {label} or {label}"), "must appear once"),
        (("{text}", " {label!r}"), "format spec or conversion"),
        (("{text}", " yes"), r"placeholders must be \['label'\], got \[\]"),
    ):
        with pytest.raises(TaskDataError, match=message):
            task_config(COPA, bad)


def test_convert_turns_the_original_layout_into_a_task_directory(tmp_path):
    source = original_layout(tmp_path / "orig" / "copa")
    out = convert(source, tmp_path / "converted" / "copa")
    for split in ("train", "test"):
        assert records(out / f"{split}.jsonl") == records(COPA / f"{split}.jsonl")  # same records, order
    assert not (out / "dev.jsonl").exists()  # only the splits the source has
    assert json.loads((out / "labels.json").read_text()) == ["A", "B"]
    assert task_config(out)["task"] == "cl_copa"


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "test.json").unlink(), r"no test\.json"),
        (lambda d: (d / "labels.json").write_text('["A", "A"]'), "labels must be distinct"),
        (lambda d: (d / "train.json").write_text('{"sentence": "x"}'), r"train\.json: expected a JSON list"),
        (
            lambda d: (d / "test.json").write_text(
                '[{"sentence": "s", "label": "A"}, {"sentence": "t", "label": "C"}]'
            ),
            r"test\.json record 1: label 'C' is not one of labels\.json \['A', 'B'\]",
        ),
        (lambda d: (d / "test.json").write_text('[{"text": "s", "label": "A"}]'), "a string 'sentence'"),
        (  # valid JSON, no text: writing it failed midway, leaving a half task that blocked a rerun
            lambda d: (d / "test.json").write_text('[{"sentence": "cut \\ud83d", "label": "A"}]'),
            r"test\.json record 0: 'sentence' holds a lone surrogate",
        ),
    ],
)
def test_convert_names_what_is_wrong_and_writes_nothing(tmp_path, break_it, message):
    source = original_layout(tmp_path / "orig" / "copa")
    break_it(source)
    with pytest.raises(TaskDataError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_never_writes_into_a_directory_that_holds_files(tmp_path):
    source = original_layout(tmp_path / "orig" / "copa")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(TaskDataError, match="not an empty directory"):
        convert(source, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_cli_convert_refuses_a_taken_yaml_name_before_converting(tmp_path, capsys):
    # it converted first, then refused the YAML, and the half-done output blocked every rerun
    source = original_layout(tmp_path / "orig" / "copa", splits=("test",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "cl_copa.yaml").write_text("# my own copa task\n")
    with pytest.raises(SystemExit) as exit_:
        main(["tasks", "convert", str(source), "--out", str(out)])
    assert exit_.value.code == 2 and "cl_copa.yaml exists and holds something else" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cl_copa.yaml"]
    assert (out / "cl_copa.yaml").read_text() == "# my own copa task\n"
    (out / "cl_copa.yaml").unlink()
    main(["tasks", "convert", str(source), "--out", str(out)])
    shutil.rmtree(out / "copa")  # its own YAML kept: converting again rewrites it
    main(["tasks", "convert", str(source), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["cl_copa.yaml", "copa"]


def test_a_bad_record_in_a_task_directory_is_named_by_file_and_line(tmp_path):
    task = tmp_path / "copa"
    task.mkdir()
    (task / "labels.json").write_text('["A", "B"]')
    (task / "test.jsonl").write_text('{"text": "x", "label": "A"}\n\n{"text": "y", "label": "b"}\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:3: label 'b' is not one of labels\.json"):
        task_config(task)
    (task / "test.jsonl").write_text('{"text": "x", "label": "A"}\nnot json\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: not JSON"):
        task_config(task)
    (task / "test.jsonl").write_bytes(b'{"text": "x", "label": "A"}\n{"text": "\xff", "label": "A"}\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: not valid UTF-8"):  # a raw UnicodeDecodeError
        task_config(task)


def test_cli_converts_and_writes_yaml(tmp_path, capsys):
    source = original_layout(tmp_path / "orig" / "copa", splits=("test",))
    out = tmp_path / "out"
    main(["tasks", "convert", str(source), "--out", str(out)])
    assert (out / "copa" / "test.jsonl").is_file() and (out / "cl_copa.yaml").is_file()
    assert f"converted {source} -> {out / 'copa'}, task {out / 'cl_copa.yaml'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # bad input: one line and exit status 2, as every verb
        main(["tasks", "convert", str(source), "--out", str(out)])
    assert exit_.value.code == 2 and "TaskDataError" in capsys.readouterr().err
    main(["tasks", "yaml", str(DBPEDIA), "--out", str(tmp_path / "y")])
    assert (tmp_path / "y" / "cl_dbpedia.yaml").is_file()
    main(
        [
            "tasks",
            "yaml",
            str(COPA),
            "--out",
            str(tmp_path / "i"),
            "--instruction",
            "{text}\nQ:",
            " ({label})",
        ]
    )
    written = yaml.safe_load((tmp_path / "i" / "cl_copa.yaml").read_text())
    assert written["doc_to_text"] == "{{text}}\nQ:" and written["doc_to_choice"] == ["A)", "B)"]
