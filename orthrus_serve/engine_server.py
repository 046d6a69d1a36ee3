"""The engine deployment: each replica owns one engine, a `ReplicaEngine` (orthrus_engines.engine.replica):
the torch AsyncEngine, or TensorRT-LLM's with `engine.backend: trtllm`.

It streams request deltas (`RequestOutput`s) to the ingress, keeps what its prefix cache holds for
the router (its routing stats; with Redis configured it also publishes its prefix-cache events there,
with a heartbeat), and reports throughput (generated and prefilled tokens/s), queue depth, running requests
and KV usage for autoscaling. A broken replica (health.py) fails Serve's health check and tells the router
it is not routable.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from ray import serve

from orthrus_engines import RequestOutput, SamplingParams
from orthrus_engines.engine.replica import ReplicaEngine, build_replica_engine
from orthrus_serve.config import ServeConfig
from orthrus_serve.health import EngineHealth
from orthrus_serve.metrics import EngineMetrics, RequestMetrics
from orthrus_serve.prefix_index import PrefixIndex
from orthrus_serve.redis_prefix_index import RedisPrefixIndex

log = logging.getLogger(__name__)
RESYNC_S = 30.0  # how often a replica republishes its whole prefix-cache content to the index


def replica_prefix_index(config: ServeConfig) -> PrefixIndex | None:
    """The index a replica publishes to: Redis when configured, else none (in single-node mode the
    router keeps the index itself, fed by the replicas' routing stats)."""
    idx = config.index
    if not idx.redis_url:
        return None
    return RedisPrefixIndex.from_env(idx.redis_url, config.index_namespace, idx.heartbeat_timeout_s,
                                     idx.redis_password_env, idx.redis_ca_file)


class ThroughputMeter:
    """Generated tokens/s over a sliding window."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        self.samples.append((now if now is not None else time.monotonic(), tokens))

    def rate(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        return sum(n for _, n in self.samples) / self.window_s


@serve.deployment(name="OrthrusEngine")
class EngineServer:
    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        engine_args = {"max_waiting_requests": self.config.max_waiting_requests, **self.config.engine}
        self.engine: ReplicaEngine = build_replica_engine(self.config.model, self.config.head, engine_args)
        self.health = EngineHealth(self.engine, self.config.health.min_failures, self.config.health.failing_for_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.index = replica_prefix_index(self.config)
        self.meter = ThroughputMeter()
        self.prefill_meter = ThroughputMeter()  # prompt tokens prefilled (not from the prefix cache) per second
        self.metrics = EngineMetrics.create(self.config.served_model_name)
        self.prompt_totals: dict = {}  # for the prefix hit-rate gauge
        self.cached_pages: set[str] = set()  # what this replica holds, for the router (routing stats)
        self.closed = False
        self._publisher = asyncio.get_event_loop().create_task(self._publish_loop())

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       page_hashes: list[str] | None = None) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; `params` were checked by the ingress. `page_hashes` is for the router."""
        rm = RequestMetrics(self.metrics, self.prompt_totals)
        first = True
        async for out in self.engine.generate(request_id, prompt, params):
            if first:
                self.prefill_meter.add(out.prompt_tokens - out.cached_prompt_tokens)
                first = False
            self.meter.add(len(out.token_ids))
            rm.on_delta(out)
            if out.finished:
                self.health.record(out.finish_reason, out.error)
            yield out

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising has this replica replaced."""
        self.health.check()

    def model_info(self) -> dict:
        return {**self.engine.model_info(), "replica_id": self.replica_id}

    def stats(self) -> dict:
        return {**self.engine.stats(), "tokens_per_s": self.meter.rate(), "replica_id": self.replica_id}

    def record_autoscaling_stats(self) -> dict:
        s = self.engine.stats()
        return {"tokens_per_s": self.meter.rate(), "prefill_tokens_per_s": self.prefill_meter.rate(),
                "queue_depth": s["num_waiting"], "running": s["num_running"], "kv_usage": s["kv_usage"]}

    def record_routing_stats(self) -> dict:
        """What the router reads; `routable` False while broken (the router then avoids this replica)."""
        s = self.engine.stats()
        return {"num_running": s["num_running"], "num_waiting": s["num_waiting"],
                "cached_pages": sorted(self.cached_pages), "routable": self.health.problem() is None}

    async def _publish_loop(self) -> None:
        """Keeps `cached_pages` current from the engine's prefix-cache events and the engine gauges
        fresh; with an index (Redis), publishes the events, heartbeats, resyncs and collects garbage."""
        last_beat, last_gc = 0.0, time.monotonic()
        last_resync = last_gc
        while not self.closed:
            try:
                events = self.engine.drain_prefix_events()
                for kind, hashes in events:
                    if kind == "stored":
                        self.cached_pages.update(hashes)
                    elif kind == "removed":
                        self.cached_pages.difference_update(hashes)
                    else:
                        self.cached_pages.clear()
                now = time.monotonic()
                if now - last_beat >= self.config.index.heartbeat_s:
                    if self.index is not None:
                        await asyncio.to_thread(self.index.heartbeat, self.replica_id)
                    last_beat = now
                    self.metrics.on_engine_stats(self.engine.stats())
                if self.index is not None:
                    if now - last_resync >= RESYNC_S:  # heals what an index outage dropped
                        events = [("cleared", []), ("stored", sorted(self.cached_pages))]
                        last_resync = now
                    if events:
                        await asyncio.to_thread(self.index.publish, self.replica_id, events)
                    if now - last_gc >= self.config.index.heartbeat_timeout_s:  # entries of lapsed replicas
                        await asyncio.to_thread(self.index.collect_garbage)
                        last_gc = now
            except Exception:  # the index is best effort: never take the replica down
                log.exception("prefix index publish failed")
            await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        """Leave cleanly, once: out of the prefix index, the engine thread stopped, Redis closed."""
        if self.closed:
            return
        self.closed = True  # the publish loop stops at its next turn
        try:
            if self.index is not None:
                self.index.remove_replica(self.replica_id)
        finally:
            try:
                self.engine.shutdown()
            finally:
                if self.index is not None:
                    self.index.close()

    def __del__(self):
        """Ray Serve calls this when it shuts the replica down (the documented hook)."""
        if getattr(self, "closed", True):  # shut down already, or never fully built
            return
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - a replica going away must not fail its shutdown
            log.exception("replica shutdown failed")
