"""Whether the packages a run's trackers need are installed: checked at start-up, before any training.

Not part of config validation: `pretrain eval` and `report` read a run's config too, and need no tracker.
`find_spec` looks a package up without importing it (W&B and MLflow each take a second to import).
"""

from __future__ import annotations

from importlib.util import find_spec

from pretrain.config import ConfigError, LoggingConfig

# tracker -> the modules it imports; TensorBoard's come with the base install
_MODULES = {"wandb": ("wandb",), "mlflow": ("mlflow",)}
# MLflow's client keeps a local store (the default, or any sqlite: URI) through SQLAlchemy and Alembic
_LOCAL_STORE_MODULES = ("sqlalchemy", "alembic")


def require_trackers(cfg: LoggingConfig) -> None:
    """Raise ConfigError naming the tracker, the missing module and the extra that installs it."""
    problems = []
    for tracker in cfg.trackers:
        for module in _needed(tracker, cfg):
            if find_spec(module) is None:
                what = "the package is" if module == tracker else f"{module} (which it needs) is"
                install = f"pip install 'pretrain[{tracker}]'"
                problems.append(f"logging.trackers lists {tracker} but {what} not installed: {install}")
    if problems:
        raise ConfigError("; ".join(problems))


def _needed(tracker: str, cfg: LoggingConfig) -> tuple[str, ...]:
    modules = _MODULES.get(tracker, ())
    uri = cfg.mlflow.tracking_uri
    if tracker == "mlflow" and (uri is None or uri.startswith("sqlite:")):
        modules += _LOCAL_STORE_MODULES
    return modules
