"""Typed run configuration: one YAML file, `--set key=value` overrides, validated before any work starts.

Every section is a dataclass with a default for each field, so a recipe only states what differs.
Validation (types, unknown keys, impossible values, missing files) happens here, on every rank alike,
before a process group exists; errors name the key or the file and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from pretrain.atomic import write_text_atomic

# allow_inf_nan: an infinite lr or weight is accepted by torch and ends the run at its first step
_STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_Beta = Annotated[float, Field(ge=0, lt=1)]  # torch's AdamW refuses others, DeepSpeed's Adam kernels do not


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key or file."""


@dataclass(config=_STRICT)
class ModelConfig:
    # scratch: a Llama of the sizes below; hf: a local transformers directory; gguf: a local .gguf file
    source: Literal["scratch", "hf", "gguf"] = "scratch"
    path: str | None = None
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    gradient_checkpointing: bool = False


@dataclass(config=_STRICT)
class TokenizerConfig:
    # train: sentencepiece BPE on the train files; model: the checkpoint's own; path: a directory
    source: Literal["train", "model", "path"] = "train"
    path: str | None = None
    vocab_size: int = Field(1024, ge=64)
    max_sentences: int = Field(20000, gt=0)


@dataclass(config=_STRICT)
class InstructionConfig:
    """An instruction domain's templates, filled from each record's fields (pretrain/instruct.py): the
    prompt is context only, the answer (and the EOS after it) is what the loss is taken on."""

    prompt: str
    answer: str


@dataclass(config=_STRICT)
class DomainConfig:
    name: str
    heldout: list[str]
    train: list[str] = field(default_factory=list)  # empty: evaluated only, never trained
    text_field: str = "text"
    instruction: InstructionConfig | None = None  # None: a text domain (packed blocks, loss on every token)


@dataclass(config=_STRICT)
class PhaseConfig:
    domain: str
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    replay_share: float | None = Field(None, ge=0, lt=1)  # this phase's replay.share (None: the run's)


@dataclass(config=_STRICT)
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(128, gt=1)
    # documents per domain in the seeded shuffle buffer of the training streams (pretrain/shuffle.py), so
    # train.seed chooses the sample; 0: file order
    shuffle_buffer: int = Field(1000, ge=0)
    # batches made ahead by a background thread, so reading and tokenizing overlap the step
    # (pretrain/prefetch.py); 0: made in the training loop
    prefetch: int = Field(2, ge=0)
    # a directory of pre-tokenized training files (`python -m pretrain pretokenize`), read instead of
    # tokenizing the stream on every rank (pretrain/token_cache.py); None: tokenize while reading
    token_cache: str | None = None
    # adamw (torch), cpu_adam (DeepSpeedCPUAdam: the same update on the CPU, for ZeRO-Offload), fused_adam
    # (DeepSpeed's fused GPU kernel), sgd
    optimizer: Literal["adamw", "cpu_adam", "fused_adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    # the lr's shape over phases (pretrain/schedule.py): rewarm_cosine, constant, wsd or infinite
    schedule: Literal["rewarm_cosine", "constant", "wsd", "infinite"] = "rewarm_cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd / infinite: the share of a phase that decays
    constant_ratio: float = Field(0.5, gt=0, le=1)  # infinite: the plateau, as a fraction of lr
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[_Beta, _Beta] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    log_every: int = Field(10, gt=0)
    # a NaN/inf loss on any rank: stop (checkpoint the last good state) or skip that optimizer step
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # a bad corpus record (unparsable JSON line, no text field, undecodable bytes): stop naming it, or
    # skip it and count it in the log and metrics.json (`skipped_records`)
    on_bad_record: Literal["error", "skip"] = "error"

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step on `world_size` ranks."""
        return self.micro_batch_size * self.grad_accum * world_size


@dataclass(config=_STRICT)
class EvalConfig:
    batch_size: int = Field(8, gt=0)  # held-out blocks per forward; also the harness's requests per batch
    max_blocks: int = Field(64, gt=0)
    inline: bool = True  # false: both matrices are left to `pretrain eval` jobs
    # accuracy on downstream tasks (pretrain/downstream.py): lm-eval task or group names, task YAML files,
    # or continual-learning benchmark directories (a path: with a `/` or ending in .yaml)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = Field(None, gt=0)  # documents per task, the first of its test split (None: all)
    task_metric: str = "acc"  # the harness's metric that fills the accuracy matrix
    # task -> the domain whose phases count as training it (forgetting, bwt, plasticity, fwt); others are
    # evaluated only
    task_domains: dict[str, str] = field(default_factory=dict)
    # every N optimizer steps also evaluate every domain's held-out loss (metrics.json `eval_curve`): the
    # forgetting curves inside a phase; 0: only the matrix at phase ends
    every: int = Field(0, ge=0)


@dataclass(config=_STRICT)
class DeepSpeedSection:
    config: str = "configs/deepspeed/zero2.json"


@dataclass(config=_STRICT)
class MethodConfig:
    name: Literal["none", "migu", "random"] = "none"
    threshold: float = Field(0.7, ge=0, lt=1)
    start_phase: int = Field(2, ge=1)
    include: list[str] = field(default_factory=lambda: [r"\.layers\.\d+\."])
    exclude: list[str] = field(default_factory=list)
    mask_bias: bool = False


@dataclass(config=_STRICT)
class ReplaySourceConfig:
    """A general corpus that is replayed but never a phase of its own (e.g. the pre-training mix)."""

    name: str
    train: list[str]
    text_field: str = "text"


@dataclass(config=_STRICT)
class ReplayConfig:
    # fraction of every optimizer step's blocks taken from earlier phases' domains and `sources`
    share: float = Field(0.0, ge=0, lt=1)
    sources: list[ReplaySourceConfig] = field(default_factory=list)


# Llama's attention and MLP projections: the linear layers of every transformer block
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(config=_STRICT)
class LoraConfig:
    """LoRA adapters (peft) instead of full training: W x + (alpha / r) B A x on each targeted layer."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # module names as peft matches them (a name, or the end of a dotted path); linear layers only
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1)


@dataclass(config=_STRICT)
class RegularisationConfig:
    """A pull toward the previous phase's weights (pretrain/methods/regularisation.py), from phase 2 on."""

    kind: Literal["none", "l2", "ewc"] = "none"
    weight: float = Field(1.0, ge=0)  # lambda in weight/2 * sum F (w - anchor)^2; ewc's F has mean 1
    fisher_steps: int = Field(20, gt=0)  # ewc: a phase's Fisher is the mean g^2 of its last N steps
    fisher_decay: float = Field(1.0, ge=0, le=1)  # ewc: F <- decay * F + F_phase (1: plain accumulation)


@dataclass(config=_STRICT)
class CheckpointConfig:
    save_every: int = Field(0, ge=0)
    keep: int = Field(2, ge=1)
    export: bool = True


# The experiment trackers a run can log to (pretrain/trackers): TensorBoard event files, a W&B run, an
# MLflow run; the order in the list is only the order they are written in.
Tracker = Literal["tensorboard", "wandb", "mlflow"]


@dataclass(config=_STRICT)
class WandbConfig:
    """A Weights & Biases run, offline by default: it lands in <output_dir>/wandb for `wandb sync`."""

    project: str = "pretrain"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # offline: written locally, nothing sent; online: streamed to the W&B server (needs `wandb login`)
    mode: Literal["offline", "online"] = "offline"


@dataclass(config=_STRICT)
class MlflowConfig:
    """An MLflow run; by default in a local SQLite store under the run directory, so nothing is sent."""

    tracking_uri: str | None = None  # None: sqlite:///<output_dir>/mlruns/mlflow.db
    experiment: str = "pretrain"
    run_name: str | None = None  # None: the run directory's name


@dataclass(config=_STRICT)
class LoggingConfig:
    trackers: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(config=_STRICT)
class RunConfig:
    output_dir: str
    domains: list[DomainConfig]
    phases: list[PhaseConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    regularisation: RegularisationConfig = field(default_factory=RegularisationConfig)
    lora: LoraConfig | None = None  # None: every weight trains
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def domain(self, name: str) -> DomainConfig:
        return next(d for d in self.domains if d.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path, overrides: list[str] = (), training: bool = True) -> RunConfig:
    """Read, override and validate a run configuration; raise ConfigError naming what is wrong.
    `training=False` (an evaluation of saved phases) does not ask for the training and replay corpora."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path), training=training)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML's last-wins would train a run the
    user did not write (`train:` twice keeps only the second section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: flattened by SafeLoader below
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # SafeLoader names an unhashable key itself
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def validate(raw: dict[str, Any], source: str = "config", training: bool = True) -> RunConfig:
    try:
        cfg = RunConfig(**raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: " + _describe(err)) from err
    except TypeError as err:  # a missing top-level section reaches the constructor before pydantic
        raise ConfigError(f"{source}: {err}") from err
    _absolutize(cfg)  # first: the files are checked where the run will read them (`~` expanded)
    _check_consistency(cfg, source, training)
    return cfg


def _absolutize(cfg: RunConfig) -> None:
    """Resolve paths against the working directory once, so a run's saved config works from anywhere."""

    def absolute(p: str | None, key: str) -> str | None:
        if p == "":  # resolve() makes it the working directory: a run would write its files into it
            raise ConfigError(f"key `{key}`: an empty path (give a path, or leave the key out)")
        return None if p is None else str(Path(p).expanduser().resolve())

    cfg.output_dir = absolute(cfg.output_dir, "output_dir")
    cfg.model.path = absolute(cfg.model.path, "model.path")
    cfg.tokenizer.path = absolute(cfg.tokenizer.path, "tokenizer.path")
    cfg.deepspeed.config = absolute(cfg.deepspeed.config, "deepspeed.config")
    cfg.train.token_cache = absolute(cfg.train.token_cache, "train.token_cache")
    for i, dom in enumerate(cfg.domains):
        dom.train = [absolute(f, f"domains.{i}.train.{j}") for j, f in enumerate(dom.train)]
        dom.heldout = [absolute(f, f"domains.{i}.heldout.{j}") for j, f in enumerate(dom.heldout)]
    for i, source in enumerate(cfg.replay.sources):
        source.train = [absolute(f, f"replay.sources.{i}.train.{j}") for j, f in enumerate(source.train)]
    tasks = enumerate(cfg.eval.tasks)
    cfg.eval.tasks = [absolute(t, f"eval.tasks.{i}") if is_task_path(t) else t for i, t in tasks]


def is_task_path(entry: str) -> bool:
    """An `eval.tasks` entry that is a task YAML file or a benchmark directory, not an lm-eval name."""
    return "/" in entry or entry.endswith((".yaml", ".yml"))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value` sets raw[a][b][c]; list elements are addressed by index (`phases.1.steps=5`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    *parents, last = key.split(".")
    node: Any = raw
    for i, part in enumerate(parents):
        node = _child(node, part, ".".join(parents[: i + 1]), item)
    value = yaml.safe_load(text) if text else ""
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {item!r}: {'.'.join(parents)} is not a section")


def _child(node: Any, part: str, where: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: {where} is not a section")
    return node.setdefault(part, {})


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {where} must be an index below {len(node)}")
    return int(part)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"unknown key `{key}`")
        elif e["type"] == "missing":
            lines.append(f"missing key `{key}`")
        else:
            lines.append(f"key `{key}`: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _check_consistency(cfg: RunConfig, source: str, training: bool) -> None:
    problems = _semantic_problems(cfg) + _file_problems(cfg, training)
    problems += _unused_tracker_problems(cfg.logging) if training else []  # an eval job logs to none
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _semantic_problems(cfg: RunConfig) -> list[str]:
    problems = []
    names = [d.name for d in cfg.domains]
    if not names:
        problems.append("key `domains`: at least one domain is needed")
    if len(set(names)) != len(names):
        problems.append(f"key `domains`: names must be unique (got {names})")
    if not cfg.phases:
        problems.append("key `phases`: at least one phase is needed")
    for i, phase in enumerate(cfg.phases):
        if phase.domain not in names:
            problems.append(f"key `phases.{i}.domain`: {phase.domain!r} is not one of the domains {names}")
        if (phase.steps is None) == (phase.tokens is None):
            problems.append(f"key `phases.{i}`: give exactly one of `steps` or `tokens`")
    if cfg.model.source == "scratch":
        if cfg.model.path is not None:
            problems.append("key `model.path`: a scratch model takes no path (use source: hf or gguf)")
        problems += _head_problems(cfg.model)
        if cfg.train.seq_len > cfg.model.max_position_embeddings:
            problems.append("key `train.seq_len`: longer than `model.max_position_embeddings`")
        if cfg.tokenizer.source == "model":
            problems.append("key `tokenizer.source`: a scratch model has no tokenizer of its own")
    elif cfg.model.path is None:
        problems.append(f"key `model.path`: required for source {cfg.model.source!r}")
    elif cfg.tokenizer.source == "train":  # the default: a pretrained model given without a tokenizer section
        problems.append(
            f"key `tokenizer.source` 'train' with `model.source` {cfg.model.source!r}: a newly trained "
            "tokenizer numbers tokens otherwise than the model's embeddings were trained on, and every "
            "step would be wasted; set tokenizer.source: model (or path, for the model's own elsewhere)"
        )
    if cfg.train.on_nonfinite == "skip" and cfg.train.grad_accum > 1:
        problems.append("key `train.on_nonfinite`: 'skip' needs train.grad_accum 1 (use 'stop')")
    if cfg.tokenizer.source == "path" and cfg.tokenizer.path is None:
        problems.append("key `tokenizer.path`: required for source 'path'")
    sources = [s.name for s in cfg.replay.sources]
    if len(set(sources)) != len(sources) or set(sources) & set(names):
        problems.append(f"key `replay.sources`: names must be unique and not domain names (got {sources})")
    trackers = cfg.logging.trackers
    if len(set(trackers)) != len(trackers):
        problems.append(f"key `logging.trackers`: each tracker at most once (got {trackers})")
    if cfg.method.name != "none" and cfg.method.start_phase > len(cfg.phases):
        problems.append(
            f"key `method.start_phase`: {cfg.method.start_phase} is after the last phase "
            f"({len(cfg.phases)}); method {cfg.method.name!r} would never mask"
        )
    patterns = _pattern_problems(cfg.method)
    # the combinations search with the patterns
    return problems + patterns + _instruction_problems(cfg) + ([] if patterns else _combination_problems(cfg))


def _unused_tracker_problems(logging: LoggingConfig) -> list[str]:
    """A tracker's settings without the tracker in `logging.trackers`: the run would log nothing there."""
    sections = {"wandb": (logging.wandb, WandbConfig()), "mlflow": (logging.mlflow, MlflowConfig())}
    return [
        f"key `logging.{name}` is set but {name!r} is not in logging.trackers {logging.trackers}: nothing "
        "would be logged to it; add it to logging.trackers, or remove the section"
        for name, (section, default) in sections.items()
        if name not in logging.trackers and section != default
    ]


def _pattern_problems(method: MethodConfig) -> list[str]:
    problems = []
    for key in ("include", "exclude"):
        for i, pattern in enumerate(getattr(method, key)):
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"key `method.{key}.{i}`: {pattern!r} is not a regular expression ({err})")
    return problems


def _instruction_problems(cfg: RunConfig) -> list[str]:
    """Templates that cannot be filled, and files an instruction domain cannot read (JSON Lines only)."""
    from pretrain.instruct import template_problem  # deferred: instruct imports this module

    problems = []
    for i, dom in enumerate(cfg.domains):
        if dom.instruction is None:
            continue
        for part in ("prompt", "answer"):
            why = template_problem(getattr(dom.instruction, part))
            if why:
                problems.append(f"key `domains.{i}.instruction.{part}`: {why}")
        for split in ("train", "heldout"):
            problems += [
                f"key `domains.{i}.{split}`: {f} is not JSON Lines (.jsonl/.json), which an instruction "
                "domain reads"
                for f in getattr(dom, split)
                if Path(f).suffix.lower() not in (".jsonl", ".json")
            ]
    return problems


MIGU_ON_FRESH_ADAPTERS = (
    "key `method.start_phase` 1 with `lora`: MIGU would mask {what}; B starts at zero, so its first masks "
    "would tie and keep the lowest-numbered rows of lora_B for the whole run; use start_phase 2 "
    "(phase 1 trains B unmasked) or add 'lora_B' to `method.exclude`"
)


def _combination_problems(cfg: RunConfig) -> list[str]:
    """Sections that each validate but cannot work together; the message names both keys."""
    problems = []
    if cfg.regularisation.kind != "none" and len(cfg.phases) < 2:
        problems.append(
            f"key `regularisation.kind` {cfg.regularisation.kind!r} with one entry in `phases`: the pull "
            "toward the previous phase's weights starts in phase 2, so it would never act"
        )
    m = cfg.method
    if (
        m.name == "migu"
        and m.start_phase == 1
        and cfg.lora is not None
        and not any("lora" in p for p in m.exclude)
    ):
        # the plain case, refused before anything starts; an exclude pattern about the adapters is checked
        # on the model's own layer names (methods/lora.py: check_migu_on_adapters)
        problems.append(MIGU_ON_FRESH_ADAPTERS.format(what="every adapter's B matrix"))
    if cfg.eval.tasks and not cfg.checkpoint.export:
        problems.append(
            "key `eval.tasks` with `checkpoint.export: false`: the harness scores each phase's export "
            "(export/phase-N); set checkpoint.export: true"
        )
    if not cfg.eval.inline and not cfg.checkpoint.export:
        problems.append(
            "key `eval.inline: false` with `checkpoint.export: false`: `pretrain eval` jobs evaluate "
            "each phase's export (export/phase-N), so no phase could ever be evaluated; set "
            "checkpoint.export: true"
        )
    if cfg.replay.share > 0 and len(cfg.phases) < 2 and not cfg.replay.sources:
        problems.append(
            "key `replay.share` with one entry in `phases` and no `replay.sources`: there is nothing "
            "earlier to replay"
        )
    problems += _replay_unused(cfg) + _budget_problems(cfg) + _tokenizer_place_problems(cfg)
    trained = {p.domain for p in cfg.phases}
    instruction = [i for i, d in enumerate(cfg.domains) if d.instruction is not None and d.name in trained]
    replaying = [i for i, p in enumerate(cfg.phases) if (p.replay_share or 0) > 0]
    if instruction and (cfg.replay.share > 0 or replaying):
        key = "replay.share" if cfg.replay.share > 0 else f"phases.{replaying[0]}.replay_share"
        problems.append(
            f"key `{key}` with `domains.{instruction[0]}.instruction`: replay mixes packed text blocks, "
            "and replaying instruction examples is not implemented; set replay.share: 0"
        )
    return problems


def _replay_unused(cfg: RunConfig) -> list[str]:
    """Replay settings that would never replay anything, which a run ignored without a word."""
    shares = [cfg.replay.share if p.replay_share is None else p.replay_share for p in cfg.phases]
    if cfg.replay.sources and not any(shares):
        return [
            "key `replay.sources` with `replay.share` 0 and no `phases.N.replay_share`: the sources would "
            "never be read; set replay.share (or a phase's replay_share)"
        ]
    if cfg.phases and (cfg.phases[0].replay_share or 0) > 0 and not cfg.replay.sources:
        return [
            "key `phases.0.replay_share`: the first phase has nothing earlier to replay and there are "
            "no `replay.sources`"
        ]
    return []


def _budget_problems(cfg: RunConfig) -> list[str]:
    """A token budget counts a step's seq_len x batch tokens: an instruction example is padded to seq_len,
    so `tokens` would buy far fewer real tokens than it says (22% in a reviewer's run)."""
    instruction = {d.name for d in cfg.domains if d.instruction is not None}
    return [
        f"key `phases.{i}.tokens`: phase {i + 1} trains the instruction domain {p.domain!r}, whose examples "
        "are padded to train.seq_len, so a token budget would count the padding; give `steps` instead"
        for i, p in enumerate(cfg.phases)
        if p.tokens is not None and p.domain in instruction
    ]


def _tokenizer_place_problems(cfg: RunConfig) -> list[str]:
    """A trained tokenizer at the run directory itself (or its checkpoints or exports): the run's files
    then make it a directory this project did not write, and every resume and eval job was refused."""
    if cfg.tokenizer.source != "train" or cfg.tokenizer.path is None:
        return []
    run = Path(cfg.output_dir)
    if Path(cfg.tokenizer.path) in (run, run / "checkpoints", run / "export"):
        return [
            f"key `tokenizer.path`: {cfg.tokenizer.path} is the run's own directory (`output_dir`) or one "
            "it fills; leave tokenizer.path out (the run's tokenizer/) or give a directory of its own"
        ]
    return []


def _file_problems(cfg: RunConfig, training: bool) -> list[str]:
    problems = []
    # an evaluation reads held-out sets only: an archived run whose training corpus is gone is still scored
    trained = {p.domain for p in cfg.phases} if training else set()
    for i, dom in enumerate(cfg.domains):
        for split in ("train", "heldout") if dom.name in trained else ("heldout",):
            problems += _missing_files(getattr(dom, split), f"domains.{i}.{split}", dom.name)
        # a trained tokenizer reads an evaluated-only domain's train files too, if it lists any
        if training and dom.name not in trained and dom.train and cfg.tokenizer.source == "train":
            problems += _missing_files(dom.train, f"domains.{i}.train", dom.name)
    for i, source in enumerate(cfg.replay.sources if training else ()):
        problems += _missing_files(source.train, f"replay.sources.{i}.train", source.name)
    if cfg.model.path is not None and not Path(cfg.model.path).exists():
        problems.append(f"key `model.path`: {cfg.model.path} does not exist")
    if cfg.tokenizer.source == "path" and cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
        problems.append(f"key `tokenizer.path`: directory {cfg.tokenizer.path} does not exist")
    problems += _deepspeed_problems(cfg.deepspeed.config, cfg.train, cfg.regularisation, cfg.method)
    return problems + _task_problems(cfg)


def _task_problems(cfg: RunConfig) -> list[str]:
    """eval.tasks: each task built once from local files (lm-eval imported only when there are tasks)."""
    if not cfg.eval.tasks:
        return ["key `eval.task_domains`: no eval.tasks to link"] if cfg.eval.task_domains else []
    from pretrain.downstream import task_names, task_problems

    problems = task_problems(cfg)
    names = [] if problems else task_names(cfg)
    domains = [d.name for d in cfg.domains]
    for task, domain in cfg.eval.task_domains.items():
        if names and task not in names:
            problems.append(f"key `eval.task_domains`: {task!r} is not one of the tasks {names}")
        if domain not in domains:
            problems.append(f"key `eval.task_domains.{task}`: {domain!r} is not one of the domains {domains}")
    linked = list(cfg.eval.task_domains.values())
    if len(set(linked)) != len(linked):
        problems.append(
            f"key `eval.task_domains`: one domain can train one task, got {cfg.eval.task_domains}"
        )
    return problems


# DeepSpeed keys the run config owns (train.*): the DeepSpeed file may repeat them, not contradict them
RUN_OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "grad_clip",
}


# DeepSpeed sections the run config replaces: refused rather than silently ignored
_RUN_OWNED_DEEPSPEED_SECTIONS = {
    "optimizer": "train.optimizer, train.lr, train.betas and train.weight_decay",
    "scheduler": "train.schedule, train.warmup_steps and train.min_lr_ratio",
}


def deepspeed_json(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed file's settings, without the keys the run config owns: what a resume compares."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text())
    return {k: v for k, v in ds.items() if k not in RUN_OWNED_DEEPSPEED_KEYS and k != "train_batch_size"}


def run_owned_conflicts(ds: dict[str, Any], train: TrainConfig, source: str) -> list[str]:
    """The DeepSpeed keys in `ds` whose value contradicts the run config, described ("auto" agrees)."""
    return [
        f"{source}: `{key}` is {ds[key]} but the run config gives train.{field} = "
        f"{getattr(train, field)}; set it in the run config (train.*) only"
        for key, field in RUN_OWNED_DEEPSPEED_KEYS.items()
        if ds.get(key, "auto") not in ("auto", getattr(train, field))
    ]


# What pretrain/data.py reads, by file name suffix (any case)
CORPUS_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _missing_files(files: list[str], key: str, name: str) -> list[str]:
    if not files:
        return [f"key `{key}`: no files given for {name!r}"]
    problems = []
    for f in files:
        p = Path(f)
        if p.suffix.lower() not in CORPUS_SUFFIXES:  # else found only when a later phase first reads it
            problems.append(
                f"key `{key}`: file {f} is of unknown type; expected one of {sorted(CORPUS_SUFFIXES)}"
            )
        elif not p.is_file():
            problems.append(f"key `{key}`: file {f} does not exist")
        elif p.stat().st_size == 0:
            problems.append(f"key `{key}`: file {f} is empty")
    return problems


def _deepspeed_problems(
    path: str, train: TrainConfig, reg: RegularisationConfig, method: MethodConfig
) -> list[str]:
    p = Path(path)
    if not p.is_file():
        return [f"key `deepspeed.config`: file {path} does not exist"]
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        return [f"key `deepspeed.config`: {path} is not valid JSON ({err})"]
    if not isinstance(ds, dict):
        return [f"key `deepspeed.config`: {path} must hold a JSON object, not {type(ds).__name__}"]
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [
            f"key `deepspeed.config`: {path}: `zero_optimization` must be an object such as "
            f'{{"stage": 2}}, not {json.dumps(zero)}'
        ]
    shapes = [
        f"key `deepspeed.config`: {path}: `{name}` must be an object such as {example}, "
        f"not {json.dumps(value)}"
        for name, value, example in (
            ("bf16", ds.get("bf16"), '{"enabled": true}'),
            ("fp16", ds.get("fp16"), '{"enabled": true}'),
            ("zero_optimization.offload_optimizer", zero.get("offload_optimizer"), '{"device": "cpu"}'),
            ("zero_optimization.offload_param", zero.get("offload_param"), '{"device": "cpu"}'),
        )
        if value is not None and not isinstance(value, dict)
    ]
    shapes = shapes or [
        f"key `deepspeed.config`: {path}: `{name}.enabled` must be true or false, not {json.dumps(value)} "
        '(DeepSpeed reads a string such as "auto" as false and trains in fp32)'
        for name in ("bf16", "fp16")
        if not isinstance(value := (ds.get(name) or {}).get("enabled", False), bool)
    ]
    if shapes:  # the checks below read inside them
        return shapes
    stage = zero.get("stage", 0)
    problems = [
        f"key `deepspeed.config`: {path}: section `{section}` is not used by this pipeline (it would be "
        f"ignored); remove it and set {_translated(section, ds[section])} in the run config instead"
        for section in _RUN_OWNED_DEEPSPEED_SECTIONS
        if section in ds
    ]
    problems += _offload_problems(path, zero, train, ds)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        problems.append(f"key `deepspeed.config`: {path} sets zero_optimization.stage={stage}, expected 0-3")
    sixteen = any((ds.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))
    if reg.kind != "none" and stage == 0 and sixteen:
        problems.append(
            f"key `regularisation.kind` {reg.kind!r} with `deepspeed.config` {path} (ZeRO stage 0 in 16 "
            "bits): the pull acts on fp32 master weights, which stage 0 keeps inside the optimizer; "
            "use stage 1-3"
        )
    problems += _bf16_optimizer_problems(path, ds, stage, train, reg, method)
    return problems + [f"key `deepspeed.config`: {c}" for c in run_owned_conflicts(ds, train, path)]


def _bf16_optimizer_problems(
    path: str, ds: dict, stage: Any, train: TrainConfig, reg: RegularisationConfig, method: MethodConfig
) -> list[str]:
    """bf16 at ZeRO-1 with fp32 accumulation, not offloaded to the CPU, is DeepSpeed's BF16_Optimizer
    (engine._do_optimizer_sanity_check: NVMe offload too): every rank holds the whole reduced gradient and
    clips by its norm without asking the others, while a method changes only the part this rank steps;
    each rank then clipped by another, wrong norm (1.0997 and 1.1037 where the masked gradient's is
    1.0686, in a 2-rank run)."""
    types = ds.get("data_types") if isinstance(ds.get("data_types"), dict) else {}
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    bf16_optimizer = (ds.get("bf16") or {}).get("enabled") and stage == 1 and offload != "cpu"
    if not (bf16_optimizer and types.get("grad_accum_dtype") in ("fp32", "float32")):
        return []
    changes = [f"method.name {method.name!r}"] if method.name != "none" else []
    changes += [f"regularisation.kind {reg.kind!r}"] if reg.kind != "none" else []
    if not changes or train.grad_clip == 0:
        return []
    return [
        f"key `train.grad_clip` {train.grad_clip} with {' and '.join(changes)} and `deepspeed.config` {path} "
        "(bf16 at ZeRO stage 1 with data_types.grad_accum_dtype fp32: DeepSpeed's BF16_Optimizer): it "
        "clips each rank by the norm of its own full gradient copy, of which the method changes only the "
        "part the rank steps, so the ranks would clip by different, wrong norms; use ZeRO stage 2, or "
        "drop grad_accum_dtype, or set train.grad_clip: 0"
    ]


def _translated(section: str, value: Any) -> str:
    """The train.* keys a DeepSpeed `optimizer`/`scheduler` section's values go to, as far as they map."""
    params = (value.get("params") if isinstance(value, dict) else None) or {}
    kind = str(value.get("type", "")).lower() if isinstance(value, dict) else ""
    names = {"lr": "train.lr", "betas": "train.betas", "weight_decay": "train.weight_decay"}
    if section == "scheduler":
        names = {"warmup_num_steps": "train.warmup_steps", "warmup_max_lr": "train.lr"}
    keys = [f"{key}={json.dumps(params[p])}" for p, key in names.items() if p in params]
    if section == "optimizer" and kind:
        keys.insert(0, f"train.optimizer={_OPTIMIZERS.get(kind, 'adamw')}")
    return " ".join(keys) if keys else _RUN_OWNED_DEEPSPEED_SECTIONS[section]


# DeepSpeed optimizer types -> train.optimizer
_OPTIMIZERS = {
    "adam": "adamw",
    "adamw": "adamw",
    "sgd": "sgd",
    "cpuadam": "cpu_adam",
    "fusedadam": "fused_adam",
}


def _offload_problems(path: str, zero: dict, train: TrainConfig, ds: dict) -> list[str]:
    """ZeRO-Offload steps the optimizer on the CPU: DeepSpeed needs DeepSpeedCPUAdam for it (train.optimizer
    cpu_adam), which in turn needs the offload."""
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    forced = ds.get("zero_force_ds_cpu_optimizer", True)
    where = f"key `train.optimizer` {train.optimizer!r} with `deepspeed.config` {path}"
    if offload and train.optimizer == "fused_adam":
        return [
            f"{where}: fused_adam is a GPU kernel, the offloaded optimizer steps on the CPU; use cpu_adam"
        ]
    if offload and forced and train.optimizer in ("adamw", "sgd"):
        return [
            f"{where}: zero_optimization.offload_optimizer steps the optimizer on the CPU, where DeepSpeed "
            "takes DeepSpeedCPUAdam only: set train.optimizer: cpu_adam (AdamW's update)"
        ]
    if not offload and train.optimizer == "cpu_adam":
        return [
            f"{where}: cpu_adam steps on the CPU and needs zero_optimization.offload_optimizer "
            '{"device": "cpu"} (configs/deepspeed/zero2_offload.json); without offload use adamw'
        ]
    return []


def steps_for_phase(phase: PhaseConfig, train: TrainConfig, world_size: int) -> int:
    """Optimizer steps of a phase; a token budget becomes whole steps of the global batch."""
    if phase.steps is not None:
        return phase.steps
    tokens_per_step = train.global_batch(world_size) * train.seq_len
    return max(1, math.ceil(phase.tokens / tokens_per_step))


def _head_problems(model: ModelConfig) -> list[str]:
    """Attention shapes a scratch Llama cannot take, found here rather than at its first forward."""
    if model.hidden_size % model.num_heads:
        return ["key `model.hidden_size`: must be a multiple of `model.num_heads`"]
    problems = []
    if (model.hidden_size // model.num_heads) % 2:  # rotary embeddings turn pairs of dimensions
        problems.append(
            f"key `model.hidden_size`: {model.hidden_size} / {model.num_heads} heads gives an odd head "
            "size; rotary embeddings need an even one"
        )
    if model.num_kv_heads is not None and model.num_heads % model.num_kv_heads:
        problems.append(  # each key/value head serves num_heads / num_kv_heads query heads
            f"key `model.num_kv_heads`: {model.num_kv_heads} does not divide `model.num_heads` "
            f"({model.num_heads})"
        )
    return problems


# The first line of a run's config.yaml: it tells the run's own file from a user's file of that name.
SAVED_CONFIG_HEADER = "# pretrain: the resolved config this run trains with, rewritten at each start\n"


def save_config(cfg: RunConfig, path: str | Path) -> None:
    # rewritten at every (re)start: a torn config.yaml would stop the next resume and every eval job
    write_text_atomic(path, SAVED_CONFIG_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
