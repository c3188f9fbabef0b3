"""Config validation: every bad input is one clear error naming the key or file, before any work."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import yaml
from conftest import corpus, instruction_corpus, run_single, tiny_run_config, write_config

from pretrain.config import ConfigError, load_config, steps_for_phase
from pretrain.engine import deepspeed_config, eval_deepspeed_config


@pytest.fixture
def cfg_file(tmp_path):
    return write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml")


def test_valid_config_loads_with_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert [p.domain for p in cfg.phases] == ["news", "plays"]
    assert cfg.method.name == "none" and cfg.method.threshold == 0.7
    assert cfg.train.grad_accum == 1


def test_overrides_reach_nested_and_list_keys(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=3e-4", "phases.1.steps=7", "method.name=migu"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.phases[1].steps == 7
    assert cfg.method.name == "migu"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "unknown key `train.lrr`"),
        ("train.micro_batch_size=two", "key `train.micro_batch_size`"),
        ("train.lr=-1", "key `train.lr`: Input should be greater than 0"),
        ("method.threshold=1.5", "key `method.threshold`"),
        ("method.name=magic", "key `method.name`"),
        ("phases.0.domain=law", "key `phases.0.domain`: 'law' is not one of the domains"),
        ("train.seq_len=4096", "key `train.seq_len`: longer than `model.max_position_embeddings`"),
        ("model.source=hf", "key `model.path`: required for source 'hf'"),
        ("model.num_kv_heads=3", "key `model.num_kv_heads`: 3 does not divide `model.num_heads` (2)"),
        ("model.hidden_size=18", "key `model.hidden_size`: 18 / 2 heads gives an odd head size"),
        ("model.hidden_size=33", "key `model.hidden_size`: must be a multiple of `model.num_heads`"),
        (
            "deepspeed.config=/nonexistent/ds.json",
            "key `deepspeed.config`: file /nonexistent/ds.json does not exist",
        ),
        ("phases.0.tokens=1000", "key `phases.0`: give exactly one of `steps` or `tokens`"),
        ("lora.r=0", "key `lora.r`: Input should be greater than 0"),
        ("lora.dropout=1", "key `lora.dropout`: Input should be less than 1"),
        ("lora.target_modules=[]", "key `lora.target_modules`: List should have at least 1 item"),
        ("lora.rank=4", "unknown key `lora.rank`"),
        ("train.betas=[0.9,1.5]", "key `train.betas.1`: Input should be less than 1"),
        ("train.betas=[-0.1,0.95]", "key `train.betas.0`: Input should be greater than or equal to 0"),
        ("train.lr=.inf", "key `train.lr`: Input should be a finite number"),
        ("regularisation.weight=.nan", "key `regularisation.weight`: Input should be a finite number"),
        ("output_dir=", "key `output_dir`: an empty path"),
        ("train.token_cache=", "key `train.token_cache`: an empty path"),
        ("domains.1.heldout=['']", "key `domains.1.heldout.0`: an empty path"),
    ],
)
def test_bad_values_name_the_key(cfg_file, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    assert expected in str(err.value)


def test_grouped_query_heads_that_divide_the_heads_are_taken(cfg_file):
    assert load_config(cfg_file, ["model.num_kv_heads=1"]).model.num_kv_heads == 1


def test_lora_is_off_by_default_and_a_section_turns_it_on(cfg_file):
    assert load_config(cfg_file).lora is None
    lora = load_config(cfg_file, ["lora={}"]).lora
    assert (lora.r, lora.alpha, lora.dropout) == (8, 16.0, 0.0)
    assert lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert load_config(cfg_file, ["lora.r=16"]).lora.r == 16


def test_missing_and_empty_corpus_files_are_named(tmp_path):
    raw = tiny_run_config(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    raw["domains"][0]["train"] = [str(tmp_path / "missing.jsonl")]
    raw["domains"][1]["heldout"] = [str(empty)]
    with pytest.raises(ConfigError) as err:
        load_config(write_config(raw, tmp_path / "run.yaml"))
    assert "domains.0.train`: file" in str(err.value) and "missing.jsonl does not exist" in str(err.value)
    assert f"domains.1.heldout`: file {empty} is empty" in str(err.value)


@pytest.mark.parametrize(("key", "pattern"), [("include", r"layers\.(\d+"), ("exclude", "lora_B(")])
def test_a_method_pattern_that_is_no_regular_expression_is_named_at_load(tmp_path, key, pattern):
    """It was a raw re.error at load (exclude, with LoRA) or after the model was built (include)."""
    raw = tiny_run_config(tmp_path, method={"name": "migu", "start_phase": 1, key: [pattern]}, lora={})
    with pytest.raises(ConfigError, match=rf"key `method.{key}.0`: .* is not a regular expression"):
        load_config(write_config(raw, tmp_path / "run.yaml"))


def test_a_corpus_under_the_home_directory_is_found(tmp_path, monkeypatch):
    """`~` was expanded where the run reads the file, but not where the config checked it exists."""
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = tiny_run_config(tmp_path)
    home = tmp_path / "news.jsonl"
    home.write_text(pathlib.Path(raw["domains"][0]["train"][0]).read_text())
    raw["domains"][0]["train"] = ["~/news.jsonl"]
    assert load_config(write_config(raw, tmp_path / "run.yaml")).domains[0].train == [str(home)]


def test_a_corpus_of_unknown_type_is_named_at_load(tmp_path):
    raw = tiny_run_config(tmp_path)
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b")
    raw["domains"][1]["train"] = [str(gz)]
    with pytest.raises(ConfigError, match=rf"domains.1.train`: file {gz} is of unknown type"):
        load_config(write_config(raw, tmp_path / "run.yaml"))


def test_a_later_phase_whose_corpus_cannot_fill_a_step_stops_the_run_before_phase_1(tmp_path):
    """Phase 2's stream was first opened after phase 1 had trained (hours, on a real run)."""
    raw = tiny_run_config(tmp_path)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "Too short."}) + "\n")
    raw["domains"][1]["train"] = [str(small)]
    proc = run_single(["train", "--config", str(write_config(raw, tmp_path / "run.yaml"))], timeout=300)
    assert proc.returncode == 2 and "corpus too small for 1 ranks x micro batch 2" in proc.stderr, proc.stderr
    assert str(small) in proc.stderr and "step 1/" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def _a_tokenizer(tmp_path) -> dict:
    """A `tokenizer` section naming a small trained tokenizer, as a pretrained model's run needs one."""
    from pretrain.tokenizer import train_tokenizer

    train_tokenizer([([corpus("news")[0]], "text")], str(tmp_path / "tok"), 512, 400)
    return {"source": "path", "path": str(tmp_path / "tok")}


def test_a_bad_heldout_record_stops_the_run_before_the_model_loads(tmp_path):
    """The held-out sets were first read after the model and the engine were built (minutes at 70B)."""
    raw = tiny_run_config(tmp_path)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": "A good record."}) + "\n{not json\n")
    raw["domains"][1]["heldout"] = [str(heldout)]
    empty = tmp_path / "model"  # no weights: loading it would be the first error, were it tried first
    empty.mkdir()
    raw["model"], raw["tokenizer"] = {"source": "hf", "path": str(empty)}, _a_tokenizer(tmp_path)
    proc = run_single(["train", "--config", str(write_config(raw, tmp_path / "run.yaml"))], timeout=300)
    assert proc.returncode == 2 and str(heldout) in proc.stderr, proc.stderr[-3000:]
    assert "cannot be loaded" not in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()


def test_a_key_deepspeed_refuses_stops_the_run_before_the_model_loads(tmp_path):
    """It failed inside deepspeed.initialize, after the model had loaded, in a pydantic traceback."""
    raw = tiny_run_config(tmp_path)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}))
    raw["deepspeed"] = {"config": str(ds)}
    empty = tmp_path / "model"
    empty.mkdir()
    raw["model"], raw["tokenizer"] = {"source": "hf", "path": str(empty)}, _a_tokenizer(tmp_path)
    proc = run_single(["train", "--config", str(write_config(raw, tmp_path / "run.yaml"))], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refuses `zero_optimization.overlap_com`" in proc.stderr
    assert "cannot be loaded" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_resume_does_not_check_the_corpora_of_phases_it_has_finished(tmp_path):
    """A finished phase's corpus need not fill a step any more (as on more ranks after an elastic
    resume): the resume from phase 1's end opens only phase 2's stream."""
    raw = tiny_run_config(tmp_path, steps=2)
    news = tmp_path / "news.jsonl"
    news.write_bytes(pathlib.Path(raw["domains"][0]["train"][0]).read_bytes())
    raw["domains"][0]["train"] = [str(news)]
    path = write_config(raw, tmp_path / "run.yaml")
    killed = run_single(["train", "--config", str(path)], env={"PRETRAIN_FAULT": "kill:3"}, timeout=300)
    assert killed.returncode != 0 and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "phase-1"
    news.write_text(json.dumps({"text": "Too short."}) + "\n")
    resumed = run_single(["train", "--config", str(path), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_missing_section_and_bad_override_syntax(tmp_path, cfg_file):
    raw = tiny_run_config(tmp_path)
    del raw["phases"]
    with pytest.raises(ConfigError, match="phases"):
        load_config(write_config(raw, tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(cfg_file, ["train.lr"])
    with pytest.raises(ConfigError, match="index below 2"):
        load_config(cfg_file, ["phases.5.steps=1"])


def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path, cfg_file):
    text = cfg_file.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "train: {seed: 7}\n")  # a second `train:` would keep only its seed
    assert "train:" in text
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping[\s\S]*line"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text(text + "lora: {r: 4, alpha: 8, r: 16}\n")
    with pytest.raises(ConfigError, match="key 'r' appears twice"):
        load_config(nested)
    raw = yaml.safe_load(text)  # a merge key (`<<`) is no repeated key, and a key after it overrides it
    raw.pop("train", None)
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(raw) + "train:\n  <<: {seed: 5, lr: 0.5}\n  lr: 0.25\n")
    cfg = load_config(merged)
    assert (cfg.train.seed, cfg.train.lr) == (5, 0.25)


def test_not_yaml_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_token_budget_becomes_whole_steps(cfg_file):
    cfg = load_config(cfg_file, ["phases.0.steps=null", "phases.0.tokens=1000"])
    # 2 sequences x 32 tokens x 2 ranks = 128 tokens a step: 1000 tokens round up to 8 steps
    assert steps_for_phase(cfg.phases[0], cfg.train, world_size=2) == 8


def _with_deepspeed(tmp_path, ds: object, *overrides: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    run = write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml")
    return lambda: load_config(run, [f"deepspeed.config={path}", *overrides])


def test_deepspeed_file_may_not_contradict_run_config_found_when_loading(tmp_path):
    # found by load_config, before any run directory is touched (probe 10)
    load = _with_deepspeed(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps` is 4 but the run config gives "):
        load()
    merged = deepspeed_config(load_config(tmp_path / "run.yaml"), world_size=2)
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["gradient_clipping"] == 1.0


def test_deepspeed_auto_values_take_the_run_config(tmp_path):
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    cfg = _with_deepspeed(tmp_path, {**auto, "train_batch_size": "auto", "gradient_clipping": "auto"})()
    merged = deepspeed_config(cfg, world_size=2)
    assert (merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]) == (2, 1)
    assert "train_batch_size" not in merged


def test_an_elastic_resume_runs_with_its_scaled_accumulation_over_a_json_that_repeats_the_configs(tmp_path):
    # the JSON repeats the config's grad_accum (1); a resume on half the ranks trains with 2
    cfg = _with_deepspeed(tmp_path, {"gradient_accumulation_steps": 1})()
    scaled = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
    with pytest.raises(ConfigError, match=r"`gradient_accumulation_steps` is 1 but the run config gives"):
        deepspeed_config(scaled, world_size=1)  # checked against the scaled value: the user never wrote 2
    assert deepspeed_config(scaled, world_size=1, written=cfg.train)["gradient_accumulation_steps"] == 2


def test_a_first_start_with_resume_finds_a_global_batch_conflict_before_anything_is_written(tmp_path):
    """The launch scripts always pass --resume: with no checkpoint yet there is no other global batch to
    keep, so the JSON's train_batch_size is checked before the run directory or tokenizer is made."""
    from pretrain.distributed import DistInfo
    from pretrain.train import build_trainer

    cfg = _with_deepspeed(tmp_path, {"train_batch_size": 4})()  # 2 x 1 x 2 ranks; this start has 1
    with pytest.raises(ConfigError, match=r"`train_batch_size` is 4 but .* x 1 ranks = 2"):
        build_trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0), resume=True)
    assert not pathlib.Path(cfg.output_dir).exists() and not (tmp_path / "tokenizer").exists()


def test_deepspeed_global_batch_must_match_the_world(tmp_path):
    cfg = _with_deepspeed(tmp_path, {"train_batch_size": 4})()
    assert "train_batch_size" not in deepspeed_config(cfg, world_size=2)  # 2 x 1 x 2 ranks = 4
    with pytest.raises(ConfigError, match=r"`train_batch_size` is 4 but .* x 3 ranks = 6"):
        deepspeed_config(cfg, world_size=3)
    assert eval_deepspeed_config(cfg, world_size=3)  # an eval job on other ranks takes no optimizer step


@pytest.mark.parametrize(
    "ds, expected",
    [
        ({"zero_optimization": None}, r"`zero_optimization` must be an object .*, not null"),
        ({"bf16": True}, r"`bf16` must be an object such as \{\"enabled\": true\}, not true"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
            r"`zero_optimization.offload_optimizer` must be an object .*, not \"cpu\"",
        ),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage=4, expected 0-3"),
        ([1, 2], r"must hold a JSON object, not list"),
        ({"optimizer": {"type": "AdamW"}}, r"section `optimizer` is not used .*set train.optimizer=adamw in"),
        (
            {
                "optimizer": {
                    "type": "Adam",
                    "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1},
                }
            },
            r"train.optimizer=adamw train.lr=0.0003 train.betas=\[0.9, 0.95\] train.weight_decay=0.1 in",
        ),
        ({"scheduler": {"type": "WarmupLR"}}, r"section `scheduler` is not used .*train.warmup_steps and"),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}},
            r"remove it and set train.warmup_steps=100 in the run config",
        ),
    ],
)
def test_malformed_deepspeed_file_is_a_config_error(tmp_path, ds, expected):
    with pytest.raises(ConfigError, match=expected):
        _with_deepspeed(tmp_path, ds)()


OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize(
    "ds, optimizer, expected",
    [
        (OFFLOAD, "adamw", r"DeepSpeed takes DeepSpeedCPUAdam only: set train.optimizer: cpu_adam"),
        (OFFLOAD, "sgd", r"set train.optimizer: cpu_adam"),
        (OFFLOAD, "fused_adam", r"fused_adam is a GPU kernel.*use cpu_adam"),
        ({"zero_optimization": {"stage": 2}}, "cpu_adam", r"cpu_adam steps on the CPU and needs .*offload"),
    ],
)
def test_offload_and_the_optimizer_must_go_together(tmp_path, ds, optimizer, expected):
    with pytest.raises(ConfigError, match=rf"key `train.optimizer` '{optimizer}' with .*{expected}"):
        _with_deepspeed(tmp_path, ds, f"train.optimizer={optimizer}")()


def test_offload_takes_cpu_adam_or_a_torch_optimizer_when_forcing_is_off(tmp_path):
    assert _with_deepspeed(tmp_path, OFFLOAD, "train.optimizer=cpu_adam")().train.optimizer == "cpu_adam"
    unforced = {**OFFLOAD, "zero_force_ds_cpu_optimizer": False}
    assert _with_deepspeed(tmp_path, unforced, "train.optimizer=adamw")().train.optimizer == "adamw"


@pytest.mark.parametrize("name", ["zero2_offload.json", "zero3_offload.json"])
def test_shipped_offload_configs_validate_with_cpu_adam(tmp_path, name):
    from conftest import REPO

    run = write_config(tiny_run_config(tmp_path), tmp_path / "run.yaml")
    path = REPO / "configs" / "deepspeed" / name
    cfg = load_config(run, [f"deepspeed.config={path}", "train.optimizer=cpu_adam"])
    zero = deepspeed_config(cfg, world_size=2)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == (zero["stage"] == 3)


def test_method_start_phase_after_the_last_phase_is_refused(cfg_file):
    with pytest.raises(ConfigError, match=r"method.start_phase`: 3 is after the last phase \(2\)"):
        load_config(cfg_file, ["method.name=migu", "method.start_phase=3"])
    assert load_config(cfg_file, ["method.name=random", "method.start_phase=2"]).method.start_phase == 2
    assert load_config(cfg_file, ["method.start_phase=9"]).method.name == "none"  # nothing to mask


def test_migu_from_phase_1_on_lora_with_no_exclude_for_the_adapters_is_refused_at_load(cfg_file):
    """The plain case needs no model; an exclude pattern about the adapters is checked on the model's own
    layer names (tests/test_lora.py)."""
    migu_lora = ["method.name=migu", "method.start_phase=1", "lora={}"]
    with pytest.raises(ConfigError, match=r"start_phase` 1 with `lora`: MIGU would mask every adapter's B"):
        load_config(cfg_file, migu_lora)
    assert load_config(cfg_file, [*migu_lora, "method.exclude=[lora_B]"]).method.exclude == ["lora_B"]
    assert load_config(cfg_file, ["method.name=random", "method.start_phase=1", "lora={}"]).lora is not None


def test_resolved_config_round_trips(tmp_path, cfg_file):
    from pretrain.config import save_config

    cfg = load_config(cfg_file, ["train.lr=5e-4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["lr"] == 5e-4
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_evaluated_only_domain_needs_no_train_files(tmp_path):
    raw = tiny_run_config(tmp_path)
    raw["domains"].append({"name": "general", "heldout": raw["domains"][0]["heldout"]})
    cfg = load_config(write_config(raw, tmp_path / "run.yaml"))
    assert cfg.domain("general").train == []
    raw["phases"].append({"domain": "general", "steps": 1})
    with pytest.raises(ConfigError, match="domains.2.train`: no files given for 'general'"):
        load_config(write_config(raw, tmp_path / "run2.yaml"))


@pytest.mark.parametrize("stage, expected", [(0, 0), (1, 0), (2, 0), (3, 3)])
def test_eval_engine_config_needs_no_optimizer(tmp_path, stage, expected):
    from pretrain.engine import eval_deepspeed_config

    cfg = _with_deepspeed(tmp_path, {"zero_optimization": {"stage": stage, "overlap_comm": True}})()
    assert eval_deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage"] == expected


@pytest.mark.parametrize("change", ["method.name=migu", "method.name=random", "regularisation.kind=l2"])
def test_clipping_under_the_bf16_optimizer_with_a_gradient_method_is_refused(tmp_path, change):
    # BF16_Optimizer clips each rank by the norm of its full gradient copy, which a method changes only in
    # the part the rank steps: the ranks clipped by different, wrong norms (a reviewer's 2-rank run)
    zero1 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    load = _with_deepspeed(tmp_path, {**zero1, "data_types": {"grad_accum_dtype": "fp32"}}, change)
    with pytest.raises(ConfigError, match=r"train.grad_clip` 1.0 with .*BF16_Optimizer.*different, wrong"):
        load()
    assert load_config(
        tmp_path / "run.yaml", [f"deepspeed.config={tmp_path / 'ds.json'}", change, "train.grad_clip=0"]
    )
    assert _with_deepspeed(tmp_path, zero1, change)()  # bf16 accumulation: the ZeRO optimizer, which agrees
    offloaded = {**zero1, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    offloaded["data_types"] = {"grad_accum_dtype": "fp32"}
    assert _with_deepspeed(tmp_path, offloaded, change, "train.optimizer=cpu_adam")()
    # DeepSpeed takes BF16_Optimizer for any offload but the CPU's
    offloaded["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"train.grad_clip` 1.0 with .*BF16_Optimizer"):
        _with_deepspeed(tmp_path, offloaded, change, "train.optimizer=cpu_adam")()


def test_settings_a_run_would_waste_or_ignore_are_refused_when_read(tmp_path):
    # each was accepted, and then trained for nothing or did not do what it said (a reviewer's runs)
    raw = tiny_run_config(tmp_path)
    path = write_config(raw, tmp_path / "run.yaml")
    model = tmp_path / "model"
    model.mkdir()
    # a pretrained model without a tokenizer section: a new BPE's ids on its embeddings (loss 9.97, not 3.99)
    with pytest.raises(
        ConfigError, match=r"tokenizer.source` 'train' with `model.source` 'hf'.*source: model"
    ):
        load_config(path, ["model.source=hf", f"model.path={model}", "tokenizer.path=null"])
    # DeepSpeed reads "auto" as false: the run trained in fp32 while the report said bf16
    with pytest.raises(ConfigError, match=r'`bf16.enabled` must be true or false, not "auto"'):
        _with_deepspeed(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}})()
    # the first resume refused the run's own directory as a foreign tokenizer's
    with pytest.raises(ConfigError, match=r"tokenizer.path`: .* is the run's own directory"):
        load_config(path, [f"tokenizer.path={raw['output_dir']}"])
    # replay settings that never replay
    with pytest.raises(ConfigError, match=r"replay.sources` with `replay.share` 0"):
        load_config(path, [f"replay.sources=[{{name: web, train: [{corpus('docs')[0]}]}}]"])
    with pytest.raises(ConfigError, match=r"phases.0.replay_share`: the first phase has nothing earlier"):
        load_config(path, ["phases.0.replay_share=0.25"])
    assert load_config(path, ["phases.1.replay_share=0.25"]).phases[1].replay_share == 0.25
    # an evaluated-only domain's train file, which the tokenizer reads: a sentencepiece error minutes later
    raw["domains"].append(
        {"name": "web", "train": [str(tmp_path / "gone.jsonl")], "heldout": [corpus("docs")[1]]}
    )
    with pytest.raises(ConfigError, match=r"domains.2.train`: file .*gone.jsonl does not exist"):
        load_config(write_config(raw, tmp_path / "web.yaml"))
    raw["tokenizer"] = _a_tokenizer(tmp_path)  # a tokenizer given: nothing reads web's train files
    assert load_config(write_config(raw, tmp_path / "web.yaml")).domains[2].name == "web"


def test_a_token_budget_on_an_instruction_phase_is_refused(tmp_path):
    # the padding counted: 2560 tokens bought 565 real ones
    train, heldout = instruction_corpus(tmp_path / "qa")
    raw = tiny_run_config(tmp_path, domains=("news",))
    raw["domains"].append(
        {
            "name": "qa",
            "train": [train],
            "heldout": [heldout],
            "instruction": {"prompt": "{text}", "answer": "{label}"},
        }
    )
    raw["phases"].append({"domain": "qa", "tokens": 2560})
    with pytest.raises(ConfigError, match=r"phases.1.tokens`: phase 2 trains the instruction domain 'qa'"):
        load_config(write_config(raw, tmp_path / "run.yaml"))
    raw["phases"][1] = {"domain": "qa", "steps": 3}
    assert load_config(write_config(raw, tmp_path / "run.yaml")).phases[1].steps == 3


def test_combinations_that_cannot_work_name_both_keys(tmp_path):
    one_phase = write_config(tiny_run_config(tmp_path, domains=("news",)), tmp_path / "one.yaml")
    with pytest.raises(ConfigError, match=r"regularisation.kind` 'ewc' with one entry in `phases`"):
        load_config(one_phase, ["regularisation.kind=ewc"])
    with pytest.raises(ConfigError, match=r"replay.share` with one entry in `phases` and no `replay"):
        load_config(one_phase, ["replay.share=0.1"])
    ds = tmp_path / "zero0_bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    two_phases = write_config(tiny_run_config(tmp_path), tmp_path / "two.yaml")
    with pytest.raises(ConfigError, match=r"regularisation.kind` 'l2' with `deepspeed.config` .*stage 0"):
        load_config(two_phases, ["regularisation.kind=l2", f"deepspeed.config={ds}"])
    assert load_config(two_phases, ["regularisation.kind=l2"]).regularisation.weight == 1.0
    assert load_config(two_phases, [f"deepspeed.config={ds}"]).regularisation.kind == "none"
    with pytest.raises(ConfigError, match=r"eval.inline: false` with `checkpoint.export: false`"):
        load_config(two_phases, ["eval.inline=false", "checkpoint.export=false"])
    assert not load_config(two_phases, ["eval.inline=false"]).eval.inline  # the eval jobs read the exports
