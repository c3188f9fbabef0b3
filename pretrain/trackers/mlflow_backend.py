"""An MLflow run: by default in a SQLite store at <run_dir>/mlruns (MLflow's local store; its plain
file store is deprecated), artifacts beside it. Browse it with `mlflow ui --backend-store-uri URI`.

Each metric is logged at its own x (the optimizer step, or the phase for per-phase numbers), as in
TensorBoard; the run's config goes in once as flat params (`train.lr`), since MLflow refuses a param
changed later. A resume reopens the run by the id trackers.json keeps, and skips the points the store
already holds: the steps between the last checkpoint and a kill, which the resumed run logs again (with
an exact resume, the same numbers), would otherwise be in the metric's history twice.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pretrain.config import MlflowConfig
from pretrain.rundir import flatten

MAX_TEXT = 5000  # under MLflow's tag limit, whatever the store
_NOT_IN_A_NAME = re.compile(r"[^\w\-. :/]")  # MLflow's metric and tag names: these characters only


def mlflow_name(key: str) -> str:
    """`key` as MLflow takes it: a domain name is free text (`eval_loss/c++`), which MLflow refuses."""
    return _NOT_IN_A_NAME.sub("_", key)


def tracking_uri(cfg: MlflowConfig, run_dir: Path) -> str:
    return cfg.tracking_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlruns' / 'mlflow.db'}"


class MlflowBackend:
    name = "mlflow"
    pictures = True

    def __init__(self, cfg: MlflowConfig, run_dir: Path, config: dict[str, Any], run_id: str | None):
        from mlflow.tracking import MlflowClient

        if cfg.tracking_uri is None:
            (Path(run_dir) / "mlruns").mkdir(parents=True, exist_ok=True)  # SQLite makes no directories
        self.client = MlflowClient(tracking_uri=tracking_uri(cfg, run_dir))
        self.logged: dict[str, int] = {}  # metric -> the last x the store holds
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self._run_id = run_id
            self.logged = self._last_logged()
        else:
            self._run_id = self._create(cfg, Path(run_dir), config)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _last_logged(self) -> dict[str, int]:
        keys = self.client.get_run(self._run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(self._run_id, k)) for k in keys}

    def _create(self, cfg: MlflowConfig, run_dir: Path, config: dict[str, Any]) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # the local store's artifacts go beside it, not into the working directory
            where = (
                (run_dir / "mlruns" / "artifacts").resolve().as_uri() if cfg.tracking_uri is None else None
            )
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=where)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name)
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def scalars(self, values: dict[str, float], step: int, phase: int | None) -> None:
        from mlflow.entities import Metric

        now, x = int(time.time() * 1000), step if phase is None else phase
        named = {mlflow_name(k): v for k, v in values.items()}
        new = [Metric(k, float(v), now, x) for k, v in named.items() if self.logged.get(k, -1) < x]
        self.client.log_batch(self._run_id, metrics=new)

    def text(self, key: str, text: str, step: int, phase: int | None) -> None:
        self.client.set_tag(self._run_id, mlflow_name(key), text[:MAX_TEXT])

    def picture(self, key: str, path: Path, step: int) -> None:
        # under the key's folder ("report/loss_heatmap" -> report/loss_heatmap.png); a repeat replaces it
        folder = str(Path(key).parent) if "/" in key else None
        self.client.log_artifact(self._run_id, str(path), artifact_path=folder)

    def flush(self) -> None:
        pass  # every call above has been written when it returns

    def close(self) -> None:
        self.client.set_terminated(self._run_id, status="FINISHED")

    def run_id(self) -> str | None:
        return self._run_id
