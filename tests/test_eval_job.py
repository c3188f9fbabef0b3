"""`pretrain eval` jobs' bookkeeping (the jobs themselves run in tests/distributed/test_eval_report.py)."""

from __future__ import annotations

import json

from conftest import tiny_run_config, write_config

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
