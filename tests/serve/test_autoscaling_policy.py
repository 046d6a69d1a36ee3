"""The autoscaling policy as a pure function of a Ray Serve AutoscalingContext."""

from types import SimpleNamespace

from orthrus_serve.autoscaling import ThroughputPolicy, throughput_policy


def ctx(tokens: list[float], queued: list[float] | None = None, current: int | None = None, now: float = 0.0,
        state: dict | None = None, lo: int = 1, hi: int = 4):
    ids = [f"r{i}" for i in range(len(tokens))]
    return SimpleNamespace(
        aggregated_metrics={"tokens_per_s": dict(zip(ids, tokens)),
                            "queue_depth": dict(zip(ids, queued or [0] * len(tokens)))},
        current_num_replicas=current if current is not None else len(tokens),
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        current_time=now, policy_state=state or {},
    )


def run(steps, **kw):
    """Feed a sequence of (time, tokens, queued) observations; returns the replica counts decided."""
    state, current, out = {}, kw.pop("current", 1), []
    for now, tokens, queued in steps:
        c = ctx([tokens / current] * current, [queued / current] * current, current, now, state, **kw)
        current, state = throughput_policy(c, target_tokens_per_s=100, upscale_delay_s=2, downscale_delay_s=10)
        out.append(current)
    return out


def test_sizes_to_demand_over_target_after_the_upscale_delay():
    # 350 tok/s against 100 per replica -> 4 replicas, but only once the wish held for 2 s
    assert run([(0, 350, 0), (1, 350, 0), (2.5, 350, 0)]) == [1, 1, 4]


def test_clamped_to_min_and_max():
    assert run([(0, 5000, 0), (3, 5000, 0)], hi=3) == [1, 3]
    assert run([(0, 0, 0), (20, 0, 0)], current=2, lo=1) == [2, 1]


def test_queued_requests_add_a_replica_even_when_served_throughput_looks_enough():
    assert run([(0, 90, 5), (3, 90, 5)]) == [1, 2]


def test_downscale_waits_for_its_own_longer_delay_and_resets_on_a_change_of_mind():
    steps = [(0, 50, 0), (5, 50, 0), (6, 250, 0), (7, 50, 0), (16, 50, 0), (17.5, 50, 0)]
    # at 6 s demand wants 3 (> 3? no: equal) -> the down wish resets, so 10 s count again from 7 s;
    # then one step down (to 2, not straight to the 1 that 50 tok/s asks for)
    assert run(steps, current=3) == [3, 3, 3, 3, 3, 2]


def test_idle_steps_down_one_replica_per_downscale_delay_to_min():
    steps = [(0, 0, 0), (11, 0, 0), (12, 0, 0), (22.5, 0, 0), (23, 0, 0), (33.5, 0, 0), (50, 0, 0)]
    assert run(steps, current=4, lo=1) == [4, 3, 3, 2, 2, 1, 1]


def serve_ctx(replicas: int, metrics: dict[str, float], total_queued: float, running: float, now: float,
              state: dict):
    """Ray Serve 2.60's own AutoscalingContext, with every replica reporting `metrics`."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID("OrthrusEngine", "app")
    ids = [ReplicaID(f"r{i}", dep) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=ids, total_num_requests=running + total_queued,
        total_queued_requests=total_queued,
        aggregated_metrics={name: {r: value for r in ids} for name, value in metrics.items()},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state=state,
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None)


def test_a_saturated_replica_with_an_empty_engine_queue_scales_up_on_the_requests_queued_at_handles():
    """One replica at its capacity (tokens/s = the target, every slot busy, nothing waiting in the engine,
    max_ongoing_requests reached): the 40 requests Serve holds at the handles are the only sign."""
    policy = ThroughputPolicy(target_tokens_per_s=100.0, upscale_delay_s=1.0, downscale_delay_s=10.0,
                              requests_per_replica=16)
    saturated = {"tokens_per_s": 100.0, "prefill_tokens_per_s": 0.0, "queue_depth": 0.0, "running": 16.0,
                 "kv_usage": 0.5}
    n, state = policy(serve_ctx(1, saturated, total_queued=40, running=16, now=0.0, state={}))
    assert n == 1  # the wish holds for the upscale delay first
    n, state = policy(serve_ctx(1, saturated, total_queued=40, running=16, now=1.5, state=state))
    assert n == 4  # 1 + ceil(40 / 16), the max
    # the same replica with nothing queued anywhere stays at 1
    assert policy(serve_ctx(1, saturated, total_queued=0, running=16, now=3.0, state={}))[0] == 1


def test_prefill_and_kv_usage_count_as_demand():
    policy = ThroughputPolicy(target_tokens_per_s=100.0, upscale_delay_s=0.0, prefill_weight=0.25)
    # 60 generated tokens/s look like 1 replica; 800 prefilled tokens/s (long prompts) add 200 -> 3
    long_prompts = {"tokens_per_s": 60.0, "prefill_tokens_per_s": 800.0, "queue_depth": 0.0, "kv_usage": 0.2}
    assert policy(serve_ctx(1, long_prompts, total_queued=0, running=4, now=0.0, state={}))[0] == 3
    # a nearly full KV cache (long contexts, preemptions ahead) asks for one more
    full_kv = {"tokens_per_s": 60.0, "prefill_tokens_per_s": 0.0, "queue_depth": 0.0, "kv_usage": 0.95}
    assert policy(serve_ctx(2, full_kv, total_queued=0, running=4, now=0.0, state={}))[0] == 3
