"""DeepSpeed's import without mlflow: its autotuner, which a run never uses, imports mlflow whenever it is
installed (the `mlflow` extra), 1.65 s of each rank's start-up here (`python -X importtime -c "import
pretrain.train, deepspeed"`), paid by every rank of every launch.

A finder at the front of sys.meta_path declines `import mlflow` while the `deepspeed` package itself is
being imported (its spec's `_initializing`, set by the import system for a module mid-import); any other
import of mlflow, the mlflow tracker's included, goes through as usual. If a Python release drops the
flag, the finder never declines and DeepSpeed loads mlflow as before. (A lazy module in sys.modules does
not work: torch's op registrations call inspect.getmodule, which touches every module in sys.modules.)
"""

from __future__ import annotations

import importlib.abc
import sys


class _NoMlflowInDeepSpeedImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        deepspeed = sys.modules.get("deepspeed")
        if name == "mlflow" and getattr(getattr(deepspeed, "__spec__", None), "_initializing", False):
            raise ModuleNotFoundError("mlflow: not for DeepSpeed's autotuner (pretrain.deepspeed_import)")
        return None


def install() -> None:
    """Idempotent: one finder per process."""
    if not any(isinstance(f, _NoMlflowInDeepSpeedImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoMlflowInDeepSpeedImport())
