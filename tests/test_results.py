"""metrics.json shared by the trainer and `pretrain eval` jobs: neither erases the other's rows."""

from __future__ import annotations

import json

import pytest

from pretrain.results import ResultsError, RunResults


def _ev(loss: float) -> dict:
    perplexity, tokens = {"a": 1.0, "b": 2.0}, {"a": 8, "b": 8}
    return {"loss": {"a": loss, "b": loss + 1}, "perplexity": perplexity, "tokens": tokens}


def _results() -> RunResults:
    return RunResults(domains=["a", "b"], phases=["a", "b"], method={"name": "none"})


def test_saving_keeps_rows_an_eval_job_wrote_since(tmp_path):
    # probe 3: the trainer rewrote metrics.json from its checkpoint's copy, erasing an eval job's rows
    path = tmp_path / "metrics.json"
    trainer = _results()
    trainer.train.append({"phase": 1, "losses": [3.0]})
    trainer.save(path)
    job = RunResults.load(path)
    job.set_eval(0, _ev(5.0))
    job.set_eval(1, _ev(4.0))
    job.save(path)
    assert trainer.save(path) == [0, 1]
    on_disk = json.loads(path.read_text())
    assert on_disk["eval_loss"] == [[5.0, 6.0], [4.0, 5.0]] and on_disk["train"] == trainer.train
    assert trainer.eval_loss == on_disk["eval_loss"] and "avg_forgetting" in on_disk


def test_the_trainers_own_rows_win_and_gaps_stay_null(tmp_path):
    path = tmp_path / "metrics.json"
    job = _results()
    job.set_eval(2, _ev(9.0))
    job.save(path)
    trainer = _results()
    trainer.set_eval(0, _ev(5.0))
    trainer.set_eval(2, _ev(3.0))  # in-line evaluation of the same phase
    assert trainer.save(path) == []
    assert json.loads(path.read_text())["eval_loss"] == [[5.0, 6.0], None, [3.0, 4.0]]


def test_rows_of_another_runs_domains_are_not_taken(tmp_path):
    path = tmp_path / "metrics.json"
    other = RunResults(domains=["x"], phases=["x"], method={})
    other.set_eval(0, {"loss": {"x": 1.0}, "perplexity": {"x": 1.0}, "tokens": {"x": 1}})
    other.save(path)
    assert _results().save(path) == []


def _scores(**accuracy: float) -> dict:
    return {"accuracy": accuracy, "docs": dict.fromkeys(accuracy, 8), "harness": "0.4.13"}


def test_accuracy_rows_columns_and_metrics(tmp_path):
    results = _results()
    results.task_domains = {"t_a": "a"}
    results.set_accuracy(0, _scores(t_a=0.25, t_x=0.5))
    results.set_accuracy(1, _scores(t_a=0.75, t_x=0.5))
    assert results.tasks == ["t_a", "t_x"] and results.accuracy == [[0.25, 0.5], [0.75, 0.5]]
    assert (
        results.accuracy_metrics["plasticity"] == 0.5
        and results.accuracy_metrics["avg_final_accuracy"] == 0.625
    )
    results.set_accuracy(2, _scores(t_a=0.5, t_x=0.5, t_new=1.0))  # a task added on a resume
    assert results.tasks == ["t_a", "t_x", "t_new"]
    assert results.accuracy == [[0.25, 0.5, None], [0.75, 0.5, None], [0.5, 0.5, 1.0]]
    # the added task is left out until an eval job scores its earlier rows; the others' metrics stand
    assert results.accuracy_metrics["left_out"] == {"t_new": [0, 1]}
    assert results.accuracy_metrics["avg_final_accuracy"] == 0.5
    results.save(tmp_path / "metrics.json")
    again = RunResults.load(tmp_path / "metrics.json")  # metrics recomputed from the matrix, not read
    assert again.accuracy == results.accuracy and again.accuracy_metrics == results.accuracy_metrics
    assert again.task_docs == {"t_a": 8, "t_x": 8, "t_new": 8} and again.harness == "0.4.13"


def test_accuracy_cells_an_eval_job_wrote_are_kept(tmp_path):
    path = tmp_path / "metrics.json"
    trainer = _results()
    trainer.set_accuracy(0, _scores(t_a=0.25))
    trainer.save(path)
    job = RunResults.load(path)
    job.set_accuracy(0, _scores(t_a=0.5, t_new=0.75))  # the job scores a task the run added later
    job.set_accuracy(1, _scores(t_a=0.5, t_new=0.75))
    job.save(path)
    trainer.set_accuracy(0, _scores(t_a=0.125))  # scored in line again meanwhile (not saved yet)
    assert trainer.save(path) == [0, 1]
    on_disk = json.loads(path.read_text())
    assert on_disk["tasks"] == ["t_a", "t_new"]
    assert on_disk["accuracy"] == [[0.125, 0.75], [0.5, 0.75]]  # the trainer's unsaved cell wins
    assert on_disk["accuracy_metrics"]["avg_final_accuracy"] == 0.625


def test_rows_an_eval_job_evaluated_again_are_not_reverted_by_the_trainer(tmp_path):
    """A resume changed eval.max_blocks; the user re-ran `pretrain eval` on the earlier rows: the
    trainer's next save keeps the job's rows, not the copies it holds from before (or its checkpoint)."""
    path = tmp_path / "metrics.json"
    trainer = _results()
    trainer.set_eval(0, _ev(5.0))
    trainer.set_eval(1, _ev(3.0))
    trainer.set_accuracy(1, _scores(t_a=0.25))
    trainer.save(path)
    job = RunResults.load(path)
    job.set_eval(0, _ev(5.5))
    job.set_eval(1, _ev(3.5))
    job.set_accuracy(1, _scores(t_a=0.375))
    job.save(path)
    trainer.set_eval(2, _ev(2.0))  # the trainer goes on: its new row is its own
    assert trainer.save(path) == [0, 1]
    on_disk = json.loads(path.read_text())
    assert on_disk["eval_loss"] == [[5.5, 6.5], [3.5, 4.5], [2.0, 3.0]] == trainer.eval_loss
    assert on_disk["accuracy"] == [None, [0.375]]


def test_a_save_over_an_unreadable_file_keeps_it_aside_and_writes_its_own_rows(tmp_path):
    """A metrics.json emptied or torn outside pretrain must not stop every save (and so every resume)."""
    path = tmp_path / "metrics.json"
    path.write_text('{"eval_loss": [[5.0')
    with pytest.raises(ResultsError, match=r"metrics.json is not valid JSON"):
        RunResults.load(path)
    trainer = _results()
    trainer.set_eval(0, _ev(3.0))
    assert trainer.save(path) == []
    assert json.loads(path.read_text())["eval_loss"] == [[3.0, 4.0]]
    assert (tmp_path / "metrics.unreadable-1.json").read_text() == '{"eval_loss": [[5.0'  # kept as it was
    path.write_text("[]")
    trainer.save(path)
    assert (tmp_path / "metrics.unreadable-2.json").read_text() == "[]"


def test_a_curve_point_evaluated_again_replaces_the_first():
    # a stop before the first step checkpoints at global step 0; the resumed run evaluates row 0 again
    results = _results()
    results.add_curve_point(0, 0, 0, _ev(5.0))
    results.add_curve_point(0, 0, 0, _ev(5.0))
    results.add_curve_point(1, 2, 2, _ev(4.0))
    assert [(p["phase"], p["global_step"], p["loss"]) for p in results.eval_curve] == [
        (0, 0, [5.0, 6.0]),
        (1, 2, [4.0, 5.0]),
    ]


_RUN = '{"domains": ["a", "b"], "phases": ["a", "b"], "method": {}, %s}'


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{}", "missing 3 required positional arguments"),
        ('{"domains": [], "phases": [], "method": {}, "eval_loss": null}', "`eval_loss` is NoneType"),
        # hand edits a save then failed on (IndexError), at every save and so at every resume
        (_RUN % '"tasks": ["t1", "t2"], "accuracy": [[0.5]]', r"accuracy row 0 is not a list of 2 numbers"),
        (_RUN % '"eval_loss": [[1, 2], [1, 2]], "perplexity": [[3, 7]]', "2 eval_loss rows but 1 perplexity"),
        (_RUN % '"eval_loss": [[1]], "perplexity": [[3]]', r"eval_loss row 0 is not a list of 2 numbers"),
    ],
)
def test_a_file_of_the_wrong_shape_is_unreadable_too(tmp_path, text, why):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(ResultsError, match=why):
        RunResults.load(path)
    _results().save(path)  # kept aside as any unreadable file
    assert (tmp_path / "metrics.unreadable-1.json").read_text() == text


def test_a_nan_row_read_back_is_not_taken_for_an_eval_jobs(tmp_path):
    path = tmp_path / "metrics.json"
    trainer = _results()
    trainer.set_eval(0, _ev(float("nan")))
    assert [trainer.save(path) for _ in range(3)] == [[], [], []]
