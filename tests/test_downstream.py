"""Accuracy with lm-evaluation-harness (pretrain/downstream.py) on a tiny random model and the vendored
benchmark slice: the harness's answer is the label our own scoring ranks highest; tasks that cannot be
scored are a ConfigError naming each, before training; scoring leaves a run's random streams alone."""

from __future__ import annotations

import json
import random
from importlib.metadata import version

import numpy as np
import pytest
import torch
from conftest import REPO, corpus, tiny_run_config
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.config import ConfigError, EvalConfig, validate
from pretrain.downstream import instruction_prompts, resolve_tasks, rng_kept, score
from pretrain.tokenizer import train_tokenizer

DATA = REPO / "tests" / "data" / "cl_benchmark"
TASKS = [str(DATA / "copa"), str(DATA / "dbpedia")]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    files = [str(DATA / "copa" / "train.jsonl"), corpus("news")[0]]
    tokenizer = train_tokenizer([(files, "text")], str(tmp_path_factory.mktemp("tok")), 512, 2000)
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def own_prediction(
    model, tokenizer, text: str, labels: list[str], templates=("{text}\nAnswer:", " {label}")
) -> tuple[int, float]:
    """The label whose continuation (" label" by default) after the prompt has the highest summed
    log-probability (our own forward passes: the definition the task template states), and the margin to
    the runner-up."""
    prompt = templates[0].format(text=text)
    context = tokenizer(prompt)["input_ids"]
    scores = []
    for label in labels:
        ids = tokenizer(prompt + templates[1].format(label=label))["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
    order = sorted(range(len(labels)), key=lambda k: -scores[k])
    return order[0], scores[order[0]] - scores[order[1]]


def test_the_harness_answer_is_the_label_our_model_scores_highest(model_and_tokenizer):
    """Accuracy over the first 12 documents of copa and of dbpedia (14 labels; eval.task_limit) equals
    ours exactly: each is k/12 of the same decisions, and the smallest margin between the top two labels
    (printed on failure; 0.18 when written) is orders above the float noise of batching (~1e-5 here)."""
    model, tokenizer = model_and_tokenizer
    specs = resolve_tasks(tuple(TASKS), "acc")
    assert [s.name for s in specs] == ["cl_copa", "cl_dbpedia"]
    got = score(model, tokenizer, specs, EvalConfig(tasks=TASKS, batch_size=8, task_limit=12))
    for name, directory in (("cl_copa", DATA / "copa"), ("cl_dbpedia", DATA / "dbpedia")):
        labels = json.loads((directory / "labels.json").read_text())
        docs = [json.loads(line) for line in (directory / "test.jsonl").read_text().splitlines()][:12]
        decisions = [own_prediction(model, tokenizer, d["text"], labels) for d in docs]
        correct = sum(labels[k] == d["label"] for (k, _), d in zip(decisions, docs, strict=True))
        margin = min(m for _, m in decisions)
        assert got["docs"][name] == 12
        assert got["accuracy"][name] == correct / 12, (name, margin)
        assert margin > 1e-3
    assert got["harness"] == version("lm_eval")


def test_a_task_linked_to_an_instruction_domain_is_scored_with_its_templates(model_and_tokenizer, tmp_path):
    """eval.task_domains links cl_copa to an instruction domain: the harness scores copa with that
    domain's prompt and answer (the text its phase trains on), and its accuracy equals our own ranking
    of the labels under those templates; the text-domain task keeps the plain prompt."""
    model, tokenizer = model_and_tokenizer
    templates = ("Premise and options: {text}\nThe better option is", " option {label}.")
    raw = tiny_run_config(tmp_path)
    raw["domains"][1].update(
        train=[str(DATA / "copa" / "train.jsonl")], instruction=dict(prompt=templates[0], answer=templates[1])
    )
    raw["eval"].update(tasks=TASKS, task_domains={"cl_copa": "plays", "cl_dbpedia": "news"})
    cfg = validate(raw)
    assert instruction_prompts(cfg) == ((TASKS[0], *templates),)
    specs = resolve_tasks(tuple(cfg.eval.tasks), "acc", instruction_prompts(cfg))
    assert specs[1].spec["doc_to_text"] == "{{text}}\nAnswer:"
    got = score(model, tokenizer, specs[:1], EvalConfig(tasks=TASKS[:1], batch_size=8, task_limit=12))
    docs = [json.loads(line) for line in (DATA / "copa" / "test.jsonl").read_text().splitlines()][:12]
    decisions = [own_prediction(model, tokenizer, d["text"], ["A", "B"], templates) for d in docs]
    correct = sum("AB"[k] == d["label"] for (k, _), d in zip(decisions, docs, strict=True))
    plain = [own_prediction(model, tokenizer, d["text"], ["A", "B"])[0] for d in docs]
    assert plain != [k for k, _ in decisions]  # the templates change the decisions: the check can fail
    assert got["accuracy"]["cl_copa"] == correct / 12, min(m for _, m in decisions)


def test_scoring_leaves_the_random_streams_of_the_run_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    specs, ev = resolve_tasks((TASKS[0],), "acc"), EvalConfig(tasks=TASKS[:1], task_limit=4)

    def states():
        return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    before = states()
    with rng_kept():
        score(model, tokenizer, specs, ev)
    after = states()
    assert after[0] == before[0] and after[1] == before[1] and torch.equal(after[2], before[2])
    score(model, tokenizer, specs, ev)  # without: the harness reseeds Python, NumPy and torch
    assert states()[0] != before[0] and not torch.equal(states()[2], before[2])


def test_tasks_that_cannot_be_scored_are_config_errors_naming_each(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # an empty cache, so that a named task is never found on this machine by chance
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "nolabels").mkdir()
    raw = tiny_run_config(tmp_path)
    raw["eval"]["tasks"] = [
        "no_such_task_anywhere",
        "hellaswag",  # an lm-eval task whose data is not on disk
        str(tmp_path / "missing.yaml"),
        str(tmp_path / "nolabels"),
        TASKS[0],
    ]
    raw["eval"]["task_domains"] = {"cl_copa": "nowhere"}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    text = str(err.value)
    assert "'no_such_task_anywhere' is not a task, group or tag that lm-eval" in text
    assert "task 'hellaswag' could not be built from local files (nothing is downloaded at run time" in text
    assert f"task YAML {tmp_path / 'missing.yaml'} does not exist" in text
    assert f"{tmp_path / 'nolabels'} has no labels.json" in text
    assert "key `eval.task_domains.cl_copa`: 'nowhere' is not one of the domains ['news', 'plays']" in text
    assert "cl_copa" not in text.split("task_domains")[0]  # the good task is not among the problems


def test_task_keys_that_cannot_work_together(tmp_path):
    raw = tiny_run_config(tmp_path)
    raw["eval"].update(tasks=TASKS, task_metric="f1", task_domains={"cl_copa": "news", "nope": "news"})
    raw["checkpoint"] = {"export": False}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    text = str(err.value)
    assert f"task '{TASKS[0]}' reports ['acc'], not eval.task_metric 'f1'" in text
    assert "key `eval.tasks` with `checkpoint.export: false`" in text
    assert "key `eval.task_domains`: one domain can train one task" in text
    raw = tiny_run_config(tmp_path)
    raw["eval"].update(tasks=TASKS, task_domains={"nope": "news"})
    with pytest.raises(ConfigError, match=r"'nope' is not one of the tasks \['cl_copa', 'cl_dbpedia'\]"):
        validate(raw)
    raw["eval"].update(tasks=[])
    with pytest.raises(ConfigError, match="no eval.tasks to link"):
        validate(raw)


def test_task_paths_are_made_absolute_and_names_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = tiny_run_config(tmp_path)
    raw["eval"].update(tasks=["tests/data/cl_benchmark/copa"], task_domains={"cl_copa": "news"})
    cfg = validate(raw)
    assert cfg.eval.tasks == [str(DATA / "copa")]
