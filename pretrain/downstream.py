"""Accuracy on downstream tasks: lm-evaluation-harness scores one model on the run's `eval.tasks`.

An entry of `eval.tasks` is an lm-eval task or group name, a task YAML file, or a continual-learning
benchmark directory (pretrain/cl_benchmark.py). Nothing is downloaded: the harness runs with the Hugging
Face hub and `datasets` offline, and `task_problems` (called when the config is loaded, before training)
builds every task once, so a task whose data is not on disk is an error that names it. The model of row 0
is the initial model rebuilt from the config, that of row k the export of phase k; `score_row` scores it
on the calling rank alone (rank 0), in line during training and in a `pretrain eval` job alike, so both
give the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain.cl_benchmark import TaskDataError, is_task_dir, task_config, task_name
from pretrain.config import is_task_path

if TYPE_CHECKING:
    from pretrain.config import EvalConfig, RunConfig

# (entry, prompt, answer): a benchmark directory scored with its instruction domain's templates
Prompts = tuple[tuple[str, str, str], ...]

_NOISY = ("lm_eval", "lm-eval", "datasets", "evaluate")


@dataclass(frozen=True)
class TaskSpec:
    """An `eval.tasks` entry as the harness loads it, and its column in the accuracy matrix."""

    entry: str  # as written in eval.tasks
    spec: str | dict  # for lm-eval's TaskManager.load: a registered name, a YAML path or a task config
    name: str = ""  # the task's (or group's) name in lm-eval's results: the matrix column

    @property
    def registered(self) -> bool:
        return isinstance(self.spec, str) and not is_task_path(self.spec)


def task_problems(cfg: RunConfig) -> list[str]:
    """Why `eval.tasks` cannot be scored, one message per task; [] when every task loaded from disk."""
    try:
        return [f"key `eval.tasks`: {p}" for p in _resolve_all(*_entries(cfg))[1]]
    except ImportError as err:
        return [
            f"key `eval.tasks` needs lm-evaluation-harness ({err}): install the `eval` extra, "
            "pip install -c constraints.txt -e '.[eval]'"
        ]


def task_names(cfg: RunConfig) -> list[str]:
    """The accuracy matrix's columns: each task's name in lm-eval, in `eval.tasks` order."""
    return [s.name for s in resolve_tasks(*_entries(cfg))]


def instruction_prompts(cfg: RunConfig) -> Prompts:
    """The benchmark directories of `eval.tasks` that `eval.task_domains` links to an instruction domain,
    with that domain's templates: a task its phase trained as instructions is scored on the same text."""
    templates = {d.name: d.instruction for d in cfg.domains if d.instruction}
    prompts = []
    for entry in cfg.eval.tasks:
        if is_task_path(entry) and Path(entry).is_dir():
            instruction = templates.get(cfg.eval.task_domains.get(task_name(entry), ""))
            if instruction:
                prompts.append((entry, instruction.prompt, instruction.answer))
    return tuple(prompts)


def _entries(cfg: RunConfig) -> tuple[tuple[str, ...], str, Prompts]:
    return tuple(cfg.eval.tasks), cfg.eval.task_metric, instruction_prompts(cfg)


def resolve_tasks(entries: tuple[str, ...], metric: str, prompts: Prompts = ()) -> tuple[TaskSpec, ...]:
    """Every entry loaded once (offline) and named; TaskDataError listing each entry that cannot be."""
    specs, problems = _resolve_all(entries, metric, prompts)
    if problems:
        raise TaskDataError("; ".join(problems))
    return specs


@functools.cache
def _resolve_all(
    entries: tuple[str, ...], metric: str, prompts: Prompts = ()
) -> tuple[tuple[TaskSpec, ...], tuple[str, ...]]:
    specs, problems = [], []
    templates = {entry: (prompt, answer) for entry, prompt, answer in prompts}
    for entry in entries:
        try:
            specs.append(_resolve(entry, metric, templates.get(entry)))
        except TaskDataError as err:
            problems.append(str(err))
    names = [s.name for s in specs]
    problems += [f"two entries are task {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    return tuple(specs), tuple(problems)


def task_spec(entry: str, instruction: tuple[str, str] | None = None) -> TaskSpec:
    """What the harness loads for an entry: a registered name as it is, a YAML file by its path, a
    benchmark directory as its task config (with `instruction`'s templates when given)."""
    if not is_task_path(entry):
        return TaskSpec(entry, entry)
    path = Path(entry)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskDataError(f"task YAML {entry} does not exist")
        return TaskSpec(entry, str(path))
    if not path.is_dir():
        raise TaskDataError(f"{entry} is neither a task YAML file nor a directory")
    if not is_task_dir(path):
        raise TaskDataError(
            f"{entry} has no labels.json: not a benchmark task directory (`pretrain tasks convert` makes one)"
        )
    return TaskSpec(entry, task_config(path, instruction))


def _resolve(entry: str, metric: str, instruction: tuple[str, str] | None) -> TaskSpec:
    spec = task_spec(entry, instruction)
    manager = _manager(spec.registered)
    if spec.registered and entry not in manager.all_tasks:
        raise TaskDataError(f"{entry!r} is not a task, group or tag that lm-eval {_version()} knows")
    try:
        with offline(), _quiet():
            loaded = manager.load(copy.deepcopy(spec.spec))
    except Exception as err:  # lm-eval and `datasets` raise many kinds for a task they cannot build
        raise TaskDataError(
            f"task {entry!r} could not be built from local files (nothing is downloaded at run time; a "
            f"named task's data must be in the `datasets` cache): {type(err).__name__}: {err}"
        ) from err
    name, task = _top(loaded, entry)
    reported = _metrics_of(task)
    if metric not in reported:
        raise TaskDataError(f"task {entry!r} reports {reported}, not eval.task_metric {metric!r}")
    return TaskSpec(entry, spec.spec, name)


def _top(loaded: dict[str, Any], entry: str) -> tuple[str, Any]:
    """The loaded task, or the group that holds the others: the one whose score is the column."""
    groups, tasks = loaded["groups"], loaded["tasks"]
    if groups:
        children = {c for kids in loaded["group_map"].values() for c in kids}
        name = next(g for g in groups if g not in children)
        return name, groups[name]
    if len(tasks) != 1:
        raise TaskDataError(
            f"{entry!r} is a tag of {len(tasks)} tasks with no group score: list them one by one"
        )
    return next(iter(tasks.items()))


def _metrics_of(task: Any) -> list[str]:
    if hasattr(task, "aggregate_metric_list"):  # a group scores what it aggregates over its tasks
        return [a.metric for a in task.aggregate_metric_list or []]
    return list(task.aggregation())


@functools.cache
def _manager(registered: bool):
    """lm-eval's task index: of its own ~15K tasks only when a name needs them (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registered)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def score_row(cfg: RunConfig, run_dir: str | Path, row: int, device: str | torch.device) -> dict[str, Any]:
    """The scores of row `row`'s model (0: the initial model; k: phase k's export) on the run's tasks, on
    this rank alone, in the precision the run trains in; the caller's random streams are left as they were."""
    from pretrain.engine import model_dtype
    from pretrain.model import model_for_row

    specs = resolve_tasks(*_entries(cfg))
    with rng_kept():
        model, tokenizer = model_for_row(cfg, run_dir, row)
        model = model.to(device=device, dtype=model_dtype(cfg)).eval()
        return score(model, tokenizer, specs, cfg.eval)


def score(model, tokenizer, specs: Sequence[TaskSpec], eval_cfg: EvalConfig) -> dict[str, Any]:
    """{"accuracy": {task: eval.task_metric}, "docs": {task: documents scored}} of one model (on its
    device), "harness": lm-eval's version, "metric": the metric. Seeds as the harness sets them; the
    caller keeps its RNG states (rng_kept)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with offline(), _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg.batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[copy.deepcopy(s.spec) for s in specs],  # lm-eval may edit a config it builds from
            task_manager=_manager(any(s.registered for s in specs)),
            limit=eval_cfg.task_limit,
            bootstrap_iters=0,  # no standard errors: the report derives them from the documents scored
            log_samples=False,
        )
    metric = eval_cfg.task_metric
    return {
        "accuracy": {s.name: _metric_value(out["results"][s.name], metric, s.name) for s in specs},
        "docs": {s.name: _docs(out, s.name) for s in specs},
        "harness": _version(),
        "metric": metric,
    }


def _metric_value(result: dict[str, Any], metric: str, name: str) -> float:
    """`metric` under its `none` filter, else under the only filter the task has."""
    keys = [k for k in result if k.startswith(f"{metric},")]
    key = f"{metric},none" if f"{metric},none" in keys else (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise TaskDataError(f"task {name!r}: lm-eval reported {sorted(result)}, no single {metric!r}")
    return float(result[key])


def _docs(out: dict[str, Any], name: str) -> int:
    if name in out.get("n-samples", {}):
        return int(out["n-samples"][name]["effective"])
    return sum(_docs(out, child) for child in out.get("group_subtasks", {}).get(name, []))


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face hub and `datasets` offline: a task whose data is not on disk fails at once
    instead of downloading (both read their switch when imported, so the module values are set)."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's random states as they were: the harness seeds all three, and a run's
    own streams (document order, dropout, `random` masks) must not depend on whether it scored tasks."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without lm-eval's per-call INFO and WARNING lines (a model object instead of a name, each task's
    set-up), and without the progress bars of the harness and `datasets` when stderr is no terminal (as
    pretrain.logs.progress: a log file full of bars is noise; PRETRAIN_PROGRESS=1 keeps them)."""
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        if not os.isatty(2) and not os.environ.get("PRETRAIN_PROGRESS"):
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))  # tqdm writes to sys.stderr
        try:
            yield
        finally:
            for x, level in zip(loggers, levels, strict=True):
                x.setLevel(level)
