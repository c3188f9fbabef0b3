"""benchmarks/quality.py's report from stored runs: the best lr, the seed means and a run without metrics."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

SCORED = {"avg_forgetting": 0.1, "bwt": -0.1, "plasticity": 0.3, "untrained_change": None, "minutes": 1.0}
FAILED = {m: None for m in quality.METRICS} | {"error": "held-out loss of news is nan", "minutes": 1.0}


@pytest.fixture
def results(tmp_path):
    lrs = quality.SETTINGS["smollm2"].lrs_for("none")
    runs = {
        f"smollm2|none|{lrs[0]:g}|0": FAILED,  # the lowest lr's run failed: it must not be "best"
        f"smollm2|none|{lrs[1]:g}|0": SCORED | {"avg_final_loss": 3.3},
        f"smollm2|none|{lrs[2]:g}|0": SCORED | {"avg_final_loss": 3.2},
        f"smollm2|none|{lrs[2]:g}|1": SCORED | {"avg_final_loss": 3.4},
        f"smollm2|none|{lrs[2]:g}|2": FAILED,
    }
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps(runs))
    return quality.Results(tmp_path / "work.json", committed), lrs[2]


def test_a_run_without_metrics_is_never_best_nor_averaged_and_is_named(results):
    stored, best = results
    # it crashed comparing None with a float, and with it every later suite and --report-only
    assert quality.best_lr(stored, "smollm2", "none") == best
    report = "\n".join(quality.tables(stored, "smollm2", ["none"]))
    (row,) = [line for line in report.splitlines() if line.startswith(f"| none | {best:g} | 2 of 3 |")]
    assert "+3.3000 ± 0.1414" in row  # the two scored seeds' mean and sd, the third left out
    assert f"smollm2|none|{best:g}|2: held-out loss of news is nan" in report


def test_results_are_written_whole_and_read_back(results, tmp_path):
    stored, best = results
    stored.put("smollm2", "none", best, 3, SCORED | {"avg_final_loss": 3.0})
    again = quality.Results(tmp_path / "work.json", tmp_path / "absent.json")
    assert again.runs == stored.runs and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
