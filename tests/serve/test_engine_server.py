"""An engine replica's own lifecycle, without Ray: which prefix index it publishes to, and its shutdown
(Ray Serve calls `__del__`): out of the index, the engine stopped, the index's connection closed, once."""

import pytest

from orthrus_serve.config import ServeConfig
from orthrus_serve.engine_server import EngineServer, replica_prefix_index
from orthrus_serve.redis_prefix_index import RedisPrefixIndex


def test_only_a_redis_index_is_built_by_a_replica():
    assert replica_prefix_index(ServeConfig()) is None  # single node: the router keeps the index
    index = replica_prefix_index(ServeConfig(index={"redis_url": "redis://127.0.0.1:1/0"}))
    assert isinstance(index, RedisPrefixIndex)  # nothing connects until it is used
    index.close()


class Calls:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def __getattr__(self, method):
        return lambda *args: self.log.append((self.name, method, *args))


def replica(index: bool) -> tuple[object, list]:
    """A replica object as its __init__ leaves it, with recording stand-ins for its engine and index."""
    log: list = []
    server = EngineServer.func_or_class.__new__(EngineServer.func_or_class)
    server.replica_id, server.closed = "r1", False
    server.engine = Calls(log, "engine")
    server.index = Calls(log, "index") if index else None
    return server, log


@pytest.mark.parametrize("index", [True, False], ids=["redis", "no-index"])
def test_shutdown_leaves_the_index_stops_the_engine_and_closes_once(index):
    server, log = replica(index)
    server.__del__()  # what Ray Serve calls
    expected = [("engine", "shutdown")]
    if index:
        expected = [("index", "remove_replica", "r1")] + expected + [("index", "close")]
    assert log == expected and server.closed
    server.shutdown()
    server.__del__()
    assert log == expected  # once
