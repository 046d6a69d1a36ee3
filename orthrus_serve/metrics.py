"""Prometheus metrics of an engine replica, through Ray's metrics API (exported by every Ray node's
metrics agent, scraped like the rest of Ray Serve's metrics).

`RequestMetrics` turns one request's stream of deltas (`RequestOutput`s, read through `counters()`)
into metric updates; the metric objects are passed in, so the accounting is testable without a Ray
cluster.
"""

import time
from dataclasses import dataclass

from orthrus_engines.outputs import RequestOutput

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@dataclass
class EngineMetrics:
    generated: object  # counters
    drafted: object
    accepted: object
    prompt_tokens: object
    cached_prompt_tokens: object
    ttft: object  # histograms (seconds)
    itl: object
    queue_depth: object  # gauges
    kv_usage: object
    prefix_hit_rate: object
    draft_fallbacks: object = None  # counter of the engine's steps run as plain AR after a draft-path fault
    fallbacks_seen: int = 0  # the engine's running total already counted

    @classmethod
    def create(cls, model: str) -> "EngineMetrics":
        from ray.serve import metrics as m

        def tagged(metric):
            metric.set_default_tags({"model": model})
            return metric

        tags = ("model",)
        return cls(
            generated=tagged(m.Counter("orthrus_generated_tokens", "Tokens generated", tags)),
            drafted=tagged(m.Counter("orthrus_drafted_tokens", "Draft tokens proposed by the diffusion view", tags)),
            accepted=tagged(m.Counter("orthrus_accepted_tokens", "Draft tokens accepted by the AR view", tags)),
            prompt_tokens=tagged(m.Counter("orthrus_prompt_tokens", "Prompt tokens of finished requests", tags)),
            cached_prompt_tokens=tagged(m.Counter("orthrus_cached_prompt_tokens",
                                                  "Prompt tokens served from the prefix cache", tags)),
            ttft=tagged(m.Histogram("orthrus_time_to_first_token_seconds", "Time to first token",
                                    LATENCY_BUCKETS_S, tags)),
            itl=tagged(m.Histogram("orthrus_inter_token_latency_seconds", "Time between streamed tokens",
                                   LATENCY_BUCKETS_S, tags)),
            queue_depth=tagged(m.Gauge("orthrus_queue_depth", "Requests waiting for admission", tags)),
            kv_usage=tagged(m.Gauge("orthrus_kv_cache_usage", "Fraction of KV pages in use", tags)),
            prefix_hit_rate=tagged(m.Gauge("orthrus_prefix_hit_rate",
                                           "Cached / total prompt tokens since start", tags)),
            draft_fallbacks=tagged(m.Counter("orthrus_draft_fallbacks",
                                             "Decode steps run as plain AR after a fault in the draft path", tags)),
        )

    def on_engine_stats(self, stats: dict) -> None:
        """Gauges and counters from a snapshot of `EngineCore.stats()`."""
        self.queue_depth.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_usage"])
        total = stats.get("num_draft_fallbacks", 0)
        if self.draft_fallbacks is not None and total > self.fallbacks_seen:
            self.draft_fallbacks.inc(total - self.fallbacks_seen)
        self.fallbacks_seen = total


class RequestMetrics:
    """Feeds one request's deltas into the replica's metrics (with n > 1, its samples' deltas interleaved:
    each sample's counters are its own; the prompt is counted once, with the first sample, which
    prefilled it)."""

    def __init__(self, metrics: EngineMetrics, totals: dict, now: float | None = None):
        self.m = metrics
        self.totals = totals  # replica-wide prompt / cached counts, for the hit-rate gauge
        self.start = now if now is not None else time.monotonic()
        self.last: dict[int, float] = {}  # sample index -> when its last tokens came
        self.drafted: dict[int, int] = {}  # sample index -> its counters already counted
        self.accepted: dict[int, int] = {}

    def on_delta(self, delta: RequestOutput, now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        n, c, i = len(delta.token_ids), delta.counters(), delta.index
        if n:
            self.m.generated.inc(n)
            if not self.last:
                self.m.ttft.observe(now - self.start)
            elif i in self.last:
                self.m.itl.observe((now - self.last[i]) / n)  # a chunk of n tokens: per-token latency
            self.last[i] = now
        for seen, name, metric in ((self.drafted, "drafted_tokens", self.m.drafted),
                                   (self.accepted, "accepted_tokens", self.m.accepted)):
            if c[name] > seen.get(i, 0):
                metric.inc(c[name] - seen.get(i, 0))
                seen[i] = c[name]
        if delta.finished and i == 0:
            self.m.prompt_tokens.inc(c["prompt_tokens"])
            if c["cached_prompt_tokens"]:
                self.m.cached_prompt_tokens.inc(c["cached_prompt_tokens"])
            self.totals["prompt"] = self.totals.get("prompt", 0) + c["prompt_tokens"]
            self.totals["cached"] = self.totals.get("cached", 0) + c["cached_prompt_tokens"]
            self.m.prefix_hit_rate.set(self.totals["cached"] / max(1, self.totals["prompt"]))
