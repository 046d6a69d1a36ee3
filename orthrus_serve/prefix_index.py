"""Cluster-wide prefix-cache index: which replica holds which KV blocks (docs/ARCHITECTURE.md §4, §5).

Engine replicas `publish` their prefix-cache events (`stored`, `removed`, `cleared`, in order) and
`heartbeat`; the prefix-aware router calls `lookup` with a prompt's page-hash chain and gets, per
live replica, how many LEADING blocks it already holds. A replica whose heartbeat is older than
`heartbeat_timeout_s` is ignored by lookups and dropped by `collect_garbage`.

Two implementations with the same semantics:
- `LocalPrefixIndex` (here): in-process dicts under a lock, owned by the router in single-node mode
  (fed by the replicas' routing stats).
- `RedisPrefixIndex` (redis_prefix_index.py): shared through Redis (the cluster case).
"""

import threading
import time
from typing import Iterable, Protocol

Events = list[tuple[str, list[str]]]
EVENT_KINDS = ("stored", "removed", "cleared")


class PrefixIndex(Protocol):
    def heartbeat(self, replica_id: str) -> None:
        """Register the replica as live now."""

    def publish(self, replica_id: str, events: Events) -> None:
        """Apply the replica's prefix-cache events, in order: ("stored", hashes), ("removed", hashes),
        ("cleared", [])."""

    def lookup(self, page_hashes: list[str]) -> dict[str, int]:
        """For each live replica holding the first block: how many leading consecutive blocks of
        the chain it holds (counting stops at its first miss)."""

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica that shut down cleanly: its entries and its heartbeat."""

    def collect_garbage(self) -> int:
        """Drop all entries of replicas whose heartbeat has lapsed; return how many were dropped."""

    def close(self) -> None:
        """Release the index's connections (a no-op in process)."""


def check_events(events: Events) -> None:
    for kind, _ in events:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown prefix-cache event {kind!r}; expected one of {EVENT_KINDS}")


def leading_counts(holders_per_block: Iterable[set[str]], live: set[str]) -> dict[str, int]:
    """replica -> number of leading blocks it holds, over replicas in `live`."""
    counts: dict[str, int] = {}
    still = live
    for i, holders in enumerate(holders_per_block):
        still = still & holders
        if not still:
            break
        for r in still:
            counts[r] = i + 1
    return counts


class LocalPrefixIndex:
    """In-process index (one process routes for the whole application). Thread-safe."""

    def __init__(self, heartbeat_timeout_s: float = 30.0):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.Lock()
        self._holders: dict[str, set[str]] = {}  # page hash -> replica ids
        self._held: dict[str, set[str]] = {}  # replica id -> page hashes
        self._last_seen: dict[str, float] = {}  # replica id -> time.monotonic() of last heartbeat

    def heartbeat(self, replica_id: str) -> None:
        with self._lock:
            self._last_seen[replica_id] = time.monotonic()

    def publish(self, replica_id: str, events: Events) -> None:
        check_events(events)
        with self._lock:
            held = self._held.setdefault(replica_id, set())
            for kind, hashes in events:
                if kind == "stored":
                    for h in hashes:
                        self._holders.setdefault(h, set()).add(replica_id)
                    held.update(hashes)
                elif kind == "removed":
                    for h in hashes:
                        self._discard(h, replica_id)
                    held.difference_update(hashes)
                else:  # cleared
                    self._drop_entries(replica_id)
                    held = self._held.setdefault(replica_id, set())

    def lookup(self, page_hashes: list[str]) -> dict[str, int]:
        with self._lock:
            now = time.monotonic()
            live = {r for r, t in self._last_seen.items() if now - t <= self.heartbeat_timeout_s}
            return leading_counts((self._holders.get(h, set()) for h in page_hashes), live)

    def remove_replica(self, replica_id: str) -> None:
        with self._lock:
            self._drop_entries(replica_id)
            self._last_seen.pop(replica_id, None)

    def collect_garbage(self) -> int:
        with self._lock:
            now = time.monotonic()
            dead = [r for r, t in self._last_seen.items() if now - t > self.heartbeat_timeout_s]
            for r in dead:
                self._drop_entries(r)
                self._last_seen.pop(r, None)
            return len(dead)

    def close(self) -> None:
        pass

    def _discard(self, h: str, replica_id: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica_id)
            if not holders:
                del self._holders[h]

    def _drop_entries(self, replica_id: str) -> None:
        for h in self._held.pop(replica_id, ()):
            self._discard(h, replica_id)
