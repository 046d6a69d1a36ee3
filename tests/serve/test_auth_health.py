"""The API key check, the engine replica's health check, `orthrus-serve up`'s message and flags, and the
Redis tests' refusal to skip silently; no Ray cluster (tests/serve/test_security.py has the served side)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orthrus_serve.auth import ApiKey
from orthrus_serve.cli import build_parser, up_message
from orthrus_serve.config import ServeConfig
from orthrus_serve.health import EngineHealth, EngineUnhealthy

ROOT = Path(__file__).resolve().parents[2]


def test_api_key_accepts_only_bearer_and_the_key():
    key = ApiKey("s3cret")
    assert key.required and key.accepts("Bearer s3cret") and key.accepts("bearer  s3cret ")
    for bad in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not key.accepts(bad), bad
    assert "s3cret" not in repr(key) and "s3cret" not in str(key)


def test_no_key_configured_accepts_everything(monkeypatch):
    monkeypatch.delenv("ORTHRUS_API_KEY", raising=False)
    for key in (ApiKey(None), ApiKey(""), ApiKey.from_env("ORTHRUS_API_KEY"), ApiKey.from_env(None)):
        assert not key.required and key.accepts(None) and key.accepts("Bearer anything")
    monkeypatch.setenv("ORTHRUS_API_KEY", "k")
    assert ApiKey.from_env("ORTHRUS_API_KEY").accepts("Bearer k")
    assert not ApiKey.from_env("ORTHRUS_API_KEY").accepts(None)


def test_the_key_is_never_in_the_config():
    cfg = ServeConfig()
    assert cfg.api_key_env == "ORTHRUS_API_KEY" and "api_key" not in ServeConfig.model_fields
    with pytest.raises(ValueError, match="api_key"):
        ServeConfig.model_validate({"api_key": "inline"})  # unknown field: a key cannot be put in a config


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from orthrus_engines import AsyncEngine

    eng = AsyncEngine(str(tiny_model_dir), num_pages=16, max_model_len=64)
    yield eng
    eng.shutdown()


def test_failures_in_a_row_over_time_make_the_replica_unhealthy(engine):
    clock = Clock()
    health = EngineHealth(engine, min_failures=3, failing_for_s=10.0, clock=clock)
    health.check()
    for _ in range(5):  # one failed step fails its whole batch at one instant: not enough
        health.record("error", "RuntimeError: boom")
    health.check()
    clock.now = 9.0
    health.record("error", "RuntimeError: boom")
    health.check()
    health.record("abort")  # a client going away says nothing about the engine
    clock.now = 10.0
    health.record("error", "RuntimeError: boom")
    with pytest.raises(EngineUnhealthy, match="last 7 requests failed.*boom"):
        health.check()
    health.record("length")  # one request finishing well: the engine steps again
    health.check()
    clock.now = 30.0
    health.record("error", "x")
    clock.now = 45.0
    health.record("error", "x")
    health.check()  # two failures are not a streak


def test_a_stopped_engine_thread_is_unhealthy(tiny_model_dir):
    from orthrus_engines import AsyncEngine

    eng = AsyncEngine(str(tiny_model_dir), num_pages=16, max_model_len=64)
    health = EngineHealth(eng)
    health.check()
    eng.shutdown()
    with pytest.raises(EngineUnhealthy, match="thread"):
        health.check()


def test_up_message_says_where_each_port_listens_and_whether_a_key_is_needed():
    cfg = ServeConfig()
    msg = up_message(cfg, key_set=False)
    assert "HTTP (OpenAI) on 127.0.0.1:8000" in msg and "gRPC on 127.0.0.1:9000:" in msg
    everywhere = up_message(ServeConfig(host="0.0.0.0"), key_set=False)
    assert "gRPC on 0.0.0.0:9000 (every interface):" in everywhere and "--address 127.0.0.1:9000" in everywhere
    assert "gRPC on [::1]:9000:" in up_message(ServeConfig(host="::1"), key_set=False)
    assert "API key: none" in msg and "Authorization" not in msg
    msg = up_message(cfg, key_set=True)
    assert "API key: required ($ORTHRUS_API_KEY)" in msg and 'Authorization: Bearer $ORTHRUS_API_KEY' in msg
    assert "Ray nodes' environment" in up_message(cfg, key_set=None)


def test_every_client_command_takes_an_api_key():
    p = build_parser()
    assert p.parse_args(["up", "--api-key", "k"]).api_key == "k"
    assert p.parse_args(["generate", "hi", "--api-key", "k"]).api_key == "k"
    assert p.parse_args(["bench", "--api-key", "k"]).api_key == "k"
    assert p.parse_args(["generate", "hi"]).api_key is None  # then $ORTHRUS_API_KEY, if set


# -- Redis tests must not skip silently ----------------------------------------------------------


def run_a_redis_test(allow: str | None, tmp_path) -> subprocess.CompletedProcess:
    """test_prefix_index's Redis factory test in a child pytest whose PATH has no redis-server."""
    env = {k: v for k, v in os.environ.items() if k != "ORTHRUS_ALLOW_NO_REDIS"}
    env["PATH"] = str(tmp_path)  # empty: no redis-server (the child is started by absolute path)
    if allow is not None:
        env["ORTHRUS_ALLOW_NO_REDIS"] = allow
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/serve/test_prefix_index.py::test_redis_index_from_env"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_redis_tests_fail_without_redis_server_unless_allowed(tmp_path):
    failed = run_a_redis_test(None, tmp_path)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "apt-get install -y redis-server" in failed.stdout and "ORTHRUS_ALLOW_NO_REDIS=1" in failed.stdout
    skipped = run_a_redis_test("1", tmp_path)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]


def test_make_test_stops_with_the_install_command_where_it_cannot_install_redis(tmp_path):
    """scripts/ensure_redis.sh (run by `make test`) with neither redis-server nor apt-get on PATH."""
    script, env = ROOT / "scripts" / "ensure_redis.sh", {"PATH": str(tmp_path)}
    stopped = subprocess.run(["/bin/bash", script], env=env, capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 1 and "apt-get install -y redis-server" in stopped.stderr, stopped.stderr
    allowed = subprocess.run(["/bin/bash", script], env=env | {"ORTHRUS_ALLOW_NO_REDIS": "1"}, capture_output=True,
                             text=True, timeout=30)
    assert allowed.returncode == 0 and "skip" in allowed.stdout
