"""ZeRO-3 after an in-run evaluation: the parameter coordinator must release and gather as it does
without one (pretrain/deepspeed_fixes.py). DeepSpeed 0.19.8 kept its memo of what to release after each
module from the forward-only trace an evaluation records, so every later step released every parameter
after its forward and gathered it again in backward: 37% slower steps on 2 CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_ok, run_deepspeed, tiny_run_config, write_config

WORKER = Path(__file__).with_name("zero3_release_worker.py")


def test_an_evaluation_leaves_zero3_releases_as_they_are_without_one(tmp_path):
    config = write_config(tiny_run_config(tmp_path, stage=3), tmp_path / "run.yaml")
    out = tmp_path / "kept.json"
    assert_ok(run_deepspeed([str(WORKER), "--config", str(config), "--out", str(out)], module=False))
    got = json.loads(out.read_text())
    plain, evaluated = got["plain"], got["evaluated"]
    # without an evaluation the tiny model's gathered weights stay for the backward (they are used
    # again within DeepSpeed's reuse distance): a comparison that can tell the two apart
    partitioned = [n for n in plain["params"] if n not in plain["persistent"]]
    assert plain["kept"] == sorted(partitioned) and partitioned
    assert evaluated["kept"] == plain["kept"]
