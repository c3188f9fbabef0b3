"""pretrain.instruct: templates, rows and label masks on a real tokenizer, truncation, bad records, the
example stream's sharding, resume and reshard, MIGU's padding exclusion, held-out answer loss, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import INSTRUCTION, corpus_lines, instruction_corpus, tiny_run_config, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.config import ConfigError, InstructionConfig, MethodConfig, validate
from pretrain.continuation import continue_stream, stream_end, stream_position
from pretrain.data import DataError, SkipCounter
from pretrain.distributed import DistInfo
from pretrain.evaluate import evaluate_domains
from pretrain.instruct import (
    IGNORE,
    Examples,
    ExampleStream,
    encode_row,
    heldout_examples,
    model_inputs,
    read_examples,
    reshard_example_state,
    template_problem,
)
from pretrain.methods import build_method
from pretrain.shuffle import Shuffle
from pretrain.tokenizer import train_tokenizer

SEQ_LEN = 40
SHUFFLE = Shuffle(7, 16)
TEMPLATE = InstructionConfig(**INSTRUCTION)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_lines("plays", 300)))
    return train_tokenizer([([str(src)], "text")], str(tmp_path_factory.mktemp("tok") / "tok"), 400, 400)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[str, str]:
    """61 train examples: no multiple of 2, 3 or 2 x 3, so epochs end inside a round."""
    return instruction_corpus(tmp_path_factory.mktemp("qa"), train=61, heldout=9)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stream(files, tokenizer, rank=0, world=1, micro=2, shuffle=SHUFFLE, skip=None) -> ExampleStream:
    return ExampleStream([files[0]], TEMPLATE, tokenizer, SEQ_LEN, rank, world, micro, skip, shuffle)


def rows_of(batches: list[Examples]) -> list[tuple]:
    return [
        (tuple(b.input_ids[i].tolist()), tuple(b.labels[i].tolist()), tuple(b.attention_mask[i].tolist()))
        for b in batches
        for i in range(len(b))
    ]


def global_rows(streams: list, batches_per_rank: int) -> list[tuple]:
    """The global example sequence from all ranks' batches: rank r's k-th example is number k * world + r."""
    per_rank = [rows_of([next(it) for _ in range(batches_per_rank)]) for it in streams]
    return [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(len(streams))]


# ---------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{text}\nAnswer:", None),
        ("{{literal}} {label}", None),
        ("{text", "not a template"),
        ("text}", "not a template"),
        ("{}", "name a record field"),
        ("{0.real}", "name a record field"),
        ("{text[0]}", "name a record field"),
        ("{text!r}", "format spec or conversion"),
        ("{label:>5}", "format spec or conversion"),
        ("  ", "empty"),
    ],
)
def test_template_problems(template, problem):
    found = template_problem(template)
    assert (found is None) if problem is None else (problem in found)


# ---------------------------------------------------------------------------------------------- rows


def test_encode_row_masks_prompt_and_padding_and_trains_answer_and_eos():
    row = encode_row([5, 6, 7], [8, 9], eos_id=2, pad_id=0, seq_len=8)
    assert row == (
        [5, 6, 7, 8, 9, 2, 0, 0],
        [IGNORE, IGNORE, IGNORE, 8, 9, 2, IGNORE, IGNORE],
        [1, 1, 1, 1, 1, 1, 0, 0],
    )


def test_too_long_cuts_the_prompt_from_its_start_and_never_the_answer():
    assert encode_row([1, 3, 4, 5, 6, 7], [8, 9], eos_id=2, pad_id=0, seq_len=5) == (
        [6, 7, 8, 9, 2],
        [IGNORE, IGNORE, 8, 9, 2],
        [1, 1, 1, 1, 1],
    )
    with pytest.raises(DataError, match=r"q\.jsonl: line 4: the answer is 4 tokens and EOS.*seq_len 5"):
        encode_row([1], [8, 9, 10, 11], eos_id=2, pad_id=0, seq_len=5, where="q.jsonl: line 4")


def test_rows_on_a_real_tokenizer_are_exact(tmp_path, tokenizer):
    text = "Why, then the world's mine oyster, which I with sword will open."
    path = write_jsonl(tmp_path / "q.jsonl", [{"text": text, "label": "speech"}])
    prompt = ids(tokenizer, f"{text}\nKind:")
    answer = [*ids(tokenizer, " speech"), tokenizer.eos_token_id]
    seq_len, pad = len(prompt) + len(answer) + 5, 5
    rows = heldout_examples([path], TEMPLATE, tokenizer, seq_len, 8)
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert rows.input_ids[0].tolist() == prompt + answer + [tokenizer.pad_token_id] * pad
    assert rows.labels[0].tolist() == [IGNORE] * len(prompt) + answer + [IGNORE] * pad
    assert rows.attention_mask[0].tolist() == [1] * (len(prompt) + len(answer)) + [0] * pad
    trained = rows.labels[0][rows.labels[0] != IGNORE].tolist()
    assert tokenizer.decode(trained[:-1]).strip() == "speech"
    # cut to 12 tokens: the answer and the prompt's last tokens stay
    short = heldout_examples([path], TEMPLATE, tokenizer, 12, 8)
    assert short.input_ids[0].tolist() == prompt[-(12 - len(answer)) :] + answer
    assert short.labels[0].tolist() == [IGNORE] * (12 - len(answer)) + answer


def test_model_inputs_text_blocks_train_every_token_examples_their_labels():
    block = torch.tensor([[1, 2, 3]])
    assert set(model_inputs(block)) == {"input_ids", "labels"} and model_inputs(block)["labels"] is block
    ex = Examples.of([([1, 2, 0], [IGNORE, 2, IGNORE], [1, 1, 0])])
    assert model_inputs(ex)["labels"].tolist() == [[IGNORE, 2, IGNORE]]
    assert model_inputs(ex)["attention_mask"].tolist() == [[1, 1, 0]]


# ---------------------------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"text": "a"}, "field 'label' is missing (instruction.answer)"),
        ({"label": "x"}, "field 'text' is missing (instruction.prompt)"),
        ({"text": "a", "label": None}, "field 'label' is null"),
        ({"text": ["a"], "label": "x"}, "field 'text' is of type list"),
        ('{"text": "a", ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "cut \ud83d", "label": "x"}, "the prompt holds a lone surrogate (\\ud83d at character 4)"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, bad, why):
    good = {"text": "to be", "label": 3}
    path = write_jsonl(tmp_path / "q.jsonl", [good, bad, good])
    with pytest.raises(DataError) as err:
        list(read_examples([path], TEMPLATE))
    assert str(err.value).startswith(f"{path}: line 2: {why}")
    skip = SkipCounter()
    assert [e.answer for e in read_examples([path], TEMPLATE, skip)] == [" 3", " 3"]
    assert skip.count == 1 and skip.examples[0].startswith(f"{path}: line 2: ")


def test_a_prompt_that_renders_empty_is_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"text": "a", "label": "b"}, {"text": " \n", "label": "b"}])
    with pytest.raises(DataError, match=r"q\.jsonl: line 2: the prompt is empty or only whitespace"):
        list(read_examples([path], InstructionConfig(prompt="{text}", answer=" {label}")))


def test_a_too_long_answer_is_an_error_naming_the_record(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "q.jsonl", [{"text": "a", "label": "b"}, {"text": "a", "label": "word " * 30}]
    )
    with pytest.raises(DataError, match=rf"{tmp_path}/q\.jsonl: line 2: the answer is \d+ tokens"):
        heldout_examples([path], TEMPLATE, tokenizer, SEQ_LEN, 8)


def test_skip_in_a_stream_equals_the_stream_without_the_bad_lines(tmp_path, files, tokenizer):
    """Also an answer too long for train.seq_len: a bad record (it stopped the run mid-phase, whatever the
    policy), dropped before the examples are numbered, so 2 ranks take the 1-rank sequence still."""
    lines = Path(files[0]).read_text().splitlines()
    too_long = json.dumps({"text": "x", "label": "word " * 30})
    dirty = lines[:5] + ['{"text": "no label"}', "not json"] + lines[5:40] + [too_long] + lines[40:]
    dirty_path = write_jsonl(tmp_path / "dirty.jsonl", dirty)
    skip = SkipCounter()
    dirty_stream = ExampleStream([dirty_path], TEMPLATE, tokenizer, SEQ_LEN, 0, 1, 2, skip, Shuffle(7, 16))
    got = rows_of([b for b, _ in zip(dirty_stream, range(70), strict=False)])
    assert got == rows_of([b for b, _ in zip(stream(files, tokenizer), range(70), strict=False)])
    assert skip.count == 3  # counted once, though the stream went through more than two epochs
    assert "line 43: the answer is" in skip.examples[2]
    ranks = [
        ExampleStream([dirty_path], TEMPLATE, tokenizer, SEQ_LEN, r, 2, 1, SkipCounter(), SHUFFLE)
        for r in (0, 1)
    ]
    assert global_rows([iter(r) for r in ranks], 35) == got[:70]
    only_long = write_jsonl(tmp_path / "long.jsonl", lines[:40] + [too_long] + lines[40:])
    strict = ExampleStream([only_long], TEMPLATE, tokenizer, SEQ_LEN, 0, 1, 2)  # on_bad_record: error
    with pytest.raises(DataError, match="long.jsonl: line 41: the answer is 61 tokens"):
        [b for b, _ in zip(strict, range(40), strict=False)]


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("shuffle", [None, Shuffle(7, 16)], ids=["file-order", "shuffled"])
def test_the_global_example_sequence_is_the_same_for_1_2_and_3_ranks(files, tokenizer, shuffle):
    reference = global_rows([iter(stream(files, tokenizer, shuffle=shuffle))], 66)  # 132 rows: 2+ epochs
    for world in (2, 3):
        ranks = [iter(stream(files, tokenizer, r, world, shuffle=shuffle)) for r in range(world)]
        got = global_rows(ranks, 132 // (2 * world))
        assert got == reference[: len(got)]
    first = reference[:61]
    assert len(set(first)) > 40  # an epoch holds the distinct examples once (a few lines repeat)
    if shuffle is None:
        assert first == rows_of([heldout_examples([files[0]], TEMPLATE, tokenizer, SEQ_LEN, 61)])
    else:
        assert reference[61:122] != first  # a new order each epoch


@pytest.mark.parametrize("consumed", [0, 1, 29, 30, 31, 45])
def test_resume_continues_with_the_very_next_batch(files, tokenizer, consumed):
    for rank in range(3):
        first = stream(files, tokenizer, rank, 3)
        it = iter(first)
        for _ in range(consumed):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
        expected = rows_of([next(it) for _ in range(6)])
        resumed = stream(files, tokenizer, rank, 3)
        resumed.load_state_dict(state)
        again = iter(resumed)
        assert rows_of([next(again) for _ in range(6)]) == expected


def test_resume_refuses_other_templates_or_world_size(files, tokenizer):
    state = stream(files, tokenizer, 0, 2).state_dict()
    with pytest.raises(DataError, match="world_size"):
        stream(files, tokenizer, 0, 3).load_state_dict(state)
    other = ExampleStream(
        [files[0]], InstructionConfig(prompt="{text}", answer="{label}"), tokenizer, SEQ_LEN, 0, 2, 2
    )
    with pytest.raises(DataError, match="instruction"):
        other.load_state_dict({**state, "shuffle": None})


@pytest.mark.parametrize("old, new, steps", [(2, 3, 7), (3, 1, 11), (1, 2, 30), (3, 2, 10)])
def test_reshard_on_another_world_size_continues_the_global_sequence(files, tokenizer, old, new, steps):
    micro = 2
    reference = global_rows([iter(stream(files, tokenizer, micro=micro))], 110)
    olds = [stream(files, tokenizer, r, old, micro) for r in range(old)]
    its = [iter(s) for s in olds]
    for _ in range(steps):
        for it in its:
            next(it)
    states = [s.state_dict() for s in olds]
    news = []
    for r in range(new):
        s = stream(files, tokenizer, r, new, micro)
        s.load_state_dict(reshard_example_state(states, r, new))
        news.append(iter(s))
    done = steps * old * micro
    got = global_rows(news, 8)
    assert got == reference[done : done + len(got)]


@pytest.mark.parametrize("old, new, steps", [(2, 3, 7), (3, 2, 10)])
def test_a_later_phase_of_an_instruction_domain_takes_the_examples_after_the_earlier_one(
    files, tokenizer, old, new, steps
):
    micro = 2
    reference = global_rows([iter(stream(files, tokenizer, micro=micro))], 110)
    olds = [stream(files, tokenizer, r, old, micro) for r in range(old)]
    for it in [iter(s) for s in olds]:
        for _ in range(steps):
            next(it)
    end = stream_end([stream_position(s.state_dict()) for s in olds])
    later = [stream(files, tokenizer, r, new, micro) for r in range(new)]
    for s in later:
        continue_stream(s, end)
    done = steps * old * micro
    got = global_rows([iter(s) for s in later], 8)
    assert got == reference[done : done + len(got)]


def test_an_elastic_resume_reshards_an_example_stream_as_one(files, tokenizer):
    from pretrain.elastic import _reshard_stream

    olds = [stream(files, tokenizer, r, 2) for r in range(2)]
    for s in olds:
        it = iter(s)
        for _ in range(5):
            next(it)
    states = [s.state_dict() for s in olds]
    got = _reshard_stream(states, DistInfo(rank=1, world_size=3, local_rank=1))
    assert got == reshard_example_state(states, 1, 3) and got["shift"] == -20 % 3


# ---------------------------------------------------------------------------------------------- MIGU, eval


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def test_migu_magnitudes_count_real_tokens_only(files, tokenizer):
    batch = next(iter(stream(files, tokenizer, micro=4, shuffle=None)))
    mask = batch.attention_mask
    assert (mask == 0).any() and (mask == 1).any()  # padded rows: the case under test
    model = tiny_llama(len(tokenizer))
    method = build_method(MethodConfig(name="migu", start_phase=1), model)
    method.begin_phase(1)
    outputs = {}
    for g in method.groups:
        for name, m in zip(g.names, g.modules, strict=True):
            m.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach()))
    model(**model_inputs(batch)).loss.backward()
    checked = 0
    for g in method.groups:
        slab = g.slab(method.magnitudes)
        for j, name in enumerate(g.names):
            h = outputs[name].abs()
            real = (h * mask.unsqueeze(-1)).sum(dim=(0, 1))  # by hand: the real tokens' |h|
            torch.testing.assert_close(slab[j][: h.shape[-1]], real, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(real, h.sum(dim=(0, 1)))  # padding would have changed it
            checked += 1
    assert checked == 7


class _Engine:
    """The parts of a DeepSpeed engine evaluate_domains uses, around a plain module."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kw):
        return self.module(**kw)

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def test_heldout_loss_of_an_instruction_domain_is_over_answer_tokens(files, tokenizer):
    rows = heldout_examples([files[1]], TEMPLATE, tokenizer, SEQ_LEN, 8)
    model = tiny_llama(len(tokenizer))
    ev = evaluate_domains(_Engine(model), {"qa": rows}, 3, DistInfo(rank=0, world_size=1, local_rank=0))
    with torch.no_grad():
        reference = model(**model_inputs(rows)).loss.item()  # transformers: mean over the labelled tokens
        everything = model(input_ids=rows.input_ids, labels=rows.input_ids).loss.item()
    answer_tokens = int((rows.labels[:, 1:] != IGNORE).sum())
    assert ev["tokens"]["qa"] == answer_tokens == int((rows.labels != IGNORE).sum())
    assert ev["loss"]["qa"] == pytest.approx(reference, rel=1e-5)
    assert abs(ev["loss"]["qa"] - everything) > 1e-3


# ---------------------------------------------------------------------------------------------- config


def qa_config(tmp_path, files, **instruction) -> dict:
    cfg = tiny_run_config(tmp_path, domains=("news",))
    cfg["domains"].append(
        {
            "name": "qa",
            "train": [files[0]],
            "heldout": [files[1]],
            "instruction": {**INSTRUCTION, **instruction},
        }
    )
    cfg["phases"].append({"domain": "qa", "steps": 2})
    return cfg


def test_config_takes_an_instruction_domain(tmp_path, files):
    cfg = validate(qa_config(tmp_path, files))
    assert cfg.domain("qa").instruction == TEMPLATE and cfg.domain("news").instruction is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": " {label"}, "key `domains.1.instruction.answer`: ' {label' is not a template"),
        ({"prompt": "{text!s}"}, "key `domains.1.instruction.prompt`: placeholder {text}"),
        ({"answer": ""}, "key `domains.1.instruction.answer`: the template is empty"),
    ],
)
def test_config_refuses_bad_templates(tmp_path, files, change, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        validate(qa_config(tmp_path, files, **change))


def test_config_refuses_replay_with_an_instruction_phase_naming_both_keys(tmp_path, files):
    raw = qa_config(tmp_path, files)
    raw["replay"] = {"share": 0.1}
    with pytest.raises(ConfigError, match=r"key `replay.share` with `domains.1.instruction`"):
        validate(raw)
    raw = qa_config(tmp_path, files)
    raw["phases"][1]["replay_share"] = 0.2
    with pytest.raises(ConfigError, match=r"key `phases.1.replay_share` with `domains.1.instruction`"):
        validate(raw)


def test_config_refuses_files_an_instruction_domain_cannot_read(tmp_path, files):
    raw = qa_config(tmp_path, files)
    txt = tmp_path / "qa.txt"
    txt.write_text("a paragraph\n")
    raw["domains"][1]["heldout"] = [str(txt)]
    with pytest.raises(ConfigError, match=r"key `domains.1.heldout`: .*qa.txt is not JSON Lines"):
        validate(raw)
