"""TLS on every path a client or a replica takes, against real servers with a throwaway CA
(tls_certs.py): HTTPS from Ray Serve's own HTTP server with the options `orthrus-serve up` passes;
gRPC from our clients and `orthrus-serve generate` to a grpcio server with TLS (as the gateway in
front of Ray's gRPC proxy presents it); the prefix index to a redis-server with TLS."""

import asyncio
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from redis_server import new_redis_server
from support.net import free_port
from tls_certs import make_tls_files

from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.api.orthrus_pb2_grpc import OrthrusServicer, add_OrthrusServicer_to_server
from orthrus_serve.cli import build_parser, main, serve_start_options, up_config
from orthrus_serve.client import AsyncOrthrusClient, OrthrusClient
from orthrus_serve.config import IndexSettings, ServeConfig
from orthrus_serve.redis_prefix_index import RedisPrefixIndex, redis_connection_kwargs


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second CA that signed nothing the servers present."""
    return make_tls_files(tmp_path_factory.mktemp("other-tls"), ca_name="another CA").ca


# -- gRPC ------------------------------------------------------------------------------------------
class EchoOrthrus(OrthrusServicer):
    """The Orthrus service from the committed stubs, answering from the request alone."""

    def __init__(self):
        self.metadata: list[dict] = []

    def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.GenerateResponse(text=f"echo: {request.prompt}", finish_reason="stop", completion_tokens=2)

    def GenerateStream(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        yield pb.GenerateResponse(text="echo: ")
        yield pb.GenerateResponse(text=request.prompt, finish_reason="stop")

    def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(model="echo")


@pytest.fixture(scope="module")
def grpc_tls_server(tls):
    servicer = EchoOrthrus()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    add_OrthrusServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(tls.key.read_bytes(),
                                                                                tls.cert.read_bytes())]))
    server.start()
    yield f"localhost:{port}", servicer
    server.stop(None)


def test_sync_client_over_tls(grpc_tls_server, tls):
    address, servicer = grpc_tls_server
    with OrthrusClient(address, application="app1", api_key="k1", ca_file=str(tls.ca), timeout_s=10) as client:
        assert client.generate("hi").text == "echo: hi"
        assert "".join(d.text for d in client.generate_stream("there")) == "echo: there"
        assert client.model_info().model == "echo"
    assert servicer.metadata[-1]["application"] == "app1" and servicer.metadata[-1]["authorization"] == "Bearer k1"


def test_async_client_over_tls(grpc_tls_server, tls):
    address, _ = grpc_tls_server

    async def calls():
        client = AsyncOrthrusClient(address, api_key="k", ca_file=str(tls.ca), timeout_s=10)
        try:
            unary = (await client.generate("a")).text
            streamed = "".join([d.text async for d in client.generate_stream("b")])
        finally:
            await client.close()
        return unary, streamed

    assert asyncio.run(calls()) == ("echo: a", "echo: b")


def test_generate_command_over_tls(grpc_tls_server, tls, capsys):
    address, _ = grpc_tls_server
    assert main(["generate", "hello", "--address", address, "--ca-file", str(tls.ca), "--api-key", "k"]) == 0
    assert capsys.readouterr().out.strip() == "echo: hello"


@pytest.mark.parametrize("client_tls", ["plaintext", "another CA", "system roots"])
def test_clients_refuse_what_they_cannot_verify(grpc_tls_server, other_ca, client_tls):
    """A plaintext client gets no answer from a TLS server; a TLS client trusts only its roots."""
    address, _ = grpc_tls_server
    kwargs = {"plaintext": {}, "another CA": {"ca_file": str(other_ca)}, "system roots": {"tls": True}}[client_tls]
    with OrthrusClient(address, timeout_s=5, **kwargs) as client, pytest.raises(grpc.RpcError) as e:
        client.generate("hi")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_flags_of_generate():
    args = build_parser().parse_args(["generate", "x", "--ca-file", "ca.pem"])
    assert (args.tls, args.ca_file) == (False, "ca.pem")
    assert build_parser().parse_args(["generate", "x", "--tls"]).tls is True


# -- HTTPS (Ray Serve's HTTP proxy) ----------------------------------------------------------------
async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def https_server(tls):
    """Ray Serve's own HTTP server start-up (what each HTTP proxy runs), with the HTTPOptions that
    `orthrus-serve up --ssl-certfile ... --ssl-keyfile ...` passes to serve.start."""
    from ray.serve._private.http_util import start_asgi_http_server

    args = build_parser().parse_args(["up", "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
                                      "--http-port", str(free_port())])
    cfg = up_config(args)
    options = serve_start_options(cfg)["http_options"]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    task, server = asyncio.run_coroutine_threadsafe(start_asgi_http_server(_ok_app, options, event_loop=loop),
                                                 loop).result(timeout=10)
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"{cfg.host}:{cfg.http_port}"
    server.should_exit = True

    async def finished():
        await task

    asyncio.run_coroutine_threadsafe(finished(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_https_with_the_ca_works(https_server, tls):
    r = httpx.get(f"https://{https_server}/v1/models", verify=str(tls.ca), timeout=10)
    assert (r.status_code, r.text) == (200, "ok")


def test_https_is_refused_without_trust_and_plain_http_gets_no_answer(https_server, other_ca):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{https_server}/", verify=str(other_ca), timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{https_server}/", timeout=10)


def test_up_needs_the_certificate_and_the_key_together(tls):
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile"):
        up_config(build_parser().parse_args(["up", "--ssl-certfile", str(tls.cert)]))
    plain = serve_start_options(ServeConfig())["http_options"]
    assert plain.ssl_certfile is None and plain.ssl_keyfile is None


# -- Redis (the prefix index) ----------------------------------------------------------------------
def test_redis_connection_kwargs(tls):
    import redis

    kw = redis_connection_kwargs("rediss://r:6380/1", "pw", str(tls.ca), 0.5)
    assert (kw["ssl_ca_certs"], kw["ssl_cert_reqs"], kw["ssl_check_hostname"]) == (str(tls.ca), "required", True)
    assert (kw["password"], kw["socket_timeout"], kw["socket_connect_timeout"]) == ("pw", 0.5, 0.5)
    pool = redis.Redis.from_url("rediss://r:6380/1", **kw).connection_pool
    assert pool.connection_class is redis.SSLConnection and pool.connection_kwargs["ssl_ca_certs"] == str(tls.ca)
    assert redis_connection_kwargs("rediss://r:6380/1", None, None, 0.5)["ssl_ca_certs"] is None  # system roots
    plain = redis_connection_kwargs("redis://r:6379/1", None, None, 0.5)
    assert not any(k.startswith("ssl_") for k in plain)
    assert redis.Redis.from_url("redis://r:6379/1", **plain).connection_pool.connection_class is redis.Connection
    with pytest.raises(ValueError, match="rediss://"):
        redis_connection_kwargs("redis://r:6379/1", None, str(tls.ca), 0.5)


def test_index_settings_take_a_ca_file_only_with_rediss(tls):
    assert IndexSettings(redis_url="rediss://r:6380/1", redis_ca_file=str(tls.ca)).redis_ca_file == str(tls.ca)
    for url in ("redis://r:6379/1", None):
        with pytest.raises(ValueError, match="rediss://"):
            IndexSettings(redis_url=url, redis_ca_file=str(tls.ca))


@pytest.fixture(scope="module")
def tls_redis(tls):
    """redis-server with TLS only (no plaintext port), clients need not present a certificate."""
    server = new_redis_server()  # fails (or skips, when allowed) without a redis-server binary
    proc = subprocess.Popen([server.binary, "--port", "0", "--tls-port", str(server.port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                             "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no", "--dir", server.dir,
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=server.dir)
    url = f"rediss://localhost:{server.port}/0"
    import redis

    probe = redis.Redis.from_url(url, ssl_ca_certs=str(tls.ca), socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.fail(f"redis-server with TLS exited: {proc.stderr.read().decode()[-500:]}")
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    server.close()


def test_prefix_index_over_tls_redis(tls_redis, tls):
    index = RedisPrefixIndex.from_env(tls_redis, "tls-test", heartbeat_timeout_s=5.0, ca_file=str(tls.ca))
    assert isinstance(index, RedisPrefixIndex)
    index.heartbeat("r1")
    index.publish("r1", [("stored", ["a", "b"])])
    assert index.lookup(["a", "b", "c"]) == {"r1": 2}
    index.close()


def test_prefix_index_does_not_trust_another_ca(tls_redis, other_ca):
    """Certificate verification is on: an index trusting another CA reaches nothing (and, by its
    failure model, routes by load: lookups return {})."""
    import redis

    index = RedisPrefixIndex(tls_redis, "tls-test-2", heartbeat_timeout_s=5.0, ca_file=str(other_ca),
                             retry_interval_s=0.0)
    index.heartbeat("r1")
    index.publish("r1", [("stored", ["a"])])
    assert index.lookup(["a"]) == {}
    index.close()
    client = redis.Redis.from_url(tls_redis, **redis_connection_kwargs(tls_redis, None, str(other_ca), 1.0))
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        client.ping()
