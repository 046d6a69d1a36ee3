"""A tensor-parallel replica on the local Ray cluster: TP = 2 on CPU (gloo) reserves a placement group
of one CPU bundle per rank, serves gRPC and HTTP with the greedy outputs of the engine alone (one
rank), and no process of the replica remains once its application is deleted."""

import psutil
import pytest
from serve_helpers import ENGINE, ENGINE_ARGS
from support.net import wait_for

from orthrus_engines import SamplingParams

pytestmark = pytest.mark.slow

APP = "tp2"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]
MAX_TOKENS = 12


def _group(name: str) -> dict | None:
    """The placement group Serve made for a replica (it bears the replica actor's name)."""
    import ray

    return next((g for g in ray.util.placement_group_table().values() if g["name"] == name), None)


def _live(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_tp2_replica_serves_like_one_rank_and_leaves_no_process(serve_cluster, reference_llm):
    import os

    import httpx
    import ray

    refs = [reference_llm.generate(p, SamplingParams(max_tokens=MAX_TOKENS))[0] for p in PROMPTS]
    app = serve_cluster.deploy(APP, engine={**ENGINE_ARGS, "tensor_parallel_size": 2})
    deleted = False
    try:
        (replica_id,) = app.replica_ids()
        name = f"SERVE_REPLICA::{APP}#{ENGINE}#{replica_id}"
        group = _group(name)
        assert group is not None and group["state"] == "CREATED" and group["strategy"] == "STRICT_PACK"
        assert list(group["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]  # one per rank

        pid = ray.get(app.replica_actor(replica_id).__ray_call__.remote(lambda _: os.getpid()), timeout=30)
        procs = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert any("multiprocessing" in " ".join(psutil.Process(c).cmdline()) for c in procs[1:])  # rank 1

        with app.client() as client:
            for prompt, ref in zip(PROMPTS, refs):
                r = client.generate(prompt, max_tokens=MAX_TOKENS)
                assert list(r.token_ids) == ref.token_ids and r.text == ref.text, prompt
            stream = list(client.generate_stream(PROMPTS[0], max_tokens=MAX_TOKENS))
            assert [t for m in stream for t in m.token_ids] == refs[0].token_ids
        r = httpx.post(f"{app.http_base}/v1/completions", timeout=60,
                       json={"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == refs[1].text

        serve_cluster.delete(APP)
        deleted = True
        wait_for(lambda: not _live(procs), 60, lambda: f"the replica's processes to exit (alive: {_live(procs)})")
        wait_for(lambda: (_group(name) or {}).get("state") in (None, "REMOVED"), 30, "the replica's group removed")
    finally:
        if not deleted:
            serve_cluster.delete(APP)
