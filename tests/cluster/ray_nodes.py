"""A multi-node Ray cluster on one machine, for tests: every node is its own `ray start --block`
process group (head, workers with their own resources), on free loopback ports, in its own temp
dir, with token authentication on. Nodes are stopped by killing their own process group, never
with `ray stop` (which would stop every Ray process of the user, the test session's cluster too).

    with RayNodes() as nodes:
        nodes.start_head(num_cpus=2)
        a = nodes.start_worker(resources={"orthrus_engine": 1})
        nodes.run_cli(["serve", "deploy", "config.yaml", "--address", nodes.dashboard_url])
        nodes.kill(a)                       # the node dies: SIGKILL to its whole process group
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from support.net import free_port

BIN = Path(sys.executable).parent  # the venv's ray / serve executables
DEFAULT_ADDRESS_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    agent_port: int  # the dashboard agent's HTTP port: /api/healthz, as KubeRay's probes use
    node_manager_port: int  # identifies the node in ray.nodes()
    resources: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class RayNodes:
    def __init__(self, env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="orc-", dir="/tmp"))  # short: Ray's socket paths
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[Node] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # independent of ~/.ray
            RAY_USAGE_STATS_ENABLED="0",
            # a lost node is noticed within a few seconds (defaults: about 15-30 s)
            RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3",
        )
        self.env.update(env or {})
        # `ray start` of a worker records the cluster address in /tmp/ray/ray_current_cluster, where a
        # later plain ray.init() would look for a cluster to join: put back what was there.
        self._address_file = DEFAULT_ADDRESS_FILE.read_text() if DEFAULT_ADDRESS_FILE.exists() else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict) -> Node:
        agent, node_manager = free_port(), free_port()
        args += ["--node-ip-address", "127.0.0.1", "--node-manager-port", str(node_manager),
                 "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(agent),
                 "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats"]  # fmt: skip
        if resources:
            args += ["--resources", json.dumps(resources)]
        log = self.dir / f"{name}.log"
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=self.env, cwd=self.dir,
                                stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, log, agent, node_manager, resources)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float = 2, resources: dict | None = None, timeout_s: float = 120) -> Node:
        args = ["--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus), "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.dir)]  # fmt: skip
        return self._start_healthy("head", args, resources or {}, timeout_s)

    def start_worker(self, name: str, num_cpus: float = 0, resources: dict | None = None,
                     timeout_s: float = 120) -> Node:
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        return self._start_healthy(name, args, resources or {}, timeout_s)

    def _start_healthy(self, name: str, args: list[str], resources: dict, timeout_s: float, tries: int = 2) -> Node:
        # `ray start` gives up if its raylet has not registered within 30 s, which a loaded
        # 2-core machine can exceed: one more try then.
        for attempt in range(tries):
            node = self._start(name, list(args), resources)
            try:
                self.wait_healthy(node, timeout_s)
                return node
            except (RuntimeError, TimeoutError):
                self.kill(node)
                self.nodes.remove(node)
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def healthz(self, node: Node) -> bool:
        """The node's own health endpoint (raylet, and GCS on the head), as a Kubernetes probe sees it."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.agent_port}/api/healthz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, node: Node, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthz(node):
            if not node.alive:
                raise RuntimeError(f"ray node {node.name} exited with {node.proc.returncode}:\n{self.tail(node)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray node {node.name} not healthy within {timeout_s} s:\n{self.tail(node)}")
            time.sleep(0.25)

    def tail(self, node: Node, n: int = 30) -> str:
        try:
            return "\n".join(node.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, node: Node, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        """Stop a node: a signal to its whole process group (raylet, agents, the workers it started)."""
        try:
            os.killpg(node.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            node.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout_s)
        deadline = time.monotonic() + timeout_s  # the group's other processes too
        while _group_alive(node.proc.pid) and time.monotonic() < deadline:
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)

    def api(self, path: str, timeout_s: float = 10) -> dict:
        """GET from the dashboard's REST API (what `serve status` and KubeRay read), token included."""
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())

    def serve_applications(self) -> dict:
        """Serve's applications with their deployments and replicas (state, node_id, actor_name)."""
        return self.api("/api/serve/applications/").get("applications") or {}

    def run_cli(self, args: list[str], timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """A `ray` / `serve` command (or any executable of the venv) against this cluster."""
        exe = args[0] if os.path.isabs(args[0]) else str(BIN / args[0])
        out = subprocess.run([exe, *args[1:]], env={**self.env, "RAY_ADDRESS": self.address}, cwd=self.dir,
                             capture_output=True, text=True, timeout=timeout_s)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def close(self) -> None:
        # SIGKILL: a throwaway cluster needs no drain (SIGTERM makes Ray drain each node for up to 30 s)
        for node in reversed(self.nodes):  # workers first, then the head
            if node.alive or _group_alive(node.proc.pid):
                self.kill(node)
        if self._address_file is None:
            DEFAULT_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            DEFAULT_ADDRESS_FILE.write_text(self._address_file)
        if not os.environ.get("ORTHRUS_KEEP_RAY_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Driver:
    """cluster_driver.py in a subprocess: a Ray driver connected to this cluster."""

    def __init__(self, nodes: RayNodes, timeout_s: float = 60):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cluster_driver.py")), nodes.address,
                                      nodes.dashboard_url],
                                     env=nodes.env, cwd=nodes.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(nodes.dir / "driver.log").open("w"), text=True)
        self.timeout_s = timeout_s
        self._read()  # {"ready": true} once connected

    def _read(self) -> dict:
        import select

        deadline = time.monotonic() + self.timeout_s
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"the cluster driver did not answer (exit code {self.proc.poll()})")
            if line.startswith("@@ "):  # an answer; anything else is Ray talking
                return json.loads(line[3:])

    def ask(self, op: str, **kw):
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
