"""The throughput autoscaling policy as a pure function of a Ray Serve AutoscalingContext."""

from types import SimpleNamespace

from orthrus_serve.autoscaling import throughput_policy


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
    # at 6 s demand wants 3 (> 3? no: equal) -> the down wish resets, so 10 s count again from 7 s
    assert run(steps, current=3) == [3, 3, 3, 3, 3, 1]


def test_idle_goes_to_min():
    assert run([(0, 0, 0), (11, 0, 0)], current=4, lo=1) == [4, 1]
