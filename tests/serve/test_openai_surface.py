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


# -- n > 1 -------------------------------------------------------------------------------------------

N_SAMPLED = dict(temperature=0.9, seed=7, max_tokens=16)  # sample i: seed 7 + i


@pytest.fixture(scope="module")
def n_refs(reference_llm):
    """The engine alone: the three samples of PROMPT and of CHAT, each as a single request seeded 7 + i."""
    sps = [SamplingParams(**{**N_SAMPLED, "seed": 7 + i}, ignore_eos=True) for i in range(3)]
    outs = reference_llm.generate([PROMPT] * 3 + [reference_llm.core.inputs.chat_ids(CHAT)] * 3, sps * 2)
    return {"completions": outs[:3], "chat": outs[3:]}


def _create(oai, chat: bool, **kw):
    if chat:
        return oai.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"ignore_eos": True}, **kw)
    return oai.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True}, **kw)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n_choices_are_the_seeded_samples(oai, n_refs, chat):
    refs = n_refs["chat" if chat else "completions"]
    c = _create(oai, chat, n=3, **N_SAMPLED)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    texts = [ch.message.content if chat else ch.text for ch in c.choices]
    assert texts == [r.text for r in refs] and len(set(texts)) > 1
    assert all(ch.finish_reason == "length" for ch in c.choices)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (refs[0].prompt_tokens, 3 * 16)  # prompt once
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n_stream_interleaves_choices_by_index(oai, n_refs, chat):
    refs = n_refs["chat" if chat else "completions"]
    chunks = list(_create(oai, chat, n=3, stream=True, stream_options={"include_usage": True}, **N_SAMPLED))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 3 * 16
    assert last.usage.prompt_tokens == refs[0].prompt_tokens
    assert all(len(ch.choices) == 1 and ch.usage is None for ch in body)  # one choice per chunk, as OpenAI
    texts: dict[int, str] = {}
    for ch in body:
        piece = ch.choices[0].delta.content if chat else ch.choices[0].text
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + (piece or "")
    assert [texts[i] for i in range(3)] == [r.text for r in refs]
    order = [ch.choices[0].index for ch in body if (ch.choices[0].delta.content if chat else ch.choices[0].text)]
    assert order != sorted(order)  # the choices' chunks interleave
    finishes = [ch.choices[0].index for ch in body if ch.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    if chat:  # each choice opens with its role
        assert [ch.choices[0].index for ch in body[:3]] == [0, 1, 2]
        assert all(ch.choices[0].delta.role == "assistant" for ch in body[:3])


def test_best_of_equal_to_n_is_n(http, n_refs):
    body = {"prompt": PROMPT, "n": 3, "best_of": 3, "ignore_eos": True, **N_SAMPLED}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [ch["text"] for ch in r.json()["choices"]] == [ref.text for ref in n_refs["completions"]]
    assert_error(http.post("/v1/completions", json={**body, "best_of": 4}), 400, "best_of")


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


# -- log probabilities ------------------------------------------------------------------------------


def _ref_logprobs(reference_llm, prompt, top: int, chat: bool = False):
    sp = SamplingParams(max_tokens=SHORT, logprobs=top)
    out = (reference_llm.chat(prompt, sp) if chat else reference_llm.generate(prompt, sp))[0]
    return out, [lp.logprob for lp in out.logprobs], [[t for t, _ in lp.top] for lp in out.logprobs]


def test_completions_logprobs_equal_the_engine(oai, reference_llm):
    """Non-stream and stream: one entry per token, the engine's values and alternatives, token texts that
    spell the completion, offsets into it."""
    ref, values, tops = _ref_logprobs(reference_llm, PROMPT, 2)
    decode = reference_llm.tokenizer.decode
    c = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=SHORT, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(values, abs=1e-5) and len(values) == c.usage.completion_tokens
    assert lp.tokens == [decode([t]) for t in ref.token_ids] and "".join(lp.tokens) == c.choices[0].text
    assert [list(d) for d in lp.top_logprobs] == [[decode([t]) for t in top] for top in tops]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=SHORT, temperature=0, logprobs=2,
                                         stream=True))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(values, abs=1e-5)
    offsets = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_chat_logprobs_equal_the_engine(oai, reference_llm):
    ref, values, tops = _ref_logprobs(reference_llm, CHAT, 3, chat=True)
    decode = reference_llm.tokenizer.decode
    c = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=SHORT, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(values, abs=1e-5)
    assert [e.token for e in content] == [decode([t]) for t in ref.token_ids]
    assert all(e.bytes == list(e.token.encode()) for e in content)
    assert [[a.token for a in e.top_logprobs] for e in content] == [[decode([t]) for t in top] for top in tops]
    plain = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_grpc_logprobs_equal_the_engine(client, reference_llm):
    ref, values, tops = _ref_logprobs(reference_llm, PROMPT, 2)
    r = client.generate(PROMPT, max_tokens=SHORT, logprobs=2)
    assert [lp.token_id for lp in r.logprobs] == list(r.token_ids) == ref.token_ids
    assert [lp.logprob for lp in r.logprobs] == pytest.approx(values, abs=1e-5)
    assert [[a.token_id for a in lp.top] for lp in r.logprobs] == tops
    streamed = [lp.logprob for msg in client.generate_stream(PROMPT, max_tokens=SHORT, logprobs=2) for lp in msg.logprobs]
    assert streamed == pytest.approx(values, abs=1e-5)
    assert not client.generate(PROMPT, max_tokens=2).logprobs


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
    {"function_call": "none"}, {"audio": {"voice": "alloy", "format": "wav"}}, {"modalities": ["text", "audio"]}, {"parallel_tool_calls": False}]
COMPLETION_REFUSED = [{"best_of": 2}, {"suffix": "!"}, {"echo": True}, {"n": 0}]


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


# -- penalties and bias ---------------------------------------------------------------------------
# Each changes this prompt's greedy output on its own (the first two tokens: `plain`'s).
PENALTIES = [lambda plain: {"presence_penalty": 1.5}, lambda plain: {"frequency_penalty": -2.0},
             lambda plain: {"repetition_penalty": 1.25}, lambda plain: {"logit_bias": {plain[0]: -100.0}},
             lambda plain: {"min_tokens": 4, "stop_token_ids": [plain[1]]}]
PENALTY_IDS = ["presence", "frequency", "repetition", "logit_bias", "min_tokens"]


@pytest.mark.parametrize("case", PENALTIES, ids=PENALTY_IDS)
def test_penalties_and_bias_equal_the_engine(oai, reference_llm, case):
    """OpenAI's presence/frequency penalties and logit_bias (keys: token ids as strings), vLLM's
    repetition_penalty and min_tokens (extra fields): completions and chat give the engine's output."""
    sp = dict(max_tokens=12, temperature=0)
    plain = reference_llm.generate(PROMPT, SamplingParams(max_tokens=12))[0]
    params = case(plain.token_ids)
    ref = reference_llm.generate(PROMPT, SamplingParams(max_tokens=12, **params))[0]
    assert ref.token_ids != plain.token_ids
    native = {k: v for k, v in params.items() if k in ("presence_penalty", "frequency_penalty", "logit_bias")}
    extra = {k: v for k, v in params.items() if k not in native}
    if "logit_bias" in native:
        native["logit_bias"] = {str(t): b for t, b in native["logit_bias"].items()}
    c = oai.completions.create(model=MODEL, prompt=PROMPT, extra_body=extra, **native, **sp)
    assert c.choices[0].text == ref.text and c.usage.completion_tokens == len(ref.token_ids)

    chat_ref = reference_llm.chat(CHAT, SamplingParams(max_tokens=12, **params))[0]
    chat = oai.chat.completions.create(model=MODEL, messages=CHAT, extra_body=extra, **native, **sp)
    assert chat.choices[0].message.content == chat_ref.text


@pytest.mark.parametrize("body, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"min_tokens": 8}, "min_tokens")])
def test_bad_penalties_are_400_naming_the_field(http, body, field):
    for path, prompt in [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})]:
        assert_error(http.post(path, json={**prompt, "max_tokens": 4, **body}), 400, field)
