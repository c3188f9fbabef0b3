"""Every recipe in configs/ that runs on the demo's corpora validates as shipped (paths as the README's
commands leave them: the corpora under .demo-data, the DeepSpeed files under configs/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, corpus, smollm2_gguf

from pretrain.config import load_config
from pretrain.downstream import instruction_prompts
from pretrain.instruct import render

DEMO_RECIPES = ["demo", "replay", "ewc", "wsd", "smollm2", "lora"]


@pytest.fixture
def demo_checkout(tmp_path, monkeypatch) -> Path:
    for name in ("code", "docs", "plays", "news"):
        (tmp_path / ".demo-data" / name).mkdir(parents=True)
        for split, path in zip(("train", "heldout"), corpus(name), strict=True):
            shutil.copy(path, tmp_path / ".demo-data" / name / f"{split}.jsonl")
    os.symlink(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe", DEMO_RECIPES)
def test_recipe_validates(demo_checkout, recipe):
    path = REPO / "configs" / f"{recipe}.yaml"
    overrides = [f"model.path={smollm2_gguf()}"] if "SET-ME" in path.read_text() else []
    cfg = load_config(path, overrides)
    assert [p.domain for p in cfg.phases] == ["code", "docs", "plays", "news"]


def test_instruct_recipe_validates_without_the_benchmark_data(tmp_path, monkeypatch):
    # the recipe reads ../shared/data/cl_benchmark beside the checkout: a few records stand in for it here
    for task in ("dbpedia", "amazon", "agnews"):
        folder = tmp_path / "shared" / "data" / "cl_benchmark" / task
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            (folder / f"{split}.jsonl").write_text(json.dumps({"text": "Title: t\nText: x\n", "label": "L"}))
        (folder / "labels.json").write_text('["L", "M"]')
    (tmp_path / "repo").mkdir()
    os.symlink(REPO / "configs", tmp_path / "repo" / "configs")
    monkeypatch.chdir(tmp_path / "repo")
    cfg = load_config(REPO / "configs" / "instruct_order1.yaml", [f"model.path={smollm2_gguf()}"])
    assert [p.domain for p in cfg.phases] == ["dbpedia", "amazon", "agnews"]
    for d in cfg.domains:
        prompt, _ = render(d.instruction.prompt, {"text": "Title: t\nText: x\n", "label": "L"})
        assert prompt.startswith("Title: t\n") and prompt.endswith("\nAnswer:")
        assert render(d.instruction.answer, {"label": "Sports"}) == (" Sports", "")
    # each task is scored with the templates its phase trains on
    prompts = {entry: (p, a) for entry, p, a in instruction_prompts(cfg)}
    data = tmp_path / "shared" / "data" / "cl_benchmark"
    assert prompts == {str(data / d.name): (d.instruction.prompt, d.instruction.answer) for d in cfg.domains}


def test_cl_benchmark_recipe_validates(tmp_path, monkeypatch):
    """configs/cl_benchmark.yaml reads ../shared/data/cl_benchmark beside the checkout: here a stand-in
    tree with the layout of that data, every task made of the vendored copa slice under its name."""
    checkout, data = tmp_path / "checkout", tmp_path / "shared" / "data" / "cl_benchmark"
    for task in ("dbpedia", "amazon", "agnews"):
        shutil.copytree(REPO / "tests" / "data" / "cl_benchmark" / "copa", data / task)
    checkout.mkdir()
    os.symlink(REPO / "configs", checkout / "configs")
    monkeypatch.chdir(checkout)
    cfg = load_config(REPO / "configs" / "cl_benchmark.yaml", [f"model.path={smollm2_gguf()}"])
    assert [p.domain for p in cfg.phases] == ["dbpedia", "amazon", "agnews"]
    assert cfg.eval.tasks == [str(data / t) for t in ("dbpedia", "amazon", "agnews")]
    assert cfg.eval.task_domains == {"cl_dbpedia": "dbpedia", "cl_amazon": "amazon", "cl_agnews": "agnews"}


def test_every_recipe_is_checked():
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    # llama: a cluster template, its paths are the user's own; the other two: checked above
    assert shipped - set(DEMO_RECIPES) == {"llama", "instruct_order1", "cl_benchmark"}
