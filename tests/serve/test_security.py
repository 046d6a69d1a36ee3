"""Production hardening on a real local cluster: the API key on HTTP (httpx, the OpenAI client) and
gRPC (grpcio, our clients, `orthrus-serve bench`), kept out of the Serve config and the logs; the
open health checks (`/health`, grpc.health.v1 Health/Check); and where each port listens."""

import ipaddress
import os
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from serve_helpers import API_KEY_ENV

from orthrus_serve import grpc_health
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.api.orthrus_pb2_grpc import OrthrusStub

pytestmark = pytest.mark.slow

APP = "secured"
PROMPT = "The capital of France is"
API_CALLS = [("post", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
             ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
             ("get", "/v1/models", None), ("get", "/version", None), ("post", "/tokenize", {"prompt": PROMPT}),
             ("post", "/detokenize", {"tokens": [1, 2]})]


@pytest.fixture(scope="module")
def app(serve_cluster):
    serve_cluster.delete("basic")  # the probe without metadata reaches the only application
    deployed = serve_cluster.deploy(APP, api_key_env=API_KEY_ENV)
    yield deployed
    serve_cluster.delete(APP)


@pytest.fixture(scope="module")
def key() -> str:
    return os.environ[API_KEY_ENV]


@pytest.fixture(scope="module")
def channel(app):
    with grpc.insecure_channel(app.grpc_address) as ch:
        yield ch


def call_http(app, method: str, path: str, body, headers: dict) -> httpx.Response:
    return httpx.request(method, app.http_base + path, json=body, headers=headers, timeout=60)


# -- HTTP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", API_CALLS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic {key}", "Bearer", "{key}"])
def test_http_without_the_key_is_401_in_openai_shape(app, key, method, path, body, authorization):
    headers = {"Authorization": authorization.format(key=key)} if authorization else {}
    r = call_http(app, method, path, body, headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert key not in r.text


@pytest.mark.parametrize("method, path, body", API_CALLS)
def test_http_with_the_key_works(app, key, method, path, body):
    r = call_http(app, method, path, body, {"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert r.json().keys() & {"object", "version", "tokens", "prompt"}


def test_openai_client(app, key):
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=f"{app.http_base}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny-orthrus", prompt=PROMPT, max_tokens=2)
    right = openai.OpenAI(base_url=f"{app.http_base}/v1", api_key=key, max_retries=0, timeout=60)
    assert right.completions.create(model="tiny-orthrus", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_http_health_is_open(app):
    r = httpx.get(app.http_base + "/health", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["engine_replicas"] == 1


# -- gRPC -----------------------------------------------------------------------------------------


def grpc_calls(channel, metadata):
    stub = OrthrusStub(channel)
    req = pb.GenerateRequest(prompt=PROMPT, max_tokens=2)
    return [lambda: stub.Generate(req, metadata=metadata, timeout=60),
            lambda: list(stub.GenerateStream(req, metadata=metadata, timeout=60)),
            lambda: stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=60)]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic {key}"])
def test_grpc_without_the_key_is_unauthenticated(channel, key, authorization):
    metadata = (("application", APP),) + ((("authorization", authorization.format(key=key)),) if authorization else ())
    for call in grpc_calls(channel, metadata):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()


def test_grpc_with_the_key_works(channel, key, app, monkeypatch):
    generate, stream, info = grpc_calls(channel, (("application", APP), ("authorization", f"Bearer {key}")))
    assert generate().completion_tokens == 2
    assert sum(len(m.token_ids) for m in stream()) == 2
    assert info().model == "tiny-orthrus"
    from orthrus_serve.client import OrthrusClient

    with OrthrusClient(app.grpc_address, application=APP, api_key=key) as c:  # the key given
        assert c.generate(PROMPT, max_tokens=2).completion_tokens == 2
    monkeypatch.setenv("ORTHRUS_API_KEY", key)
    with OrthrusClient(app.grpc_address, application=APP) as c:  # the key from $ORTHRUS_API_KEY
        assert c.generate(PROMPT, max_tokens=2).completion_tokens == 2


def test_grpc_health_check_is_open(channel, app):
    from ray import serve

    assert grpc_health.check(channel, metadata=(("application", APP),)) == grpc_health.SERVING
    assert grpc_health.check(channel, "orthrus.v1.Orthrus", (("application", APP),)) == grpc_health.SERVING
    with pytest.raises(grpc.RpcError) as e:
        grpc_health.check(channel, "no.such.Service", (("application", APP),))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # A probe sends no metadata at all: Ray's proxy routes it when the cluster serves one application.
    assert list(serve.status().applications) == [APP], "another module left its application deployed"
    assert grpc_health.check(channel) == grpc_health.SERVING


# -- the key stays secret; the bench client ---------------------------------------------------------


def test_bench_sends_the_key_and_does_not_write_it(app, key, tmp_path):
    from orthrus_serve.cli import main

    out = tmp_path / "bench.json"
    common = ["bench", "--num-requests", "2", "--concurrency", "2", "--max-tokens", "2", "--json", str(out)]
    assert main(common + ["--address", app.grpc_address, "--application", APP, "--api-key", key]) == 0
    assert main(common + ["--http", app.http_base, "--api-key", key]) == 0
    assert key not in out.read_text()
    assert main(common + ["--http", app.http_base, "--api-key", "wrong"]) == 1  # every request failed


def test_key_is_in_no_serve_config_or_log(app, key):
    """After all the calls above (right and wrong keys), the key appears nowhere Ray records things."""
    import ray
    from ray.serve.context import _get_global_client

    assert key not in str(_get_global_client().get_serve_details())
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    found = [p.name for p in logs.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert found == []


# -- where the ports listen -------------------------------------------------------------------------


def listening(port: int) -> set[str]:
    """The addresses listening on `port`; IPv4-mapped IPv6 as IPv4 (gRPC binds 127.0.0.1 on an IPv6 socket)."""
    ips = {ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections(kind="inet")
           if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return {str(getattr(ip, "ipv4_mapped", None) or ip) for ip in ips}


def test_http_and_grpc_listen_only_on_the_configured_host(app, channel):
    """Both bind the host (127.0.0.1 here): gRPC through orthrus_serve.grpc_bind, which the test cluster's Ray
    job runs as `orthrus-serve up`'s does (Ray Serve 2.60's own gRPC proxy binds "[::]", every interface)."""
    assert listening(app.cluster.http_port) == {"127.0.0.1"}
    assert listening(app.cluster.grpc_port) == {"127.0.0.1"}
    assert grpc_health.check(channel, metadata=(("application", APP),)) == grpc_health.SERVING  # on 127.0.0.1
