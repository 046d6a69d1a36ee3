"""Structured output (llguidance grammars as a logits processor): the output follows the grammar and ends
where it does, greedy and seeded output under drafting equals plain AR decoding with the same grammar (both
cycles, K 1-4), and the grammar's matcher follows any order of AR-row, draft-row and recomputed histories."""

import json
import random
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
from support.tiny_models import write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.grammar import Grammars
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.inputs import load_tokenizer

VOCAB = 49152  # the built-in tokenizer's; the test model pads its vocabulary past it
PADDED = VOCAB + 64
EOS = 2
PROMPT = "Describe a person as JSON:"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}, "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "ok", "pet"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False}}  # compact: a random model's output stays short
SEEDED = dict(seed=5, temperature=0.9, top_k=50)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, builtin_dir) -> Path:
    """A tiny random causal-anchor checkpoint with the built-in tokenizer and a padded vocabulary."""
    path = write_orthrus(tmp_path_factory.mktemp("structured") / "m", "qwen3", seed=3, twin_noise=0.03,
                         anchor_view="causal", vocab_size=PADDED)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(builtin_dir) / name, path / name)
    return path


@pytest.fixture(scope="module")
def llms(model_dir) -> dict[bool, LLM]:
    return {fused: LLM(str(model_dir), block_size=4, fused_cycle=fused, num_pages=64) for fused in (True, False)}


def run(llm: LLM, structured: dict, k: int, **sampling) -> list:
    """A greedy and a seeded request, batched, each with draft length k (1 = plain AR)."""
    params = [SamplingParams(max_tokens=64, block_size=k, structured=structured, **s) for s in (sampling, SEEDED)]
    return llm.generate([PROMPT, PROMPT], params)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
def test_json_schema_output_validates_and_equals_plain_ar(llms, fused):
    llm = llms[fused]
    want = run(llm, {"json": SCHEMA}, 1, ignore_eos=True)  # the grammar's EOS ends it even so
    for out in want:
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.finish_reason == "stop" and out.token_ids[-1] == EOS
    accepted = 0
    for k in (2, 3, 4):
        outs = run(llm, {"json": SCHEMA}, k, ignore_eos=True)
        assert [o.token_ids for o in outs] == [o.token_ids for o in want], k
        accepted += sum(o.accepted_tokens for o in outs)
    assert accepted > 10


def test_regex_and_choice(llms):
    llm = llms[True]
    regex = r"[a-z]{2,5}-[0-9]{1,3}"
    choices = ["yes", "no", "it depends"]
    for structured, check in (({"regex": regex}, lambda t: re.fullmatch(regex, t)), ({"choice": choices},
                                                                                     lambda t: t in choices)):
        want = run(llm, structured, 1)
        assert all(check(o.text) and o.finish_reason == "stop" for o in want), [o.text for o in want]
        assert [o.token_ids for o in run(llm, structured, 4)] == [o.token_ids for o in want]
    sampled = llm.generate([PROMPT] * 4, SamplingParams(max_tokens=16, temperature=1.0, structured={"choice": choices}))
    assert all(o.text in choices for o in sampled)  # rejection sampling over the masked p and q


def test_preemption_recomputes_the_same_constrained_output(model_dir, llms):
    """A pool too small for the batch: recomputed sequences resume their grammar state (seeded and greedy)."""
    prompts = [f"Person number {i} as JSON, please:" for i in range(6)]
    params = [SamplingParams(max_tokens=40, structured={"json": SCHEMA}, **(dict(SEEDED, seed=i) if i % 2 else {}))
              for i in range(6)]
    tight = LLM(str(model_dir), block_size=4, num_pages=16, page_size=4)
    got = tight.generate(prompts, params)
    assert tight.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in llms[True].generate(prompts, params)]


def test_matcher_follows_any_order_of_histories(model_dir):
    """Rows are processed at histories that branch (drafts), go back (rejections) and repeat (a recompute
    after preemption): each row's mask is that of a fresh matcher fed its history."""
    tokenizer = load_tokenizer(model_dir)
    grammars = Grammars(tokenizer, str(model_dir), PADDED, {EOS})
    prompt = tokenizer(PROMPT)["input_ids"]
    good = tokenizer('{"name":"Bob","age":42,"ok":true,"pet":"dog"}')["input_ids"] + [EOS]
    histories = [good[:n] for n in range(len(good) + 1)]
    histories += [good[:n] + [good[n + 1]] for n in range(len(good) - 2)]  # off-grammar drafts
    histories += [good + [EOS, 7]]  # rows after the end
    rng = random.Random(0)
    order = histories * 2
    rng.shuffle(order)
    proc = grammars.processor({"json": SCHEMA}, len(prompt))
    for out in order:
        fresh = grammars.processor({"json": SCHEMA}, len(prompt))
        assert torch_equal(proc.allowed(prompt + out), fresh.allowed(prompt + out)), out
    rows = {n: proc.allowed(prompt + good[:n]) for n in (0, len(good) - 2, len(good) - 1, len(good))}
    assert rows[0].any() and not rows[0][VOCAB:].any()  # padding ids never
    assert not rows[len(good) - 2][EOS]  # EOS only where the grammar may end
    assert rows[len(good) - 1].nonzero().flatten().tolist() == [EOS]
    assert rows[len(good)].nonzero().flatten().tolist() == [EOS]  # after the end: EOS only, never a row of -inf


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.parametrize("structured, field", [
    ({"json": {"type": "foo"}}, "structured.json"),
    ({"json": "{not json"}, "structured.json"),
    ({"regex": "a(b"}, "structured.regex"),
    ({"choice": []}, "structured.choice"),
    ({"grammar": "start: undefined_rule"}, "structured.grammar"),
    ({"json_object": "yes"}, "structured.json_object"),
    ({"yaml": "x"}, "structured"),
    ({"regex": "a", "choice": ["a"]}, "structured"),
])
def test_bad_specs_name_the_field(structured, field):
    with pytest.raises(OrthrusInputError) as e:
        SamplingParams(structured=structured)
    assert e.value.field == field
