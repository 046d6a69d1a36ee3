"""Under overload and faults (docs/ARCHITECTURE.md §5), on one application of two engine replicas:
bounded queues shed load with 429 + Retry-After / RESOURCE_EXHAUSTED, the request time limit and a gRPC
client's deadline end a request in the engine (its pages freed), a request the engine fails is a 500 /
INTERNAL / SSE error event with the engine's text, a replica lost before the first token has its request
retried on the other, a broken replica is unroutable and replaced, and a rolling update drains streams.

The replicas serve a real checkpoint with a NaN in its final norm (a corrupt checkpoint): greedy decoding
runs (every logit is NaN; argmax picks token 0), sampling fails in the engine (torch.multinomial refuses
NaN probabilities), so each sampled request is a real engine failure."""

import threading

import grpc
import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.net import wait_for

from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.api.orthrus_pb2_grpc import OrthrusStub
from orthrus_serve.client import call_metadata

APP = "overload"
LIMITS = {"num_replicas": 2, "max_ongoing_requests": 4, "max_queued_requests": 8, "max_waiting_requests": 2,
          "request_timeout_s": 8.0, "health": {"min_failures": 4, "failing_for_s": 0.0, "check_period_s": 1.0}}
ENGINE = {"num_pages": 256, "max_model_len": 512, "max_num_seqs": 1}  # one running request per replica: the rest wait
LONG = {"max_tokens": 450, "ignore_eos": True, "block_size": 1}  # plain AR, past the time limit
SHORT = {"max_tokens": 3, "ignore_eos": True, "block_size": 1}
SAMPLED = {"max_tokens": 3, "temperature": 1.0}  # fails in the engine on this checkpoint


@pytest.fixture(scope="module")
def app(serve_cluster, tmp_path_factory):
    import shutil

    model = tmp_path_factory.mktemp("nan") / "nan-model"
    shutil.copytree(serve_cluster.model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    deployed = serve_cluster.deploy(APP, model=str(model), engine=ENGINE, **LIMITS)
    deployed.wait_healthy(2)
    yield deployed
    serve_cluster.delete(APP)


def in_engines(app) -> int:
    """Requests running or waiting in the replicas' engines."""
    return sum(s["num_running"] + s["num_waiting"] for s in app.routing_stats().values())


def refused(call: "Call") -> bool:
    return call.result is not None and call.result[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def idle_everywhere(app) -> bool:
    """Nothing runs or waits on any replica (an aborted request's pages are freed with it)."""
    return all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in app.routing_stats().values())


class Call(threading.Thread):
    """One gRPC call in a thread: `.result` is ("ok", tokens, finish_reason) or (code, details); `.call`
    (streams) can be cancelled; `.first` is set at the first token or at the end."""

    def __init__(self, app, prompt: str, params: dict, stream: bool = True, timeout_s: float | None = 60):
        super().__init__(daemon=True)
        self.app, self.prompt, self.params, self.stream, self.timeout_s = app, prompt, params, stream, timeout_s
        self.first, self.result, self.call = threading.Event(), None, None
        self.start()

    def run(self) -> None:
        with grpc.insecure_channel(self.app.grpc_address) as ch:
            stub, md = OrthrusStub(ch), call_metadata(self.app.name, None)
            req = pb.GenerateRequest(prompt=self.prompt, **self.params)
            try:
                if self.stream:
                    self.call = stub.GenerateStream(req, metadata=md, timeout=self.timeout_s)
                    n, last = 0, None
                    for last in self.call:
                        n += len(last.token_ids)
                        self.first.set()
                    self.result = ("ok", n, last.finish_reason if last else None)
                else:
                    r = stub.Generate(req, metadata=md, timeout=self.timeout_s)
                    self.result = ("ok", r.completion_tokens, r.finish_reason)
            except grpc.RpcError as e:
                self.result = (e.code(), e.details())
            finally:
                self.first.set()


def test_full_queues_shed_load_with_429_and_resource_exhausted_and_the_time_limit_ends_requests(app):
    # each replica runs one long request and holds two waiting ones (max_waiting_requests): 6 accepted. The
    # router may send a third to one replica before its stats show it full (refused): send another instead.
    longs = [Call(app, f"long {i}", LONG) for i in range(6)]
    for extra in range(4):
        wait_for(lambda: in_engines(app) == 6 or any(map(refused, longs)), 30,
                 lambda: f"6 requests in the engines: {app.routing_stats()}, {[c.result for c in longs]}")
        if not any(map(refused, longs)):
            break
        longs = [c for c in longs if not refused(c)] + [Call(app, f"long again {extra}", LONG)]
    wait_for(lambda: in_engines(app) == 6, 30, lambda: f"6 requests in the engines: {app.routing_stats()}")
    # past the bounds: answered at once (the long ones still run), never a 500, never a wait
    with httpx.Client(base_url=app.http_base, timeout=60) as h:
        shed = [h.post("/v1/completions", json={"prompt": f"more {i}", **LONG}) for i in range(3)]
        shed.append(h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "stream": True, **LONG}))
    grpc_shed = Call(app, "one more", LONG, stream=False)
    grpc_shed.join(30)
    for r in shed:
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "capacity" in r.json()["error"]["message"]
    assert grpc_shed.result[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, grpc_shed.result
    # the accepted ones finish or end at the 8 s limit (the last in each queue waits for two before it: 1350
    # tokens on one replica's CPU share), in the engine too
    for c in longs:
        c.join(30)
    timed_out = [c.result for c in longs if c.result[0] == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(timed_out) >= 2 and all("request_timeout_s" in r[1] for r in timed_out), [c.result for c in longs]
    assert all(c.result == ("ok", 450, "length") for c in longs if c.result not in timed_out)
    wait_for(lambda: idle_everywhere(app), 20, "idle engines")


def test_a_grpc_deadline_aborts_the_request_in_the_engine(app):
    c = Call(app, "deadline", LONG, timeout_s=1.0)
    c.join(30)
    assert c.result[0] == grpc.StatusCode.DEADLINE_EXCEEDED, c.result
    wait_for(lambda: idle_everywhere(app), 20, "the request aborted in the engine, its pages freed")


def test_a_request_the_engine_failed_is_500_internal_or_an_sse_error_event(app):
    with httpx.Client(base_url=app.http_base, timeout=60) as h:
        r = h.post("/v1/completions", json={"prompt": "sample", **SAMPLED})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "probability tensor" in error["message"], error
        events = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "sample"}],
                                                      "stream": True, **SAMPLED})
        assert events.status_code == 500, events.text  # it failed before its first token: a status
    c = Call(app, "sample", SAMPLED, stream=False)
    c.join(30)
    code, details = c.result
    assert code == grpc.StatusCode.INTERNAL and "probability tensor" in details, c.result
    assert "Traceback" not in details and "\n" not in details
    assert app.engine_handle().stats.remote().result(timeout_s=30)  # the replicas still serve


def test_a_request_whose_replica_died_before_its_first_token_is_retried_on_another(app):
    app.wait_healthy(2)
    longs = [Call(app, f"hold {i}", {**LONG, "max_tokens": 200}) for i in range(2)]
    for c in longs:
        assert c.first.wait(30)
    shorts = [Call(app, f"short {i}", SHORT, stream=False) for i in range(2)]
    waiting: dict = {}

    def queued():
        nonlocal waiting
        waiting = {r: s for r, s in app.routing_stats().items() if s["num_waiting"]}
        return sum(s["num_waiting"] for s in waiting.values()) == 2

    wait_for(queued, 30, "two requests waiting for a slot")
    app.kill_replica(next(iter(waiting)))
    for c in longs:  # the survivor's slot frees; the killed replica's stream fails
        c.call.cancel()
    for c in shorts:
        c.join(30)
    assert [c.result for c in shorts] == [("ok", 3, "length")] * 2
    app.wait_healthy(2)


def test_a_broken_replica_is_unroutable_then_replaced(app):
    before = app.replica_ids()
    broken: dict = {}

    def one_broken():
        nonlocal broken
        with app.client() as c:
            try:
                c.generate("sample", **SAMPLED)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INTERNAL
        broken = {r for r, s in app.routing_stats().items() if not s["routable"]}
        return bool(broken)

    wait_for(one_broken, 30, "a replica past 4 failures in a row")
    victim = next(iter(broken))
    assert victim in before
    wait_for(lambda: victim not in app.replica_ids(), 30, "Serve to replace the unhealthy replica")
    app.wait_healthy(2)


def test_a_rolling_update_lets_in_flight_streams_finish(app, serve_cluster):
    from ray import serve

    from orthrus_serve.app import build_app

    streams = [Call(app, f"drain {i}", {**SHORT, "max_tokens": 40}) for i in range(2)]
    for c in streams:
        assert c.first.wait(30)
    cfg = {**app.config, "health": {**LIMITS["health"], "min_failures": 5}}  # new arguments: new replicas
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}")
    for c in streams:
        c.join(30)
    assert [c.result for c in streams] == [("ok", 40, "length")] * 2
