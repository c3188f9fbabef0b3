"""One CLI, a verb per job: `python -m pretrain {train,eval,report,compare,tokenizer,pretokenize,tasks}`.

Works as a plain process, under `torchrun`, and under the `deepspeed` launcher (which appends
`--local_rank=N`; the rank is read from the environment instead).
"""

from __future__ import annotations

import argparse
import sys

from pretrain.distributed import select_accelerator


def main(argv: list[str] | None = None) -> None:
    select_accelerator()
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as err:  # bad input: one clear line, not a traceback
        print(f"pretrain {args.verb}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from pretrain.cl_benchmark import TaskDataError
    from pretrain.config import ConfigError
    from pretrain.data import DataError
    from pretrain.model import ModelError
    from pretrain.report import ReportError
    from pretrain.results import ResultsError
    from pretrain.rundir import RunDirError

    return (ConfigError, DataError, ModelError, ReportError, ResultsError, RunDirError, TaskDataError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    # the deepspeed launcher puts --local_rank=N before the verb; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    verbs = p.add_subparsers(dest="verb", required=True)

    t = _with_config(verbs.add_parser("train", help="continual pre-training, phase by phase"))
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in output_dir (start fresh if none)",
    )
    t.set_defaults(func=_train)

    tk = _with_config(verbs.add_parser("tokenizer", help="train the run's sentencepiece BPE tokenizer"))
    tk.set_defaults(func=_tokenizer)

    pt = _with_config(
        verbs.add_parser("pretokenize", help="tokenize the training files once into train.token_cache")
    )
    pt.set_defaults(func=_pretokenize)

    e = verbs.add_parser("eval", help="evaluate a run's saved phases on every domain")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--phase", type=int, default=None, help="0 = initial model; default: all phases")
    e.set_defaults(func=_eval)

    r = verbs.add_parser("report", help="write report.md and PNGs of a run")
    r.add_argument("--run", required=True, help="run directory")
    r.set_defaults(func=_report)

    c = verbs.add_parser("compare", help="side-by-side table and picture of several runs")
    c.add_argument("runs", nargs="+", help="run directories (the first is the baseline)")
    c.add_argument(
        "--out", default=None, help="where to write comparison.md/png (default: first run's parent)"
    )
    c.set_defaults(func=_compare)
    for sub in (e, r, c):
        sub.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    _tasks_parser(verbs)
    return p


def _tasks_parser(verbs) -> None:
    t = verbs.add_parser("tasks", help="continual-learning benchmark tasks for lm-eval (eval.tasks)")
    actions = t.add_subparsers(dest="action", required=True)
    cv = actions.add_parser(
        "convert",
        help="the original layout (SPLIT.json: a list of {sentence, label}; labels.json) to task directories",
    )
    cv.add_argument("sources", nargs="+", help="task directories of the original layout")
    cv.add_argument("--out", required=True, help="makes OUT/<name>/ per task and OUT/cl_<name>.yaml")
    ym = actions.add_parser("yaml", help="lm-eval task YAML files for task directories (text, label)")
    ym.add_argument("dirs", nargs="+", help="task directories: test.jsonl and labels.json")
    ym.add_argument("--out", required=True, help="where cl_<name>.yaml is written")
    ym.add_argument(
        "--instruction",
        nargs=2,
        metavar=("PROMPT", "ANSWER"),
        help="score with an instruction domain's prompt and answer templates, as a run does for a task that "
        "eval.task_domains links to that domain",
    )
    t.set_defaults(func=_tasks)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _train(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from pretrain.rundir import refuse_config_in_run_dir
    from pretrain.train import train

    cfg = load_config(args.config, args.overrides)
    refuse_config_in_run_dir(args.config, cfg)
    train(cfg, resume=args.resume)


def _tokenizer(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from pretrain.logs import setup_logging
    from pretrain.tokenizer import resolve_tokenizer

    setup_logging(0)  # the warning that an existing tokenizer was trained on other files
    tok = resolve_tokenizer(load_config(args.config, args.overrides))
    print(f"tokenizer: {len(tok)} tokens, in {tok.name_or_path}")


def _pretokenize(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from pretrain.token_cache import pretokenize

    for path, meta in pretokenize(load_config(args.config, args.overrides)):
        done = "up to date" if meta["built_s"] is None else f"tokenized in {meta['built_s']:.1f} s"
        print(f"{path}: {meta['documents']} documents, {meta['tokens']} tokens, {done}")


def _eval(args: argparse.Namespace) -> None:
    from pretrain.eval_job import evaluate_run

    evaluate_run(args.run, args.phase)


def _tasks(args: argparse.Namespace) -> None:

    from pretrain.cl_benchmark import convert_task, write_task_yaml

    if args.action == "convert":
        for source in args.sources:
            out, task = convert_task(source, args.out)
            print(f"converted {source} -> {out}, task {task}")
    else:
        for directory in args.dirs:
            print(f"wrote {write_task_yaml(directory, args.out, args.instruction)}")


def _report(args: argparse.Namespace) -> None:
    from pretrain.report import write_report

    print(f"wrote {write_report(args.run)}")


def _compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pretrain.report import compare_runs

    out = args.out or str(Path(args.runs[0]).resolve().parent)
    print(f"wrote {compare_runs(args.runs, out)}")
