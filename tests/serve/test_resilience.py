"""Losing an engine replica under load (docs/ARCHITECTURE.md §5): its in-flight calls fail with UNAVAILABLE,
every other call succeeds, and Serve replaces the replica."""

import threading
import time

import grpc
import pytest
from serve_helpers import stream_story
from support.net import wait_for

pytestmark = pytest.mark.slow

APP = "resilient"
STREAMS = 6
# plain AR, hundreds of steps: every stream is still running when the replica is killed
LONG = {"max_tokens": 480, "ignore_eos": True, "block_size": 1}
ENGINE = {"num_pages": 256, "max_model_len": 512}  # room for all the streams on one replica


@pytest.fixture(scope="module")
def app(serve_cluster):
    deployed = serve_cluster.deploy(APP, num_replicas=2, engine=ENGINE)  # the in-process prefix index
    yield deployed
    serve_cluster.delete(APP)


def test_killing_a_replica_under_load(app):
    app.wait_healthy(2)
    with app.client() as c:  # the ingress fetches the model's facts once: not while timing the streams
        c.generate("warm up", max_tokens=2)
    started = [threading.Event() for _ in range(STREAMS)]
    results: list = [None] * STREAMS

    threads = [threading.Thread(target=stream_story, args=(app.client, i, LONG, results, started), daemon=True)
               for i in range(STREAMS)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(60)
    stats = app.routing_stats()
    assert sum(s["num_running"] + s["num_waiting"] for s in stats.values()) == STREAMS, stats
    victim = max(stats, key=lambda r: stats[r]["num_running"])
    in_flight = stats[victim]["num_running"] + stats[victim]["num_waiting"]
    app.kill_replica(victim)
    killed = time.monotonic()
    for t in threads:
        t.join(120)

    failed = [r for r in results if r[0] != "ok"]
    assert all(r[0] == grpc.StatusCode.UNAVAILABLE for r in failed), results
    assert all("replica" in r[1] for r in failed), results
    assert len(failed) == in_flight, (in_flight, results)
    assert all(r == ("ok", LONG["max_tokens"], "length") for r in results if r[0] == "ok"), results

    # Serve replaces it; the new replica serves
    app.wait_healthy(2)
    assert victim not in app.replica_ids()
    print(f"replaced within {time.monotonic() - killed:.1f} s")
    with app.client() as c:
        for i in range(4):
            assert c.generate(f"after {i}", max_tokens=3).completion_tokens == 3


def test_http_non_streaming_call_on_a_killed_replica_is_503(app):
    """The HTTP side of the same mapping: a lost replica is 503, not a 500 with a traceback."""
    import httpx

    app.wait_healthy(2)
    out: dict = {}

    def call():
        with httpx.Client(base_url=app.http_base, timeout=60) as h:
            r = h.post("/v1/completions", json={"prompt": "A long story:", **LONG})
            out["status"], out["body"] = r.status_code, r.json()

    t = threading.Thread(target=call, daemon=True)
    t.start()
    busy = {}

    def running():
        nonlocal busy
        busy = {r: s for r, s in app.routing_stats().items() if s["num_running"]}
        return bool(busy)

    wait_for(running, 30, "the request to run")
    app.kill_replica(next(iter(busy)))
    t.join(60)
    assert out["status"] == 503, out
    assert out["body"]["error"]["type"] == "unavailable"
    app.wait_healthy(2)
