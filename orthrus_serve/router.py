"""Prefix-aware request routing (docs/ARCHITECTURE.md §5).

The ingress passes each request's page-hash chain as the `page_hashes` keyword of
`handle.generate.remote(...)`. The router asks the prefix index which replicas hold how many
leading blocks, and ranks the best holders first, unless they are much busier than the least
loaded replica (then load wins); with no match it falls back to power-of-two-choices.

A replica that reports itself broken (routing stats `routable: False`: its engine thread stopped or its
steps keep failing) is left out while any other replica is a candidate, so it never looks least loaded.

Index: Redis when configured (replicas publish their engines' events there); otherwise an
in-process index in this router, fed by the replicas' `record_routing_stats()` snapshots.
"""

import asyncio
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from orthrus_serve.prefix_index import LocalPrefixIndex
from orthrus_serve.redis_prefix_index import RedisPrefixIndex


def rank_replicas(
    candidates: list[str], matches: dict[str, int], loads: dict[str, float], imbalance_threshold: float,
    min_match_blocks: int = 1,
) -> list[list[str]]:
    """Pure ranking: ids of the best prefix holders first (if not overloaded), then two random others."""
    best = max((matches.get(c, 0) for c in candidates), default=0)
    ranks: list[list[str]] = []
    if best >= min_match_blocks:
        least = min(loads.get(c, 0.0) for c in candidates)
        holders = [c for c in candidates if matches.get(c, 0) == best
                   and loads.get(c, 0.0) - least <= imbalance_threshold]
        if holders:
            ranks.append(sorted(holders, key=lambda c: loads.get(c, 0.0)))
    rest = [c for c in candidates if not ranks or c not in ranks[0]]
    if rest:
        ranks.append(random.sample(rest, min(2, len(rest))))
    return ranks


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, redis_url: str | None = None, namespace: str = "default",
                         imbalance_threshold: float = 8, min_match_blocks: int = 1,
                         heartbeat_timeout_s: float = 5.0, redis_password_env: str | None = None,
                         redis_ca_file: str | None = None, **_):
        self.local = redis_url is None
        self.index = (RedisPrefixIndex.from_env(redis_url, namespace, heartbeat_timeout_s, redis_password_env,
                                                redis_ca_file) if redis_url else LocalPrefixIndex(heartbeat_timeout_s))
        self.imbalance_threshold = imbalance_threshold
        self.min_match_blocks = min_match_blocks
        self._seen_stats: dict[str, int] = {}

    def _refresh_local(self, replicas: list[RunningReplica]) -> None:
        for r in replicas:
            uid, stats = r.replica_id.unique_id, r.routing_stats or {}
            blocks = stats.get("cached_pages")
            if blocks is None:
                continue
            self.index.heartbeat(uid)
            if self._seen_stats.get(uid) != id(stats):
                self._seen_stats[uid] = id(stats)
                self.index.publish(uid, [("cleared", []), ("stored", list(blocks))])

    @staticmethod
    def _routable(r: RunningReplica) -> bool:
        return (r.routing_stats or {}).get("routable", True)

    def _load(self, r: RunningReplica) -> float:
        queued = self.replica_queue_len_cache.get(r.replica_id)
        if queued is not None:
            return float(queued)
        stats = r.routing_stats or {}
        return float(stats.get("num_running", 0) + stats.get("num_waiting", 0))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hashes = (pending_request.kwargs.get("page_hashes") if pending_request is not None else None) or []
        candidate_replicas = [r for r in candidate_replicas if self._routable(r)] or candidate_replicas
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        matches: dict[str, int] = {}
        if hashes:
            if self.local:
                self._refresh_local(candidate_replicas)
                matches = self.index.lookup(hashes)
            else:  # a network round trip: keep the router's event loop free
                matches = await asyncio.to_thread(self.index.lookup, hashes)
        loads = {uid: self._load(r) for uid, r in by_id.items()}
        ranks = rank_replicas(list(by_id), matches, loads, self.imbalance_threshold, self.min_match_blocks)
        return [[by_id[uid] for uid in rank] for rank in ranks]
