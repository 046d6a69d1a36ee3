"""Fixtures for the cluster tests: one multi-node Ray cluster on this machine for the session (a
head and two workers, each a `ray start` process of its own; see ray_nodes.py), a password-protected
redis-server, and deploying the Serve config files of cluster/ onto it with `serve deploy`.

Nothing here joins the test process to a Ray cluster: it may already be connected to the serving
tests' cluster (tests/serve/conftest.py), and this cluster must not disturb that one either.
"""

import copy
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import Driver, RayNodes
from support.net import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
ENGINE_ARGS = {"num_pages": 512, "max_model_len": 1536}  # the tiny model: small and fast
WORKER_RESOURCES = {"orthrus_engine": 1}  # what cluster/local/serve.yaml's engine replicas need
PASSWORD_ENV = "ORTHRUS_REDIS_PASSWORD"


class PasswordRedis:
    """redis-server on a free loopback port that requires a password (as in cluster/kuberay/redis.yaml)."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:  # as tests/serve/redis_server.py: fail, never skip silently
            if os.environ.get("ORTHRUS_ALLOW_NO_REDIS") == "1":
                pytest.skip("redis-server not found; skipped as ORTHRUS_ALLOW_NO_REDIS=1")
            pytest.fail("redis-server not found: apt-get install -y redis-server (or set ORTHRUS_ALLOW_NO_REDIS=1 "
                        "to skip the Redis tests)", pytrace=False)
        self.password = secrets.token_hex(16)
        self.dir = tempfile.mkdtemp(prefix="orthrus-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--requirepass", self.password, "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")
            time.sleep(0.05)

    def url(self, db: int = 1) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 1):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, decode_responses=True)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                return b"+PONG" in s.recv(64)
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """The session's multi-node cluster, its Serve ports, and deploying cluster/ configs onto it."""

    def __init__(self, nodes: RayNodes, redis: PasswordRedis, model_dir: Path):
        self.nodes, self.redis, self.model_dir = nodes, redis, model_dir
        self.worker_resources = WORKER_RESOURCES
        self.http_port, self.grpc_port = free_port(), free_port()
        self._driver: Driver | None = None

    @property
    def driver(self) -> Driver:
        if self._driver is None:
            self._driver = Driver(self.nodes)
        return self._driver

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def test_config(self, path: Path, **args_over) -> dict:
        """A Serve config file of cluster/ as it is, except: this session's ports, the tiny model,
        this session's Redis (where the config uses Redis), and `args_over`."""
        cfg = copy.deepcopy(yaml.safe_load(path.read_text()))
        cfg["http_options"]["port"] = self.http_port
        cfg["grpc_options"]["port"] = self.grpc_port
        (app,) = cfg["applications"]
        app["args"].update(model=str(self.model_dir), engine=dict(ENGINE_ARGS))
        if (app["args"].get("index") or {}).get("redis_url"):
            app["args"]["index"]["redis_url"] = self.redis.url()
        app["args"].update(args_over)
        return cfg

    def deploy(self, cfg: dict, timeout_s: float = 180) -> None:
        """`serve deploy` (the dashboard's REST API, as KubeRay uses) and wait until RUNNING."""
        path = self.nodes.dir / "serve-config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.nodes.run_cli(["serve", "deploy", str(path), "--address", self.nodes.dashboard_url])
        self.wait_running(cfg["applications"][0]["name"], timeout_s)

    def wait_running(self, app: str, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.nodes.serve_applications().get(app)
            if last and last["status"] == "RUNNING" and all(
                    d["status"] == "HEALTHY" for d in last["deployments"].values()):
                return last
            if last and last["status"] == "DEPLOY_FAILED":
                break
            time.sleep(1)
        msg = last and {k: last.get(k) for k in ("status", "message")}
        raise AssertionError(f"application {app} not RUNNING within {timeout_s} s: {msg}\n"
                             f"{self.nodes.tail(self.nodes.nodes[0])}")

    def shutdown_serve(self) -> None:
        self.nodes.run_cli(["serve", "shutdown", "-y", "--address", self.nodes.dashboard_url], check=False)
        deadline = time.monotonic() + 60
        while self.nodes.serve_applications() and time.monotonic() < deadline:
            time.sleep(0.5)

    def replicas(self, app: str, deployment: str) -> list[dict]:
        return self.nodes.serve_applications()[app]["deployments"][deployment]["replicas"]

    def node_ids(self) -> dict[str, str]:
        """Our node name -> Ray node id, for the live nodes."""
        by_port = {n["node_manager_port"]: n["node_id"] for n in self.driver.ask("nodes") if n["alive"]}
        return {n.name: by_port[n.node_manager_port] for n in self.nodes.nodes if n.node_manager_port in by_port}

    def close(self) -> None:
        if self._driver is not None:
            self._driver.close()


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The serving tests' tiny model with a 2048-token window (named `tiny-long`): calls that
    stay in flight for seconds."""
    import json

    path = tmp_path_factory.mktemp("cluster") / "tiny-long"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def password_redis():
    server = PasswordRedis()
    yield server
    server.close()


@pytest.fixture(scope="session")
def cluster(long_model_dir, password_redis):
    """A head (proxies, ingress; 3 CPUs) and two workers `a`, `b` that offer one engine slot each
    and no CPUs, every node with the Redis password in its environment, as a Secret gives it."""
    nodes = RayNodes(env={PASSWORD_ENV: password_redis.password})
    c = None
    try:
        nodes.start_head(num_cpus=3)
        for name in ("a", "b"):
            nodes.start_worker(name, resources=WORKER_RESOURCES)
        c = Cluster(nodes, password_redis, long_model_dir)
        yield c
    finally:
        if c is not None:
            c.close()
        nodes.close()
