"""The phase loop: for each domain in turn, train, evaluate every domain, export and checkpoint.

Reads top to bottom: build the parts from the config (or resume them from the newest complete
checkpoint), evaluate the initial model, then per phase train -> evaluate -> record -> export ->
checkpoint -> (a stop asked meanwhile: exit 75) -> score downstream tasks. Once per micro-step the
ranks agree (one small all-reduce) on whether to stop: a SIGTERM on any rank, a NaN/inf loss on any
rank, or a batch some rank could not read (a bad record under `on_bad_record: error`, a file gone):
every stop checkpoints the state before its step, so nothing trained since the last checkpoint is lost.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint import (
    checkpoint_meta,
    export_dir,
    export_phase,
    latest_tag,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from pretrain.config import RunConfig, deepspeed_json, save_config, steps_for_phase
from pretrain.continuation import continue_stream, stream_end, stream_position
from pretrain.data import BadRecord, DataError, TrainStream, bad_record_counter
from pretrain.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    from_main,
    init_distributed,
    shutdown_distributed,
)
from pretrain.elastic import Elastic, load_elastic, plan_elastic
from pretrain.engine import build_engine, check_with_deepspeed, deepspeed_config
from pretrain.evaluate import evaluate_domains, load_heldout
from pretrain.fault_injection import fault_at, kill_self
from pretrain.instruct import ExampleStream, model_inputs
from pretrain.logs import log, progress, setup_logging
from pretrain.methods import Method, build_methods
from pretrain.methods.lora import apply_lora, check_migu_on_adapters
from pretrain.methods.masking import masked_layers
from pretrain.model import build_model, past_context
from pretrain.preemption import EXIT_BAD_DATA, EXIT_NONFINITE, EXIT_PREEMPTED, StopRequest
from pretrain.prefetch import Prefetched
from pretrain.replay import ReplayStream, phase_share, replay_sources, replay_summary
from pretrain.results import RunResults
from pretrain.rundir import RunDirError, RunDirPlan, config_tree, prepare_run_dir, resumable_changes
from pretrain.schedule import set_peak_lr
from pretrain.shuffle import Shuffle
from pretrain.token_cache import TokenCache, open_token_cache
from pretrain.tokenizer import fingerprint, resolve_tokenizer
from pretrain.trackers import MetricsLogger, open_trackers, require_trackers
from pretrain.trackers.forgetting import accuracy_scalars, log_forgetting
from pretrain.trackers.pictures import log_report_pictures


@dataclass
class Position:
    """Where the run stands; saved in every checkpoint. `step` = optimizer steps done in `phase`."""

    phase: int = 1
    step: int = 0
    global_step: int = 0
    world_size: int = 1


@dataclass
class Trainer:
    cfg: RunConfig
    dist: DistInfo
    run_dir: Path
    tokenizer: object
    engine: object
    method: Method
    heldout: dict[str, torch.Tensor]
    phase_steps: list[int]
    results: RunResults
    pos: Position
    trackers: MetricsLogger = field(default_factory=MetricsLogger)  # a no-op off rank 0
    stream: TrainStream | ReplayStream | ExampleStream | None = None
    feed: Prefetched | TrainStream | ReplayStream | ExampleStream | None = None  # the stream, read ahead
    stop: StopRequest | None = None
    phase_losses: list[float] = field(default_factory=list)  # the mean loss over all ranks, per step
    step_lr: float = 0.0
    tokenizer_id: dict = field(default_factory=dict)  # fingerprint, kept in each checkpoint's mark
    token_cache: TokenCache | None = None  # the training files pre-tokenized (train.token_cache)
    deepspeed_json: dict = field(default_factory=dict)  # the DeepSpeed file's settings, in each mark too
    domain_ends: dict[str, dict] = field(default_factory=dict)  # where each domain's stream stopped

    def run(self, stream_state: dict | None = None) -> RunResults:
        if self.pos.phase == 1 and self.pos.step == 0:
            self.evaluate(row=0)
            self.score_tasks(row=0)
        elif self.pos.step == 0:  # resumed at a phase's checkpoint, which is written before its scoring
            self.score_unscored(row=self.pos.phase - 1)
        for phase in range(self.pos.phase, len(self.phase_steps) + 1):
            self.train_phase(phase, stream_state)
            stream_state = None
            self.evaluate(row=phase)
            self.finish_phase(phase)
        log_report_pictures(self.trackers, self.run_dir, self.pos.global_step)
        self.trackers.close()
        return self.results

    def train_phase(self, phase: int, stream_state: dict | None) -> None:
        domain = self.cfg.domain(self.cfg.phases[phase - 1].domain)
        steps = self.phase_steps[phase - 1]
        self.stream = self._stream(phase)
        if stream_state:
            self.stream.load_state_dict(stream_state)
        elif domain.name in self.domain_ends:  # trained in an earlier phase: its stream goes on from there
            continue_stream(self.stream, self.domain_ends[domain.name])
            log.info(
                "phase %d: %s continues its stream from %s", phase, domain.name, self.domain_ends[domain.name]
            )
        depth = self.cfg.train.prefetch
        left = (steps - self.pos.step) * self.cfg.train.grad_accum  # the micro-batches this phase still uses
        self.feed = Prefetched(self.stream, depth, limit=left) if depth else self.stream
        if self.pos.step == 0:  # a phase resumed midway has its method state from the checkpoint
            self.method.begin_phase(phase)
        log.info(
            "phase %d/%d: %s, steps %d-%d",
            phase,
            len(self.phase_steps),
            domain.name,
            self.pos.step + 1,
            steps,
        )
        batches = TimedBatches(iter(self.feed))
        meter = ThroughputMeter(self.tokens_per_step, batches)
        try:
            self._train_steps(phase, domain.name, steps, batches, meter)
            ends = all_gather_object(stream_position(self.feed.state_dict()))
            self.domain_ends[domain.name] = stream_end(ends)
        finally:  # also on a stop or an error: no thread reads on behind an exiting run
            if isinstance(self.feed, Prefetched):
                self.feed.close()
        self._record_phase(phase, domain.name, steps, meter)

    def _train_steps(self, phase: int, domain: str, steps: int, batches, meter: ThroughputMeter) -> None:
        bar = progress(steps - self.pos.step, f"phase {phase} {domain}", self.dist.rank)
        while self.pos.step < steps:
            # where a stop inside the step resumes: the step's batches and its random draws (dropout)
            step_start = {"stream": self.feed.state_dict(), **rng_state()}
            loss = self.train_step(batches, step_start)
            self.pos.step += 1
            self.pos.global_step += 1
            meter.add(loss)
            self.phase_losses.append(loss)
            bar.update()
            if self.pos.step % self.cfg.train.log_every == 0 or self.pos.step == steps:
                self._log_interval(phase, domain, steps, meter.flush())
            if self._curve_due(steps):
                self.evaluate_curve(phase)
            if self._checkpoint_due(steps):
                self.checkpoint(f"step-{self.pos.global_step}")
            if fault_at("kill", self.pos.global_step) and self.dist.rank == 0:
                kill_self()
        bar.close()

    def _record_phase(self, phase: int, domain: str, steps: int, meter: ThroughputMeter) -> None:
        row = {
            "phase": phase,
            "domain": domain,
            "steps": steps,
            "tokens": steps * self.tokens_per_step,
            "losses": self.phase_losses,
            **meter.totals(),
        }
        if isinstance(self.stream, ReplayStream):
            blocks, seq_len = steps * self.tokens_per_step // self.cfg.train.seq_len, self.cfg.train.seq_len
            row["replay"] = replay_summary(self.stream.share, self.stream.names, blocks, seq_len)
        skip = self.stream.skip
        if skip is not None:  # counted by the stream, so a resumed phase still counts its whole pass
            row["skipped_records"] = skip.count
            self.results.count_skipped("train", domain, skip)
            log.info("phase %d %s: %d bad records skipped", phase, domain, skip.count)
        if isinstance(self.stream, ReplayStream):
            for name, source_skip in self.stream.source_skips().items():
                self.results.count_skipped("train", name, source_skip)
        self.results.train.append(row)
        self.phase_losses = []

    def train_step(self, batches, step_start: dict) -> float:
        """One optimizer step: grad_accum micro-batches; DeepSpeed steps at the boundary."""
        total = 0.0
        self.step_lr = self.engine.get_lr()[0]  # the lr this step uses; get_lr() after it is the next one's
        for micro in range(self.cfg.train.grad_accum):
            if fault_at("stop_at_micro", f"{self.pos.global_step + 1}.{micro}") and self.dist.rank == 1:
                self.stop.signal_name = "SIGTERM"
            batch, unread = _next_batch(batches)
            loss = self.engine(**model_inputs(batch.to(self.engine.device))).loss  # instruction: answers only
            if fault_at("nan_loss", self.pos.global_step + 1) and self.dist.rank == 1:
                loss = loss * math.nan
            stop, nonfinite, bad, mean_loss = self._agree(loss.item(), unread is not None)
            if bad:
                message = _unread_message(unread)  # gathered from every rank
                if self.dist.is_main:
                    log.error("%s", message)
                self._stop(EXIT_BAD_DATA, "a batch that could not be read", step_start)
            if stop:
                self._stop(EXIT_PREEMPTED, f"stopped by {self.stop.signal_name or 'a signal'}", step_start)
            if nonfinite:
                if self.cfg.train.on_nonfinite == "stop":
                    self._stop(EXIT_NONFINITE, "non-finite loss", step_start)
                self.method.discard_step()
                self.method.skip_step()
                self.engine.lr_scheduler.step()  # the schedule counts the skipped step, so phases keep length
                self.results.skipped_steps.append(self.pos.global_step + 1)
                log.warning("non-finite loss at step %d on some rank: step skipped", self.pos.global_step + 1)
                return math.nan
            self.method.before_backward(self.engine)
            self.engine.backward(loss)
            self.method.after_backward(self.engine)
            self.engine.step()
            total += mean_loss
        if not self.engine.was_step_applied():  # an fp16 overflow (or non-finite gradients): DeepSpeed
            self.engine.lr_scheduler.step()  # skipped the update and its scheduler; phases keep length
        return total / self.cfg.train.grad_accum

    def evaluate(self, row: int) -> None:
        if not self.cfg.eval.inline:  # left to `pretrain eval --run DIR` jobs
            self._save_results()
            return
        ev = evaluate_domains(self.engine, self.heldout, self.cfg.eval.batch_size, self.dist)
        if self.cfg.eval.every:  # the phase end is a point of the curves too
            self._record_curve_point(row, ev)
        self.results.set_eval(row, ev)
        label = "initial" if row == 0 else f"after phase {row}"
        log.info("eval %s: %s", label, "  ".join(f"{d} {v:.4f}" for d, v in ev["loss"].items()))
        row_scalars = {f"eval_loss/{d}": v for d, v in ev["loss"].items()}
        row_scalars |= {f"eval_perplexity/{d}": v for d, v in ev["perplexity"].items()}
        self.trackers.scalars(row_scalars, self.pos.global_step, phase=row)
        self._save_results()

    def evaluate_curve(self, phase: int) -> None:
        """Every domain's held-out loss now (eval.every): a point of the forgetting curves."""
        ev = evaluate_domains(self.engine, self.heldout, self.cfg.eval.batch_size, self.dist)
        self._record_curve_point(phase, ev)
        self._save_results()

    def _record_curve_point(self, phase: int, ev: dict) -> None:
        self.results.add_curve_point(phase, self.pos.step, self.pos.global_step, ev)
        curve = {f"eval_curve/{d}": v for d, v in ev["loss"].items()}
        self.trackers.scalars(curve, self.pos.global_step)

    def score_tasks(self, row: int) -> None:
        """Accuracy of row `row` on eval.tasks (pretrain/downstream.py): rank 0 scores while the others
        wait, then every rank records the same row."""
        if not self.cfg.eval.tasks or not self.cfg.eval.inline:
            return
        from pretrain.downstream import score_row

        def work() -> dict:
            if fault_at("kill_scoring", row):
                kill_self()
            return score_row(self.cfg, self.run_dir, row, self.engine.device)

        scores = from_main(work)
        self.results.task_domains = dict(self.cfg.eval.task_domains)  # eval.* may change on resume
        self.results.set_accuracy(row, scores)
        label = "initial" if row == 0 else f"after phase {row}"
        log.info("accuracy %s: %s", label, "  ".join(f"{t} {v:.4f}" for t, v in scores["accuracy"].items()))
        self.trackers.scalars(accuracy_scalars(self.results.to_dict(), row), self.pos.global_step, phase=row)
        self._save_results()

    def score_unscored(self, row: int) -> None:
        """Score row `row` unless metrics.json has it for every task of eval.tasks (a scoring that ended
        before a stop has it; a task dropped on an earlier resume stays empty in later rows: not asked)."""
        if not self.cfg.eval.tasks or not self.cfg.eval.inline:
            return
        from pretrain.downstream import task_names

        def unscored() -> bool:
            self._save_results()  # takes over the rows metrics.json holds
            return not row_scored(self.results, row, task_names(self.cfg))

        if broadcast_object(unscored() if self.dist.is_main else None):
            log.info("phase %d's accuracy was not scored before the run stopped: scoring it now", row)
            self.score_tasks(row)

    def finish_phase(self, phase: int) -> None:
        summary = self.method.end_phase(phase)
        if summary:
            self.results.migu.append(summary)
        if self.cfg.eval.inline:  # else no row of this phase yet: the metrics would be an earlier phase's
            log_forgetting(self.trackers, self.results.to_dict(), phase, self.pos.global_step)
        self.method.log(self.trackers, self.pos.global_step)
        self._save_results()
        if self.cfg.checkpoint.export:  # before the checkpoint: a resume past this phase finds its export
            export_phase(self.engine, self.tokenizer, export_dir(self.run_dir, phase), self.dist.is_main)
        self.pos.phase, self.pos.step = phase + 1, 0
        self.stream = self.feed = None
        self.checkpoint(f"phase-{phase}")
        # Scoring (minutes) comes after the checkpoint: a scoring error or a kill then costs the scoring,
        # which the resume does (score_unscored), not the phase; a stop asked during the evaluation or the
        # export is taken here, not after the scoring.
        if fault_at("stop_at_phase_end", phase) and self.dist.rank == 1:
            self.stop.signal_name = "SIGTERM"
        if self._stop_agreed():
            log.warning(
                "stopped by %s after checkpoint phase-%d: exiting with %d",
                self.stop.signal_name or "a signal on another rank",
                phase,
                EXIT_PREEMPTED,
            )
            self._exit(EXIT_PREEMPTED)
        self.score_tasks(row=phase)

    def checkpoint(self, tag: str, step_start: dict | None = None) -> None:
        """Save the state after the last step, or `step_start` (stream position and random state) for a
        stop inside a step."""
        stream_state = None if self.feed is None else self.feed.state_dict()  # trained on, not read ahead
        client = {
            "position": asdict(self.pos),
            "results": self.results.to_dict(),
            "method": self.method.state_dict(),
            "phase_losses": self.phase_losses,
            "domain_ends": self.domain_ends,  # (none in older checkpoints: a domain's stream restarts)
            "config": config_tree(self.cfg),  # what a resume compares its resumable keys against
        }
        global_batch = self.cfg.train.global_batch(self.dist.world_size)
        meta = {
            "global_step": self.pos.global_step,
            "tokenizer": self.tokenizer_id,
            "global_batch": global_batch,
            "phase": self.pos.phase,  # the phase a resume trains first: its start checks only those left
            "deepspeed": self.deepspeed_json,  # what a resume's DeepSpeed file is compared against
        }
        rank_state = {"stream": stream_state, **(step_start or {}), "method": self.method.rank_state_dict()}
        tag = save_checkpoint(
            self.engine, self.run_dir, tag, client, rank_state, self.dist, self.cfg.checkpoint.keep, meta
        )
        log.info("checkpoint %s written", tag)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch(self.dist.world_size) * self.cfg.train.seq_len

    def _curve_due(self, steps: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and self.pos.step % every == 0 and self.pos.step < steps  # the end: evaluate()

    def _checkpoint_due(self, steps: int) -> bool:
        every = self.cfg.checkpoint.save_every
        return every > 0 and self.pos.step % every == 0 and self.pos.step < steps

    def _stop_agreed(self) -> bool:
        """Whether a stop was asked on some rank (a collective: every rank calls it at the same point)."""
        return _summed([float(self.stop.requested)])[0] > 0

    def _agree(self, loss: float, unread: bool = False) -> tuple[bool, bool, bool, float]:
        """(stop requested on some rank, a non-finite loss on some rank, a batch unread on some rank, the
        micro-step's mean loss over ranks): one small all-reduce a micro-step. The mean makes a step's loss
        the same number for any split of its batch over ranks."""
        finite = math.isfinite(loss) or unread  # an unread batch's stand-in loss is no NaN of training
        flags = [float(self.stop.requested), float(not finite), loss if finite else 0.0, float(unread)]
        flags = _summed(flags)
        return flags[0] > 0, flags[1] > 0, flags[3] > 0, flags[2] / self.dist.world_size

    def _stop(self, code: int, why: str, step_start: dict) -> None:
        """Checkpoint the state before the current step (weights are unchanged until engine.step) and exit."""
        log.warning(
            "%s at phase %d step %d: checkpointing and exiting with %d",
            why,
            self.pos.phase,
            self.pos.step + 1,
            code,
        )
        # The resumed run forwards this step again: what the method recorded in it must not travel along.
        self.method.discard_step()
        if code == EXIT_PREEMPTED and self.stop is not None:
            self.stop.saving()
        self.checkpoint(f"step-{self.pos.global_step}-stop", step_start)
        self._exit(code)

    def _exit(self, code: int) -> None:
        if code == EXIT_PREEMPTED and self.stop is not None:
            self.stop.acknowledge()  # every node's launch script then exits 75, not the launcher's 1
        raise SystemExit(code)

    def _stream(self, phase: int) -> TrainStream | ReplayStream | ExampleStream:
        return phase_stream(self.cfg, phase, self.dist, self.tokenizer, self.token_cache)

    def _log_interval(self, phase: int, domain: str, steps: int, interval: dict) -> None:
        mean_loss = interval["loss"]  # the steps' losses are means over ranks already
        lr = self.step_lr
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        extra = self.method.scalars()  # the same on every rank (e.g. the regularisation penalty)
        log.info(
            "phase %d %s | step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | tok/s %.0f | data %.1f%%%s",
            phase,
            domain,
            self.pos.step,
            steps,
            mean_loss,
            lr,
            norm,
            interval["tokens_per_s"],
            100 * interval["data_wait_share"],
            "".join(f" | {k} {v:.4g}" for k, v in extra.items()),
        )
        scalars = {"loss": mean_loss, "lr": lr, "grad_norm": norm, **extra}
        scalars["tokens_per_s"] = interval["tokens_per_s"]
        scalars["data_wait_share"] = interval["data_wait_share"]
        self.trackers.scalars({f"train/{k}": v for k, v in scalars.items()}, self.pos.global_step)

    def _save_results(self) -> None:
        if self.dist.is_main:
            taken = self.results.save(self.run_dir / "metrics.json")
            if taken:
                log.info("kept evaluation rows %s that an eval job wrote to metrics.json", taken)


def row_scored(results: RunResults, row: int, tasks: list[str]) -> bool:
    """Whether accuracy row `row` has a score for each of `tasks` (others' empty cells do not count)."""
    cells = results.accuracy[row] if row < len(results.accuracy) else None
    have = dict(zip(results.tasks, cells, strict=True)) if cells is not None else {}
    return all(have.get(task) is not None for task in tasks)


_STAND_IN = torch.zeros((1, 2), dtype=torch.long)  # forwarded by a rank whose batch could not be read


def _next_batch(batches) -> tuple[object, Exception | None]:
    """The next batch, or a stand-in and the error that kept this rank from reading it. The rank forwards
    the stand-in (at ZeRO-3 the forward gathers weights with every rank) and the ranks then agree to stop
    before anything is trained on; a rank that raised here instead left the others waiting in a
    collective, and the run lost what it trained since its last checkpoint."""
    try:
        return next(batches), None
    except (DataError, OSError) as err:  # a bad record (on_bad_record: error); a file gone, a storage fault
        return _STAND_IN, err


def _unread_message(unread: Exception | None) -> str:
    """Why the ranks stop, the same on every rank: the first rank's error that met one (a collective)."""
    mine = unread and (str(unread), isinstance(unread, BadRecord))
    rank, (error, bad_record) = next((r, e) for r, e in enumerate(all_gather_object(mine)) if e)
    fix = "mend what it names and resume"
    if bad_record:
        fix = "resume with --set train.on_bad_record=skip (it is skipped and counted) or mend it and resume"
    return f"rank {rank} could not read its next batch: {error}. To go on: {fix}"


class TimedBatches:
    """A batch iterator that adds up the time its consumer waits for each batch (reading, tokenizing)."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start


class ThroughputMeter:
    """Mean loss, tokens/s and the share of time spent waiting for data, over a logging interval and over
    a phase (or its resumed part). The waiting is this rank's (rank 0's in the log and metrics.json):
    every rank reads the same documents, so it stands for all of them. Over a phase also the median and
    the longest time from one step's end to the next's: the mean of a short phase moves with a few
    stalls (a checkpoint, an evaluation, a slow batch), which the median leaves out and the longest shows."""

    def __init__(self, tokens_per_step: int, batches: TimedBatches | None = None):
        self.tokens_per_step = tokens_per_step
        self.batches = batches
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.steps = 0
        self.start = self.phase_start = self.step_end = time.perf_counter()
        self.waited_at_start = self._waited()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the phase's own peak in totals()

    def _waited(self) -> float:
        return self.batches.waited if self.batches is not None else 0.0

    def add(self, loss: float) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self.step_end)
        self.step_end = now
        self.losses.append(loss)
        self.steps += 1

    def flush(self) -> dict:
        now, waited = time.perf_counter(), self._waited()
        finite = [x for x in self.losses if math.isfinite(x)] or [math.nan]
        elapsed = max(now - self.start, 1e-9)
        out = {
            "loss": sum(finite) / len(finite),
            "tokens_per_s": len(self.losses) * self.tokens_per_step / elapsed,
            "data_wait_share": (waited - self.waited_at_start) / elapsed,
        }
        self.losses, self.start, self.waited_at_start = [], now, waited
        return out

    def totals(self) -> dict:
        elapsed = time.perf_counter() - self.phase_start
        waited = self._waited()
        totals = {
            "seconds": round(elapsed, 3),
            "tokens_per_s": self.steps * self.tokens_per_step / max(elapsed, 1e-9),
            "data_wait_seconds": round(waited, 3),
            "data_wait_share": waited / max(elapsed, 1e-9),
        }
        if self.step_seconds:
            totals["step_seconds_median"] = round(statistics.median(self.step_seconds), 4)
            totals["step_seconds_max"] = round(max(self.step_seconds), 4)
        if torch.cuda.is_available():
            totals["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return totals


def phase_stream(
    cfg: RunConfig, phase: int, dist: DistInfo, tokenizer, token_cache: TokenCache | None
) -> TrainStream | ReplayStream | ExampleStream:
    """This rank's batches of a phase: its domain's blocks, a share of them replayed if configured,
    or an instruction domain's examples (the config refuses replay with those)."""
    domain = cfg.domain(cfg.phases[phase - 1].domain)
    t, policy = cfg.train, cfg.train.on_bad_record
    rank, world, micro = dist.rank, dist.world_size, t.micro_batch_size
    share = phase_share(cfg, phase)
    shuffle = Shuffle(t.seed, t.shuffle_buffer) if t.shuffle_buffer > 1 else None
    if domain.instruction is not None:
        args = (tokenizer, t.seq_len, rank, world, micro, bad_record_counter(policy))
        return ExampleStream(domain.train, domain.instruction, *args, shuffle=shuffle)
    own = (domain.train, domain.text_field, bad_record_counter(policy))
    if share == 0:
        files, field, skip = own
        read = (tokenizer, t.seq_len, rank, world, micro, skip)
        return TrainStream(files, field, *read, shuffle=shuffle, cache=token_cache)
    sources = {
        s.name: (s.files, s.text_field, bad_record_counter(policy)) for s in replay_sources(cfg, phase)
    }
    read = (tokenizer, t.seq_len, rank, world, micro)
    return ReplayStream(own, sources, share, *read, shuffle=shuffle, cache=token_cache)


def build_trainer(cfg: RunConfig, dist: DistInfo, resume: bool) -> tuple[Trainer, dict | None]:
    """Every part from the config, in dependency order; then the newest checkpoint if resuming.

    The run's config.yaml is written last: a start that fails on the way leaves the directory as it was.
    It keeps the config as the user wrote it; a resume whose ranks and grad_accum would not make the
    checkpoint's global batch runs with grad_accum scaled to keep it (pretrain/elastic.py).
    """
    # a batch-size conflict is an error before anything is touched; a resume's global batch is its
    # checkpoint's, on any ranks (elastic), and build_engine checks it against the batch the run trains with
    continuing = resume and latest_tag(Path(cfg.output_dir)) is not None
    ds = deepspeed_config(cfg, dist.world_size, check_global_batch=not continuing)
    check_with_deepspeed(ds, cfg.deepspeed.config)
    require_trackers(cfg.logging)  # so is a tracker whose package is missing
    plan = prepare_run_dir(cfg, dist, resume)
    elastic = _plan_resume(cfg, plan, dist)
    run_cfg = elastic.cfg if elastic else cfg
    tokenizer = _tokenizer_rank0_first(cfg, dist)
    token_cache = open_token_cache(cfg, tokenizer)  # a file not pre-tokenized is an error before any work
    # the phases still to train, each opened once (one step of its data and of its replay sources'): a
    # later phase's bad corpus stops the run now, not after the phases before it
    first = checkpoint_meta(plan.path, latest_tag(plan.path)).get("phase", 1) if plan.resuming else 1
    for phase in range(first, len(cfg.phases) + 1):
        phase_stream(run_cfg, phase, dist, tokenizer, token_cache)
    phase_steps = [steps_for_phase(p, run_cfg.train, dist.world_size) for p in cfg.phases]
    results = RunResults.for_run(cfg)
    heldout = load_heldout(cfg, tokenizer, results)  # a bad held-out file is an error before the model loads
    model = apply_lora(cfg.lora, build_model(cfg.model, len(tokenizer), cfg.train.seed))
    if cfg.method.name != "none":  # before DeepSpeed, on the model's own layer names (LoRA's too)
        masked_layers(model, cfg.method)
        check_migu_on_adapters(model, cfg.method)
    if (overrun := past_context(model, cfg.train.seq_len)) and dist.is_main:
        log.warning("%s", overrun)
    engine = build_engine(
        run_cfg,
        model,
        phase_steps,
        dist.world_size,
        load_universal=bool(elastic and elastic.universal),
        written=cfg.train,
    )
    method = build_methods(
        cfg.method, cfg.regularisation, engine.module, engine, phase_steps, seed=cfg.train.seed
    )
    trainer = Trainer(
        run_cfg,
        dist,
        plan.path,
        tokenizer,
        engine,
        method,
        heldout,
        phase_steps,
        results,
        Position(world_size=dist.world_size),
        stop=StopRequest().install(),
        tokenizer_id=fingerprint(tokenizer),
        token_cache=token_cache,
        deepspeed_json=deepspeed_json(cfg),
    )
    stream_state = None
    if plan.resuming:
        stream_state = _restore(trainer, plan, elastic)
    elif resume:
        log.info("no checkpoint in %s: starting from the beginning", plan.path)
    if dist.is_main:
        save_config(cfg, plan.path / "config.yaml")
    trainer.trackers = open_trackers(cfg.logging, plan.path, dist.rank, plan.resuming, config_tree(cfg))
    return trainer, stream_state


def _plan_resume(cfg: RunConfig, plan: RunDirPlan, dist: DistInfo) -> Elastic | None:
    """How the newest checkpoint is taken up on this many ranks: None, as it was written."""
    if not plan.resuming:
        return None
    elastic = plan_elastic(cfg, plan.path, latest_tag(plan.path), dist)
    if elastic:
        log.warning(
            "resuming checkpoint %s of %d ranks on %d: train.grad_accum %d -> %d keeps the global batch "
            "(the config says %d)",
            elastic.tag,
            elastic.old_world,
            dist.world_size,
            elastic.old_accum,
            elastic.cfg.train.grad_accum,
            cfg.train.grad_accum,
        )
    return elastic


def _restore(trainer: Trainer, plan: RunDirPlan, elastic: Elastic | None) -> dict:
    """Load the newest complete checkpoint into the trainer; return this rank's data-stream position."""
    tag = latest_tag(trainer.run_dir)
    _check_resumable(trainer, tag)
    if elastic:
        loaded = load_elastic(trainer.engine, trainer.run_dir, elastic, trainer.dist)
        client, stream_state, method_states = loaded
    else:
        client, rank_state = load_checkpoint(trainer.engine, trainer.run_dir, trainer.dist)
        stream_state, method_states = rank_state["stream"], rank_state.get("method", {})
    trainer.pos = Position(**{**client["position"], "world_size": trainer.dist.world_size})
    trainer.results = RunResults.from_dict(client["results"])
    # Rows a `pretrain eval` job wrote after this checkpoint are taken over by the first save.
    trainer.method.load_state_dict(client["method"])
    if elastic:
        trainer.method.reshard_rank_state(method_states)
    else:
        trainer.method.load_rank_state_dict(method_states)
    trainer.phase_losses = client["phase_losses"]
    trainer.domain_ends = client.get("domain_ends", {})
    log.info("resumed from %s: phase %d, step %d", tag, trainer.pos.phase, trainer.pos.step)
    # Against the checkpoint's own config: config.yaml already holds a change made by a resume that
    # died before its first checkpoint, whose change must be applied (and recorded) again.
    saved = client.get("config")
    recorded = checkpoint_meta(trainer.run_dir, tag).get("deepspeed")
    changes = plan.changes if saved is None else resumable_changes(saved, trainer.cfg, tag, recorded)
    changes = changes + plan.deepspeed_changes
    _apply_changes(trainer, (elastic.changes(trainer.dist.world_size) if elastic else []) + changes)
    return stream_state


def _check_resumable(trainer: Trainer, tag: str) -> None:
    """Refuse, before DeepSpeed's load fails obscurely, a checkpoint this run cannot take up."""
    saved = checkpoint_meta(trainer.run_dir, tag).get("tokenizer")
    if saved and saved != trainer.tokenizer_id:
        now = trainer.tokenizer_id
        what = f"{saved['size']} tokens, now {now['size']}"
        if saved["size"] == now["size"]:
            what = f"{now['size']} tokens both, numbered differently"
        where = _tokenizer_source(trainer.cfg)
        raise RunDirError(
            f"the tokenizer changed since checkpoint {tag} was written ({what}; {where}): "
            "the checkpoint's embeddings belong to the old vocabulary. Put the run's tokenizer back, or "
            "start a new run in another output_dir"
        )


def _tokenizer_source(cfg: RunConfig) -> str:
    tok = cfg.tokenizer
    if tok.source == "model":
        return f"the tokenizer of model.path {cfg.model.path}"
    return f"tokenizer.path {tok.path or Path(cfg.output_dir) / 'tokenizer'}"


def _apply_changes(trainer: Trainer, changes: list[dict]) -> None:
    """Record the config keys changed on this resume in metrics.json and put a new train.lr into effect."""
    pos = trainer.pos
    for change in changes:
        trainer.results.config_changes.append(
            {**change, "phase": pos.phase, "step": pos.step, "global_step": pos.global_step}
        )
        log.warning("resumed with %s changed: %r -> %r", change["key"], change["from"], change["to"])
        if change["key"] == "train.lr":
            set_peak_lr(trainer.engine.lr_scheduler, change["to"])


def _tokenizer_rank0_first(cfg: RunConfig, dist: DistInfo):
    # Rank 0 trains (or checks) the tokenizer; the others then load the very same files.
    if dist.is_main:
        tokenizer = resolve_tokenizer(cfg)
    barrier()
    if not dist.is_main:
        tokenizer = resolve_tokenizer(cfg)
    return tokenizer


def _summed(values: list[float]) -> list[float]:
    """`values` summed over the ranks: a collective, so every rank calls it at the same point."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def train(cfg: RunConfig, resume: bool = False) -> RunResults:
    dist = init_distributed()
    setup_logging(dist.rank)
    trainer, stream_state = build_trainer(cfg, dist, resume)
    results = trainer.run(stream_state)
    log.info("run finished: %s", trainer.run_dir)
    shutdown_distributed()
    return results
