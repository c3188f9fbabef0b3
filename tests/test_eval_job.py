"""`pretrain eval` jobs' bookkeeping (the jobs themselves run in tests/distributed/test_eval_report.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_ok, run_single, tiny_run_config, write_config

from pretrain.config import load_config
from pretrain.eval_job import _record_row
from pretrain.results import RunResults


def test_a_row_computed_over_an_unreadable_metrics_json_is_kept_and_the_file_set_aside(tmp_path):
    # the job raised ResultsError after its evaluation and scoring (minutes), and the row was lost
    cfg = load_config(write_config(tiny_run_config(tmp_path, domains=("news",)), tmp_path / "run.yaml"))
    path, torn = tmp_path / "metrics.json", '{"domains": ["news"], "eval_lo'
    path.write_text(torn)
    ev = {"loss": {"news": 4.5}, "perplexity": {"news": 90.0}, "tokens": {"news": 64}}
    _record_row(path, cfg, 1, ev, RunResults.for_run(cfg))
    assert json.loads(path.read_text())["eval_loss"] == [None, [4.5]]
    assert (tmp_path / "metrics.unreadable-1.json").read_text() == torn


def test_a_moved_run_is_evaluated_with_its_own_tokenizer_and_never_with_another(tmp_path):
    # the job trusted config.yaml's output_dir: a moved run got a new tokenizer trained at its old place
    # (or another run's found there), and every row was overwritten with losses on other token ids
    cfg = tiny_run_config(tmp_path, steps=2, tokenizer={"path": None})  # the tokenizer in run/tokenizer
    archived = []  # and the training corpus deleted since: an evaluation reads held-out sets only
    for dom in cfg["domains"]:
        archived.append(str(shutil.copy(dom["train"][0], tmp_path / f"{dom['name']}-train.jsonl")))
        dom["train"] = [archived[-1]]
    assert_ok(run_single(["train", "--config", str(write_config(cfg, tmp_path / "run.yaml"))]))
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    for path in archived:
        Path(path).unlink()
    inline = json.loads((moved / "metrics.json").read_text())["eval_loss"]
    proc = run_single(["eval", "--run", str(moved)])
    assert_ok(proc)
    assert "its config names output_dir" in proc.stderr and not (tmp_path / "run").exists()
    again = json.loads((moved / "metrics.json").read_text())
    # one process, the same weights and blocks as in training: equal but for the summation order
    assert len(again["eval_loss"]) == 3 and all(
        a == pytest.approx(b, abs=1e-5)
        for x, y in zip(again["eval_loss"], inline, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    # another tokenizer of the same size where the run's was: refused, not scored over the right rows
    shutil.rmtree(moved / "tokenizer")
    other = tiny_run_config(tmp_path, tokenizer={"path": str(moved / "tokenizer"), "max_sentences": 50})
    assert_ok(run_single(["tokenizer", "--config", str(write_config(other, tmp_path / "other.yaml"))]))
    proc = run_single(["eval", "--run", str(moved)])
    assert proc.returncode == 2 and "numbers tokens otherwise" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((moved / "metrics.json").read_text()) == again
    shutil.rmtree(moved / "tokenizer")  # and none at all: an evaluation never trains one
    proc = run_single(["eval", "--run", str(moved), "--phase", "0"])
    assert proc.returncode == 2 and "an evaluation never trains one" in proc.stderr, proc.stderr[-2000:]
    assert not (moved / "tokenizer").exists()
