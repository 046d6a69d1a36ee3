"""Autoscaling on demand, served and unserved (docs/ARCHITECTURE.md §5).

Engine replicas report `tokens_per_s` (generated), `prefill_tokens_per_s`, `queue_depth` (requests waiting in
the engine), `running` and `kv_usage` from `record_autoscaling_stats()`; Ray Serve adds the requests queued at
the callers' handles (`total_queued_requests`), which no replica sees. The policy sizes the deployment to the
served work, `ceil((generated + prefill_weight * prefilled) / target_tokens_per_s)`, and adds replicas for the
work it is not serving: one per `requests_per_replica` requests queued at handles or waiting in engines (at
least one), and one while the KV cache is nearly full (`kv_high_usage`, the mean over replicas). A saturated
deployment serves at its capacity, so only the unserved part can show that it needs more.

It steps down one replica at a time, each step after the wish held for the downscale delay, and not while
anything queues. A change is applied only after the wish has held for the upscale / downscale delay (Ray Serve
2.60 also wraps custom policies in delays of its own; the app sets those to 0).
"""

import math
from dataclasses import dataclass


@dataclass
class Demand:
    tokens_per_s: float = 0.0  # generated
    prefill_tokens_per_s: float = 0.0  # prompt tokens prefilled (not from the prefix cache)
    queued: float = 0.0  # requests waiting in the engines and queued at the handles
    kv_usage: float = 0.0  # mean over replicas


def demand_of(ctx) -> Demand:
    """The deployment's demand from a Ray Serve AutoscalingContext (metrics averaged over the look-back)."""
    metrics = ctx.aggregated_metrics or {}

    def total(name: str) -> float:
        return sum(metrics.get(name, {}).values())

    kv = metrics.get("kv_usage", {})
    handle_queued = getattr(ctx, "total_queued_requests", None) or 0.0
    return Demand(total("tokens_per_s"), total("prefill_tokens_per_s"), total("queue_depth") + handle_queued,
                  sum(kv.values()) / len(kv) if kv else 0.0)


def desired_replicas(d: Demand, current: int, target_tokens_per_s: float, prefill_weight: float = 0.2,
                     requests_per_replica: float = 64, kv_high_usage: float = 0.9) -> int:
    served = d.tokens_per_s + prefill_weight * d.prefill_tokens_per_s
    want = math.ceil(served / target_tokens_per_s) if served > 0 else 0
    if d.queued > 0:
        want = max(want, current + max(1, math.ceil(d.queued / requests_per_replica)))
    if d.kv_usage >= kv_high_usage:
        want = max(want, current + 1)
    return max(want, current - 1)  # down one step at a time


def throughput_policy(
    ctx,
    target_tokens_per_s: float = 100.0,
    upscale_delay_s: float = 5.0,
    downscale_delay_s: float = 30.0,
    prefill_weight: float = 0.2,
    requests_per_replica: float = 64,
    kv_high_usage: float = 0.9,
) -> tuple[int, dict]:
    """Ray Serve custom autoscaling policy: `(ctx: AutoscalingContext) -> (replicas, state)`."""
    # What the deployment is set to, not what runs: while a new replica starts, holding at the
    # running count would ask Ray to scale straight back down (and flap).
    target = getattr(ctx, "target_num_replicas", None)
    current = target if target is not None else ctx.current_num_replicas
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    wanted = desired_replicas(demand_of(ctx), current, target_tokens_per_s, prefill_weight, requests_per_replica,
                              kv_high_usage)
    want = min(max(wanted, lo), hi)
    now = ctx.current_time
    state = dict(ctx.policy_state or {})
    if want == current:
        state.pop("wish", None)
        return current, state
    direction = "up" if want > current else "down"
    wish = state.get("wish")
    if wish is None or wish["direction"] != direction:
        state["wish"] = {"direction": direction, "since": now}
        wish = state["wish"]
    delay = upscale_delay_s if direction == "up" else downscale_delay_s
    if now - wish["since"] >= delay:
        state.pop("wish")
        return want, state
    return current, state


class ThroughputPolicy:
    """`throughput_policy` with its parameters, in the form Ray Serve 2.60 passes `policy_kwargs` to:
    a class it builds once with them (a plain policy function gets none of them, silently)."""

    def __init__(self, target_tokens_per_s: float = 100.0, upscale_delay_s: float = 5.0,
                 downscale_delay_s: float = 30.0, prefill_weight: float = 0.2, requests_per_replica: float = 64,
                 kv_high_usage: float = 0.9):
        self.kwargs = {"target_tokens_per_s": target_tokens_per_s, "upscale_delay_s": upscale_delay_s,
                       "downscale_delay_s": downscale_delay_s, "prefill_weight": prefill_weight,
                       "requests_per_replica": requests_per_replica, "kv_high_usage": kv_high_usage}

    def __call__(self, ctx) -> tuple[int, dict]:
        return throughput_policy(ctx, **self.kwargs)
