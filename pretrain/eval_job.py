"""`python -m pretrain eval --run DIR [--phase N]`: evaluate saved phases of a run as a job of its own.

Row 0 is the initial model, rebuilt from the run's config (a scratch model from its seed, a checkpoint
from its path); row N is `export/phase-N`. The rows land in the run's metrics.json, the same matrices
the training loop fills in-line (held-out loss, and accuracy on eval.tasks), and a re-run gives the same
numbers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pretrain.atomic import write_json_atomic
from pretrain.checkpoint import checkpoint_meta, export_dir, latest_tag
from pretrain.config import ConfigError, load_config
from pretrain.distributed import broadcast_object, from_main, init_distributed, shutdown_distributed
from pretrain.engine import build_eval_engine
from pretrain.evaluate import evaluate_domains, load_heldout
from pretrain.logs import log, setup_logging
from pretrain.model import row_model, row_tokenizer
from pretrain.results import RunResults, metrics_lock, readable_or_set_aside
from pretrain.tokenizer import fingerprint


def evaluate_run(run_dir: str, phase: int | None = None) -> RunResults:
    run = Path(run_dir).resolve()
    cfg = load_config(run / "config.yaml", training=False)
    named = cfg.output_dir
    cfg.output_dir = str(run)  # a run moved or copied since: its own tokenizer, not one at its old place
    # a bad --phase: an error before the ranks meet
    rows, waiting = _rows_to_evaluate(run, len(cfg.phases), phase, cfg.checkpoint.export)
    dist = init_distributed()
    setup_logging(dist.rank)
    if named != cfg.output_dir:
        log.warning("%s: its config names output_dir %s; evaluated here, as the run it holds", run, named)
    if waiting:
        log.info("%s", waiting)
    # rank 0's list on every rank: an export the trainer renames into place between two ranks' listings
    # gave them different rows, and one rank then waited in a collective the others never reached
    rows = broadcast_object(rows)
    tokenizers = _same_tokenizers(run, {row: row_tokenizer(cfg, run, row) for row in rows})
    seen = RunResults.for_run(cfg)  # what reading the held-out sets met (bad records skipped)
    heldout = load_heldout(cfg, tokenizers[rows[0]], seen)  # the same fixed blocks for every row
    for row in rows:
        model = row_model(cfg, run, row, len(tokenizers[row]))
        engine = build_eval_engine(cfg, model, dist.world_size)
        ev = evaluate_domains(engine, heldout, cfg.eval.batch_size, dist)
        log.info("eval row %d: %s", row, "  ".join(f"{d} {v:.4f}" for d, v in ev["loss"].items()))
        # rank 0 scores and records the row while the others wait (from_main: scoring may take long)
        from_main(partial(_score_and_record, cfg, run, row, ev, seen, engine.device))
    shutdown_distributed()
    return RunResults.load(run / "metrics.json")


def _same_tokenizers(run: Path, tokenizers: dict[int, object]) -> dict[int, object]:
    """The rows' tokenizers, if each numbers tokens as the run trained with (its latest checkpoint's
    record, or without one the first row's): the held-out blocks are tokenized once for all rows, and a
    row scored on another numbering would be a wrong number written over a right one."""
    tag = latest_tag(run)
    expected = (checkpoint_meta(run, tag).get("tokenizer") if tag else None) or fingerprint(
        next(iter(tokenizers.values()))
    )
    for row, tokenizer in tokenizers.items():
        if fingerprint(tokenizer) != expected:
            where = f"export/phase-{row}" if row else "the run's tokenizer (row 0)"
            raise ConfigError(
                f"{run}: {where} numbers tokens otherwise than the tokenizer the run trained with "
                f"({len(tokenizer)} tokens against {expected['size']}, or other ids): not evaluated"
            )
    return tokenizers


def _score_and_record(cfg, run: Path, row: int, ev: dict, seen, device) -> None:
    _record_row(run / "metrics.json", cfg, row, ev, seen, _score_tasks(cfg, run, row, device))


def _score_tasks(cfg, run: Path, row: int, device) -> dict | None:
    """The row's accuracy on eval.tasks (pretrain/downstream.py), scored on rank 0; None without tasks."""
    if not cfg.eval.tasks:
        return None
    from pretrain.downstream import score_row

    scores = score_row(cfg, run, row, device)
    log.info("accuracy row %d: %s", row, "  ".join(f"{t} {v:.4f}" for t, v in scores["accuracy"].items()))
    return scores


def _record_row(path: Path, cfg, row: int, ev: dict, seen: RunResults, scores: dict | None = None) -> None:
    """Set one row in metrics.json as it is now: a training run may have written it since this job began."""
    with metrics_lock(path):
        # an unreadable file (torn, edited by hand) is set aside, kept: the row just computed is not lost
        results = readable_or_set_aside(path) or RunResults.for_run(cfg)
        results.set_eval(row, ev)
        if scores:
            results.task_domains = dict(cfg.eval.task_domains)
            results.set_accuracy(row, scores)
        if "heldout" in seen.skipped_records:
            results.skipped_records["heldout"] = seen.skipped_records["heldout"]
        write_json_atomic(path, results.to_dict())


def _rows_to_evaluate(run: Path, phases: int, phase: int | None, export: bool) -> tuple[list[int], str]:
    """(--phase N, or the initial model and every phase exported so far (the run may still be going);
    a line saying what is left out and why)."""
    if phase is not None and not 0 <= phase <= phases:
        raise ConfigError(f"--phase {phase}: the run has phases 0 (initial) to {phases}")
    exported = [r for r in range(1, phases + 1) if export_dir(run, r).is_dir()]
    if phase is not None and phase > 0 and phase not in exported:
        raise ConfigError(f"{run}: no export for phase {phase} (export/phase-N); has the run got there?")
    if phase is not None:
        return [phase], ""
    missing = sorted(set(range(1, phases + 1)) - set(exported))
    if missing and not export:
        return [0, *exported], f"checkpoint.export is off: phases {missing} have no export to evaluate"
    return [0, *exported], f"phases not exported yet, left for a later job: {missing}" if missing else ""
