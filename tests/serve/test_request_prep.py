"""What the ingress does once per request, without Ray: the tokenizer it loads, the sampling params it
checks (into the SamplingParams object the replica uses as is), and the one mapping of the counters
into gRPC responses and OpenAI's usage object."""

import pytest

from orthrus_engines import OrthrusInputError, RequestOutput, SamplingParams
from orthrus_engines.outputs import COUNTERS
from orthrus_serve import grpc_api
from orthrus_serve import openai_api as oai
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.config import InputLimits
from orthrus_serve.request_prep import RequestPreparer, sampling_params

VOCAB = 49152


@pytest.fixture(scope="module")
def preparer(tiny_model_dir, tmp_path_factory):
    """Model facts as a replica reports them, its tokenizer in a directory other than the model's."""
    info = {"model": str(tmp_path_factory.mktemp("no-tokenizer")), "tokenizer": str(tiny_model_dir),
            "vocab_size": VOCAB, "max_model_len": 64, "page_size": 4, "prefix_fingerprint": "f"}
    return RequestPreparer(info)


def test_the_tokenizer_comes_from_the_directory_model_info_names(preparer):
    ids = preparer.inputs.text_ids("The capital of France is")
    assert ids and preparer.inputs.tokenizer.decode(ids) == "The capital of France is"
    assert preparer.inputs.chat_ids([{"role": "user", "content": "hi"}])


def test_prepare_checks_params_once_into_sampling_params(preparer):
    req = preparer.prepare(list(range(1, 10)), {"max_tokens": 3, "stop": "x", "temperature": 0.5}, "rid")
    assert isinstance(req.params, SamplingParams)
    assert (req.params.max_tokens, req.params.stop, req.params.temperature) == (3, ["x"], 0.5)
    assert req.request_id == "rid" and len(req.page_hashes) == 2  # 8 cacheable tokens, pages of 4
    assert preparer.prepare([1, 2], {}).request_id  # one is made up


@pytest.mark.parametrize("fields,field", [({"max_tokens": 3, "bogus": 1}, "bogus"), ({"top_p": 2.0}, "top_p"),
                                          ({"max_tokens": 60}, "max_tokens"), ({"stop_token_ids": [VOCAB]},
                                                                                 "stop_token_ids")])
def test_bad_params_name_the_field(preparer, fields, field):
    with pytest.raises(OrthrusInputError) as e:
        preparer.prepare(list(range(1, 10)), fields)
    assert e.value.field == field


def test_sampling_params_names_an_unknown_field():
    with pytest.raises(OrthrusInputError) as e:
        sampling_params({"temperature": 0.0, "beam_width": 4})
    assert e.value.field == "beam_width"


def _output() -> RequestOutput:
    return RequestOutput("r", [5], "a", finished=True, finish_reason="length",
                         **{name: i + 1 for i, name in enumerate(COUNTERS)})


def test_grpc_responses_carry_every_counter():
    msg = pb.GenerateResponse()
    grpc_api.copy_counters(msg, _output())
    assert {name: getattr(msg, name) for name in COUNTERS} == _output().counters()
    assert msg.finish_reason == "length"


def test_openai_usage_of_the_counters():
    counters = _output().counters()
    usage = oai.usage(counters)
    assert usage["prompt_tokens"] == counters["prompt_tokens"]
    assert usage["completion_tokens"] == counters["completion_tokens"]
    assert usage["total_tokens"] == counters["prompt_tokens"] + counters["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": counters["cached_prompt_tokens"]}
    assert usage["orthrus"] == {name: counters[name] for name in ("forward_passes", "drafted_tokens",
                                                                  "accepted_tokens")}
    assert oai.usage_counters(usage) == counters  # what a client (the bench) reads back


def test_detokenize_any_length_in_the_vocabulary(preparer):
    ids = preparer.inputs.text_ids("The capital of France is")
    assert preparer.detokenize(ids) == "The capital of France is"
    assert preparer.detokenize(ids * 20)  # longer than the window (64): an output may be
    assert preparer.detokenize([]) == ""
    for bad in ([VOCAB], [1, -1], "hi", [1.5], None):
        with pytest.raises(OrthrusInputError) as e:
            preparer.detokenize(bad)
        assert e.value.field == "tokens"


@pytest.mark.parametrize("fields,field", [
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"use_diffusion": 0}, "use_diffusion"),
    ({"temperature": float("inf")}, "temperature"), ({"top_p": float("nan")}, "top_p"), ({"seed": 2**64}, "seed"),
    ({"stop": ["s"] * 3}, "stop"), ({"stop": ["long"]}, "stop"), ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids")])
def test_sampling_fields_past_the_limits_are_named(fields, field):
    limits = InputLimits(max_stop_strings=2, max_stop_string_chars=3, max_stop_token_ids=2)
    with pytest.raises(OrthrusInputError) as e:
        sampling_params(fields, limits)
    assert e.value.field == field
    assert sampling_params({"stop": ["abc"] * 2, "stop_token_ids": [1, 2], "seed": -(2**63)}, limits)


def test_fastapi_validation_errors_have_the_openai_shape():
    """The ingress takes raw bodies, so FastAPI validates nothing of its own yet; a route that does gets 400."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from orthrus_serve.http_guard import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/items/{n}")
    def item(n: int):
        return {"n": n}

    with TestClient(app) as c:
        r = c.get("/items/x")
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert c.get("/nothing").json()["error"]["type"] == "invalid_request_error"


def test_grpc_service_registers_every_rpc_unparsed():
    """grpc_service stands in for the generated servicer function: every rpc of the proto, each with its
    streaming kind, the request passed on as bytes; a request already parsed (a Serve config naming the generated
    function) passes grpc_api.parse as it is."""
    from orthrus_serve import grpc_service
    from orthrus_serve.api.orthrus_pb2_grpc import OrthrusServicer

    class Server:
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.service, self.handlers = service, handlers

    server = Server()
    grpc_service.add_OrthrusServicer_to_server(OrthrusServicer(), server)
    methods = pb.DESCRIPTOR.services_by_name["Orthrus"].methods
    assert server.service == "orthrus.v1.Orthrus" and set(server.handlers) == {m.name for m in methods}
    for m in methods:
        h = server.handlers[m.name]
        assert h.request_deserializer is None and (h.response_streaming, h.request_streaming) == (
            m.server_streaming, m.client_streaming)
    request = pb.GenerateRequest(prompt="hi")
    assert grpc_api.parse(pb.GenerateRequest, request) is request
