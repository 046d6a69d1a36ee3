"""Hostile input on a real local cluster (application "hostile"): every field at and past its limits gets a 400 /
INVALID_ARGUMENT naming it, a body past limits.max_request_bytes a 413, every HTTP error OpenAI's error shape,
and the server keeps serving: a normal request after each, and a stream that keeps flowing while a huge prompt
is tokenized (the ingress tokenizes off its event loop)."""

import json
import threading
import time

import grpc
import pytest
from serve_helpers import ENGINE_ARGS

from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.config import InputLimits

pytestmark = pytest.mark.slow

VOCAB = 49152
WINDOW = ENGINE_ARGS["max_model_len"]
LIMITS = InputLimits()  # the defaults, as deployed
PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "Name a colour."}]
INT64 = 1 << 63


@pytest.fixture(scope="module")
def app(basic_app):
    return basic_app


def assert_error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err


def post_raw(http, path: str, raw: str | bytes):
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def still_serves(http) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


# -- HTTP: each field past its limits is named ---------------------------------------------------------

TOO_MANY_STOPS = [f"s{i}" for i in range(LIMITS.max_stop_strings + 1)]
BAD_SAMPLING = [  # (field, value): each on /v1/completions and /v1/chat/completions
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", WINDOW), ("max_tokens", INT64), ("max_tokens", 1 << 64),
    ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", True), ("seed", INT64), ("seed", -INT64 - 1),
    ("seed", "1"), ("seed", 0.5), ("top_k", -2), ("top_k", 1 << 64), ("top_k", "x"), ("temperature", -1),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("block_size", 0), ("block_size", 1 << 70),
    ("stop", TOO_MANY_STOPS), ("stop", "x" * (LIMITS.max_stop_string_chars + 1)), ("stop", [""]), ("stop", [1]),
    ("stop", {"a": 1}), ("stop_token_ids", list(range(LIMITS.max_stop_token_ids + 1))), ("stop_token_ids", [-1]),
    ("stop_token_ids", [VOCAB]), ("stop_token_ids", "1"), ("ignore_eos", "yes"), ("ignore_eos", 1),
    ("use_diffusion", "false"), ("n", 0), ("n", -1), ("n", "1"), ("logprobs", -1), ("user", 5), ("model", 5),
    ("stream", "yes"), ("stream_options", [1])]


@pytest.mark.parametrize("path,base", [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                                {"messages": USER})])
def test_each_bad_sampling_field_is_named(http, path, base):
    for field, value in BAD_SAMPLING:
        err = assert_error(http.post(path, json={**base, field: value}), 400, field)
        assert field in err["message"], (field, value, err)
    still_serves(http)


BAD_BODIES = [  # (raw JSON body, the field named): what only raw JSON can carry
    ('{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),  # a lone surrogate: valid JSON, not Unicode
    ('{"prompt": ["\\udfff"], "max_tokens": 1}', "prompt[0]"),
    ('{"prompt": "hi", "stop": ["ok", "\\ud83d"]}', "stop[1]"),
    ('{"prompt": "hi", "user": "\\udc00"}', "user"),
    ('{"prompt": "hi", "\\ud800": 1}', "body"),
    ('{"prompt": "hi", "temperature": NaN}', "body"), ('{"prompt": "hi", "temperature": Infinity}', "body"),
    ('{"prompt": "hi", "temperature": 1e999}', "temperature"),
    ('{"prompt": "hi", "seed": 1' + "0" * 5000 + "}", "body"),  # past Python's int digits
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "body"),  # past the parser's recursion
    ('{"prompt": [1, 2, 18446744073709551616]}', "prompt[2]"),
    ('{"prompt": "hi"', "body"), ("[1, 2]", "body"), (b'{"prompt": "\xff\xfe"}', "body"),
]


def test_raw_bodies_are_refused_by_name(http):
    for raw, field in BAD_BODIES:
        for path in ("/v1/completions", "/tokenize"):
            assert_error(post_raw(http, path, raw), 400, field)
    err = assert_error(post_raw(http, "/v1/chat/completions", '{"messages": [{"role": "user", "content": '
                                                             '"hi \\ud800"}]}'), 400, "messages[0].content")
    assert "surrogate" in err["message"]
    # A surrogate pair is one character (an emoji): valid.
    r = post_raw(http, "/v1/completions", '{"prompt": "hi \\ud83d\\ude00", "max_tokens": 1}')
    assert r.status_code == 200, r.text
    still_serves(http)


def test_prompts_past_the_window_are_named(http):
    long_text = "word " * (2 * WINDOW)
    for path, body, field in [("/v1/completions", {"prompt": long_text}, "prompt"),
                              ("/v1/completions", {"prompt": [1] * WINDOW}, "prompt"),
                              ("/v1/completions", {"prompt": [VOCAB]}, "prompt"),
                              ("/v1/completions", {"prompt": [-1]}, "prompt"),
                              ("/v1/completions", {"prompt": ""}, "prompt"),
                              ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]},
                               "messages"),
                              ("/tokenize", {"prompt": long_text * 4}, "prompt"),
                              ("/detokenize", {"tokens": [VOCAB]}, "tokens")]:
        assert_error(http.post(path, json=body), 400, field)
    still_serves(http)


def test_a_body_past_the_limit_is_413(http):
    big = json.dumps({"prompt": "x" * LIMITS.max_request_bytes}).encode()
    err = assert_error(post_raw(http, "/v1/completions", big), 413, "body")
    assert str(LIMITS.max_request_bytes) in err["message"] and err["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies to what arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    assert_error(http.post("/v1/chat/completions", content=chunked()), 413, "body")
    # At the limit, the body is read and checked (max_tokens 0: refused after parsing, cheaply).
    at_limit = json.dumps({"prompt": "hi", "max_tokens": 0, "user": "u" * (LIMITS.max_request_bytes - 64)}).encode()
    assert len(at_limit) <= LIMITS.max_request_bytes
    assert_error(post_raw(http, "/v1/completions", at_limit), 400, "max_tokens")
    still_serves(http)


def test_every_http_error_has_the_openai_shape(http):
    assert_error(http.post("/v1/nothing-here", json={}), 404, None)
    assert_error(http.get("/v1/completions"), 405, None)
    assert_error(http.delete("/v1/chat/completions"), 405, None)
    assert_error(http.put("/tokenize", json={}), 405, None)


# -- gRPC ------------------------------------------------------------------------------------------------

BAD_GRPC = [  # (GenerateRequest fields, the field named)
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2**31 - 1}, "max_tokens"),
    ({"top_k": -(2**31)}, "top_k"), ({"block_size": -1}, "block_size"), ({"stop": TOO_MANY_STOPS}, "stop"),
    ({"stop": ["y" * (LIMITS.max_stop_string_chars + 1)]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": list(range(LIMITS.max_stop_token_ids + 1))}, "stop_token_ids"),
    ({"stop_token_ids": [-(2**31)]}, "stop_token_ids"),
]


def test_grpc_fields_past_their_limits_are_named(client):
    for params, field in BAD_GRPC:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, **params)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(f"{field}:"), \
            (params, e.value.details())
    for prompt, field in [("word " * (2 * WINDOW), "prompt"), ([1] * WINDOW, "prompt_token_ids"),
                          ([VOCAB], "prompt_token_ids"), ([-1], "prompt_token_ids"), ("", "prompt")]:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(prompt, max_tokens=1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(f"{field}:")
    # The 64-bit seed at both ends is valid.
    for seed in (-INT64, INT64 - 1):
        assert client.generate(PROMPT, max_tokens=2, temperature=1.0, seed=seed).completion_tokens == 2


def call_raw(client, path: str, payload: bytes, stream: bool = False):
    """`path` called with `payload` as the serialized request, as a hand-built message arrives."""
    rpc = client.channel.unary_stream if stream else client.channel.unary_unary
    call = rpc(path, request_serializer=None, response_deserializer=None)  # bytes in, bytes out
    result = call(payload, metadata=client.metadata, timeout=60)
    return list(result) if stream else result


VALID = pb.GenerateRequest(prompt=PROMPT, max_tokens=2).SerializeToString()
BAD_MESSAGES = [  # (serialized request, the field named): what protobuf's own serializer never writes
    (b"\x12\x04caf\xe9" + b"\x20\x02", "prompt"),  # field 2, then max_tokens = 2
    (VALID + b"\x4a\x02ok" + b"\x4a\x02\xff\xfe", "stop[1]"),  # field 9, repeated
    (VALID + b"\x82\x02\x01\x80", "guided_regex"),  # field 32 (a two-byte tag)
    (b"\x12\x10short", "request"), (b"\xff\xff\xff", "request"),  # not protobuf: past the end, a bad tag
]


def test_grpc_messages_that_do_not_parse_are_named(client):
    """A request message protobuf does not parse (a string field that is not UTF-8, bytes that are not protobuf)
    is INVALID_ARGUMENT naming the field, on every method; the server keeps serving."""
    for payload, field in BAD_MESSAGES:
        for method in ("Generate", "GenerateStream"):
            with pytest.raises(grpc.RpcError) as e:
                call_raw(client, f"/orthrus.v1.Orthrus/{method}", payload, stream=method == "GenerateStream")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(f"{field}:"), \
                (method, payload, e.value.code(), e.value.details())
    for path, payload, field in [("/orthrus.v1.Orthrus/ModelInfo", b"\xff", "request"),
                                 ("/grpc.health.v1.Health/Check", b"\x0a\x02\xff\xfe", "service")]:
        with pytest.raises(grpc.RpcError) as e:
            call_raw(client, path, payload)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(f"{field}:"), \
            (path, e.value.code(), e.value.details())
    served = pb.GenerateResponse.FromString(call_raw(client, "/orthrus.v1.Orthrus/Generate", VALID))
    assert served.completion_tokens == 2
    assert client.generate(PROMPT, max_tokens=2).completion_tokens == 2


# -- one huge prompt does not stall the other streams ---------------------------------------------------


def test_a_huge_prompt_does_not_stall_other_streams(app, http):
    """While the ingress tokenizes a prompt of ~2 MB (seconds of work; then refused: past the window), small
    streams keep flowing: no gap between their chunks as long as half the huge request. Tokenizing on the
    event loop stops every stream of the ingress for the whole tokenization."""
    import httpx

    huge = "Tell me a story about two-headed dogs. " * (2_000_000 // 40)
    assert len(json.dumps({"prompt": huge})) < LIMITS.max_request_bytes
    chunk_times: list[float] = []
    stop = threading.Event()

    def small_streams():
        with httpx.Client(base_url=app.http_base, timeout=60) as h:
            while not stop.is_set():
                body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True}
                with h.stream("POST", "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        chunk_times.append(time.monotonic())

    streamer = threading.Thread(target=small_streams, daemon=True)
    streamer.start()
    while len(chunk_times) < 10:  # flowing before the huge prompt is sent
        time.sleep(0.01)
    start = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": huge, "max_tokens": 1})
    end = time.monotonic()
    stop.set()
    streamer.join(timeout=60)
    assert_error(r, 400, "prompt")
    during = [start] + [t for t in chunk_times if start < t < end] + [end]
    longest_gap = max(b - a for a, b in zip(during, during[1:]))
    assert longest_gap < (end - start) / 2, (longest_gap, end - start, len(during) - 2)
    still_serves(http)
