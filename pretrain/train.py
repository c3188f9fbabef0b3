"""The phase loop: for each domain in turn, train, evaluate every domain, checkpoint and export.

Reads top to bottom: build the parts from the config (or resume them from the newest complete
checkpoint), evaluate the initial model, then per phase train -> evaluate -> record -> checkpoint ->
export. Once per micro-step the ranks agree (one small all-reduce) on whether to stop: a SIGTERM on
any rank, or a NaN/inf loss on any rank.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint import checkpoint_meta, export_phase, latest_tag, load_checkpoint, save_checkpoint
from pretrain.config import RunConfig, save_config, steps_for_phase
from pretrain.data import TrainStream, bad_record_counter
from pretrain.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from pretrain.engine import build_engine, deepspeed_config
from pretrain.evaluate import evaluate_domains, load_heldout
from pretrain.logs import log, progress, setup_logging, tensorboard_writer
from pretrain.methods import Method, build_methods
from pretrain.methods.lora import apply_lora
from pretrain.model import build_model
from pretrain.preemption import EXIT_NONFINITE, EXIT_PREEMPTED, StopRequest
from pretrain.replay import ReplayStream, phase_share, replay_sources, replay_summary
from pretrain.results import RunResults
from pretrain.rundir import RunDirError, RunDirPlan, config_tree, prepare_run_dir, resumable_changes
from pretrain.schedule import set_peak_lr
from pretrain.shuffle import Shuffle
from pretrain.tokenizer import fingerprint, resolve_tokenizer


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
    writer: object = None
    stream: TrainStream | None = None
    stop: StopRequest | None = None
    phase_losses: list[float] = field(default_factory=list)  # rank 0's loss per step of this phase
    step_lr: float = 0.0
    tokenizer_id: dict = field(default_factory=dict)  # fingerprint, kept in each checkpoint's mark

    def run(self, stream_state: dict | None = None) -> RunResults:
        if self.pos.phase == 1 and self.pos.step == 0:
            self.evaluate(row=0)
            self.score_tasks(row=0)
        for phase in range(self.pos.phase, len(self.phase_steps) + 1):
            self.train_phase(phase, stream_state)
            stream_state = None
            self.evaluate(row=phase)
            self.finish_phase(phase)
        if self.writer:
            self.writer.close()
        return self.results

    def train_phase(self, phase: int, stream_state: dict | None) -> None:
        domain = self.cfg.domain(self.cfg.phases[phase - 1].domain)
        steps = self.phase_steps[phase - 1]
        self.stream = self._stream(phase)
        if stream_state:
            self.stream.load_state_dict(stream_state)
        batches = iter(self.stream)
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
        meter = ThroughputMeter(self.tokens_per_step)
        bar = progress(steps - self.pos.step, f"phase {phase} {domain.name}", self.dist.rank)
        while self.pos.step < steps:
            step_start = self.stream.state_dict()
            loss = self.train_step(batches, step_start)
            self.pos.step += 1
            self.pos.global_step += 1
            meter.add(loss)
            self.phase_losses.append(loss)
            bar.update()
            if self.pos.step % self.cfg.train.log_every == 0 or self.pos.step == steps:
                self._log_interval(phase, domain.name, steps, meter.flush())
            if self._checkpoint_due(steps):
                self.checkpoint(f"step-{self.pos.global_step}")
            _fault_kill(self.pos.global_step, self.dist.rank)
        bar.close()
        self._record_phase(phase, domain.name, steps, meter)

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
        self.results.train.append(row)
        self.phase_losses = []

    def train_step(self, batches, step_start: dict) -> float:
        """One optimizer step: grad_accum micro-batches; DeepSpeed steps at the boundary."""
        total = 0.0
        self.step_lr = self.engine.get_lr()[0]  # the lr this step uses; get_lr() after it is the next one's
        for _ in range(self.cfg.train.grad_accum):
            batch = next(batches).to(self.engine.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            loss = _fault_nan(loss, self.pos.global_step, self.dist.rank)
            stop, nonfinite = self._agree(torch.isfinite(loss).item())
            if stop:
                self._stop(EXIT_PREEMPTED, f"stopped by {self.stop.signal_name or 'a signal'}", step_start)
            if nonfinite:
                if self.cfg.train.on_nonfinite == "stop":
                    self._stop(EXIT_NONFINITE, "non-finite loss", step_start)
                self.method.discard_step()
                self.engine.lr_scheduler.step()  # the schedule counts the skipped step, so phases keep length
                self.results.skipped_steps.append(self.pos.global_step + 1)
                log.warning("non-finite loss at step %d on some rank: step skipped", self.pos.global_step + 1)
                return math.nan
            self.method.before_backward(self.engine)
            self.engine.backward(loss)
            self.method.after_backward(self.engine)
            self.engine.step()
            total += loss.item()
        return total / self.cfg.train.grad_accum

    def evaluate(self, row: int) -> None:
        if not self.cfg.eval.inline:  # left to `pretrain eval --run DIR` jobs
            self._save_results()
            return
        ev = evaluate_domains(self.engine, self.heldout, self.cfg.eval.batch_size, self.dist)
        self.results.set_eval(row, ev)
        label = "initial" if row == 0 else f"after phase {row}"
        log.info("eval %s: %s", label, "  ".join(f"{d} {v:.4f}" for d, v in ev["loss"].items()))
        if self.writer:
            for d, v in ev["loss"].items():
                self.writer.add_scalar(f"eval_loss/{d}", v, row)
                self.writer.add_scalar(f"eval_perplexity/{d}", ev["perplexity"][d], row)
        self._save_results()

    def score_tasks(self, row: int) -> None:
        """Accuracy of row `row` on eval.tasks (pretrain/downstream.py): rank 0 scores while the others
        wait, then every rank records the same row."""
        if not self.cfg.eval.tasks or not self.cfg.eval.inline:
            return
        from pretrain.downstream import score_row

        scores = score_row(self.cfg, self.run_dir, row, self.engine.device) if self.dist.is_main else None
        scores = broadcast_object(scores)
        self.results.task_domains = dict(self.cfg.eval.task_domains)  # eval.* may change on resume
        self.results.set_accuracy(row, scores)
        label = "initial" if row == 0 else f"after phase {row}"
        log.info("accuracy %s: %s", label, "  ".join(f"{t} {v:.4f}" for t, v in scores["accuracy"].items()))
        if self.writer:
            from pretrain.tb_metrics import log_accuracy

            log_accuracy(self.writer, self.results.to_dict(), row)
        self._save_results()

    def finish_phase(self, phase: int) -> None:
        summary = self.method.end_phase(phase)
        if summary:
            self.results.migu.append(summary)
        if self.writer:
            from pretrain.tb_metrics import log_forgetting

            log_forgetting(self.writer, self.results.to_dict(), phase)
            self.method.log(self.writer, self.pos.global_step)
        self._save_results()
        if self.cfg.checkpoint.export:  # before the checkpoint: a resume past this phase finds its export
            export_phase(
                self.engine, self.tokenizer, self.run_dir / "export" / f"phase-{phase}", self.dist.is_main
            )
        self.score_tasks(row=phase)  # scores the export just written, so a resume past here keeps its row
        self.pos.phase, self.pos.step = phase + 1, 0
        self.stream = None
        self.checkpoint(f"phase-{phase}")

    def checkpoint(self, tag: str, stream_state: dict | None = None) -> None:
        if stream_state is None and self.stream is not None:
            stream_state = self.stream.state_dict()
        client = {
            "position": asdict(self.pos),
            "results": self.results.to_dict(),
            "method": self.method.state_dict(),
            "phase_losses": self.phase_losses,
            "config": config_tree(self.cfg),  # what a resume compares its resumable keys against
        }
        meta = {"global_step": self.pos.global_step, "tokenizer": self.tokenizer_id}
        rank_state = {"stream": stream_state, "method": self.method.rank_state_dict()}
        tag = save_checkpoint(
            self.engine, self.run_dir, tag, client, rank_state, self.dist, self.cfg.checkpoint.keep, meta
        )
        log.info("checkpoint %s written", tag)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * t.seq_len * self.dist.world_size

    def _checkpoint_due(self, steps: int) -> bool:
        every = self.cfg.checkpoint.save_every
        return every > 0 and self.pos.step % every == 0 and self.pos.step < steps

    def _agree(self, finite: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(self.stop.requested), float(not finite)])
        all_reduce_sum(flags)
        return bool(flags[0] > 0), bool(flags[1] > 0)

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
        self.checkpoint(f"step-{self.pos.global_step}-stop", stream_state=step_start)
        raise SystemExit(code)

    def _stream(self, phase: int) -> TrainStream | ReplayStream:
        """This rank's batches of a phase: its domain's blocks, a share of them replayed if configured."""
        domain = self.cfg.domain(self.cfg.phases[phase - 1].domain)
        t, policy = self.cfg.train, self.cfg.train.on_bad_record
        rank, world, micro = self.dist.rank, self.dist.world_size, t.micro_batch_size
        share = phase_share(self.cfg, phase)
        shuffle = Shuffle(t.seed, t.shuffle_buffer) if t.shuffle_buffer > 1 else None
        own = (domain.train, domain.text_field, bad_record_counter(policy))
        if share == 0:
            files, field, skip = own
            return TrainStream(
                files, field, self.tokenizer, t.seq_len, rank, world, micro, skip, shuffle=shuffle
            )
        sources = {
            s.name: (s.files, s.text_field, bad_record_counter(policy))
            for s in replay_sources(self.cfg, phase)
        }
        return ReplayStream(
            own, sources, share, self.tokenizer, t.seq_len, rank, world, micro, shuffle=shuffle
        )

    def _log_interval(self, phase: int, domain: str, steps: int, interval: dict) -> None:
        mean_loss = all_reduce_sum(torch.tensor([interval["loss"]], dtype=torch.float64)).item()
        mean_loss /= self.dist.world_size
        lr = self.step_lr
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        extra = self.method.scalars()  # the same on every rank (e.g. the regularisation penalty)
        log.info(
            "phase %d %s | step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | tok/s %.0f%s",
            phase,
            domain,
            self.pos.step,
            steps,
            mean_loss,
            lr,
            norm,
            interval["tokens_per_s"],
            "".join(f" | {k} {v:.4g}" for k, v in extra.items()),
        )
        if self.writer:
            scalars = {"loss": mean_loss, "lr": lr, "grad_norm": norm, **extra}
            for key, value in {**scalars, "tokens_per_s": interval["tokens_per_s"]}.items():
                self.writer.add_scalar(f"train/{key}", value, self.pos.global_step)

    def _save_results(self) -> None:
        if self.dist.is_main:
            taken = self.results.save(self.run_dir / "metrics.json")
            if taken:
                log.info("kept evaluation rows %s that an eval job wrote to metrics.json", taken)


class ThroughputMeter:
    """Mean loss and tokens/s over a logging interval, and tokens/s over a phase (or its resumed part)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.losses: list[float] = []
        self.steps = 0
        self.start = self.phase_start = time.perf_counter()

    def add(self, loss: float) -> None:
        self.losses.append(loss)
        self.steps += 1

    def flush(self) -> dict:
        now = time.perf_counter()
        finite = [x for x in self.losses if math.isfinite(x)] or [math.nan]
        out = {
            "loss": sum(finite) / len(finite),
            "tokens_per_s": len(self.losses) * self.tokens_per_step / max(now - self.start, 1e-9),
        }
        self.losses, self.start = [], now
        return out

    def totals(self) -> dict:
        elapsed = time.perf_counter() - self.phase_start
        return {
            "seconds": round(elapsed, 3),
            "tokens_per_s": self.steps * self.tokens_per_step / max(elapsed, 1e-9),
        }


def build_trainer(cfg: RunConfig, dist: DistInfo, resume: bool) -> tuple[Trainer, dict | None]:
    """Every part from the config, in dependency order; then the newest checkpoint if resuming.

    The run's config.yaml is written last: a start that fails on the way leaves the directory as it was.
    """
    deepspeed_config(cfg, dist.world_size)  # a batch-size conflict is an error before anything is touched
    plan = prepare_run_dir(cfg, dist, resume)
    tokenizer = _tokenizer_rank0_first(cfg, dist)
    phase_steps = [steps_for_phase(p, cfg.train, dist.world_size) for p in cfg.phases]
    model = apply_lora(cfg.lora, build_model(cfg.model, len(tokenizer), cfg.train.seed))
    engine = build_engine(cfg, model, phase_steps, dist.world_size)
    method = build_methods(
        cfg.method, cfg.regularisation, engine.module, engine, phase_steps, seed=cfg.train.seed
    )
    results = RunResults.for_run(cfg)
    heldout = load_heldout(cfg, tokenizer, results)
    trainer = Trainer(
        cfg,
        dist,
        plan.path,
        tokenizer,
        engine,
        method,
        heldout,
        phase_steps,
        results,
        Position(world_size=dist.world_size),
        tensorboard_writer(plan.path, dist.rank),
        stop=StopRequest().install(),
        tokenizer_id=fingerprint(tokenizer),
    )
    stream_state = None
    if plan.resuming:
        stream_state = _restore(trainer, plan)
    elif resume:
        log.info("no checkpoint in %s: starting from the beginning", plan.path)
    if dist.is_main:
        save_config(cfg, plan.path / "config.yaml")
    return trainer, stream_state


def _restore(trainer: Trainer, plan: RunDirPlan) -> dict:
    """Load the newest complete checkpoint into the trainer; return this rank's data-stream position."""
    tag = latest_tag(trainer.run_dir)
    _check_resumable(trainer, tag)
    client, rank_state = load_checkpoint(trainer.engine, trainer.run_dir, trainer.dist)
    trainer.pos = Position(**client["position"])
    trainer.results = RunResults.from_dict(client["results"])
    # Rows a `pretrain eval` job wrote after this checkpoint are taken over by the first save.
    trainer.method.load_state_dict(client["method"])
    trainer.method.load_rank_state_dict(rank_state.get("method", {}))
    trainer.phase_losses = client["phase_losses"]
    log.info("resumed from %s: phase %d, step %d", tag, trainer.pos.phase, trainer.pos.step)
    # Against the checkpoint's own config: config.yaml already holds a change made by a resume that
    # died before its first checkpoint, whose change must be applied (and recorded) again.
    saved = client.get("config")
    _apply_changes(trainer, plan.changes if saved is None else resumable_changes(saved, trainer.cfg))
    return rank_state["stream"]


def _check_resumable(trainer: Trainer, tag: str) -> None:
    """Refuse, before DeepSpeed's load fails obscurely, a checkpoint this run cannot take up."""
    saved_world = len(list((trainer.run_dir / "checkpoints" / tag).glob("rank*_state.pt")))
    if saved_world != trainer.dist.world_size:
        raise RunDirError(
            f"checkpoint {tag} was written by {saved_world} ranks, this run has {trainer.dist.world_size}: "
            f"resume with {saved_world} ranks, or convert it with DeepSpeed's "
            "`python -m deepspeed.checkpoint.ds_to_universal` and load the universal checkpoint"
        )
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


def _fault_kill(global_step: int, rank: int) -> None:
    # Fault injection for the resume test: PRETRAIN_FAULT=kill:STEP sends SIGKILL to rank 0 after that step.
    if os.environ.get("PRETRAIN_FAULT") == f"kill:{global_step}" and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_nan(loss: torch.Tensor, global_step: int, rank: int) -> torch.Tensor:
    # Fault injection for the NaN-policy test: PRETRAIN_FAULT=nan_loss:STEP poisons rank 1's loss there.
    fault = os.environ.get("PRETRAIN_FAULT", "")
    if fault.startswith("nan_loss:") and int(fault.split(":")[1]) == global_step + 1 and rank == 1:
        return loss * math.nan
    return loss


def train(cfg: RunConfig, resume: bool = False) -> RunResults:
    dist = init_distributed()
    setup_logging(dist.rank)
    trainer, stream_state = build_trainer(cfg, dist, resume)
    results = trainer.run(stream_state)
    log.info("run finished: %s", trainer.run_dir)
    shutdown_distributed()
    return results
