"""Metric accounting of one request's deltas (the Ray metric objects replaced by recorders)."""

from orthrus_engines import RequestOutput
from orthrus_serve.metrics import EngineMetrics, RequestMetrics


class Recorder:
    def __init__(self):
        self.calls: list[float] = []

    def inc(self, v=1.0):
        self.calls.append(v)

    def observe(self, v):
        self.calls.append(v)

    def set(self, v):
        self.calls.append(v)


def delta(tokens, drafted, accepted, finished=False, prompt=40, cached=32) -> RequestOutput:
    return RequestOutput("r", tokens, "", finished=finished, drafted_tokens=drafted, accepted_tokens=accepted,
                         prompt_tokens=prompt, cached_prompt_tokens=cached)


def test_ttft_itl_counters_and_hit_rate():
    m = EngineMetrics(*(Recorder() for _ in range(10)))
    totals: dict = {}
    r = RequestMetrics(m, totals, now=0.0)
    r.on_delta(delta([], 0, 0), now=0.5)  # no tokens yet: nothing timed
    r.on_delta(delta([1, 2, 3], 7, 2), now=1.0)  # first tokens at 1.0 s
    r.on_delta(delta([4, 5], 14, 3), now=1.4)  # 2 tokens 0.4 s later: 0.2 s each
    r.on_delta(delta([6], 21, 3, finished=True), now=1.5)
    assert m.ttft.calls == [1.0]
    assert [round(x, 6) for x in m.itl.calls] == [0.2, 0.1]
    assert sum(m.generated.calls) == 6
    assert sum(m.drafted.calls) == 21 and sum(m.accepted.calls) == 3
    assert m.prompt_tokens.calls == [40] and m.cached_prompt_tokens.calls == [32]
    assert m.prefix_hit_rate.calls == [0.8]
    RequestMetrics(m, totals, now=0.0).on_delta(delta([9], 0, 0, finished=True, prompt=40, cached=0), now=0.1)
    assert m.prefix_hit_rate.calls[-1] == 32 / 80  # replica-wide, not per request


def test_engine_stats_feed_gauges_and_the_fallback_counter():
    """The engine's running total of draft fallbacks becomes counter increments, each counted once."""
    m = EngineMetrics(*(Recorder() for _ in range(11)))
    for waiting, fallbacks in ((2, 0), (1, 3), (0, 3), (0, 5)):
        m.on_engine_stats({"num_waiting": waiting, "kv_usage": 0.5, "num_draft_fallbacks": fallbacks})
    assert m.queue_depth.calls == [2, 1, 0, 0] and m.kv_usage.calls == [0.5] * 4
    assert m.draft_fallbacks.calls == [3, 2]


def test_samples_of_one_request_count_their_own_counters_and_the_prompt_once():
    """n > 1: interleaved deltas of two samples, each with its own counters; time between tokens is per sample."""
    m = EngineMetrics(*(Recorder() for _ in range(10)))
    r = RequestMetrics(m, {}, now=0.0)

    def sample(i, tokens, drafted, finished=False):
        out = delta(tokens, drafted, 0, finished, cached=0 if i == 0 else 32)
        out.index = i
        return out

    r.on_delta(sample(0, [1, 2], 4), now=1.0)
    r.on_delta(sample(1, [3], 2), now=1.5)
    r.on_delta(sample(0, [4], 6, finished=True), now=2.0)
    r.on_delta(sample(1, [5], 5, finished=True), now=2.1)
    assert m.ttft.calls == [1.0] and [round(x, 6) for x in m.itl.calls] == [1.0, 0.6]
    assert sum(m.drafted.calls) == 6 + 5 and sum(m.generated.calls) == 5
    assert m.prompt_tokens.calls == [40] and m.cached_prompt_tokens.calls == []  # once: the first sample's
