"""Helpers for the serving end-to-end tests: deployed applications, waiting, background load."""

import threading
from pathlib import Path

from support.net import wait_for

ENGINE = "OrthrusEngine"
INGRESS = "OrthrusIngress"
ENGINE_ARGS = {"num_pages": 64, "max_model_len": 256}  # replicas and the reference engine alike
API_KEY_ENV = "ORTHRUS_TEST_API_KEY"  # set by the serve_cluster fixture before Ray starts


class Deployed:
    """One deployed application: its addresses and helpers to reach its engine replicas."""

    def __init__(self, cluster: "ServeCluster", name: str, config: dict):
        self.cluster, self.name, self.config = cluster, name, config
        self._handle = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.cluster.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.cluster.http_port}/{self.name}"

    def client(self, timeout_s: float | None = 60.0):
        from orthrus_serve.client import OrthrusClient

        return OrthrusClient(self.grpc_address, application=self.name, timeout_s=timeout_s)

    def engine_handle(self):
        from ray import serve

        if self._handle is None:  # one handle (one router) for all the test's calls
            self._handle = serve.get_deployment_handle(ENGINE, self.name)
        return self._handle

    def engine_stats(self) -> dict:
        """Stats of one engine replica (the router picks which: use with one replica)."""
        return self.engine_handle().stats.remote().result(timeout_s=30)

    def ingress_in_flight(self) -> int:
        """API calls the ingress serves now (its max_ingress_requests count; one ingress replica)."""
        from ray import serve

        return serve.get_deployment_handle(INGRESS, self.name).in_flight_requests.remote().result(timeout_s=30)

    def replica_ids(self) -> set[str]:
        """Unique ids of the live engine replica actors."""
        import ray

        prefix = f"SERVE_REPLICA::{self.name}#{ENGINE}#"
        return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefix)}

    def replica_actor(self, unique_id: str):
        import ray

        return ray.get_actor(f"SERVE_REPLICA::{self.name}#{ENGINE}#{unique_id}", namespace="serve")

    def routing_stats(self) -> dict[str, dict]:
        """Every running engine replica's `record_routing_stats()` (num_running, num_waiting,
        cached_pages), asked of each replica actor directly rather than through the router."""
        return self._ask_replicas("record_routing_stats")

    def serve_in_flight(self) -> int:
        """Calls Serve counts in flight at the running engine replicas (what its router ranks them by)."""
        return sum(self._ask_replicas("get_num_ongoing_requests").values())

    def _ask_replicas(self, method: str) -> dict:
        """`method` of each engine replica actor, by replica id; a replica Serve is still starting (one replacing
        a killed or unhealthy replica) is left out."""
        import ray

        refs = {r: getattr(self.replica_actor(r), method).remote() for r in sorted(self.replica_ids())}
        answers = {}
        for r, ref in refs.items():
            try:
                answers[r] = ray.get(ref, timeout=30)
            except ray.exceptions.RayTaskError as e:
                if "initialize_callable" not in str(e):  # "... must be called before ...": not started yet
                    raise
        return answers

    def kill_replica(self, unique_id: str) -> None:
        import ray

        ray.kill(self.replica_actor(unique_id), no_restart=True)

    def engine_status(self):
        from ray import serve

        return serve.status().applications[self.name].deployments[ENGINE]

    def running_replicas(self) -> int:
        return self.engine_status().replica_states.get("RUNNING", 0)

    def wait_healthy(self, replicas: int, timeout_s: float = 90.0) -> None:
        wait_for(lambda: self.engine_status().status == "HEALTHY" and self.running_replicas() == replicas
                 and len(self.replica_ids()) == replicas, timeout_s, f"{replicas} healthy replicas of {self.name}")

    def wait_idle(self, timeout_s: float = 20.0) -> dict:
        """One replica: poll until nothing runs or waits and every KV page is free."""
        last = {}

        def idle():
            nonlocal last
            last = self.engine_stats()
            return last["num_running"] == 0 and last["num_waiting"] == 0 and last["num_free_pages"] == last["num_pages"]

        wait_for(idle, timeout_s, lambda: f"an idle engine (last stats {last})")
        return last


class ServeCluster:
    def __init__(self, http_port: int, grpc_port: int, model_dir: Path, metrics_port: int | None = None):
        self.http_port, self.grpc_port, self.model_dir = http_port, grpc_port, model_dir
        self.metrics_port = metrics_port  # Ray's Prometheus endpoint
        self._basic: Deployed | None = None

    def config(self, name: str, **over) -> dict:
        cfg = {"app_name": name, "model": str(self.model_dir), "engine": dict(ENGINE_ARGS)}
        cfg.update(over)
        return cfg

    def deploy(self, name: str, **over) -> Deployed:
        from ray import serve

        from orthrus_serve.app import build_app

        cfg = self.config(name, **over)
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
        return Deployed(self, name, cfg)

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)
        if self._basic is not None and self._basic.name == name:
            self._basic = None

    def basic(self) -> Deployed:
        """The default application with one engine replica ("basic"), deployed on first use and kept for the
        modules after (deploying one takes seconds); whoever needs to be the only application deletes it."""
        if self._basic is None:
            self._basic = self.deploy("basic")
        return self._basic


def stream_story(client_factory, i: int, params: dict, results, started: list[threading.Event]) -> None:
    """Stream one long completion (run it in a thread): `results[i]` becomes ("ok", tokens, finish_reason),
    or (gRPC code, details) when the call fails; `started[i]` is set at the first token or on failure."""
    import grpc

    with client_factory() as c:
        try:
            n, msg = 0, None
            for msg in c.generate_stream(f"Stream {i}: tell me a long story.", **params):
                n += len(msg.token_ids)
                started[i].set()
            results[i] = ("ok", n, msg.finish_reason if msg else None)
        except grpc.RpcError as e:
            results[i] = (e.code(), e.details())
        finally:
            started[i].set()


class Load:
    """Background gRPC load: `threads` callers send requests until stopped; records outcomes."""

    def __init__(self, app: Deployed, threads: int, **params):
        self.app, self.params = app, params
        self.stop_event = threading.Event()
        self.ok = 0
        self.errors: list = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        import grpc

        with self.app.client() as c:
            n = 0
            while not self.stop_event.is_set():
                try:
                    c.generate(f"load {i} {n}: once upon a time", **self.params)
                    self.ok += 1
                except grpc.RpcError as e:
                    self.errors.append((e.code(), e.details()))
                n += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=60)
