"""The prefix index shared through Redis (the cluster case); the interface is in prefix_index.py.

Keys, per namespace (one per model):
    orthrus:{ns}:blk:{hash}     SET of replica ids holding the block
    orthrus:{ns}:rep:{replica}  SET of page hashes the replica holds (for clear, removal, GC)
    orthrus:{ns}:hb             HASH replica id -> last heartbeat, in Redis server time (seconds)
All times are the Redis server's clock (TIME), so replicas and routers on different machines
never compare their own clocks. `publish` sends all of one call's events as one pipeline and
`lookup` is one pipelined round trip (TIME, HGETALL hb, SMEMBERS per block).

TTL (`block_ttl_s`, default max(3600 s, 20 x heartbeat timeout)): block and replica keys get it,
refreshed on every store (and the replica key and the heartbeat hash on every heartbeat). It is a
memory backstop for when no GC ever runs, not the liveness mechanism: lookups already ignore
replicas with a lapsed heartbeat, and GC removes their entries. It is deliberately long because the
engine emits `stored` only once per block: a hot prefix (a system prompt) that stays cached for
hours is never re-stored, and a TTL of a few heartbeat timeouts would drop it from the index
exactly when prefix routing matters most.

Failure model: no method raises because Redis is unreachable, slow or failing. `lookup` then
returns {} (the router falls back to load-based routing); `publish`/`heartbeat` drop their data and
log a warning at most once per `warn_interval_s`. After a failure, Redis is not tried again for
`retry_interval_s` (so an outage does not add a socket timeout to every request). A replica whose
events were dropped may be listed for blocks it has since evicted, so the next successful
heartbeat or publish for it first clears all its entries: the index is again a subset of the truth.
"""

import logging
import os
import threading
import time

from orthrus_serve.prefix_index import Events, check_events, leading_counts

log = logging.getLogger(__name__)

# KEYS: hb, rep key. ARGV: replica id, block key prefix, timeout s (-1: unconditional), drop hb (0/1).
# Drops all of the replica's block entries; with a timeout, only if its heartbeat is (still) older
# than that, checked atomically against the server clock (a replica that just came back is kept).
_DROP_REPLICA = """
local timeout = tonumber(ARGV[3])
if timeout >= 0 then
  local seen = redis.call('HGET', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  if seen and tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(seen) <= timeout then return 0 end
end
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('SREM', ARGV[2] .. h, ARGV[1])
end
redis.call('DEL', KEYS[2])
if ARGV[4] == '1' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: hb, rep key. ARGV: replica id, ttl ms. Heartbeat stamped with the server clock.
_HEARTBEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


def redis_connection_kwargs(url: str, password: str | None, ca_file: str | None, socket_timeout_s: float) -> dict:
    """redis-py's keyword arguments besides the URL. A `rediss://` URL is TLS, verifying the
    server's certificate and host name against `ca_file` (None: the system's roots)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    tls = url.startswith("rediss://")
    if ca_file is not None and not tls:
        raise ValueError(f"a Redis CA file is for TLS: use a rediss:// URL, not {url.split('://')[0]}://")
    kwargs = {
        "password": password,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": Retry(NoBackoff(), 1),  # one retry on a fresh connection: pooled ones go stale on restarts
        "decode_responses": True,
    }
    if tls:
        kwargs |= {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": ca_file}
    return kwargs


class RedisPrefixIndex:
    """Index shared through Redis; see the module docstring for keys, TTLs and failure handling."""

    @classmethod
    def from_env(cls, url: str, namespace: str, heartbeat_timeout_s: float, password_env: str | None = None,
                 ca_file: str | None = None) -> "RedisPrefixIndex":
        """The password, if any, comes from this process's environment variable `password_env` (never
        from a config); `ca_file`: TLS (rediss://) trusting that CA."""
        password = os.environ.get(password_env) if password_env else None
        if password_env and password is None:
            log.warning("prefix index: %s is not set; connecting to Redis without a password", password_env)
        return cls(url, namespace, heartbeat_timeout_s=heartbeat_timeout_s, password=password, ca_file=ca_file)

    def __init__(
        self,
        url: str,
        namespace: str,
        heartbeat_timeout_s: float = 30.0,
        socket_timeout_s: float = 0.25,
        block_ttl_s: float | None = None,
        retry_interval_s: float = 1.0,
        warn_interval_s: float = 30.0,
        password: str | None = None,  # when the URL has none
        ca_file: str | None = None,  # TLS (a rediss:// URL): the CA certificates to trust
    ):
        import redis

        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.block_ttl_s = block_ttl_s if block_ttl_s is not None else max(3600.0, 20 * heartbeat_timeout_s)
        self._ttl_ms = max(1, int(self.block_ttl_s * 1000))
        self.retry_interval_s = retry_interval_s
        self.warn_interval_s = warn_interval_s
        self._prefix = f"orthrus:{namespace}:"
        self._blk = self._prefix + "blk:"
        self._hb = self._prefix + "hb"
        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, **redis_connection_kwargs(url, password, ca_file, socket_timeout_s))
        self._lock = threading.Lock()
        self._down_until = 0.0  # time.monotonic() before which Redis is not tried
        self._last_warning = float("-inf")
        self._resync: set[str] = set()  # replicas whose events were dropped: clear them first

    def heartbeat(self, replica_id: str) -> None:
        if not self._available():
            self._dropped(replica_id, "heartbeat", None)
            return
        pipe = self._redis.pipeline(transaction=False)
        resync = self._add_resync(pipe, replica_id)
        pipe.eval(_HEARTBEAT, 2, self._hb, self._rep(replica_id), replica_id, self._ttl_ms)
        self._execute(pipe, "heartbeat", replica_id, resync)

    def publish(self, replica_id: str, events: Events) -> None:
        check_events(events)
        if not events:
            return
        if not self._available():
            self._dropped(replica_id, "publish", None)
            return
        rep = self._rep(replica_id)
        pipe = self._redis.pipeline(transaction=False)
        resync = self._add_resync(pipe, replica_id)
        for kind, hashes in events:
            if kind == "cleared":
                self._add_drop(pipe, replica_id, timeout_s=-1, drop_heartbeat=False)
            elif not hashes:
                continue
            elif kind == "stored":
                for h in hashes:
                    pipe.sadd(self._blk + h, replica_id)
                    pipe.pexpire(self._blk + h, self._ttl_ms)
                pipe.sadd(rep, *hashes)
                pipe.pexpire(rep, self._ttl_ms)
            else:  # removed
                for h in hashes:
                    pipe.srem(self._blk + h, replica_id)
                pipe.srem(rep, *hashes)
        self._execute(pipe, "publish", replica_id, resync)

    def lookup(self, page_hashes: list[str]) -> dict[str, int]:
        if not page_hashes or not self._available():
            return {}
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self._hb)
        for h in page_hashes:
            pipe.smembers(self._blk + h)
        res = self._execute(pipe, "lookup", None, False)
        if res is None:
            return {}
        (sec, usec), seen, holders = res[0], res[1], res[2:]
        now = sec + usec / 1e6
        live = {r for r, t in seen.items() if now - float(t) <= self.heartbeat_timeout_s}
        return leading_counts(holders, live)

    def remove_replica(self, replica_id: str) -> None:
        if not self._available():
            return  # its heartbeat lapses; GC or the TTLs remove its entries later
        pipe = self._redis.pipeline(transaction=False)
        self._add_drop(pipe, replica_id, timeout_s=-1, drop_heartbeat=True)
        self._execute(pipe, "remove_replica", None, False)
        with self._lock:
            self._resync.discard(replica_id)

    def collect_garbage(self) -> int:
        if not self._available():
            return 0
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self._hb)
        res = self._execute(pipe, "collect_garbage", None, False)
        if res is None:
            return 0
        (sec, usec), seen = res
        now = sec + usec / 1e6
        lapsed = [r for r, t in seen.items() if now - float(t) > self.heartbeat_timeout_s]
        if not lapsed:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for r in lapsed:  # the script re-checks each heartbeat atomically
            self._add_drop(pipe, r, timeout_s=self.heartbeat_timeout_s, drop_heartbeat=True)
        res = self._execute(pipe, "collect_garbage", None, False)
        return sum(res) if res is not None else 0

    def close(self) -> None:
        self._redis.close()

    # -- helpers ------------------------------------------------------------------------------
    def _rep(self, replica_id: str) -> str:
        return f"{self._prefix}rep:{replica_id}"

    def _add_drop(self, pipe, replica_id: str, timeout_s: float, drop_heartbeat: bool) -> None:
        pipe.eval(
            _DROP_REPLICA, 2, self._hb, self._rep(replica_id),
            replica_id, self._blk, timeout_s, int(drop_heartbeat),
        )  # fmt: skip

    def _add_resync(self, pipe, replica_id: str) -> bool:
        with self._lock:
            resync = replica_id in self._resync
        if resync:
            self._add_drop(pipe, replica_id, timeout_s=-1, drop_heartbeat=False)
        return resync

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _execute(self, pipe, what: str, replica_id: str | None, resynced: bool) -> list | None:
        """Run the pipeline (one round trip); None on any Redis failure."""
        try:
            res = pipe.execute()
        except self._errors as e:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_interval_s
            self._dropped(replica_id, what, e)
            return None
        if resynced:
            with self._lock:
                self._resync.discard(replica_id)
        return res

    def _dropped(self, replica_id: str | None, what: str, error: Exception | None) -> None:
        now = time.monotonic()
        with self._lock:
            if replica_id is not None and what == "publish":
                self._resync.add(replica_id)
            warn = now - self._last_warning >= self.warn_interval_s
            if warn:
                self._last_warning = now
        if warn:
            reason = f"{type(error).__name__}: {error}" if error is not None else "Redis was failing moments ago"
            log.warning("prefix index: Redis unavailable (%s); %s skipped, routing falls back to load", reason, what)
