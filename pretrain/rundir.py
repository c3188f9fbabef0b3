"""The run directory's life across attempts: a new run, a resume, or a restart of a run that died early.

A run directory with results is never overwritten by a new run. `--resume` continues from the newest
complete checkpoint; with none (killed before its first one) the run starts again from the beginning, the
earlier attempt's metrics.json kept aside. A resume may change only the keys that leave the checkpoint's
meaning intact (RESUMABLE_KEYS); each change is recorded in metrics.json with the step it took effect at.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from pretrain.atomic import foreign_file, set_aside
from pretrain.checkpoint import checkpoint_meta, latest_tag
from pretrain.config import SAVED_CONFIG_HEADER, RunConfig, deepspeed_json
from pretrain.distributed import DistInfo, broadcast_object
from pretrain.logs import log

# What a resumed run may change: how it learns from here on, how it logs, saves and evaluates. Anything
# else (data, model, method, batch shape, schedule length) would make the checkpoint mean another run.
RESUMABLE_KEYS = (
    "train.lr",
    "train.on_nonfinite",
    "train.on_bad_record",
    "train.log_every",
    "train.prefetch",
    "train.token_cache",  # the same blocks read from pre-tokenized files
    "deepspeed.config",  # where the file is: its settings are compared with the checkpoint's
    "checkpoint.*",
    "eval.*",
    "logging.*",
)


class RunDirError(RuntimeError):
    """The output directory holds another run that this one would overwrite, or cannot be resumed."""


@dataclass
class RunDirPlan:
    """What rank 0 found in the run directory, the same on every rank."""

    path: Path
    resuming: bool = False  # a complete checkpoint is there to continue from
    changes: list[dict] = field(default_factory=list)  # {"key", "from", "to"} against config.yaml
    deepspeed_changes: list[dict] = field(
        default_factory=list
    )  # the DeepSpeed file's, against the checkpoint


def prepare_run_dir(cfg: RunConfig, dist: DistInfo, resume: bool) -> RunDirPlan:
    """Check the run directory against this start (rank 0 decides, every rank learns the outcome).

    Nothing is written here but the directory itself and, on a restart, the rename of the old metrics.
    """
    plan = None
    if dist.is_main:
        try:
            plan = _plan(cfg, resume)
        except RunDirError as err:
            plan = err
    plan = broadcast_object(plan)
    if isinstance(plan, RunDirError):
        raise plan
    return plan


def refuse_config_in_run_dir(config: str | Path, cfg: RunConfig) -> None:
    """RunDirError if a new run's config file is the `config.yaml` the run writes into its output_dir (as
    the config it ran with: the user's comments, relative paths and layout would be lost). In a directory
    that holds a run, that file is the run's own and may be passed back."""
    run_dir = Path(cfg.output_dir)
    if Path(config).resolve() != (run_dir / "config.yaml").resolve():
        return
    if not (run_dir / "metrics.json").exists() and latest_tag(run_dir) is None:
        raise RunDirError(
            f"{config} is where the run writes the config it ran with (output_dir {run_dir}): keep your "
            "config file elsewhere, or choose another output_dir"
        )


def _plan(cfg: RunConfig, resume: bool) -> RunDirPlan:
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():  # mkdir's FileExistsError left the other ranks waiting
        raise RunDirError(f"output_dir {run_dir} is a file, not a directory: choose another output_dir")
    metrics = run_dir / "metrics.json"
    held = "metrics.json" if metrics.exists() else "a checkpoint" if latest_tag(run_dir) else None
    if held and not resume:  # a checkpoint alone (metrics.json moved away) is a run too: never continue it
        raise RunDirError(
            f"{run_dir} already holds a run ({held}); choose another output_dir, or pass --resume "
            "to continue it (or start it again, if it has no complete checkpoint)"
        )
    if not held:
        _refuse_foreign_config(run_dir)
    changed = _changed_keys(cfg, run_dir / "config.yaml") if resume else {}
    _refuse_frozen(changed, f"{run_dir}: --resume with a different config")
    run_dir.mkdir(parents=True, exist_ok=True)
    if latest_tag(run_dir) is None:
        if metrics.exists():
            kept = set_aside(metrics, "attempt")  # an abandoned attempt's: metrics.attempt-N.json
            log.warning("%s has no complete checkpoint: starting the run again (old: %s)", run_dir, kept)
        return RunDirPlan(run_dir)
    changes = [{"key": k, "from": old, "to": new} for k, (old, new) in sorted(changed.items())]
    tag = latest_tag(run_dir)
    recorded = checkpoint_meta(run_dir, tag).get("deepspeed")
    _refuse_unrecorded_deepspeed(changed, recorded, tag)
    ds_changes = deepspeed_changes(recorded, deepspeed_json(cfg), tag)
    return RunDirPlan(run_dir, resuming=True, changes=changes, deepspeed_changes=ds_changes)


def _refuse_foreign_config(run_dir: Path) -> None:
    """A new run writes its config.yaml into output_dir: a file of that name which no run wrote is the
    user's, not overwritten. A run's own (an earlier attempt's, before its first results) starts with
    SAVED_CONFIG_HEADER, or, written before the header existed, names this output_dir as its own."""
    saved = run_dir / "config.yaml"
    if not foreign_file(saved, SAVED_CONFIG_HEADER) or any(run_dir.glob("metrics.attempt-*.json")):
        return
    if saved.is_file() and _names_output_dir(saved.read_text(errors="replace"), run_dir):
        return
    raise RunDirError(
        f"{saved} was not written by a run, and a new run writes the config it ran with there: move it, or "
        "choose another output_dir"
    )


def _names_output_dir(text: str, run_dir: Path) -> bool:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(tree, dict) and tree.get("output_dir") == str(run_dir.resolve())


def _refuse_unrecorded_deepspeed(changed: dict[str, tuple], recorded: dict | None, tag: str) -> None:
    """Another deepspeed.config file may be compared only with the settings a checkpoint recorded."""
    if recorded is None and "deepspeed.config" in changed:
        old, new = changed["deepspeed.config"]
        raise RunDirError(
            f"checkpoint {tag} was written before pretrain kept the DeepSpeed settings a run trains with, "
            f"so another file cannot be compared with them: keep deepspeed.config {old!r} (not {new!r})"
        )


def _refuse_frozen(changed: dict[str, tuple], what: str, scaled: tuple[str, ...] = ()) -> None:
    """RunDirError if `changed` holds a key a resume may not change (`scaled`: ones the run itself set)."""
    frozen = sorted(k for k in changed if not resumable(k) and k not in scaled)
    if frozen:
        diff = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in frozen)
        raise RunDirError(
            f"{what} ({diff}); set them back (None: the run had no such section); a resumed run may "
            f"change only {', '.join(RESUMABLE_KEYS)}"
        )


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def _changed_keys(cfg: RunConfig, saved: Path) -> dict[str, tuple]:
    """{key: (saved value, new value)} where the config differs from the run's config.yaml."""
    if not saved.is_file():
        return {}
    try:
        tree = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as err:
        tree = err
    if not isinstance(tree, dict):
        # pretrain writes it whole (atomically); an emptied or hand-edited one cannot say what changed
        raise RunDirError(
            f"{saved} does not hold a run config ({_what_it_holds(tree)}); put back the config this run "
            "was started with: --resume compares the new config against it"
        )
    return config_diff(tree, cfg)


def _what_it_holds(tree: object) -> str:
    if isinstance(tree, yaml.YAMLError):
        return f"not valid YAML: {str(tree).splitlines()[0]}"
    return "empty" if tree is None else f"a {type(tree).__name__}, not a mapping"


def config_diff(old: dict, cfg: RunConfig) -> dict[str, tuple]:
    """{key: (old value, new value)} where `cfg` differs from a saved config tree (tuples as lists).

    A key the saved tree lacks was added to pretrain after that run started: the run behaved as that
    key's `_BEFORE_THE_KEY` value, which is its default except where the default changed behaviour.
    """
    new = flatten(config_tree(cfg))
    old = {**{k: v for k, v in _before_the_key().items() if k in new}, **flatten(old)}
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


# Keys whose default is not what runs started before the key existed did (documents were read in order).
_PREDATED = {"train.shuffle_buffer": 0}


def _before_the_key() -> dict:
    sections = {
        f.name: asdict(f.default_factory())
        for f in fields(RunConfig)
        if f.default_factory is not MISSING  # the sections with defaults; lora's default is None
    }
    return {**flatten(json.loads(json.dumps(sections))), **_PREDATED}


def config_tree(cfg: RunConfig) -> dict:
    """The config as plain JSON data, as a checkpoint keeps it."""
    return json.loads(json.dumps(cfg.to_dict()))


def resumable_changes(old: dict, cfg: RunConfig, tag: str, recorded: dict | None) -> list[dict]:
    """The resumable keys `cfg` changes against the config checkpoint `tag` was trained with; RunDirError
    for any other key (config.yaml, checked first, may be gone or replaced by hand). train.grad_accum is
    the run's own to scale on another number of ranks (pretrain/elastic.py). `recorded`: the DeepSpeed
    settings the checkpoint's mark keeps (None in older ones)."""
    changed = config_diff(old, cfg)
    _refuse_frozen(changed, f"checkpoint {tag} was trained with another config", scaled=("train.grad_accum",))
    _refuse_unrecorded_deepspeed(changed, recorded, tag)
    return [{"key": k, "from": a, "to": b} for k, (a, b) in changed.items() if resumable(k)]


def deepspeed_changes(old: dict | None, new: dict, tag: str) -> list[dict]:
    """What the DeepSpeed file changes against the one checkpoint `tag` was trained with (None: a
    checkpoint from before it was recorded), keys named `deepspeed:KEY`; RunDirError if the ZeRO stage or
    the precision changed: the checkpoint holds another optimizer state, or another run."""
    if old is None:
        return []
    frozen = {k: (a, b) for k, (a, b) in _deepspeed_meaning(old, new).items() if a != b}
    if frozen:
        diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in frozen.items())
        raise RunDirError(
            f"checkpoint {tag} was trained with another DeepSpeed config ({diff}); put back the "
            "deepspeed.config file it was trained with, or start a new run in another output_dir"
        )
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [{"key": f"deepspeed:{k}", "from": a.get(k), "to": b.get(k)} for k in keys]


def _deepspeed_meaning(old: dict, new: dict) -> dict[str, tuple]:
    def stage(ds: dict) -> int:
        return int((ds.get("zero_optimization") or {}).get("stage", 0))

    def precision(ds: dict) -> str:
        on = [k for k in ("bf16", "fp16") if (ds.get(k) or {}).get("enabled")]
        return on[0] if on else "fp32"

    return {"ZeRO stage": (stage(old), stage(new)), "precision": (precision(old), precision(new))}


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys (`train.lr`), as config keys are named."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
