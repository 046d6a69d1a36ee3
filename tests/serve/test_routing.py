"""Prefix-aware routing across two engine replicas with the Redis prefix index (docs/ARCHITECTURE.md §5):
shared prefixes go to the replica holding them while unrelated load spreads; a killed replica
leaves routing within the heartbeat timeout; with Redis down every request still succeeds."""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from support.net import wait_for

from orthrus_engines.prefix_hash import page_hashes
from orthrus_serve.redis_prefix_index import RedisPrefixIndex

pytestmark = pytest.mark.slow

APP = "routed"
HEARTBEAT_TIMEOUT_S = 2.0
PREFIX_BLOCKS = 5


@pytest.fixture(scope="module")
def app(serve_cluster, redis_srv):
    deployed = serve_cluster.deploy(
        APP, num_replicas=2,
        index={"redis_url": redis_srv.url, "heartbeat_s": 0.25, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S})
    yield deployed
    serve_cluster.delete(APP)


@pytest.fixture(scope="module")
def info(client):
    return client.model_info()


@pytest.fixture(scope="module")
def namespace(info):
    return f"{APP}:{info.model}"  # ServeConfig.index_namespace: app name and served model name


@pytest.fixture
def index(redis_srv, namespace):
    """The index as the router sees it (same namespace and heartbeat timeout)."""
    idx = RedisPrefixIndex(redis_srv.url, namespace, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    yield idx
    idx.close()


def token_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def holders(index, info, ids: list[int]) -> dict[str, int]:
    """Replica -> how many leading full blocks of `ids` it holds, as the index says."""
    return index.lookup(page_hashes(ids, info.page_size, info.prefix_fingerprint))


def wait_held(index, info, prompt: list[int], blocks: int, timeout_s: float = 10.0) -> str:
    """Wait until one replica is listed for the prompt's first `blocks` blocks; return its id."""
    found = {}

    def held():
        nonlocal found
        found = {r: n for r, n in holders(index, info, prompt).items() if n >= blocks}
        return bool(found)

    wait_for(held, timeout_s, f"the index to list a holder of {blocks} blocks")
    assert len(found) == 1, found
    return next(iter(found))


def test_shared_prefix_goes_to_its_holder_while_other_load_spreads(app, client, index, info):
    app.wait_healthy(2)
    bs = info.page_size
    prefix = token_ids(PREFIX_BLOCKS * bs, seed=1)
    first = client.generate(prefix + token_ids(7, seed=100), max_tokens=2)
    assert first.cached_prompt_tokens == 0
    holder = wait_held(index, info, prefix, PREFIX_BLOCKS)

    others = [token_ids(3 * bs, seed=1000 + i) for i in range(12)]  # unrelated prompts, 2+ full blocks each
    with ThreadPoolExecutor(4) as pool:
        unrelated = [pool.submit(client.generate, p, max_tokens=4) for p in others]
        for i in range(6):  # meanwhile: the shared prefix with new suffixes
            r = client.generate(prefix + token_ids(7, seed=101 + i), max_tokens=2)
            assert r.cached_prompt_tokens == PREFIX_BLOCKS * bs, (i, r)
        for f in unrelated:
            assert f.result().completion_tokens == 4
    assert set(holders(index, info, prefix)) == {holder}  # nobody else had to compute it

    served_by: dict[str, int] = {}
    for p in others:
        r = wait_held(index, info, p, 2)
        served_by[r] = served_by.get(r, 0) + 1
    assert len(served_by) == 2, f"unrelated requests all went to one replica: {served_by}"


def test_killed_replica_leaves_routing_within_the_heartbeat_timeout(app, client, index, info, redis_srv, namespace):
    app.wait_healthy(2)
    prefix = token_ids(PREFIX_BLOCKS * info.page_size, seed=2)
    client.generate(prefix + token_ids(5, seed=200), max_tokens=2)
    victim = wait_held(index, info, prefix, PREFIX_BLOCKS)
    assert victim in app.replica_ids()

    app.kill_replica(victim)
    killed = time.monotonic()
    wait_for(lambda: victim not in holders(index, info, prefix), HEARTBEAT_TIMEOUT_S + 3, "the lapse")
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT_S + 1.0

    # the prefix is served again (by the survivor, which computes it afresh), and only it is listed
    r = client.generate(prefix + token_ids(5, seed=201), max_tokens=2)
    assert r.completion_tokens == 2 and r.cached_prompt_tokens == 0
    survivor = wait_held(index, info, prefix, PREFIX_BLOCKS)
    assert survivor != victim
    r = client.generate(prefix + token_ids(5, seed=202), max_tokens=2)
    assert r.cached_prompt_tokens == PREFIX_BLOCKS * info.page_size

    # the dead replica's entries are garbage-collected from Redis, not just ignored
    rc = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    try:
        wait_for(lambda: not rc.exists(f"orthrus:{namespace}:rep:{victim}")
                 and not rc.hexists(f"orthrus:{namespace}:hb", victim), 15, "the dead replica's keys to go")
    finally:
        rc.close()

    app.wait_healthy(2)  # Serve replaced it
    assert victim not in app.replica_ids()
    assert client.generate("after the replacement", max_tokens=2).completion_tokens == 2


def test_requests_succeed_with_redis_down(app, client, index, info, redis_srv, namespace):
    app.wait_healthy(2)
    prefix = token_ids(PREFIX_BLOCKS * info.page_size, seed=3)
    redis_srv.stop()
    try:
        t0 = time.monotonic()
        for i in range(8):
            r = client.generate(prefix + token_ids(5, seed=300 + i), max_tokens=3)
            assert r.completion_tokens == 3
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: client.generate(token_ids(40, seed=400 + i), max_tokens=3), range(8)))
        assert all(r.completion_tokens == 3 for r in results)
        assert time.monotonic() - t0 < 30
    finally:
        redis_srv.start()

    # Blocks stored while Redis was down never reach the index (the engine reports each block once),
    # so wait until both replicas are registered again (they back off a moment after a failure)
    rc = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    try:
        wait_for(lambda: rc.hlen(f"orthrus:{namespace}:hb") == 2, 15, "both replicas to heartbeat again")
    finally:
        rc.close()

    # back up: prefix routing works again (for a new prefix: the index stays a subset of the truth)
    fresh = token_ids(PREFIX_BLOCKS * info.page_size, seed=4)
    client.generate(fresh + token_ids(5, seed=310), max_tokens=2)
    wait_held(index, info, fresh, PREFIX_BLOCKS, timeout_s=15)
    for i in range(3):
        r = client.generate(fresh + token_ids(5, seed=320 + i), max_tokens=2)
        assert r.cached_prompt_tokens == PREFIX_BLOCKS * info.page_size
