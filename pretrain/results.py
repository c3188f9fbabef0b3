"""The run's metrics.json: the domain-by-phase evaluation matrix and what each phase reported.

Row 0 of `eval_loss`/`perplexity` is the initial model, row i the model after phase i; one column per
domain in `domains` order. `accuracy` has the same rows and one column per downstream task in `tasks`
(eval.tasks, scored by lm-evaluation-harness), with its forgetting metrics under `accuracy_metrics`.
Written atomically by rank 0 after every change so a crash never leaves a half-written file.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pretrain.atomic import set_aside, write_json_atomic
from pretrain.config import RunConfig
from pretrain.data import SKIP_EXAMPLES, SkipCounter
from pretrain.logs import log
from pretrain.results_shape import shape_problems


class ResultsError(ValueError):
    """A run's metrics.json cannot be read."""


@dataclass
class RunResults:
    domains: list[str]
    phases: list[str]
    method: dict[str, Any]
    eval_loss: list[list[float]] = field(default_factory=list)
    perplexity: list[list[float]] = field(default_factory=list)
    eval_tokens: dict[str, int] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    migu: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    # bad corpus records skipped (train.on_bad_record: skip): {"heldout"|"train": {domain: n}, "examples"}
    skipped_records: dict[str, Any] = field(default_factory=dict)
    # keys changed on resume: {"key", "from", "to", "phase", "step", "global_step"}
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    # eval.every: {"phase", "step", "global_step", "loss": [per domain, `domains` order]}, phase ends included
    eval_curve: list[dict[str, Any]] = field(default_factory=list)
    # accuracy on eval.tasks: accuracy[i][j] after phase i on task j (null: not scored yet)
    tasks: list[str] = field(default_factory=list)
    task_domains: dict[str, str] = field(default_factory=dict)  # task -> the domain whose phases train it
    accuracy: list[list[float | None] | None] = field(default_factory=list)
    task_docs: dict[str, int] = field(default_factory=dict)  # documents each accuracy is the mean of
    harness: str = ""  # the lm-eval version that scored them
    task_metric: str = ""  # the harness's metric in `accuracy` (eval.task_metric)
    summary: dict[str, Any] = field(default_factory=dict)
    accuracy_metrics: dict[str, Any] = field(default_factory=dict)  # computed from `accuracy`, never loaded

    def __post_init__(self) -> None:
        # rows this process evaluated (or scored) since its last save: they win over the file's; every
        # other row is taken from the file, where an eval job may have re-evaluated it since
        self._fresh_loss: set[int] = set()
        self._fresh_accuracy: set[int] = set()

    @classmethod
    def for_run(cls, cfg: RunConfig) -> RunResults:
        return cls(
            domains=domain_order(cfg),
            phases=[p.domain for p in cfg.phases],
            method=cfg.to_dict()["method"],
            task_domains=dict(cfg.eval.task_domains),
        )

    def set_eval(self, row: int, ev: dict[str, dict[str, float]]) -> None:
        """Store the evaluation of the model after phase `row` (0 = initial); rows fill in order."""
        losses = [ev["loss"][d] for d in self.domains]
        self._put_row(row, losses, [ev["perplexity"][d] for d in self.domains])
        self._fresh_loss.add(row)
        self.eval_tokens = dict(ev["tokens"])
        self.summary = self._forgetting()

    def add_curve_point(
        self, phase: int, step: int, global_step: int, ev: dict[str, dict[str, float]]
    ) -> None:
        """A point of the forgetting curves: every domain's held-out loss at `global_step`. A point at a step
        already there replaces it: a run stopped before its first step evaluates its initial model again."""
        loss = [ev["loss"][d] for d in self.domains]
        at = (phase, global_step)
        self.eval_curve = [p for p in self.eval_curve if (p["phase"], p["global_step"]) != at]
        self.eval_curve.append({"phase": phase, "step": step, "global_step": global_step, "loss": loss})

    def _put_row(self, row: int, losses: list[float], perplexities: list[float]) -> None:
        while len(self.eval_loss) <= row:  # an eval job may fill a later row first: gaps stay null
            self.eval_loss.append(None)
            self.perplexity.append(None)
        self.eval_loss[row], self.perplexity[row] = losses, perplexities

    def set_accuracy(self, row: int, scores: dict[str, Any]) -> None:
        """Store task accuracies of the model after phase `row` (downstream.score_row's dict); a task not
        seen before (added on a resume) becomes a new column, null in the rows scored without it."""
        for task in scores["accuracy"]:
            if task not in self.tasks:
                self.tasks.append(task)
                self.accuracy = [None if r is None else [*r, None] for r in self.accuracy]
        while len(self.accuracy) <= row:
            self.accuracy.append(None)
        old = self.accuracy[row] or [None] * len(self.tasks)
        self.accuracy[row] = [scores["accuracy"].get(t, old[j]) for j, t in enumerate(self.tasks)]
        self._fresh_accuracy.add(row)
        self.task_docs.update(scores.get("docs", {}))
        self.harness = scores.get("harness", self.harness)
        self.task_metric = scores.get("metric", self.task_metric)
        self.accuracy_metrics = self._accuracy_metrics()

    def _adopt_accuracy(self, other: RunResults) -> list[int]:
        """Take over the accuracy cells `other` has and this lacks or did not score itself; return their
        rows."""
        taken = []
        for row, values in enumerate(other.accuracy):
            own = self.accuracy[row] if row < len(self.accuracy) else None
            mine = dict(zip(self.tasks, own, strict=True)) if own else {}
            fresh = row in self._fresh_accuracy
            new = {
                t: v
                for t, v in zip(other.tasks, values or [], strict=False)
                if v is not None and (mine.get(t) is None or (not fresh and not _same(v, mine[t])))
            }
            if new:
                docs = {t: n for t, n in other.task_docs.items() if t in new}
                scores = {
                    "accuracy": new,
                    "docs": docs,
                    "harness": other.harness,
                    "metric": other.task_metric,
                }
                self.set_accuracy(row, scores)
                if not fresh:  # taken over, not scored here
                    self._fresh_accuracy.discard(row)
                taken.append(row)
        return taken

    def adopt_eval_rows(self, other: RunResults) -> list[int]:
        """Take over the evaluation rows `other` has (an eval job wrote them to disk) where this has none,
        or has one it did not evaluate itself since its last save (an eval job re-evaluated it)."""
        if other.domains != self.domains:
            return []
        accuracy_rows = self._adopt_accuracy(other)
        mine = self.eval_loss + [None] * max(len(other.eval_loss) - len(self.eval_loss), 0)
        replaceable = [row is None or i not in self._fresh_loss for i, row in enumerate(mine)]
        taken = [
            row
            for row, losses in enumerate(other.eval_loss)
            if losses is not None and replaceable[row] and not _same(losses, mine[row])
        ]
        for row in taken:
            self._put_row(row, other.eval_loss[row], other.perplexity[row])
        if taken:
            self.eval_tokens = self.eval_tokens or dict(other.eval_tokens)
            self.summary = self._forgetting()
        return sorted(set(taken) | set(accuracy_rows))

    def count_skipped(self, split: str, domain: str, skip: SkipCounter | None) -> None:
        """Record the bad records skipped reading a domain's split. A held-out set is read whole every
        time, so its count is set. A later phase of a domain goes on with its earlier phases' count
        (pretrain/continuation.py) and each replay of it reads from the first record, so the bad records
        met are the most any count reached, not their sum."""
        if skip is None:
            return
        counts = self.skipped_records.setdefault(split, {})
        counts[domain] = max(skip.count, counts.get(domain, 0)) if split == "train" else skip.count
        examples = self.skipped_records.setdefault("examples", [])
        examples.extend(m for m in skip.examples if m not in examples)
        del examples[SKIP_EXAMPLES:]

    def _forgetting(self) -> dict[str, Any]:
        from pretrain.metrics import forgetting_metrics

        if any(row is None for row in self.eval_loss):
            return {}
        try:
            return forgetting_metrics(self.domains, self.phases, self.eval_loss, self.perplexity)
        except ValueError as err:  # e.g. a NaN loss: recorded as such, never a made-up number
            return {"error": str(err)}

    def _accuracy_metrics(self) -> dict[str, Any]:
        from pretrain.metrics import scored_accuracy_metrics

        if not self.accuracy or any(row is None for row in self.accuracy):
            return {}
        try:
            return scored_accuracy_metrics(self.tasks, self.phases, self.task_domains, self.accuracy)
        except ValueError as err:  # a cell not scored yet (a task added on resume): said, not made up
            return {"error": str(err)}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("summary"))
        return out

    def save(self, path: str | Path) -> list[int]:
        """Write metrics.json, first taking over rows an eval job wrote there; return those rows.

        The trainer and `pretrain eval` jobs write the same file: under a lock, each keeps the other's rows.
        """
        path = Path(path)
        with metrics_lock(path):
            taken = self.adopt_eval_rows(on_disk) if (on_disk := readable_or_set_aside(path)) else []
            write_json_atomic(path, self.to_dict())
        self._fresh_loss.clear()
        self._fresh_accuracy.clear()
        return taken

    @classmethod
    def load(cls, path: str | Path) -> RunResults:
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ResultsError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ResultsError(f"{path} holds a {type(data).__name__}, not a run's results")
        wrong = [
            f"`{f.name}` is {type(data[f.name]).__name__}"
            for f in fields(cls)
            if f.name in data
            and f.default_factory is not MISSING
            and not isinstance(data[f.name], type(f.default_factory()))
        ]
        try:
            if wrong:
                raise TypeError(", ".join(wrong))
            return cls.from_dict(data)
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as err:  # a key missing, or
            raise ResultsError(f"{path} does not hold a run's results ({err})") from err  # of another type

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        if problems := shape_problems(data):  # a hand edit; every save would fail on it (IndexError)
            raise ValueError("; ".join(problems))
        computed = {"summary", "accuracy_metrics"}
        results = cls(**{k: data[k] for k in cls.__dataclass_fields__.keys() - computed if k in data})
        results.summary = results._forgetting() if results.eval_loss else {}
        results.accuracy_metrics = results._accuracy_metrics()
        return results


def _same(a: object, b: object) -> bool:
    """Equal values as metrics.json holds them (NaN equals NaN: a NaN loss read back is no new row)."""
    return json.dumps(a) == json.dumps(b)


def readable_or_set_aside(path: Path) -> RunResults | None:
    """The results on disk; None if there are none, or none readable: the writer's own rows are whole, so
    an unreadable file (emptied or edited by hand) is set aside, kept, rather than stopping every save."""
    if not path.is_file():
        return None
    try:
        return RunResults.load(path)
    except ResultsError as err:
        kept = set_aside(path, "unreadable")
        log.warning("%s: kept as %s; written again from this run's rows", err, kept.name)
        return None


@contextmanager
def metrics_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on a run's metrics.json for a read-modify-write (a lock file beside it)."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def domain_order(cfg: RunConfig) -> list[str]:
    """Domains in the order phases first train them, then the evaluated-only ones."""
    trained = list(dict.fromkeys(p.domain for p in cfg.phases))
    return trained + [d.name for d in cfg.domains if d.name not in trained]
