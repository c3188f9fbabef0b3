"""The metrics logger and its trackers in-process: what W&B (offline) and MLflow (local store) hold is
read back in their own formats, across an attempt that is resumed; config and missing-package errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, tiny_run_config, write_config
from PIL import Image
from tracker_checks import (
    mlflow_client,
    mlflow_series,
    tracker_state,
    wandb_history,
    wandb_merged,
    wandb_run_ids,
    wandb_runs,
    wandb_series,
)

from pretrain.config import ConfigError, LoggingConfig, load_config
from pretrain.distributed import DistInfo
from pretrain.trackers import open_trackers, require_trackers
from pretrain.trackers.forgetting import log_forgetting

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(scope="module", autouse=True)
def _wandb_service_ends_with_the_module():
    """W&B runs in this process start a service and put its address in os.environ (WANDB_SERVICE): runs
    launched by later tests would share it, and a run killed there left its id in use, so
    test_replay_run's resume failed ("run ID ... is in use") when it ran after this module."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def _attempt(run_dir, resuming, steps, initial=False, phase=None, picture=None):
    """One attempt of a run, logging as the trainer does: the initial evaluation (row 0 at step 0), train
    scalars per step, at a phase end its evaluation row (x = the row) and forgetting metrics, and at the
    end a picture."""
    logger = open_trackers(LoggingConfig(trackers=ALL), run_dir, 0, resuming, {"train": {"lr": 0.01}})
    if initial:
        logger.scalars({"eval_loss/news": 5.0, "eval_loss/plays": 6.0}, 0, phase=0)
    for step in steps:
        logger.scalars({"train/loss": 10.0 - step, "train/lr": 0.01}, step)
    if phase is not None:
        logger.scalars({"eval_loss/news": 5.0 - phase, "eval_loss/plays": 6.0 - phase}, steps[-1], phase)
        log_forgetting(logger, {"plasticity": 0.5 * phase, "bwt": None}, phase, steps[-1])
    if picture:
        logger.picture("report/loss_heatmap", picture, steps[-1])
    logger.close()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Attempt 1 logs steps 1-5 and is 'killed' (its last checkpoint was at step 3); attempt 2 resumes
    from that checkpoint: it logs steps 4-8 again, as the trainer does, then phase 1's evaluation."""
    run = tmp_path_factory.mktemp("tracked")
    picture = run.parent / "loss_heatmap.png"
    Image.new("RGB", (40, 30), "red").save(picture)
    _attempt(run, resuming=False, steps=range(1, 6), initial=True)
    first = tracker_state(run)
    _attempt(run, resuming=True, steps=range(4, 9), phase=1, picture=picture)
    return run, first


def test_resume_reopens_the_same_tracker_runs(resumed_run):
    run, first = resumed_run
    state = tracker_state(run)
    assert state == first and set(state) == {"wandb", "mlflow"}
    # W&B offline: one directory per attempt, both of the one run id that `wandb sync` uploads into
    assert wandb_run_ids(run) == [state["wandb"]] * 2
    client = mlflow_client(run)
    (only,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert only.info.run_id == state["mlflow"] and only.info.status == "FINISHED"
    assert only.data.params["train.lr"] == "0.01"


def test_wandb_offline_run_holds_each_attempt(resumed_run):
    run, _ = resumed_run
    attempts = wandb_history(run)
    # each attempt as it logged: the resumed one from its checkpoint on
    assert [[s for s, _ in wandb_series(rows, "train/loss")] for rows in attempts] == [
        [1, 2, 3, 4, 5],
        [4, 5, 6, 7, 8],
    ]
    assert wandb_merged(attempts, "train/loss") == {s: 10.0 - s for s in range(1, 9)}
    assert wandb_merged(attempts, "eval_loss/plays", x="phase") == {0: 6.0, 1: 5.0}
    assert wandb_merged(attempts, "forgetting/plasticity", x="phase") == {1: 0.5}
    assert not any("forgetting/bwt" in row for rows in attempts for row in rows)  # undefined: left out
    (image,) = [row for row in attempts[1] if "report/loss_heatmap/path" in row]
    assert image["_step"] == 8 and image["report/loss_heatmap/width"] == 40
    assert (wandb_runs(run)[-1] / "files" / image["report/loss_heatmap/path"]).is_file()


def test_mlflow_store_holds_each_point_once(resumed_run):
    run, _ = resumed_run
    client, run_id = mlflow_client(run), tracker_state(run)["mlflow"]
    assert mlflow_series(client, run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 9)]  # 4, 5 once
    assert mlflow_series(client, run_id, "eval_loss/news") == [(0, 5.0), (1, 4.0)]  # x: the row
    assert mlflow_series(client, run_id, "forgetting/plasticity") == [(1, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/loss_heatmap.png"]


def test_tensorboard_gets_every_attempt_as_before(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = resumed_run
    points = []
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        points += [(p.step, p.value) for p in acc.Scalars("train/loss")]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # each attempt its own file


def test_a_new_start_begins_new_tracker_runs(resumed_run, tmp_path):
    """A run started again (no checkpoint to resume) is a new attempt: new tracker runs, nothing skipped.
    On a copy of the resumed run's directory, whose MLflow store is made already (a new one takes 3 s)."""
    run, first = resumed_run
    again = shutil.copytree(run, tmp_path / "run")
    _attempt(again, resuming=False, steps=range(1, 3))
    state = tracker_state(again)
    assert state["wandb"] != first["wandb"] and state["mlflow"] != first["mlflow"]
    assert sorted(wandb_run_ids(again)) == sorted([first["wandb"]] * 2 + [state["wandb"]])
    client = mlflow_client(again)
    runs = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert {r.info.run_id for r in runs} == {first["mlflow"], state["mlflow"]}
    assert mlflow_series(client, state["mlflow"], "train/loss") == [(1, 9.0), (2, 8.0)]


def test_other_ranks_log_nothing_and_write_nothing(tmp_path):
    logger = open_trackers(LoggingConfig(trackers=ALL), tmp_path, 1, resuming=False, config={})
    logger.scalars({"train/loss": 1.0}, 1)
    logger.close()
    assert logger.backends == [] and list(tmp_path.iterdir()) == []


def test_tracker_names_are_checked_by_the_config(tmp_path):
    path = write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml")
    cfg = load_config(path)
    assert cfg.logging.trackers == ["tensorboard"] and cfg.logging.wandb.mode == "offline"
    assert load_config(path, ["logging.trackers=[tensorboard, wandb, mlflow]"]).logging.trackers == ALL
    with pytest.raises(ConfigError, match=r"key `logging.trackers.1`: Input should be 'tensorboard'"):
        load_config(path, ["logging.trackers=[tensorboard, neptune]"])
    with pytest.raises(ConfigError, match=r"key `logging.trackers`: each tracker at most once"):
        load_config(path, ["logging.trackers=[wandb, wandb]"])
    with pytest.raises(ConfigError, match=r"key `logging.wandb.mode`"):
        load_config(path, ["logging.wandb.mode=cloud"])
    # a tracker's settings without the tracker: the run would start and log nothing there
    with pytest.raises(ConfigError, match=r"key `logging.mlflow` is set but 'mlflow' is not in logging.tr"):
        load_config(path, ["logging.mlflow.experiment=cl"])
    with pytest.raises(ConfigError, match=r"key `logging.wandb` is set but 'wandb' is not in logging.tra"):
        load_config(path, ["logging.trackers=[mlflow]", "logging.wandb.project=cl"])
    assert (
        load_config(path, ["logging.trackers=[wandb]", "logging.wandb.project=cl"]).logging.wandb.project
        == "cl"
    )
    # an eval job of an archived run logs to no tracker: its config's sections are not refused there
    evaluating = load_config(path, ["logging.mlflow.experiment=cl"], training=False)
    assert evaluating.logging.mlflow.experiment == "cl"


@pytest.mark.parametrize(
    ("missing", "trackers", "expected"),
    [
        ("wandb", ["wandb"], "lists wandb but the package is not installed: pip install 'pretrain[wandb]'"),
        (
            "mlflow",
            ["mlflow"],
            "lists mlflow but the package is not installed: pip install 'pretrain[mlflow]'",
        ),
        ("sqlalchemy", ["mlflow"], "lists mlflow but sqlalchemy (which it needs) is not installed"),
    ],
)
def test_a_missing_package_names_the_extra(monkeypatch, missing, trackers, expected):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: find_spec and import fail
    with pytest.raises(ConfigError) as err:
        require_trackers(LoggingConfig(trackers=["tensorboard", *trackers]))
    assert expected in str(err.value)


def test_a_server_needs_no_local_store_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    require_trackers(LoggingConfig(trackers=["mlflow"], mlflow={"tracking_uri": "http://127.0.0.1:5000"}))


def test_a_missing_package_stops_the_run_before_anything_is_written(tmp_path, monkeypatch):
    from pretrain.train import build_trainer

    cfg = load_config(write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml"))
    cfg.logging.trackers = ["tensorboard", "wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'pretrain\[wandb\]'"):
        build_trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0), resume=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "tokenizer").exists()


def test_deepspeed_does_not_load_mlflow_at_start_up_and_the_tracker_still_finds_it():
    # DeepSpeed's autotuner imports mlflow when it is installed: seconds of every rank's start-up
    code = (
        "import sys, pretrain, deepspeed.autotuning.autotuner as tuner\n"
        "assert not tuner.has_mlflow and not any(m.startswith('mlflow') for m in sys.modules), 'loaded'\n"
        "from mlflow.tracking import MlflowClient\n"
        "assert MlflowClient.__module__.startswith('mlflow.tracking')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


class _Failing:
    """A tracker whose store fails at every call, as a full disk or a locked MLflow store makes it."""

    name, pictures = "failing", True

    def scalars(self, *args) -> None:
        raise OSError(28, "No space left on device")

    text = picture = flush = close = scalars

    def run_id(self) -> None:
        return None


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, caplog):
    # it raised in the training loop on rank 0: the run ended and lost all since its last checkpoint
    logger = open_trackers(LoggingConfig(trackers=["mlflow"]), tmp_path, 0, resuming=False, config={})
    logger.backends.insert(0, _Failing())
    logger.scalars({"train/loss": 3.0}, 1)
    logger.scalars({"train/loss": 2.0}, 2)
    logger.close()
    assert [b.name for b in logger.backends] == ["mlflow"]
    assert caplog.text.count("tracker failing failed (OSError: [Errno 28] No space left on device)") == 1
    series = mlflow_series(mlflow_client(tmp_path), tracker_state(tmp_path)["mlflow"], "train/loss")
    assert series == [(1, 3.0), (2, 2.0)]


def test_mlflow_takes_the_domain_names_it_refuses_under_names_it_allows(tmp_path, caplog):
    # a domain name is free text; MLflow refused `eval_loss/c++` (a traceback after the initial evaluation)
    logger = open_trackers(LoggingConfig(trackers=["mlflow"]), tmp_path, 0, resuming=False, config={})
    logger.scalars({"eval_loss/c++": 1.5, "eval_loss/news(en)": 2.5}, 0, phase=0)
    logger.close()
    client, run_id = mlflow_client(tmp_path), tracker_state(tmp_path)["mlflow"]
    assert mlflow_series(client, run_id, "eval_loss/c__") == [(0, 1.5)]
    assert mlflow_series(client, run_id, "eval_loss/news_en_") == [(0, 2.5)]
    assert "failed" not in caplog.text
