"""The engine replicas' Prometheus metrics reach Ray's metrics endpoint with real values."""

import re
import time

import httpx
import pytest

NAMES = ("generated_tokens_total", "drafted_tokens_total", "accepted_tokens_total", "prompt_tokens_total",
         "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "queue_depth",
         "kv_cache_usage", "prefix_hit_rate")


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(metric, label set) -> value for every orthrus metric (other tests' replicas included)."""
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        m = re.match(r"ray_orthrus_(\w+)\{([^}]*)\} ([0-9.eE+-]+)$", line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def new_series(before: dict, after: dict) -> dict[str, float]:
    """Per metric: the growth since `before` (counters, histograms) summed over label sets, and for
    gauges the largest value of a label set that appeared since."""
    out: dict[str, float] = {}
    for (name, labels), v in after.items():
        grew = v - before.get((name, labels), 0.0)
        if name in ("queue_depth", "kv_cache_usage", "prefix_hit_rate"):
            if (name, labels) not in before:
                out[name] = max(out.get(name, 0.0), v)
        else:
            out[name] = out.get(name, 0.0) + grew
    return out


@pytest.mark.slow
def test_metrics_are_exported(serve_cluster):
    before = scrape(serve_cluster.metrics_port)
    app = serve_cluster.deploy("metrics")
    try:
        for _ in range(2):  # the second request hits the first one's prefix
            r = httpx.post(f"{app.http_base}/v1/completions", timeout=120, json={
                "prompt": "Tell me a long story about a dog. " * 4, "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200
        deadline, seen = time.time() + 60, {}
        while time.time() < deadline:
            seen = new_series(before, scrape(serve_cluster.metrics_port))
            if (seen.get("generated_tokens_total", 0) >= 16 and seen.get("time_to_first_token_seconds_count", 0) >= 2
                    and seen.get("prefix_hit_rate", 0) > 0):
                break
            time.sleep(1)
        missing = [n for n in NAMES if n not in seen]
        assert not missing, f"not exported: {missing}"
        assert seen["generated_tokens_total"] >= 16
        assert seen["time_to_first_token_seconds_count"] >= 2
        assert seen["prefix_hit_rate"] > 0  # the repeated prompt was served from the prefix cache
    finally:
        serve_cluster.delete("metrics")
