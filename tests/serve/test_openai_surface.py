"""What vLLM users expect of the OpenAI surface, end to end on test_serving's application ("basic"): vLLM's
defaults (max_tokens to the window's end, the served model's name, content parts, stream_options), its extra
endpoints (/version, /tokenize, /detokenize), and a 400 naming every field the server does not implement.
The official `openai` client and httpx for raw bodies; gRPC keeps its own defaults."""

import importlib.metadata
import json
import re

import httpx
import pytest
from serve_helpers import ENGINE_ARGS

from orthrus_engines import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "tiny-orthrus"  # the served name: the model directory's name
VOCAB = 49152
WINDOW = ENGINE_ARGS["max_model_len"]
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
SHORT = 6


@pytest.fixture(scope="module")
def app(basic_app):  # the shared clients (conftest's http, oai) talk to it
    return basic_app


def assert_error(r: httpx.Response, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err


# -- defaults as vLLM has them ------------------------------------------------------------------


def test_no_max_tokens_generates_to_the_end_of_the_window(oai, reference_llm):
    ids = reference_llm.tokenizer(PROMPT)["input_ids"]
    c = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == WINDOW - len(ids) and c.choices[0].finish_reason == "length"
    ref = reference_llm.generate(PROMPT, SamplingParams(max_tokens=WINDOW - len(ids), ignore_eos=True))[0]
    assert c.choices[0].text == ref.text

    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == WINDOW


def test_grpc_keeps_its_default(client):
    r = client.generate(PROMPT, ignore_eos=True)
    assert r.completion_tokens == SamplingParams().max_tokens


def test_model_must_be_the_served_one(oai, http):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert e.value.param == "model" and "gpt-4o" in e.value.message
    for path, body in [("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": PROMPT}),
                       ("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})]:
        err = assert_error(http.post(path, json={"model": "nope", **body}), 404, "model")
        assert err["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})  # model left out: the served one
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_content_parts_are_joined(oai):
    def answer(messages):
        c = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=SHORT, temperature=0)
        return c.choices[0].message.content, c.usage.prompt_tokens

    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name"}, {"type": "text", "text": "a colour."}]}]
    joined = [CHAT[0], {"role": "user", "content": "Name\na colour."}]
    assert answer(parts) == answer(joined)


def test_image_parts_are_refused_by_name(oai):
    import openai

    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}], max_tokens=2)
    assert e.value.param == "messages[0].content[1].type" and "image_url" in e.value.message


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_usage_in_a_last_chunk_only_when_asked(oai, chat):
    def stream(**kw):
        if chat:
            return list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=SHORT, temperature=0,
                                                    extra_body={"ignore_eos": True}, stream=True, **kw))
        return list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=SHORT, temperature=0,
                                           extra_body={"ignore_eos": True}, stream=True, **kw))

    chunks = stream(stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == SHORT
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None and c.choices for c in stream())


def test_raw_stream_has_no_usage_key_unless_asked(http):
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": SHORT, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    assert lines and all('"usage"' not in ln for ln in lines)


# -- vLLM's extra endpoints -----------------------------------------------------------------------


def test_version(http):
    r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": importlib.metadata.version("orthrus-serve")}


def test_tokenize_and_detokenize(http, reference_llm):
    tok = reference_llm.tokenizer
    ids = tok(PROMPT)["input_ids"]
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 200 and r.json() == {"tokens": ids, "count": len(ids), "max_model_len": WINDOW}

    chat_ids = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"])
    r = http.post("/tokenize", json={"messages": CHAT})
    assert r.status_code == 200 and r.json()["tokens"] == chat_ids and r.json()["count"] == len(chat_ids)

    r = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT}


@pytest.mark.parametrize("path,body,field", [
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"prompt": ""}, "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": False}, "add_special_tokens"),
    ("/tokenize", {"messages": []}, "messages"), ("/tokenize", {"messages": CHAT, "prompt": "hi"}, "prompt"),
    ("/detokenize", {}, "tokens"), ("/detokenize", {"tokens": "hi"}, "tokens"),
    ("/detokenize", {"tokens": [VOCAB]}, "tokens"), ("/detokenize", {"tokens": [1], "extra": 1}, "extra"),
    ("/tokenize", [1], "body")])
def test_tokenize_bad_input_is_400(http, path, body, field):
    err = assert_error(http.post(path, json=body), 400, field)
    assert err["message"].startswith(f"{field}:") and err["type"] == "invalid_request_error"


# -- structured output ------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}  # compact: a random model's output stays short


def test_response_format_json_schema(oai, reference_llm):
    import jsonschema
    import openai

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    c = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=64, temperature=0, response_format=fmt)
    text = c.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert c.choices[0].finish_reason == "stop"
    ref = reference_llm.chat(CHAT, SamplingParams(max_tokens=64, structured={"json": PERSON}))[0]
    assert text == ref.text
    with pytest.raises(openai.BadRequestError) as e:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, response_format=bad)
    assert e.value.param == "response_format.json_schema.schema"


def test_grpc_guided_choice_and_regex(client):
    import grpc

    colours = ["red", "green", "dark blue"]
    r = client.generate(PROMPT, guided_choice=colours, max_tokens=8)
    assert r.text in colours and r.finish_reason == "stop"
    r = client.generate(PROMPT, guided_regex="[0-9]{2}-[a-z]{1,4}", max_tokens=12, temperature=1.0, seed=3)
    assert re.fullmatch("[0-9]{2}-[a-z]{1,4}", r.text) and r.finish_reason == "stop"
    with pytest.raises(grpc.RpcError) as e:
        client.generate(PROMPT, guided_regex="a(b")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("guided_regex:")


# -- what is not implemented is refused by name -----------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
CHAT_REFUSED = [
    {"tools": TOOLS}, {"tool_choice": "none"}, {"functions": [{"name": "f", "parameters": {}}]},
    {"function_call": "none"}, {"logprobs": True},
    {"top_logprobs": 2}, {"n": 2}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"logit_bias": {"5": 1}},
    {"audio": {"voice": "alloy", "format": "wav"}}, {"modalities": ["text", "audio"]}, {"parallel_tool_calls": False},
    {"extra_body": {"repetition_penalty": 1.2}}]
COMPLETION_REFUSED = [{"best_of": 2}, {"suffix": "!"}, {"echo": True}, {"logprobs": 2}, {"n": 3},
                      {"presence_penalty": 1.0}, {"logit_bias": {"5": 1}}]


def _field(kwargs: dict) -> str:
    return next(iter(kwargs.get("extra_body", kwargs)))


@pytest.mark.parametrize("kwargs", CHAT_REFUSED, ids=_field)
def test_chat_refuses_unimplemented_fields_by_name(oai, kwargs):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
    assert e.value.param == _field(kwargs) and e.value.type == "invalid_request_error", e.value.body


@pytest.mark.parametrize("kwargs", COMPLETION_REFUSED, ids=_field)
def test_completions_refuse_unimplemented_fields_by_name(oai, kwargs):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **kwargs)
    assert e.value.param == _field(kwargs), e.value.body


def test_harmless_fields_keep_working(oai, http):
    c = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=SHORT, temperature=0, user="u-1", n=1,
                                    presence_penalty=0, frequency_penalty=0, seed=3, stop=["\n\n\n"])
    assert c.usage.completion_tokens <= SHORT and c.choices[0].message.role == "assistant"
    body = {"prompt": PROMPT, "max_tokens": 2, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
            "suffix": None, "tools": None, "user": "u-1", "seed": 1, "stream": False}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
