"""Reading back what a run's trackers stored, in their own formats: W&B's offline run files and MLflow's
store through its client. Shared by the in-process tracker tests and the real 2-rank run.

wandb 0.31 ships no Python reader for its `.wandb` files (the old `wandb.sdk.internal.datastore` is gone),
so `wandb_records` reads the format its service writes: a 7-byte header (":W&B", magic 0xBEE1, version),
then LevelDB-log records in 32 KiB blocks (crc32, length, type; a record split FIRST/MIDDLE/LAST across
blocks), each a serialised `wandb_internal_pb2.Record`, parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def wandb_records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pending, pos = pending + chunk, pos + _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline run directories under <run_dir>/wandb, oldest first (one per attempt)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def wandb_run_ids(run_dir: Path) -> list[str]:
    ids = []
    for run in wandb_runs(run_dir):
        (file,) = run.glob("run-*.wandb")
        ids += [r.run.run_id for r in wandb_records(file) if r.WhichOneof("record_type") == "run"]
    return ids


def wandb_history(run_dir: Path) -> list[list[dict]]:
    """Per attempt (offline directory, oldest first), its history rows as {key: value} with `_step`."""
    attempts = []
    for run in wandb_runs(run_dir):
        (file,) = run.glob("run-*.wandb")
        records = wandb_records(file)
        attempts.append([_row(r.history.item) for r in records if r.WhichOneof("record_type") == "history"])
    return attempts


def _row(items) -> dict:
    row: dict = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        row[key] = json.loads(item.value_json)
    return row


def wandb_series(rows: list[dict], key: str, x: str = "_step") -> list[tuple]:
    """(x, value) of every row holding `key`, in logging order."""
    return [(row[x], row[key]) for row in rows if key in row]


def wandb_merged(attempts: list[list[dict]], key: str, x: str = "_step") -> dict:
    """{x: value} over all attempts, as `wandb sync` uploads them into one run (oldest first)."""
    return {at: value for rows in attempts for at, value in wandb_series(rows, key, x)}


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir).resolve() / 'mlruns' / 'mlflow.db'}")


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, in the order MLflow returns them, duplicates kept."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tracker_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "trackers.json").read_text())
