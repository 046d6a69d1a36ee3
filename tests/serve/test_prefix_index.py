"""Prefix-cache index: both implementations, same semantics; Redis against a real redis-server."""

import logging
import time
import uuid

import pytest
import redis
from redis_server import new_redis_server, redis_server
from support.net import free_port

from orthrus_serve.prefix_index import LocalPrefixIndex
from orthrus_serve.redis_prefix_index import RedisPrefixIndex

H = [f"{i:032x}" for i in range(8)]  # stand-ins for page hashes
TIMEOUT = 0.3  # heartbeat timeout for the lapse tests


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture
def rclient(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(params=["local", "redis"])
def make_index(request):
    """make_index(namespace=None, heartbeat_timeout_s=30) -> a fresh index (a fresh namespace on Redis)."""
    made = []

    def make(namespace=None, heartbeat_timeout_s=30.0):
        if request.param == "local":
            return LocalPrefixIndex(heartbeat_timeout_s=heartbeat_timeout_s)
        url = request.getfixturevalue("redis_url")
        index = RedisPrefixIndex(url, namespace or uuid.uuid4().hex[:8], heartbeat_timeout_s=heartbeat_timeout_s)
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()


def live(index, *replicas):
    for r in replicas:
        index.heartbeat(r)


def test_counts_leading_blocks_only(make_index):
    index = make_index()
    live(index, "a", "b", "c")
    index.publish("a", [("stored", [H[0], H[1]]), ("stored", [H[3]])])  # holds 0, 1, 3
    index.publish("b", [("stored", H[:4])])
    index.publish("c", [("stored", [H[1], H[2]])])  # misses block 0
    assert index.lookup(H[:4]) == {"a": 2, "b": 4}
    assert index.lookup(H[:1]) == {"a": 1, "b": 1}
    assert index.lookup(H[5:]) == {}
    assert index.lookup([]) == {}


def test_published_without_heartbeat_is_not_live(make_index):
    index = make_index()
    index.publish("a", [("stored", H[:2])])
    assert index.lookup(H[:2]) == {}
    index.heartbeat("a")
    assert index.lookup(H[:2]) == {"a": 2}


def test_removed_events_in_order(make_index):
    index = make_index()
    live(index, "a", "b")
    index.publish("a", [("stored", H[:4]), ("removed", [H[2]])])
    index.publish("b", [("stored", H[:2]), ("removed", [H[0]]), ("stored", [H[0]])])
    assert index.lookup(H[:4]) == {"a": 2, "b": 2}
    index.publish("a", [("removed", [H[0]])])
    assert index.lookup(H[:4]) == {"b": 2}


def test_cleared_drops_only_that_replica(make_index):
    index = make_index()
    live(index, "a", "b")
    index.publish("a", [("stored", H[:3])])
    index.publish("b", [("stored", H[:2])])
    index.publish("a", [("stored", [H[3]]), ("cleared", []), ("stored", [H[0]])])
    assert index.lookup(H[:4]) == {"a": 1, "b": 2}


def test_unknown_event_is_a_programming_error(make_index):
    index = make_index()
    with pytest.raises(ValueError, match="unknown prefix-cache event"):
        index.publish("a", [("evicted", [H[0]])])


def test_namespaces_are_isolated(make_index):
    one, two = make_index("model-one"), make_index("model-two")
    live(one, "a")
    live(two, "a", "b")
    one.publish("a", [("stored", H[:2])])
    two.publish("b", [("stored", H[:3])])
    assert one.lookup(H[:3]) == {"a": 2}
    assert two.lookup(H[:3]) == {"b": 3}


def test_remove_replica(make_index):
    index = make_index()
    live(index, "a", "b")
    index.publish("a", [("stored", H[:2])])
    index.publish("b", [("stored", H[:2])])
    index.remove_replica("a")
    assert index.lookup(H[:2]) == {"b": 2}
    index.heartbeat("a")  # a replacement under the same id starts empty
    assert index.lookup(H[:2]) == {"b": 2}


def test_lapsed_replica_ignored_then_collected(make_index, rclient):
    index = make_index(heartbeat_timeout_s=TIMEOUT)
    live(index, "dead", "alive")
    index.publish("dead", [("stored", H[:3])])
    index.publish("alive", [("stored", H[:1])])
    assert index.lookup(H[:3]) == {"dead": 3, "alive": 1}
    time.sleep(TIMEOUT + 0.1)
    index.heartbeat("alive")
    assert index.lookup(H[:3]) == {"alive": 1}
    assert index.collect_garbage() == 1
    assert index.collect_garbage() == 0
    index.heartbeat("dead")  # back, but its entries were collected
    assert index.lookup(H[:3]) == {"alive": 1}
    if isinstance(index, RedisPrefixIndex):
        ns = index._prefix
        assert not rclient.exists(f"{ns}rep:dead")
        assert rclient.smembers(f"{ns}blk:{H[0]}") == {"alive"}
        assert not rclient.exists(f"{ns}blk:{H[1]}", f"{ns}blk:{H[2]}")
        assert rclient.smembers(f"{ns}rep:alive") == {H[0]}


def test_gc_keeps_a_replica_that_came_back(make_index):
    index = make_index(heartbeat_timeout_s=TIMEOUT)
    live(index, "a")
    index.publish("a", [("stored", H[:2])])
    time.sleep(TIMEOUT + 0.1)
    index.heartbeat("a")
    assert index.collect_garbage() == 0
    assert index.lookup(H[:2]) == {"a": 2}


def test_redis_index_from_env(redis_url, monkeypatch):
    """The password comes from the named environment variable (none set: no password, a warning)."""
    monkeypatch.delenv("ORTHRUS_TEST_NO_PW", raising=False)
    index = RedisPrefixIndex.from_env(redis_url, "m", 10.0, password_env="ORTHRUS_TEST_NO_PW")
    assert isinstance(index, RedisPrefixIndex) and index.heartbeat_timeout_s == 10.0
    index.heartbeat("a")
    index.publish("a", [("stored", H[:2])])
    assert index.lookup(H[:2]) == {"a": 2}
    index.close()


# -- Redis only --------------------------------------------------------------------------------


@pytest.fixture
def rindex(redis_url):
    index = RedisPrefixIndex(redis_url, uuid.uuid4().hex[:8], heartbeat_timeout_s=30.0, retry_interval_s=0.05)
    yield index
    index.close()


@pytest.fixture
def round_trips(monkeypatch):
    """Counts requests written to any Redis connection (a pipeline is written as one)."""
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def test_lookup_is_one_round_trip(rindex, round_trips):
    live(rindex, "a", "b")
    rindex.publish("a", [("stored", H)])
    rindex.lookup(H)  # the connection is open now
    round_trips.clear()
    assert rindex.lookup(H) == {"a": 8}
    assert len(round_trips) == 1


def test_publish_is_one_round_trip(rindex, round_trips, rclient):
    rindex.heartbeat("a")
    round_trips.clear()
    events = [("stored", [f"{i:032x}"]) for i in range(100)]
    events += [("removed", [f"{i:032x}"]) for i in range(50)] + [("cleared", []), ("stored", H[:2])]
    rindex.publish("a", events)
    assert len(round_trips) == 1
    assert rindex.lookup(H[:3]) == {"a": 2}
    assert rclient.scard(f"{rindex._prefix}rep:a") == 2


def test_keys_have_ttls(rindex, rclient):
    rindex.heartbeat("a")
    rindex.publish("a", [("stored", H[:1])])
    ttl_ms = rindex.block_ttl_s * 1000
    for key in (f"blk:{H[0]}", "rep:a", "hb"):
        assert 0 < rclient.pttl(rindex._prefix + key) <= ttl_ms


def test_dropped_publish_resyncs_by_clearing(rindex, monkeypatch):
    live(rindex, "a")
    rindex.publish("a", [("stored", H[:4])])
    real_execute = redis.client.Pipeline.execute

    def failing(self, *args, **kwargs):
        raise redis.ConnectionError("injected")

    monkeypatch.setattr(redis.client.Pipeline, "execute", failing)
    rindex.publish("a", [("removed", [H[0]])])  # dropped: the index still lists H[0] for "a"
    assert rindex.lookup(H[:4]) == {}  # failing: degrade
    monkeypatch.setattr(redis.client.Pipeline, "execute", real_execute)
    time.sleep(0.06)  # retry_interval_s
    rindex.heartbeat("a")  # first success clears a's possibly stale entries
    assert rindex.lookup(H[:4]) == {}
    rindex.publish("a", [("stored", H[1:3])])
    assert rindex.lookup(H[:4]) == {}
    assert rindex.lookup(H[1:4]) == {"a": 2}


def test_closed_port_never_raises():
    index = RedisPrefixIndex(f"redis://127.0.0.1:{free_port()}/0", "m", heartbeat_timeout_s=1.0)
    t0 = time.monotonic()
    index.heartbeat("a")
    index.publish("a", [("stored", H[:2]), ("cleared", [])])
    assert index.lookup(H[:2]) == {}
    index.remove_replica("a")
    assert index.collect_garbage() == 0
    assert time.monotonic() - t0 < 1.0
    index.close()


def test_server_stopped_and_restarted(caplog):
    server = new_redis_server()
    server.start()
    index = RedisPrefixIndex(server.url, "m", heartbeat_timeout_s=30.0, socket_timeout_s=0.25, retry_interval_s=0.05)
    try:
        live(index, "a")
        index.publish("a", [("stored", H[:2])])
        assert index.lookup(H[:2]) == {"a": 2}

        server.stop()
        with caplog.at_level(logging.WARNING, logger="orthrus_serve.redis_prefix_index"):
            for _ in range(2):
                index.heartbeat("a")
                index.publish("a", [("stored", H[2:4])])
                assert index.lookup(H[:2]) == {}
                assert index.collect_garbage() == 0
                index.remove_replica("b")
                time.sleep(0.06)
        assert len([r for r in caplog.records if r.name == "orthrus_serve.redis_prefix_index"]) == 1

        server.start()  # same port, empty data set
        time.sleep(0.06)
        index.heartbeat("a")
        index.publish("a", [("stored", H[:3])])
        assert index.lookup(H[:4]) == {"a": 3}
    finally:
        index.close()
        server.close()
