"""The engine deployment: each replica owns one AsyncEngine.

It streams request deltas to the ingress, publishes its prefix-cache events to the prefix index
(with a heartbeat), and reports throughput, queue depth and KV usage for autoscaling.
"""

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from ray import serve

from orthrus_engines import AsyncEngine, SamplingParams
from orthrus_serve.config import ServeConfig
from orthrus_serve.health import EngineHealth
from orthrus_serve.metrics import EngineMetrics, RequestMetrics
from orthrus_serve.prefix_index import make_prefix_index

log = logging.getLogger(__name__)
RESYNC_S = 30.0  # how often a replica republishes its whole prefix-cache content to the index


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
        self.engine = AsyncEngine(self.config.model, head=self.config.head, **self.config.engine)
        self.health = EngineHealth(self.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        idx = self.config.index
        self.index = make_prefix_index(idx.redis_url, self.config.index_namespace, idx.heartbeat_timeout_s,
                                       idx.redis_password_env, idx.redis_ca_file)
        self.meter = ThroughputMeter()
        self.metrics = EngineMetrics.create(self.config.served_model_name)
        self.prompt_totals: dict = {}  # for the prefix hit-rate gauge
        self.cached_blocks: set[str] = set()  # what this replica holds, for the in-process index
        self._publisher = asyncio.get_event_loop().create_task(self._publish_loop())

    async def generate(self, request_id: str, prompt: str | list[int], params: dict,
                       block_hashes: list[str] | None = None) -> AsyncIterator[dict]:
        """Deltas of one request as dicts (RequestOutput fields). `block_hashes` is for the router."""
        rm = RequestMetrics(self.metrics, self.prompt_totals)
        async for out in self.engine.generate(request_id, prompt, SamplingParams(**params)):
            self.meter.add(len(out.token_ids))
            delta = dataclasses.asdict(out)
            rm.on_delta(delta)
            if out.finished:
                self.health.record(out.finish_reason, out.error)
            yield delta

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising has this replica replaced."""
        self.health.check()

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def model_info(self) -> dict:
        core = self.engine.core
        return {
            "model": str(core.source.path),
            "block_size": core.block_size,
            "max_model_len": core.max_model_len,
            "page_size": core.page_size,
            "vocab_size": core.vocab_size,
            "prefix_fingerprint": core.fingerprint,
            "replica_id": self.replica_id,
        }

    def stats(self) -> dict:
        return {**self.engine.stats(), "tokens_per_s": self.meter.rate(), "replica_id": self.replica_id}

    def record_autoscaling_stats(self) -> dict:
        s = self.engine.stats()
        return {"tokens_per_s": self.meter.rate(), "queue_depth": s["num_waiting"], "kv_usage": s["kv_usage"]}

    def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        return {"num_running": s["num_running"], "num_waiting": s["num_waiting"],
                "cached_blocks": sorted(self.cached_blocks)}

    async def _publish_loop(self) -> None:
        last_beat, last_gc = 0.0, time.monotonic()
        last_resync = last_gc
        while True:
            try:
                events = self.engine.drain_prefix_events()
                for kind, hashes in events:
                    if kind == "stored":
                        self.cached_blocks.update(hashes)
                    elif kind == "removed":
                        self.cached_blocks.difference_update(hashes)
                    else:
                        self.cached_blocks.clear()
                now = time.monotonic()
                if now - last_beat >= self.config.index.heartbeat_s:
                    await asyncio.to_thread(self.index.heartbeat, self.replica_id)
                    last_beat = now
                    self.metrics.on_engine_stats(self.engine.stats())
                if now - last_resync >= RESYNC_S:  # heals what an index outage dropped
                    events = [("cleared", []), ("stored", sorted(self.cached_blocks))]
                    last_resync = now
                if events:
                    await asyncio.to_thread(self.index.publish, self.replica_id, events)
                if now - last_gc >= self.config.index.heartbeat_timeout_s:  # entries of lapsed replicas
                    await asyncio.to_thread(self.index.collect_garbage)
                    last_gc = now
            except Exception:  # the index is best effort: never take the replica down
                log.exception("prefix index publish failed")
            await asyncio.sleep(0.05)

    def __del__(self):
        try:
            self.index.remove_replica(self.replica_id)
            self.engine.shutdown()
        except Exception:
            pass
