"""The phase loop: for each domain in turn, train, evaluate every domain, checkpoint and export.

Reads top to bottom: build the parts from the config, evaluate the initial model, then per phase
train -> evaluate -> record -> checkpoint -> export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import export_phase, save_checkpoint
from pretrain.config import RunConfig, save_config, steps_for_phase
from pretrain.data import TrainStream, heldout_blocks
from pretrain.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from pretrain.engine import build_engine
from pretrain.evaluate import evaluate_domains
from pretrain.logs import log, progress, setup_logging, tensorboard_writer
from pretrain.model import build_model
from pretrain.results import RunResults
from pretrain.tokenizer import resolve_tokenizer


class RunDirError(RuntimeError):
    """The output directory holds another run that this one would overwrite."""


@dataclass
class Trainer:
    cfg: RunConfig
    dist: DistInfo
    run_dir: Path
    tokenizer: object
    engine: object
    method: object
    heldout: dict[str, torch.Tensor]
    phase_steps: list[int]
    results: RunResults
    writer: object = None
    global_step: int = 0

    def run(self) -> RunResults:
        self.evaluate(row=0)
        for phase, steps in enumerate(self.phase_steps, start=1):
            self.train_phase(phase, steps)
            self.evaluate(row=phase)
            self.finish_phase(phase)
        if self.writer:
            self.writer.close()
        return self.results

    def train_phase(self, phase: int, steps: int) -> None:
        domain = self.cfg.domain(self.cfg.phases[phase - 1].domain)
        stream = iter(self._stream(domain))
        self.method.begin_phase(phase)
        log.info("phase %d/%d: %s, %d steps", phase, len(self.phase_steps), domain.name, steps)
        meter = ThroughputMeter(self.tokens_per_step)
        bar = progress(steps, f"phase {phase} {domain.name}", self.dist.rank)
        for step in range(1, steps + 1):
            loss = self.train_step(stream)
            meter.add(loss)
            bar.update()
            if step % self.cfg.train.log_every == 0 or step == steps:
                self._log_interval(phase, domain.name, step, steps, meter.flush())
        bar.close()
        self.results.train.append({"phase": phase, "domain": domain.name, "steps": steps, **meter.totals()})

    def train_step(self, stream) -> float:
        """One optimizer step: grad_accum micro-batches; DeepSpeed steps at the boundary."""
        total = 0.0
        for _ in range(self.cfg.train.grad_accum):
            batch = next(stream).to(self.engine.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.method.before_backward(self.engine)
            self.engine.backward(loss)
            self.method.after_backward(self.engine)
            self.engine.step()
            total += loss.item()
        self.global_step += 1
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

    def finish_phase(self, phase: int) -> None:
        summary = self.method.end_phase(phase)
        if summary:
            self.results.migu.append(summary)
        if self.writer:
            from pretrain.tb_metrics import log_forgetting

            log_forgetting(self.writer, self.results.to_dict(), phase)
            self.method.log(self.writer, self.global_step)
        self._save_results()
        state = {"phase": phase, "global_step": self.global_step, "method": self.method.state_dict()}
        save_checkpoint(self.engine, self.run_dir, f"phase-{phase}", state)
        if self.cfg.checkpoint.export:
            export_phase(
                self.engine,
                self.tokenizer,
                self.run_dir / "export" / f"phase-{phase}",
                self.engine.zero_optimization_stage(),
                self.dist.is_main,
            )

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * t.seq_len * self.dist.world_size

    def _stream(self, domain) -> TrainStream:
        return TrainStream(
            domain.train,
            domain.text_field,
            self.tokenizer,
            self.cfg.train.seq_len,
            self.dist.rank,
            self.dist.world_size,
            self.cfg.train.micro_batch_size,
        )

    def _log_interval(self, phase: int, domain: str, step: int, steps: int, interval: dict) -> None:
        mean_loss = all_reduce_sum(torch.tensor([interval["loss"]], dtype=torch.float64)).item()
        mean_loss /= self.dist.world_size
        lr = self.engine.get_lr()[0]
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        log.info(
            "phase %d %s | step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | tok/s %.0f",
            phase,
            domain,
            step,
            steps,
            mean_loss,
            lr,
            norm,
            interval["tokens_per_s"],
        )
        if self.writer:
            for key, value in (
                ("loss", mean_loss),
                ("lr", lr),
                ("grad_norm", norm),
                ("tokens_per_s", interval["tokens_per_s"]),
            ):
                self.writer.add_scalar(f"train/{key}", value, self.global_step)

    def _save_results(self) -> None:
        if self.dist.is_main:
            self.results.save(self.run_dir / "metrics.json")


class ThroughputMeter:
    """Mean loss and tokens/s over a logging interval, and totals over a phase."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.losses: list[float] = []
        self.all_losses: list[float] = []
        self.start = self.phase_start = time.perf_counter()

    def add(self, loss: float) -> None:
        self.losses.append(loss)
        self.all_losses.append(loss)

    def flush(self) -> dict:
        now = time.perf_counter()
        out = {
            "loss": sum(self.losses) / len(self.losses),
            "tokens_per_s": len(self.losses) * self.tokens_per_step / max(now - self.start, 1e-9),
        }
        self.losses, self.start = [], now
        return out

    def totals(self) -> dict:
        elapsed = time.perf_counter() - self.phase_start
        steps = len(self.all_losses)
        return {
            "first_loss": self.all_losses[0],
            "last_loss": self.all_losses[-1],
            "tokens": steps * self.tokens_per_step,
            "seconds": round(elapsed, 3),
            "tokens_per_s": steps * self.tokens_per_step / max(elapsed, 1e-9),
        }


def build_trainer(cfg: RunConfig, dist: DistInfo) -> Trainer:
    """Every part from the config, in dependency order: tokenizer, model, engine, method, data."""
    from pretrain.migu import build_method

    run_dir = prepare_run_dir(cfg, dist)
    tokenizer = _tokenizer_rank0_first(cfg, dist)
    phase_steps = [steps_for_phase(p, cfg.train, dist.world_size) for p in cfg.phases]
    model = build_model(cfg.model, len(tokenizer), cfg.train.seed)
    engine = build_engine(cfg, model, phase_steps, dist.world_size)
    method = build_method(cfg.method, engine.module, engine)
    heldout = {
        d.name: heldout_blocks(d.heldout, d.text_field, tokenizer, cfg.train.seq_len, cfg.eval.max_blocks)
        for d in cfg.domains
    }
    results = RunResults.for_run(cfg)
    writer = tensorboard_writer(run_dir, dist.rank)
    return Trainer(cfg, dist, run_dir, tokenizer, engine, method, heldout, phase_steps, results, writer)


def prepare_run_dir(cfg: RunConfig, dist: DistInfo) -> Path:
    """Create the run directory; refuse to write over a run that already has results."""
    run_dir = Path(cfg.output_dir)
    if dist.is_main:
        if (run_dir / "metrics.json").exists():
            error = f"{run_dir} already holds a run (metrics.json); choose another output_dir"
        else:
            error = None
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
    error = broadcast_object(error if dist.is_main else None)
    if error:
        raise RunDirError(error)
    return run_dir


def _tokenizer_rank0_first(cfg: RunConfig, dist: DistInfo):
    # Rank 0 trains (or checks) the tokenizer; the others then load the very same files.
    if dist.is_main:
        tokenizer = resolve_tokenizer(cfg)
    barrier()
    if not dist.is_main:
        tokenizer = resolve_tokenizer(cfg)
    return tokenizer


def train(cfg: RunConfig) -> RunResults:
    dist = init_distributed()
    setup_logging(dist.rank)
    trainer = build_trainer(cfg, dist)
    results = trainer.run()
    log.info("run finished: %s", trainer.run_dir)
    return results
