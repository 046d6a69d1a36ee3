"""Invalid input raises OrthrusInputError naming the field, and the engine stays healthy
(docs/ARCHITECTURE.md §3): after every bad request a good one is served correctly and nothing is left held."""

from contextlib import contextmanager

import pytest
import torch
from support.tiny_models import hf_greedy, hf_model

from orthrus_engines import LLM, OrthrusInputError, SamplingParams
from orthrus_engines.models.heads import save_head

VOCAB = 96
WINDOW = 64  # max_model_len engine argument


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=13)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=str(model_dir), block_size=4, num_pages=32, max_model_len=WINDOW)


GOOD_PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def good_output(model_dir):
    return hf_greedy(hf_model(model_dir, "llama"), GOOD_PROMPT, 8)


def assert_healthy(llm, good_output):
    eng = llm.core
    assert not eng.has_unfinished(), "a rejected request was left queued"
    assert eng.pages.num_free == eng.pages.num_pages
    assert llm.generate(GOOD_PROMPT, SamplingParams(max_tokens=8))[0].token_ids == good_output
    assert eng.pages.num_free == eng.pages.num_pages


@contextmanager
def raises_field(field: str):
    """The error is an OrthrusInputError naming the field: `.field` and the start of the message."""
    with pytest.raises(OrthrusInputError) as info:
        yield info
    assert info.value.field == field, f"field {info.value.field!r}, expected {field!r}: {info.value}"
    assert str(info.value).startswith(field), str(info.value)


def sp_with(**bad) -> SamplingParams:
    """SamplingParams with a field set after construction (bypasses __post_init__): the engine must
    validate on its own."""
    sp = SamplingParams(max_tokens=8)
    for k, v in bad.items():
        setattr(sp, k, v)
    return sp


# (id, field, prompt, sampling-params factory)
BAD_REQUESTS = [
    ("empty_string", "prompt", "", lambda: SamplingParams()),
    ("empty_token_list", "prompt_token_ids", [[]], lambda: SamplingParams()),
    ("empty_token_dict", "prompt_token_ids", {"prompt_token_ids": []}, lambda: SamplingParams()),
    ("dict_without_prompt", "prompt", {"text": "hi"}, lambda: SamplingParams()),
    ("prompt_fills_window", "prompt_token_ids", [1] * WINDOW, lambda: SamplingParams(max_tokens=1)),
    ("prompt_beyond_window", "prompt_token_ids", [1] * (3 * WINDOW), lambda: SamplingParams(max_tokens=1)),
    ("prompt_plus_max_tokens_beyond_window", "max_tokens", [1] * 10, lambda: SamplingParams(max_tokens=WINDOW)),
    ("negative_token_id", "prompt_token_ids", [1, -1, 2], lambda: SamplingParams()),
    ("token_id_equal_vocab", "prompt_token_ids", [1, VOCAB], lambda: SamplingParams()),
    ("token_id_beyond_vocab", "prompt_token_ids", [10**9], lambda: SamplingParams()),
    ("float_token_id", "prompt_token_ids", [1, 2.0], lambda: SamplingParams()),
    ("bool_token_id", "prompt_token_ids", [1, True], lambda: SamplingParams()),
    ("int_prompt", "prompt", 3, lambda: SamplingParams()),
    ("none_prompt", "prompt", None, lambda: SamplingParams()),
    ("string_without_tokenizer", "prompt", "hello", lambda: SamplingParams()),
    ("max_tokens_0_set_late", "max_tokens", GOOD_PROMPT, lambda: sp_with(max_tokens=0)),
    ("max_tokens_str_set_late", "max_tokens", GOOD_PROMPT, lambda: sp_with(max_tokens="a")),
    ("temperature_negative_set_late", "temperature", GOOD_PROMPT, lambda: sp_with(temperature=-1.0)),
    ("top_p_0_set_late", "top_p", GOOD_PROMPT, lambda: sp_with(top_p=0.0)),
    ("top_k_negative_set_late", "top_k", GOOD_PROMPT, lambda: sp_with(top_k=-5)),
    ("stop_token_out_of_vocab", "stop_token_ids", GOOD_PROMPT, lambda: SamplingParams(stop_token_ids=[VOCAB])),
    ("stop_string_without_tokenizer", "stop", GOOD_PROMPT, lambda: SamplingParams(stop=["x"])),
    ("params_not_sampling_params", "sampling_params", GOOD_PROMPT, lambda: {"max_tokens": 3}),
]


@pytest.mark.parametrize("field,prompt,make_sp", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_names_field_and_engine_stays_healthy(llm, good_output, field, prompt, make_sp):
    """LLM.generate rejects the request with OrthrusInputError(field); then serves correctly."""
    with raises_field(field):
        llm.generate(prompt, make_sp())
    assert_healthy(llm, good_output)


BAD_PARAMS = [
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("max_tokens", dict(max_tokens="a")),
    ("max_tokens", dict(max_tokens=2.5)),
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature="hot")),
    ("top_p", dict(top_p=0)),
    ("top_p", dict(top_p=2)),
    ("top_p", dict(top_p=-0.1)),
    ("top_k", dict(top_k=-5)),
    ("top_k", dict(top_k=1.5)),
    ("seed", dict(seed="x")),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=[3])),
    ("stop_token_ids", dict(stop_token_ids=["a"])),
    ("block_size", dict(block_size=0)),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS, ids=[f"{f}={v!r}" for f, kw in BAD_PARAMS for v in kw.values()])
def test_bad_sampling_params_name_field(field, kwargs):
    with raises_field(field):
        SamplingParams(**kwargs)


def test_valid_edge_params_accepted(llm, good_output):
    """Boundary values that are valid: top_p=1, top_k=-1/0, temperature 0, max_tokens filling the
    window exactly."""
    for sp in (SamplingParams(top_p=1.0, top_k=-1), SamplingParams(top_k=0, temperature=0.0)):
        assert llm.generate(GOOD_PROMPT, sp)
    out = llm.generate(GOOD_PROMPT, SamplingParams(max_tokens=WINDOW - len(GOOD_PROMPT)))[0]
    assert len(out.token_ids) == WINDOW - len(GOOD_PROMPT)
    assert_healthy(llm, good_output)


def test_bad_request_in_a_batch_runs_nothing(llm, good_output):
    """One bad request in a batch: the call raises and none of the batch's requests stays queued
    (LLM.generate validates everything before running anything)."""
    with raises_field("prompt_token_ids"):
        llm.generate([GOOD_PROMPT, [1, VOCAB]], SamplingParams(max_tokens=4))
    assert_healthy(llm, good_output)
    with raises_field("max_tokens"):
        llm.generate([GOOD_PROMPT, [1] * 10], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=WINDOW)])
    assert_healthy(llm, good_output)


def test_params_list_length_mismatch(llm, good_output):
    with raises_field("sampling_params"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [SamplingParams()])
    assert_healthy(llm, good_output)


def test_duplicate_request_id(llm, good_output):
    eng = llm.core
    eng.add_request("dup", GOOD_PROMPT, SamplingParams(max_tokens=4))
    with raises_field("request_id"):
        eng.add_request("dup", GOOD_PROMPT, SamplingParams(max_tokens=4))
    while eng.has_unfinished():
        eng.step()
    assert_healthy(llm, good_output)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("model", dict(model="/nonexistent")),
        ("model", dict(model="/tmp")),  # a directory without config.json
        ("nonsense_arg", dict(nonsense_arg=1)),
        ("block_size", dict(block_size=0)),
        ("head", dict(head="/nonexistent/head.safetensors")),
    ],
    ids=["missing_path", "dir_without_config", "unknown_engine_arg", "block_size_0", "missing_head"],
)
def test_bad_engine_arguments(model_dir, field, kwargs):
    """Engine construction errors name the argument."""
    kwargs = {"model": str(model_dir), "num_pages": 8} | kwargs
    with raises_field(field):
        LLM(**kwargs)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with raises_field("model"):
        LLM(model=str(tmp_path))


def test_head_without_twins(model_dir, tmp_path):
    """A head file holding no *_diff tensors is rejected as `head`."""
    from safetensors.torch import save_file

    bad = tmp_path / "head.safetensors"
    save_file({"model.norm.weight": torch.ones(64)}, str(bad))
    with raises_field("head"):
        LLM(model=str(model_dir), head=str(bad), num_pages=8)
    good = tmp_path / "good.safetensors"
    save_head(LLM(model=str(model_dir), num_pages=8).core.runner.model, good, 4, VOCAB - 1)
    assert LLM(model=str(model_dir), head=str(good), num_pages=8).core.block_size == 4
