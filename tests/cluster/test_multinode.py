"""Multi-node Ray on one machine (cluster/local/serve.yaml deployed with `serve deploy` across a
head and two worker nodes, each a `ray start` process of its own): engine replicas run on the
workers and share the prefix index through a password-protected Redis; losing a worker node fails
only the calls in flight on it, with UNAVAILABLE / HTTP 503 and a message that says so; the other
worker keeps serving; the application is whole again once a node with the needed resources joins."""

import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from orthrus_serve.client import OrthrusClient
from support.net import wait_for
from tests.serve.serve_helpers import stream_story

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "local" / "serve.yaml"
APP, ENGINE, INGRESS = "orthrus", "OrthrusEngine", "OrthrusIngress"
NAMESPACE = "orthrus:orthrus:tiny-long:"  # Redis keys: orthrus:{app}:{model}:
STREAMS = 6
# plain AR, hundreds of steps: every call is still running when the node is stopped
LONG = {"max_tokens": 1200, "ignore_eos": True, "block_size": 1}
# two full KV blocks (32+ tokens): after one call, the prefix-aware router sends it to the same replica
SHARED_PROMPT = ("You are a careful assistant. Answer in one short sentence, with no preamble. "
                 "Question: what is the tallest mountain on Earth, and how high is it?")


@pytest.fixture(scope="module")
def app(cluster):
    cluster.deploy(cluster.test_config(CONFIG))
    yield cluster
    cluster.shutdown_serve()


def running_engines(c) -> list[dict]:
    return [r for r in c.replicas(APP, ENGINE) if r["state"] == "RUNNING"]


def test_engine_replicas_run_on_the_workers(app):
    ids = app.node_ids()
    engines = running_engines(app)
    assert sorted(r["node_id"] for r in engines) == sorted([ids["a"], ids["b"]])
    assert [r["node_id"] for r in app.replicas(APP, INGRESS)] == [ids["head"]]

    with OrthrusClient(app.grpc_address, timeout_s=60) as client:
        assert client.model_info().model == "tiny-long"
        for i in range(4):
            assert client.generate(f"Hello from the cluster {i}", max_tokens=8).completion_tokens == 8
    with httpx.Client(base_url=app.http_base, timeout=60) as h:
        assert h.get("/v1/models").json()["data"][0]["id"] == "tiny-long"
        r = h.post("/v1/completions", json={"prompt": "Hello over HTTP", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5

    # Both replicas heartbeat into Redis with the password each node has in its environment.
    redis = app.redis.client()
    wait_for(lambda: set(redis.hgetall(NAMESPACE + "hb"))
             == {r["replica_id"] for r in engines}, 30, "both replicas' heartbeats in Redis")
    assert all(app.nodes.healthz(n) for n in app.nodes.nodes)  # what a Kubernetes probe asks each node


def test_losing_a_worker_fails_only_its_calls_and_the_app_recovers(app):
    ns = NAMESPACE
    redis = app.redis.client()
    node_name = {v: k for k, v in app.node_ids().items()}
    with OrthrusClient(app.grpc_address, timeout_s=120) as client:
        client.generate(SHARED_PROMPT, max_tokens=1)  # one replica now holds the prompt's blocks
    holders = wait_for(lambda: [rid for rid, s in app.driver.ask("replicas").items() if s.get("cached_pages")],
                       30, "a replica holding the shared prompt's blocks")
    assert len(holders) == 1, holders
    victim_replica = holders[0]
    wait_for(lambda: redis.scard(f"{ns}rep:{victim_replica}") >= 2, 30, "the blocks in the Redis index")

    results: dict = {}
    started = [threading.Event() for _ in range(STREAMS)]

    def http_call():  # same prompt: routed to the replica that holds its prefix
        with httpx.Client(base_url=app.http_base, timeout=300) as h:
            r = h.post("/v1/completions", json={"prompt": SHARED_PROMPT, **LONG})
            results["http"] = (r.status_code, r.json())

    client = lambda: OrthrusClient(app.grpc_address, timeout_s=300)
    threads = [threading.Thread(target=http_call, daemon=True)]
    threads += [threading.Thread(target=stream_story, args=(client, i, LONG, results, started), daemon=True)
                for i in range(STREAMS)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(60)
    stats = wait_for(lambda: (s := app.driver.ask("replicas")) and sum(
        r["num_running"] + r["num_waiting"] for r in s.values()) == STREAMS + 1 and s, 30, "all calls running")
    in_flight = {rid: s["num_running"] + s["num_waiting"] for rid, s in stats.items()}
    victim = next(n for n in app.nodes.nodes if n.name == node_name[stats[victim_replica]["node_id"]])
    survivor_replica = next(rid for rid in stats if rid != victim_replica)
    assert victim.name in ("a", "b") and in_flight[survivor_replica] >= 1, (victim.name, in_flight)

    app.nodes.kill(victim)  # the node dies: raylet, agents and the replica's worker process, at once
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)

    # The calls in flight on the lost node, and only they, failed, each with a clear error.
    grpc_failed = [r for i, r in results.items() if i != "http" and r[0] != "ok"]
    assert all(r[0] == grpc.StatusCode.UNAVAILABLE and "replica" in r[1] and "lost" in r[1]
               for r in grpc_failed), results
    status, body = results["http"]
    assert status == 503 and body["error"]["type"] == "unavailable" and "lost" in body["error"]["message"], body
    assert len(grpc_failed) + 1 == in_flight[victim_replica], (in_flight, results)
    ok = [r for i, r in results.items() if i != "http" and r[0] == "ok"]
    assert len(ok) == in_flight[survivor_replica] and all(r == ("ok", LONG["max_tokens"], "length") for r in ok)

    # Serve notices the replica is gone; the surviving worker serves every new call meanwhile.
    wait_for(lambda: [r["replica_id"] for r in running_engines(app)] == [survivor_replica], 60,
             "Serve to drop the lost replica")
    with OrthrusClient(app.grpc_address, timeout_s=60) as client:
        for i in range(4):
            assert client.generate(f"During the outage {i}", max_tokens=4).completion_tokens == 4

    # A node with the needed resources joins: Serve places the missing replica there.
    joined = time.monotonic()
    c = app.nodes.start_worker("c", resources=app.worker_resources)
    app.wait_running(APP, timeout_s=120)
    wait_for(lambda: len(running_engines(app)) == 2, 60, "two running engine replicas")
    ids = app.node_ids()
    new = [r for r in running_engines(app) if r["replica_id"] != survivor_replica]
    assert [r["node_id"] for r in new] == [ids["c"]], (new, ids)
    print(f"whole again {time.monotonic() - joined:.1f} s after the new node started")
    with OrthrusClient(app.grpc_address, timeout_s=60) as client:
        for i in range(12):  # distinct two-block prompts: both replicas get some
            assert client.generate(f"{i} " + SHARED_PROMPT, max_tokens=2).completion_tokens == 2
    stats = app.driver.ask("replicas")
    assert stats[new[0]["replica_id"]]["cached_pages"] > 0, stats  # the new replica served
    assert c.alive and app.nodes.healthz(c)
