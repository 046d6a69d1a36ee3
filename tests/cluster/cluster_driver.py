"""A Ray driver in its own process, for looking inside a cluster the test process must not join
(it may already be connected to the serving tests' cluster). One JSON command a line on stdin,
one JSON answer a line on stdout, after the marker `@@ ` (Ray prints its own messages there too):

    {"op": "nodes"}                      -> [{"node_id", "node_manager_port", "alive", "resources"}]
    {"op": "replicas", "app": "orthrus"} -> {replica_id: {"node_id", "num_running", "num_waiting",
                                                          "cached_pages"}} of the live engine replicas

Run as `python cluster_driver.py <gcs address> <dashboard URL>` with the cluster's RAY_AUTH_*
environment. Every call names this cluster: with no address, Ray's state API looks for "the" local
cluster and fails when the serving tests' cluster runs beside this one.
"""

import json
import sys

import ray

ENGINE = "OrthrusEngine"


def nodes() -> list[dict]:
    return [{"node_id": n["NodeID"], "node_manager_port": n["NodeManagerPort"], "alive": n["Alive"],
             "resources": n.get("Resources", {})} for n in ray.nodes()]


def replicas(app: str, dashboard: str) -> dict:
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{app}#{ENGINE}#"
    alive = {a.name: a.node_id for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10_000)
             if a.name and a.name.startswith(prefix)}
    out = {}
    for name, node_id in alive.items():
        try:
            stats = ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote(), timeout=10)
            stats["cached_pages"] = len(stats["cached_pages"])
        except Exception as e:  # noqa: BLE001 - a replica that just died
            stats = {"error": f"{type(e).__name__}: {e}"}
        out[name[len(prefix):]] = {"node_id": node_id, **stats}
    return out


def main() -> None:
    ray.init(address=sys.argv[1], namespace="serve", log_to_driver=False, logging_level="ERROR")
    print("@@", json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "nodes":
                answer = nodes()
            elif cmd["op"] == "replicas":
                answer = replicas(cmd.get("app", "orthrus"), sys.argv[2])
            else:
                raise ValueError(f"unknown op {cmd['op']!r}")
            print("@@", json.dumps({"ok": answer}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            print("@@", json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    main()
