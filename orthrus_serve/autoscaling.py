"""Autoscaling on throughput (docs/ARCHITECTURE.md §5).

Engine replicas report `tokens_per_s`, `queue_depth` and `kv_usage` from
`record_autoscaling_stats()`. The policy sizes the deployment to
`ceil(demand / target_tokens_per_s)` within [min, max], where demand is the generated tokens/s of
all replicas, plus one replica's worth for requests that wait in a queue (served demand cannot show
unserved demand). The policy keeps its delays in its state: a change is applied only after the wish
has held for the upscale / downscale delay (Ray Serve 2.60 also wraps custom policies in delays of
its own; the app sets those to 0).
"""

import math


def desired_replicas(tokens_per_s: float, queued: float, current: int, target_tokens_per_s: float) -> int:
    want = math.ceil(tokens_per_s / target_tokens_per_s) if tokens_per_s > 0 else 0
    if queued > 0:
        want = max(want, current + 1)
    return want


def throughput_policy(
    ctx,
    target_tokens_per_s: float = 100.0,
    upscale_delay_s: float = 5.0,
    downscale_delay_s: float = 30.0,
) -> tuple[int, dict]:
    """Ray Serve custom autoscaling policy: `(ctx: AutoscalingContext) -> (replicas, state)`."""
    metrics = ctx.aggregated_metrics or {}
    tokens = sum(metrics.get("tokens_per_s", {}).values())
    queued = sum(metrics.get("queue_depth", {}).values())
    # What the deployment is set to, not what runs: while a new replica starts, holding at the
    # running count would ask Ray to scale straight back down (and flap).
    target = getattr(ctx, "target_num_replicas", None)
    current = target if target is not None else ctx.current_num_replicas
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    want = min(max(desired_replicas(tokens, queued, current, target_tokens_per_s), lo), hi)
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
                 downscale_delay_s: float = 30.0):
        self.kwargs = {"target_tokens_per_s": target_tokens_per_s, "upscale_delay_s": upscale_delay_s,
                       "downscale_delay_s": downscale_delay_s}

    def __call__(self, ctx) -> tuple[int, dict]:
        return throughput_policy(ctx, **self.kwargs)
