"""Autoscaling on throughput (DESIGN.md §5).

Engine replicas report `tokens_per_s`, `queue_depth` and `kv_usage` from
`record_autoscaling_stats()`. The policy sizes the deployment to
`ceil(demand / target_tokens_per_s)` within [min, max], where demand is the generated tokens/s of
all replicas, plus one replica's worth for requests that wait in a queue (served demand cannot show
unserved demand). Ray Serve gives custom policies no delays of their own, so the policy keeps them
in its state: a change is applied only after the wish has held for the upscale / downscale delay.
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
    current = ctx.current_num_replicas
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
