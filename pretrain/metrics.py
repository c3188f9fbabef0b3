"""Forgetting metrics from the domain-by-phase matrix `L[i][j]`: what phase k cost earlier domains and bought.

`L[i][j]` is the mean token loss on domain j's held-out set after phase i (row 0 = the initial model).
Definitions and sign conventions are in docs/metrics.md; in short (losses, so lower is better):

- phase(j): the most recent completed phase that trained j; first_phase(j): the first one.
- forgetting[j] = L[last][j] - min(L[i][j], phase(j) <= i < last), for every j with phase(j) < last.
- bwt = mean of L[phase(j)][j] - L[last][j] over the same domains (negative = forgetting).
- plasticity = mean over phases k of L[k-1][d_k] - L[k][d_k], d_k the domain phase k trained.
- fwt = mean over domains first trained in phase 2 or later of L[0][j] - L[first_phase(j) - 1][j].
- avg_final_loss / avg_final_perplexity: mean of the last row over all domains.
- untrained: domains never in `phases` (evaluated only), with their loss change from row 0 to last.

"last" is the last row present, so a run part-way through gets the metrics of the phases done so far.
A metric with nothing to average (bwt after one phase) is None, never a made-up 0. A NaN, inf or
missing cell raises MetricsError (a ValueError) naming the row and the domain.

`accuracy_metrics` gives the same metrics for the task-by-phase accuracy matrix `A[i][j]` (higher is
better): they are computed on -A, so each signed metric keeps the meaning it has for losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class MetricsError(ValueError):
    """The matrix cannot give honest metrics: bad shape, unknown domain, NaN/inf/missing cell."""


def forgetting_metrics(
    domains: Sequence[str],
    phases: Sequence[str],
    eval_loss: Sequence[Sequence[float]],
    perplexity: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """All forgetting metrics of the rows present, as a JSON-serialisable dict (None where undefined)."""
    domains, phases = list(domains), list(phases)
    loss = check_matrix(domains, phases, eval_loss, "eval_loss")
    ppl = check_matrix(domains, phases, perplexity, "perplexity")
    if len(ppl) != len(loss):
        raise MetricsError(f"perplexity has {len(ppl)} rows but eval_loss has {len(loss)}")
    last = len(loss) - 1
    return {
        **_signed_metrics(domains, phases, loss),
        "avg_final_loss": _mean(loss[last]),
        "avg_final_perplexity": _mean(ppl[last]),
        "untrained": untrained(domains, phases, loss),
    }


def accuracy_metrics(
    tasks: Sequence[str],
    phases: Sequence[str],
    task_domains: dict[str, str],
    accuracy: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """The forgetting metrics of the accuracy matrix A[i][j] (task j after phase i; higher is better).

    Task j counts as trained by the phases of domain `task_domains[j]`; a task linked to no domain is
    evaluated only. The metrics are those of -A, so with phase(j) and first_phase(j) as above:
    forgetting[j] = max(A[i][j], phase(j) <= i < last) - A[last][j] (+ = forgot), bwt = mean of
    A[last][j] - A[phase(j)][j] (- = forgetting), plasticity = mean of A[k][t_k] - A[k-1][t_k] over the
    phases k that trained a task t_k (+ = learned), fwt = mean of A[first_phase(j) - 1][j] - A[0][j]
    (+ = earlier phases helped); avg_final_accuracy = mean of the last row; untrained[j]: initial, final
    and change = final - initial (+ = gained).
    """
    tasks, phases = list(tasks), list(phases)
    by_domain = {d: t for t, d in task_domains.items()}
    if len(by_domain) != len(task_domains):
        raise MetricsError(f"task_domains links two tasks to one domain: {task_domains}")
    trained = [by_domain.get(d) for d in phases]  # the task column each phase trains, None if none
    acc = check_matrix(tasks, phases, accuracy, "accuracy", trained=trained, what="task")
    last = len(acc) - 1
    changes = {
        t: {"initial": acc[0][j], "final": acc[last][j], "change": acc[last][j] - acc[0][j]}
        for j, t in enumerate(tasks)
        if t not in trained
    }
    return {
        **_signed_metrics(tasks, trained, [[-v for v in row] for row in acc]),
        "avg_final_accuracy": _mean(acc[last]),
        "untrained": changes,
    }


def scored_accuracy_metrics(
    tasks: Sequence[str],
    phases: Sequence[str],
    task_domains: dict[str, str],
    accuracy: Sequence[Sequence[float | None]],
) -> dict[str, Any]:
    """accuracy_metrics over the tasks scored in every row so far; the others are named in `left_out`
    ({task: rows without a score}). A task removed from eval.tasks on a resume is never scored again,
    and one added is scored on the earlier rows only by a `pretrain eval` job: neither holds back the
    metrics of the rest. MetricsError if no task is scored in every row."""
    tasks = list(tasks)
    missing = {t: [i for i, row in enumerate(accuracy) if row[j] is None] for j, t in enumerate(tasks)}
    left_out = {t: rows for t, rows in missing.items() if rows}
    if not left_out:
        return accuracy_metrics(tasks, phases, task_domains, accuracy)
    kept = [j for j, t in enumerate(tasks) if t not in left_out]
    if not kept:
        first = next(iter(left_out.items()))
        raise MetricsError(f"no task is scored in every row yet (task {first[0]!r}: rows {first[1]} missing)")
    rows = [[row[j] for j in kept] for row in accuracy]
    links = {t: d for t, d in task_domains.items() if t not in left_out}
    return {**accuracy_metrics([tasks[j] for j in kept], phases, links, rows), "left_out": left_out}


def _signed_metrics(columns: list[str], trained: list[str | None], loss: list[list[float]]) -> dict[str, Any]:
    """forgetting, bwt, plasticity and fwt of a lower-is-better matrix; trained[k-1]: phase k's column."""
    last = len(loss) - 1
    done = trained[:last]
    column = {d: j for j, d in enumerate(columns)}
    forgot = forgetting(columns, done, loss)
    return {
        "phases_done": last,
        "forgetting": forgot,
        "avg_forgetting": _mean(forgot.values()),
        "bwt": bwt(columns, done, loss),
        "plasticity": plasticity(done, loss, column),
        "fwt": fwt(done, loss, column),
    }


def check_matrix(
    domains: list[str],
    phases: list[str],
    matrix: Sequence[Sequence[float]],
    name: str = "eval_loss",
    trained: list[str | None] | None = None,
    what: str = "domain",
) -> list[list[float]]:
    """The matrix as floats, or MetricsError naming what is wrong (shape, unknown domain, non-finite cell).

    `trained[k-1]` is the column phase k trained (default: `phases`, the loss matrix's domains), None for
    a phase that trained none of this matrix's columns; `what` names a column in messages.
    """
    trained = phases if trained is None else trained
    if not domains or len(set(domains)) != len(domains):
        raise MetricsError(f"{what}s must be a non-empty list of distinct names, got {domains}")
    unknown = [(k, d) for k, d in enumerate(trained, 1) if d is not None and d not in domains]
    if unknown:
        k, d = unknown[0]
        raise MetricsError(f"phase {k} trains {d!r}, which is not in {what}s {domains}")
    if matrix is None or len(matrix) == 0:
        raise MetricsError(f"{name} has no rows: not even the initial model was evaluated")
    if len(matrix) > len(phases) + 1:
        raise MetricsError(
            f"{name} has {len(matrix)} rows but {len(phases)} phases allow at most {len(phases) + 1} "
            "(row 0 = initial model)"
        )
    rows = []
    for i, row in enumerate(matrix):
        if row is None:
            raise MetricsError(f"{name}: {row_label(i, phases)} (row {i}) has not been evaluated")
        if len(row) != len(domains):
            raise MetricsError(
                f"{name}: {row_label(i, phases)} (row {i}) has {len(row)} values, expected one per {what} "
                f"({len(domains)}: {domains})"
            )
        rows.append([_cell(v, name, i, d, phases, what) for v, d in zip(row, domains, strict=True)])
    return rows


def forgetting(domains: list[str], done: list[str], loss: list[list[float]]) -> dict[str, float]:
    """Loss added since the best point after its latest training phase, per domain trained before the last."""
    last = len(loss) - 1
    out = {}
    for j, d in enumerate(domains):
        k = latest_phase(d, done)
        if k is not None and k < last:
            out[d] = loss[last][j] - min(loss[i][j] for i in range(k, last))
    return out


def bwt(domains: list[str], done: list[str], loss: list[list[float]]) -> float | None:
    """Mean of L[phase(j)][j] - L[last][j] over domains trained before the last phase; - = forgetting."""
    last = len(loss) - 1
    drops = []
    for j, d in enumerate(domains):
        k = latest_phase(d, done)
        if k is not None and k < last:
            drops.append(loss[k][j] - loss[last][j])
    return _mean(drops)


def plasticity(done: list[str], loss: list[list[float]], column: dict[str, int]) -> float | None:
    """Mean over completed phases of how much the trained domain's loss dropped during its own phase."""
    return _mean(loss[k - 1][column[d]] - loss[k][column[d]] for k, d in enumerate(done, 1) if d is not None)


def fwt(done: list[str], loss: list[list[float]], column: dict[str, int]) -> float | None:
    """Mean of L[0][j] - L[first_phase(j) - 1][j] over domains first trained in phase 2 or later.

    Phase 1's term is 0 by construction (nothing ran before it), so it is left out as in GEM's FWT;
    a domain trained again later counts once, at its first phase (later ones include its own training).
    """
    gains = []
    for k, d in enumerate(done, 1):
        if k > 1 and d is not None and first_phase(d, done) == k:
            gains.append(loss[0][column[d]] - loss[k - 1][column[d]])
    return _mean(gains)


def untrained(domains: list[str], phases: list[str], loss: list[list[float]]) -> dict[str, dict[str, float]]:
    """Domains that no phase trains (evaluated only): initial and last loss and the change (+ = worse)."""
    last = len(loss) - 1
    return {
        d: {"initial": loss[0][j], "final": loss[last][j], "change": loss[last][j] - loss[0][j]}
        for j, d in enumerate(domains)
        if d not in phases
    }


def latest_phase(domain: str, done: list[str]) -> int | None:
    """phase(j): the most recent completed phase (1-based) that trained `domain`, None if none did."""
    ks = [k for k, d in enumerate(done, 1) if d == domain]
    return ks[-1] if ks else None


def first_phase(domain: str, done: list[str]) -> int | None:
    """The first completed phase (1-based) that trained `domain`, None if none did."""
    return done.index(domain) + 1 if domain in done else None


def row_label(row: int, phases: Sequence[str]) -> str:
    """ "initial" for row 0, "after phase k (domain)" for row k."""
    if row == 0:
        return "initial"
    if row <= len(phases):
        return f"after phase {row} ({phases[row - 1]})"
    return f"after phase {row}"


def _cell(value: Any, name: str, row: int, domain: str, phases: list[str], what: str = "domain") -> float:
    where = f"{name} of {what} {domain!r} {row_label(row, phases)} (row {row})"
    if value is None:
        raise MetricsError(f"{where} is missing")
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise MetricsError(f"{where} is not a number: {value!r}") from err
    if not math.isfinite(value):
        raise MetricsError(f"{where} is {value}: forgetting metrics are undefined for a diverged model")
    return value


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
