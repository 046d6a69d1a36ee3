"""ServeConfig from YAML, its errors, and the app builder's deployment options."""

import pytest
from pydantic import ValidationError

from orthrus_serve.app import build_app, engine_options
from orthrus_serve.config import ServeConfig

YAML = """
app_name: prod
model: /models/orthrus-qwen3-4b
engine: {block_size: 16, max_num_seqs: 32}
autoscaling: {min_replicas: 1, max_replicas: 4, target_tokens_per_s_per_replica: 500}
router: {kind: prefix, imbalance_threshold: 4}
index: {redis_url: "redis://redis:6379/0", heartbeat_timeout_s: 3}
replica_num_gpus: 1
"""


def test_yaml_round_trip_and_deployment_options(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(YAML)
    cfg = ServeConfig.from_yaml(path)
    assert cfg.served_model_name == "orthrus-qwen3-4b" and cfg.index_namespace == "prod:orthrus-qwen3-4b"
    opts = engine_options(cfg)
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 4)
    assert auto["policy"]["policy_kwargs"]["target_tokens_per_s"] == 500
    router = opts["request_router_config"]
    assert router.request_router_kwargs["redis_url"] == "redis://redis:6379/0"
    assert router.request_router_kwargs["namespace"] == "prod:orthrus-qwen3-4b"
    assert "num_replicas" not in opts
    assert build_app(cfg.model_dump()) is not None  # a Serve Application, as an import_path builder returns


def test_the_ingress_bound_reaches_the_ingress_with_serve_room_above_it():
    ingress = build_app({"max_ingress_requests": 5})._bound_deployment
    assert ingress.init_args[1]["max_ingress_requests"] == 5  # (the engine deployment, the config)
    # Serve lets the calls past our bound in, to be answered 429 at once, rather than queue them
    assert ingress._deployment_config.max_ongoing_requests > 5
    assert ServeConfig().max_ingress_requests >= ServeConfig().max_ongoing_requests  # generous by default


def test_fixed_replicas_and_pow2_router():
    opts = engine_options(ServeConfig(num_replicas=3, router={"kind": "pow2"}))
    assert opts["num_replicas"] == 3 and "request_router_config" not in opts and "autoscaling_config" not in opts


def test_tensor_parallel_replica_reserves_a_bundle_per_rank():
    """TP = 2 on GPUs: the replica (rank 0) holds both GPUs in bundle 0, its worker's CPUs are bundle 1,
    all on one node; Serve accepts the options (the actor fits its first bundle)."""
    from orthrus_serve.engine_server import EngineServer

    cfg = ServeConfig(engine={"tensor_parallel_size": 2}, replica_num_cpus=4, replica_num_gpus=2,
                      replica_resources={"accel": 1})
    opts = engine_options(cfg)
    assert opts["placement_group_bundles"] == [{"CPU": 4.0, "GPU": 2.0, "accel": 1.0}, {"CPU": 4.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 2.0, "resources": {"accel": 1.0}}
    EngineServer.options(**opts)  # Serve's own check of the bundles against the actor's resources
    cpu = engine_options(ServeConfig(engine={"tensor_parallel_size": 3}))
    assert cpu["placement_group_bundles"] == [{"CPU": 1.0}] * 3 and cpu["ray_actor_options"]["num_gpus"] == 0
    assert "placement_group_bundles" not in engine_options(ServeConfig(replica_num_gpus=1))  # one rank: no group


@pytest.mark.parametrize("bad, field", [
    ({"engine": {"tensor_parallel_size": 2}, "replica_num_gpus": 1}, "replica_num_gpus"),
    ({"engine": {"tensor_parallel_size": 2}, "replica_num_cpus": 0}, "replica_num_cpus"),
    ({"num_replicas": 0}, "num_replicas"),
    ({"autoscaling": {"max_replicas": 0}}, "max_replicas"),
    ({"router": {"kind": "random"}}, "kind"),
    ({"modle": "x"}, "modle"),  # a typo is an error, not silently ignored
    ({"max_ingress_requests": 0}, "max_ingress_requests"),
    ({"max_ingress_requests": 2.5}, "max_ingress_requests"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        ServeConfig.model_validate(bad)
