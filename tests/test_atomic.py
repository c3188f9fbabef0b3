"""Files the run keeps rewriting (config.yaml, metrics.json, checkpoint marks) are never left torn."""

from __future__ import annotations

import pytest
from conftest import tiny_run_config

from pretrain.config import load_config, save_config, validate


def test_a_write_that_fails_midway_leaves_the_old_config_whole(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(validate(tiny_run_config(tmp_path)), path)
    before = path.read_text()

    def disk_full(fd):  # the text is written, then the disk cannot take it: ENOSPC when it is flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pretrain.atomic.os.fsync", disk_full)
    changed = validate(tiny_run_config(tmp_path, train={"lr": 0.5}))
    with pytest.raises(OSError, match="No space left"):
        save_config(changed, path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no half-written file left
    assert load_config(path).train.lr == validate(tiny_run_config(tmp_path)).train.lr
