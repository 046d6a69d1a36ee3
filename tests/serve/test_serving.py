"""The serving layer end to end (docs/ARCHITECTURE.md §5) with one engine replica: gRPC and HTTP return what the
engine alone returns; the official OpenAI client works; cancelled streams free the engine; bad input
gets INVALID_ARGUMENT / HTTP 400 naming the field and the server keeps serving."""

import json

import grpc
import httpx
import pytest
from serve_helpers import ENGINE_ARGS

from orthrus_engines import SamplingParams
from orthrus_serve.api import orthrus_pb2 as pb

pytestmark = pytest.mark.slow

MODEL = "tiny-orthrus"  # the served name: the model directory's name
VOCAB = 49152
WINDOW = ENGINE_ARGS["max_model_len"]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]
MAX_TOKENS = 12
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def app(basic_app):  # the shared clients (conftest's http, oai) talk to it
    return basic_app


@pytest.fixture(scope="module")
def refs(reference_llm):
    """The engine alone: greedy results for every prompt (text and token ids) and for the chat."""
    sp = SamplingParams(max_tokens=MAX_TOKENS)
    out = {p: reference_llm.generate(p, sp)[0] for p in PROMPTS}  # one at a time, as the tests send them
    out["chat"] = reference_llm.chat(CHAT, sp)[0]
    return out


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_good_request_works(client) -> None:
    r = client.generate(PROMPTS[0], max_tokens=2)
    assert r.completion_tokens == 2 and len(r.token_ids) == 2


# -- results equal the engine's ---------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_grpc_unary_and_stream_equal_the_engine(client, reference_llm, refs, prompt):
    ref = refs[prompt]
    r = client.generate(prompt, max_tokens=MAX_TOKENS)
    assert list(r.token_ids) == ref.token_ids and r.text == ref.text
    assert r.finish_reason == ref.finish_reason and r.request_id
    assert (r.prompt_tokens, r.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    assert r.forward_passes > 0

    msgs = list(client.generate_stream(prompt, max_tokens=MAX_TOKENS))
    assert [t for m in msgs for t in m.token_ids] == ref.token_ids
    assert "".join(m.text for m in msgs) == ref.text
    assert msgs[-1].finish_reason == ref.finish_reason and all(not m.finish_reason for m in msgs[:-1])
    assert msgs[-1].completion_tokens == len(ref.token_ids)
    assert len({m.request_id for m in msgs}) == 1

    ids = reference_llm.tokenizer(prompt)["input_ids"]  # the same request as token ids
    r = client.generate(ids, max_tokens=MAX_TOKENS, request_id="my-request-1")
    assert list(r.token_ids) == ref.token_ids and r.text == ref.text and r.request_id == "my-request-1"


# Each changes the first prompt's greedy output on its own (`plain`: its tokens); floats exact in float32.
PENALTIES = [lambda plain: {"presence_penalty": 1.5}, lambda plain: {"frequency_penalty": -2.0},
             lambda plain: {"repetition_penalty": 1.25}, lambda plain: {"logit_bias": {plain[0]: -100.0}},
             lambda plain: {"min_tokens": 4, "stop_token_ids": [plain[1]]}]


@pytest.mark.parametrize("case", PENALTIES, ids=["presence", "frequency", "repetition", "logit_bias", "min_tokens"])
def test_grpc_penalties_and_bias_equal_the_engine(client, reference_llm, refs, case):
    plain = refs[PROMPTS[0]]
    params = case(plain.token_ids)
    ref = reference_llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, **params))[0]
    assert ref.token_ids != plain.token_ids
    r = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, **params)
    assert list(r.token_ids) == ref.token_ids and r.text == ref.text
    msgs = list(client.generate_stream(PROMPTS[0], max_tokens=MAX_TOKENS, **params))
    assert [t for m in msgs for t in m.token_ids] == ref.token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_http_completions_equal_the_engine(http, reference_llm, refs, prompt):
    ref = refs[prompt]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == ref.text and body["choices"][0]["finish_reason"] == ref.finish_reason
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)
    assert body["usage"]["prompt_tokens"] == ref.prompt_tokens

    ids = reference_llm.tokenizer(prompt)["input_ids"]
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text

    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ref.token_ids)


def test_openai_client_completions(oai, refs):
    for prompt in PROMPTS:
        ref = refs[prompt]
        c = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert c.choices[0].text == ref.text and c.choices[0].finish_reason == ref.finish_reason
        assert c.usage.completion_tokens == len(ref.token_ids)
        stream = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == ref.text


def test_openai_client_chat(oai, refs):
    ref = refs["chat"]
    c = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert c.object == "chat.completion"
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == ref.text
    assert c.choices[0].finish_reason == ref.finish_reason
    assert c.usage.prompt_tokens == ref.prompt_tokens and c.usage.completion_tokens == len(ref.token_ids)

    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_models_and_model_info(oai, http, client, reference_llm):
    assert [m.id for m in oai.models.list()] == [MODEL]
    r = http.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL

    info = client.model_info()
    core = reference_llm.core
    assert info.model == MODEL
    assert (info.block_size, info.max_model_len, info.page_size, info.vocab_size) == (
        core.block_size, WINDOW, core.page_size, VOCAB)
    assert info.prefix_fingerprint == core.fingerprint


def test_grpc_n_completions_unary_and_stream(client, reference_llm):
    """n = 3 over plain grpcio: the unary response lists the completions by index (completion 0 also in its
    top fields), the stream tags every delta with its completion's index; counters count the prompt once."""
    kw = dict(max_tokens=MAX_TOKENS, temperature=0.8, seed=11, ignore_eos=True)
    refs = reference_llm.generate([PROMPTS[1]] * 3, [SamplingParams(**{**kw, "seed": 11 + i}) for i in range(3)])
    r = client.generate(PROMPTS[1], n=3, **kw)
    assert [(c.index, list(c.token_ids), c.text, c.finish_reason) for c in r.completions] == [
        (i, ref.token_ids, ref.text, "length") for i, ref in enumerate(refs)]
    assert (list(r.token_ids), r.text) == (refs[0].token_ids, refs[0].text)
    assert (r.prompt_tokens, r.completion_tokens) == (refs[0].prompt_tokens, 3 * MAX_TOKENS)

    msgs = list(client.generate_stream(PROMPTS[1], n=3, **kw))
    for i, ref in enumerate(refs):
        mine = [m for m in msgs if m.index == i]
        assert [t for m in mine for t in m.token_ids] == ref.token_ids
        assert [m.finish_reason for m in mine if m.finish_reason] == ["length"] and mine[-1].finish_reason
    assert (msgs[-1].prompt_tokens, msgs[-1].completion_tokens) == (refs[0].prompt_tokens, 3 * MAX_TOKENS)


# -- cancellation frees the engine ------------------------------------------------------------

LONG = {"max_tokens": 240, "ignore_eos": True, "block_size": 1}  # plain AR: hundreds of steps


def test_grpc_cancel_mid_stream_aborts_in_the_engine(app, client):
    generated = []
    for _ in range(3):  # the tiny model can finish all 240 steps before the cancel reaches it; try again
        before = app.wait_idle()
        call = client.generate_stream("Tell me a very long story about two-headed dogs.", **LONG)
        first = next(call)
        assert not first.finish_reason
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.CANCELLED
        after = app.wait_idle(timeout_s=10)  # holds no KV pages
        generated.append(after["num_generated_tokens"] - before["num_generated_tokens"])
        if generated[-1] < LONG["max_tokens"]:
            break
    # aborted: the request stopped short of its budget
    assert generated[-1] < LONG["max_tokens"], f"never aborted early: {generated}"
    assert_good_request_works(client)


def test_http_disconnect_mid_sse_aborts_in_the_engine(app, client):
    before = app.wait_idle()
    body = {"prompt": "Tell me a very long story about two-headed dogs.", "stream": True, **LONG}
    with httpx.Client(base_url=app.http_base, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                    break
    # leaving both blocks closed the connection mid-stream
    after = app.wait_idle(timeout_s=10)
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < LONG["max_tokens"]
    assert_good_request_works(client)


def test_grpc_deadline_aborts_in_the_engine(app):
    before = app.wait_idle()
    with app.client(timeout_s=0.3) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("Tell me a very long story about two-headed dogs.", **LONG)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = app.wait_idle(timeout_s=10)
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < LONG["max_tokens"]


# -- bad input ---------------------------------------------------------------------------------

GRPC_BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1_000_000}, "max_tokens"),
    ({"prompt": "hi", "top_p": 2.0}, "top_p"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "hi", "top_k": -5}, "top_k"),
    ({"prompt": "hi", "block_size": 0}, "block_size"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [VOCAB + 3]}, "stop_token_ids"),
    ({"prompt": "word " * (WINDOW + 10)}, "prompt"),  # over the model's window
    ({"prompt": [1, 2, VOCAB]}, "prompt_token_ids"),
    ({"prompt": [5, -1]}, "prompt_token_ids"),
    ({"prompt": list(range(1, WINDOW + 1))}, "prompt_token_ids"),
    ({"prompt": "hi", "presence_penalty": -2.5}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0.0}, "repetition_penalty"),
    ({"prompt": "hi", "logit_bias": {VOCAB: 1.0}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("kwargs,field", GRPC_BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(GRPC_BAD)])
def test_grpc_bad_input_is_invalid_argument(client, kwargs, field, stream):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as e:
        if stream:
            list(client.generate_stream(prompt, **kwargs))
        else:
            client.generate(prompt, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"{field}:"), e.value.details()
    assert_good_request_works(client)


def test_grpc_prompt_and_token_ids_together_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Generate(pb.GenerateRequest(prompt="hi", prompt_token_ids=[1, 2]), metadata=client.metadata,
                             timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("prompt:")
    assert_good_request_works(client)


def test_grpc_duplicate_running_request_id_is_invalid_argument(app, client):
    """Caught by the engine replica, not the ingress: the error crosses a deployment boundary."""
    call = client.generate_stream("Tell me a very long story.", request_id="dup-1", **LONG)
    try:
        next(call)
        with pytest.raises(grpc.RpcError) as e:
            client.generate("hi", request_id="dup-1", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith("request_id:"), e.value.details()
    finally:
        call.cancel()
    app.wait_idle(timeout_s=10)
    assert_good_request_works(client)


HTTP_BAD = [
    ("completions", {}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": [1, 2, VOCAB + 10]}, "prompt"),
    ("completions", {"prompt": [1, True]}, "prompt"),
    ("completions", {"prompt": "word " * (WINDOW + 10)}, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 10**12}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("completions", {"prompt": "hi", "seed": "x"}, "seed"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "n": 129}, "n"),
    ("completions", {"prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 2}, "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
     "logprobs"),
    ("completions", {"prompt": "", "stream": True}, "prompt"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("completions", b'{"prompt": "caf\xe9 \xff\xfe", "max_tokens": 4}', "body"),  # not UTF-8
    ("completions", b'{"prompt": "hi", "max_tokens": ', "body"),  # malformed JSON
    ("completions", b"", "body"),
    ("completions", b"[1, 2, 3]", "body"),  # JSON, but not an object
    ("chat/completions", b"{'messages': []}", "body"),
]


@pytest.mark.parametrize("path,body,field", HTTP_BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(HTTP_BAD)])
def test_http_bad_input_is_400(http, client, path, body, field):
    if isinstance(body, bytes):
        r = http.post(f"/v1/{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(f"/v1/{path}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:"), err
    assert err["type"] == "invalid_request_error"
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_openai_client_sees_bad_request(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=10**9)
    assert "max_tokens" in str(e.value)
