"""Fixtures for the serving end-to-end tests (docs/ARCHITECTURE.md §5).

One local Ray cluster with Serve (gRPC and HTTP proxies on free loopback ports) for the whole
session; applications are deployed per module with `serve_cluster.deploy(name, **config)` under
their own route prefix and deleted afterwards. Replicas run a tiny random Orthrus checkpoint that
carries the built-in model's tokenizer, so text prompts and chat work and every call is fast.
"""

import os
import secrets

import pytest
from redis_server import new_redis_server
from support.net import free_port
from serve_helpers import API_KEY_ENV, ENGINE_ARGS, ServeCluster

@pytest.fixture(scope="session")
def serve_cluster(tiny_model_dir):
    """A local Ray cluster with Serve's HTTP and gRPC proxies, shared by all serving tests."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from orthrus_serve import grpc_bind
    from orthrus_serve.app import GRPC_SERVICERS

    # The security tests' API key: in the environment before Ray starts, as on a real node, so the
    # replicas inherit it; only an app whose api_key_env names this variable asks for it.
    os.environ[API_KEY_ENV] = secrets.token_urlsafe(24)
    # Logical CPUs: several applications' replicas (1 CPU each) fit at once; the host has fewer cores.
    metrics_port = free_port()  # Ray's Prometheus endpoint, reporting every second for the metrics test
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=bool(os.environ.get("ORTHRUS_TEST_RAY_LOGS")),
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env=grpc_bind.runtime_env("127.0.0.1"))  # the gRPC proxy on loopback, as `up` binds it
    try:
        http_port, grpc_port = free_port(), free_port()
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        yield ServeCluster(http_port, grpc_port, tiny_model_dir, metrics_port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def basic_app(serve_cluster):
    """The default application with one engine replica, shared by the modules that use it (test_fuzz_soak,
    test_hostile_input, test_openai_surface, test_serving); test_security's probe without metadata needs its own
    application to be the only one, so it deletes this one, and the next user deploys it again."""
    return serve_cluster.basic()


@pytest.fixture(scope="module")
def http(app):
    """An HTTP client for the module's `app`."""
    import httpx

    with httpx.Client(base_url=app.http_base, timeout=60) as h:
        yield h


@pytest.fixture(scope="module")
def oai(app):
    """The official OpenAI client for the module's `app`."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{app.http_base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir):
    """The engine alone, on the same model and engine arguments as the deployed replicas."""
    from orthrus_engines import LLM

    return LLM(str(tiny_model_dir), **ENGINE_ARGS)


@pytest.fixture(scope="module")
def redis_srv():
    """A real redis-server on a free port; tests may stop() and start() it again."""
    server = new_redis_server()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(app):
    """A gRPC client of the module's own `app` fixture, open for the whole module."""
    with app.client() as c:
        yield c
