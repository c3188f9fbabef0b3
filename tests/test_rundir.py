"""The run directory across attempts: new run, resume, restart after dying before a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config, write_config

from pretrain.checkpoint import COMPLETE, LATEST
from pretrain.cli import main as cli
from pretrain.config import LoraConfig, deepspeed_json, load_config, save_config
from pretrain.distributed import DistInfo
from pretrain.rundir import (
    RunDirError,
    config_tree,
    prepare_run_dir,
    refuse_config_in_run_dir,
    resumable,
    resumable_changes,
)

ONE = DistInfo(rank=0, world_size=1, local_rank=0)


@pytest.fixture
def started(tmp_path):
    """The config of a run that has begun: its config.yaml and metrics.json (row 0) are written."""
    cfg = load_config(write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml"))
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"eval_loss": [[7.0, 7.0]]}))
    return cfg, run


def _checkpointed(run, tag="step-2"):
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / tag / COMPLETE).write_text("{}")
    (run / "checkpoints" / LATEST).write_text(tag)


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(started):
    # probe 1: "has results but no complete checkpoint", and a requeued job (always --resume) failed forever
    cfg, run = started
    plan = prepare_run_dir(cfg, ONE, resume=True)
    assert not plan.resuming and plan.path == run
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "metrics.attempt-1.json").read_text()) == {"eval_loss": [[7.0, 7.0]]}
    (run / "metrics.json").write_text("{}")  # the second attempt dies early too
    prepare_run_dir(cfg, ONE, resume=True)
    assert (run / "metrics.attempt-2.json").read_text() == "{}"  # nothing of either attempt is lost


def test_a_new_run_never_takes_over_a_started_one(started):
    cfg, run = started
    with pytest.raises(RunDirError, match="already holds a run.*pass --resume"):
        prepare_run_dir(cfg, ONE, resume=False)
    assert (run / "metrics.json").exists()


def test_a_new_run_never_continues_a_checkpoint_whose_metrics_were_moved_away(started):
    cfg, run = started
    _checkpointed(run)
    (run / "metrics.json").unlink()
    with pytest.raises(RunDirError, match=r"already holds a run \(a checkpoint\).*pass --resume"):
        prepare_run_dir(cfg, ONE, resume=False)
    assert prepare_run_dir(cfg, ONE, resume=True).resuming


def test_a_new_runs_config_file_is_never_the_config_yaml_it_would_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = run / "config.yaml"
    mine.write_text(yaml.safe_dump(tiny_run_config(tmp_path)) + "# my notes\n")
    cfg = load_config(mine)
    with pytest.raises(RunDirError, match=r"config.yaml is where the run writes the config it ran with"):
        refuse_config_in_run_dir(mine, cfg)
    before = mine.read_text()
    with pytest.raises(SystemExit) as exit_:
        cli(["train", "--config", str(mine)])
    assert exit_.value.code == 2 and mine.read_text() == before
    refuse_config_in_run_dir(tmp_path / "elsewhere.yaml", cfg)  # another file: nothing to lose
    _checkpointed(run)
    refuse_config_in_run_dir(mine, cfg)  # a run's own config.yaml, passed back to resume it


def test_a_new_run_never_writes_over_a_config_yaml_no_run_wrote(tmp_path):
    cfg = load_config(write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml"))
    run = tmp_path / "run"
    run.mkdir()
    mine = run / "config.yaml"
    mine.write_text("# the settings I used for the HF Trainer run in this folder\nlr: 3e-4\n")
    for resume in (False, True):  # --resume with no run there starts one too
        with pytest.raises(RunDirError, match=r"config.yaml was not written by a run.*move it"):
            prepare_run_dir(cfg, ONE, resume=resume)
    assert mine.read_text().startswith("# the settings I used")
    save_config(cfg, mine)  # an earlier attempt's, killed before its first results: its own, taken over
    assert not prepare_run_dir(cfg, ONE, resume=False).resuming
    mine.write_text(yaml.safe_dump(cfg.to_dict()))  # as a run wrote it before the header (its output_dir)
    assert not prepare_run_dir(cfg, ONE, resume=True).resuming
    assert load_config(mine).train.lr == cfg.train.lr  # the header is a comment: the file still loads
    mine.unlink()
    mine.mkdir()  # a directory of that name is not a run's either: refused before a write fails on it
    with pytest.raises(RunDirError, match=r"config.yaml was not written by a run"):
        prepare_run_dir(cfg, ONE, resume=False)


def test_an_output_dir_that_is_a_file_is_refused_on_every_rank(tmp_path):
    cfg = load_config(write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml"))
    Path(cfg.output_dir).write_text("my file\n")
    with pytest.raises(RunDirError, match=r"output_dir .* is a file, not a directory"):
        prepare_run_dir(cfg, ONE, resume=False)  # a RunDirError is what prepare_run_dir hands every rank
    assert Path(cfg.output_dir).read_text() == "my file\n"


def test_resume_may_change_the_listed_keys_and_reports_them(started):
    cfg, run = started
    _checkpointed(run)
    cfg.train.lr, cfg.train.on_nonfinite, cfg.eval.max_blocks = 1e-4, "skip", 4
    plan = prepare_run_dir(cfg, ONE, resume=True)
    assert plan.resuming
    assert plan.changes == [
        {"key": "eval.max_blocks", "from": 8, "to": 4},
        {"key": "train.lr", "from": 1e-2, "to": 1e-4},
        {"key": "train.on_nonfinite", "from": "stop", "to": "skip"},
    ]


def _deepspeed_file_changed(cfg, run, tmp_path, edit) -> None:
    """The run's checkpoint marked with its DeepSpeed file, which is then edited by `edit`."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    _checkpointed(run)
    mark = run / "checkpoints" / "step-2" / COMPLETE
    mark.write_text(json.dumps({"deepspeed": deepspeed_json(cfg)}))
    edit(ds)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg.deepspeed.config = str(tmp_path / "ds.json")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda ds: ds["zero_optimization"].update(stage=1), "ZeRO stage 2 -> 1"),
        (lambda ds: ds.update(bf16={"enabled": True}), "precision fp32 -> bf16"),
    ],
)
def test_resume_refuses_a_deepspeed_file_that_changed_stage_or_precision(started, tmp_path, edit, named):
    """config.yaml names the file only: its contents are compared with the checkpoint's mark."""
    cfg, run = started
    _deepspeed_file_changed(cfg, run, tmp_path, edit)
    with pytest.raises(RunDirError, match=rf"step-2 was trained with another DeepSpeed config \({named}\)"):
        prepare_run_dir(cfg, ONE, resume=True)


def test_resume_records_other_deepspeed_changes(started, tmp_path):
    cfg, run = started
    saved = config_tree(cfg)
    _deepspeed_file_changed(cfg, run, tmp_path, lambda ds: ds["zero_optimization"].update(overlap_comm=True))
    plan = prepare_run_dir(cfg, ONE, resume=True)
    key = "deepspeed:zero_optimization.overlap_comm"
    assert plan.resuming and plan.deepspeed_changes == [{"key": key, "from": False, "to": True}]
    # a checkpoint marked before the settings were recorded: another file cannot be compared, as before
    (run / "checkpoints" / "step-2" / COMPLETE).write_text("{}")
    refused = r"step-2 was written before pretrain kept the DeepSpeed settings .* keep deepspeed.config"
    with pytest.raises(RunDirError, match=refused):
        prepare_run_dir(cfg, ONE, resume=True)
    with pytest.raises(RunDirError, match=refused):  # config.yaml gone: the checkpoint's own config says it
        resumable_changes(saved, cfg, "step-2", None)


def test_resume_refuses_other_changes_naming_them(started):
    cfg, run = started
    _checkpointed(run)
    cfg.train.seq_len, cfg.train.lr = 16, 1e-4
    with pytest.raises(RunDirError, match=r"different config \(train.seq_len 32 -> 16\); set them back"):
        prepare_run_dir(cfg, ONE, resume=True)


@pytest.mark.parametrize(
    ("text", "held"), [("", "empty"), ("- a\n- b\n", "a list"), ("train: {lr: [\n", "not valid YAML")]
)
def test_resume_names_a_config_yaml_that_holds_no_config(started, text, held):
    cfg, run = started
    _checkpointed(run)
    (run / "config.yaml").write_text(text)
    with pytest.raises(RunDirError, match=rf"config.yaml does not hold a run config \({held}.*put back"):
        prepare_run_dir(cfg, ONE, resume=True)
    assert (run / "config.yaml").read_text() == text  # left for the user to mend


def test_resume_refuses_turning_lora_on(started):
    """A checkpoint of full training cannot go on as a LoRA run, nor the other way round."""
    cfg, run = started
    _checkpointed(run)
    cfg.lora = LoraConfig()
    with pytest.raises(
        RunDirError, match=r"different config \(lora.alpha None -> 16.0, lora.dropout None -> 0.0, lora.r"
    ):
        prepare_run_dir(cfg, ONE, resume=True)


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("train.lr", True),
        ("checkpoint.keep", True),
        ("eval.inline", True),
        ("logging.trackers", True),
        ("train.token_cache", True),
        ("train.seed", False),
    ],
)
def test_resumable_keys(key, allowed):
    assert resumable(key) is allowed


def test_a_run_started_before_new_keys_existed_resumes_as_it_ran(started):
    """Upgrading pretrain mid-run: keys the saved config lacks count as what the run did without them
    (their defaults, but file order for train.shuffle_buffer), so only a real change is refused."""
    cfg, run = started
    _checkpointed(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in (("train", "shuffle_buffer"), ("train", "schedule"), ("regularisation", None)):
        saved[section].pop(key) if key else saved.pop(section)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RunDirError, match=r"different config \(train.shuffle_buffer 0 -> 1000\)"):
        prepare_run_dir(cfg, ONE, resume=True)
    cfg.train.shuffle_buffer = 0  # the order the run was trained in
    assert prepare_run_dir(cfg, ONE, resume=True).changes == []


def test_the_checkpoints_own_config_refuses_what_config_yaml_can_no_longer_say(started):
    """config.yaml gone (or replaced by hand): the checkpoint's config still refuses a frozen change,
    passes the resumable ones, and leaves train.grad_accum, which an elastic resume scales, to the run."""
    cfg, run = started
    saved = config_tree(cfg)
    (run / "config.yaml").unlink()
    _checkpointed(run)
    cfg.train.seq_len, cfg.train.lr = 16, 1e-4
    assert prepare_run_dir(cfg, ONE, resume=True).changes == []  # nothing left to compare against here
    refused = r"checkpoint step-2 was trained with another config \(train.seq_len 32 -> 16\)"
    with pytest.raises(RunDirError, match=refused):
        resumable_changes(saved, cfg, "step-2", None)
    cfg.train.seq_len, cfg.train.grad_accum = 32, 2
    assert resumable_changes(saved, cfg, "step-2", None) == [{"key": "train.lr", "from": 1e-2, "to": 1e-4}]
