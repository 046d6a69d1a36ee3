"""Autoscaling (docs/ARCHITECTURE.md §5), live: a load above one replica's capacity scales the engine
deployment from 1 to 2 replicas although its engine's queue stays empty and its throughput is far below the
target (one request at a time per replica: the rest wait at the ingress's handle); idle, it scales back to 1. And, without Ray, how the application
hands the policy to Ray Serve 2.60."""

import time
from types import SimpleNamespace

import pytest
from serve_helpers import Load
from support.net import wait_for

from orthrus_serve.app import engine_options
from orthrus_serve.autoscaling import ThroughputPolicy
from orthrus_serve.config import ServeConfig

APP = "scaled"
SETTINGS = {"min_replicas": 1, "max_replicas": 2, "target_tokens_per_s_per_replica": 10_000.0,
            "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5}


def ctx(tokens: float, running: int, target: int, now: float = 0.0, state: dict | None = None):
    return SimpleNamespace(aggregated_metrics={"tokens_per_s": {"r0": tokens}, "queue_depth": {"r0": 0.0}},
                           current_num_replicas=running, target_num_replicas=target,
                           capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
                           current_time=now, policy_state=state or {})


def test_ray_builds_the_policy_with_the_configured_parameters():
    """Ray 2.60 passes `policy_kwargs` only to a class policy, and wraps custom policies in its own
    delays (30 s up, 600 s down by default) unless they are set to 0."""
    from ray.serve.config import AutoscalingConfig

    opts = engine_options(ServeConfig(autoscaling=SETTINGS, max_ongoing_requests=1))
    cfg = AutoscalingConfig(**opts["autoscaling_config"])
    assert (cfg.upscale_delay_s, cfg.downscale_delay_s) == (0, 0)
    policy_cls = cfg.policy.get_policy()
    assert isinstance(policy_cls, type)
    policy = policy_cls(**cfg.policy.policy_kwargs)
    assert policy.kwargs == {"target_tokens_per_s": 10_000.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
                             "prefill_weight": 0.2, "requests_per_replica": 1, "kv_high_usage": 0.9}


def test_policy_holds_the_target_while_a_new_replica_starts():
    policy = ThroughputPolicy(target_tokens_per_s=10.0, upscale_delay_s=0.5, downscale_delay_s=2.0)
    assert policy(ctx(25.0, running=1, target=1, now=0.0))[0] == 1  # the wish must hold for 0.5 s
    n, state = policy(ctx(25.0, running=1, target=1, now=0.6, state={"wish": {"direction": "up", "since": 0.0}}))
    assert n == 3
    # Ray set the target to 3; until the new replicas run, demand is unchanged: stay at 3, not 1
    assert policy(ctx(25.0, running=1, target=3, now=0.7, state=state))[0] == 3
    assert policy(ctx(25.0, running=2, target=3, now=1.5, state=state))[0] == 3


@pytest.fixture(scope="module")
def app(serve_cluster):
    deployed = serve_cluster.deploy(APP, autoscaling=SETTINGS, max_ongoing_requests=1)
    yield deployed
    serve_cluster.delete(APP)


@pytest.mark.slow
def test_scales_up_under_load_and_down_when_idle(app):
    app.wait_healthy(1)
    t0 = time.monotonic()
    with Load(app, threads=2, max_tokens=48, ignore_eos=True) as load:
        wait_for(lambda: app.running_replicas() == 2 and len(app.replica_ids()) == 2, 90, "a second replica")
        up = time.monotonic() - t0
        ok_before = load.ok
        wait_for(lambda: load.ok > ok_before + 3, 60, "requests served by the scaled-up deployment")
    assert load.errors == [], load.errors[:3]
    assert app.routing_stats().keys() == app.replica_ids()

    t1 = time.monotonic()
    wait_for(lambda: app.running_replicas() == 1 and len(app.replica_ids()) == 1, 120, "the scale-down to 1")
    print(f"scaled up after {up:.1f} s of load, down after {time.monotonic() - t1:.1f} s idle")
    with app.client() as c:
        assert c.generate("still serving", max_tokens=3).completion_tokens == 3
