"""The Serve config files of cluster/, offline: each is a valid Ray Serve deploy config (the schema
`serve deploy` and KubeRay's serveConfigV2 use), with the gRPC servicer, one application whose
import path builds the app from its args, and the settings its use needs. Plus the two ServeConfig
fields deployments use: custom replica resources, and the Redis password from an environment
variable (never in the config)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from orthrus_serve.app import GRPC_SERVICERS, engine_options
from orthrus_serve.config import ServeConfig

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CONFIGS = {"serve.yaml": "gpu", "serve-tp2.yaml": "tp2", "serve-cpu.yaml": "cpu", "local/serve.yaml": "multinode"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_serve_config_in_cluster_is_listed():
    found = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")
             if "kuberay" not in p.parts and "applications" in (yaml.safe_load(p.read_text()) or {})}
    assert found == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serve_config_is_valid_and_builds_the_app(name):
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from orthrus_engines.config import EngineArgs
    from orthrus_serve.engine_server import EngineServer
    from orthrus_serve.ingress import Ingress

    raw = load(name)
    cfg = ServeDeploySchema.model_validate(raw)
    assert cfg.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    assert cfg.http_options.port != cfg.grpc_options.port
    (app,) = cfg.applications
    assert app.import_path == "orthrus_serve.app:build_app" and app.route_prefix == "/"
    args = ServeConfig.model_validate(app.args)  # unknown or mistyped fields are errors
    assert args.app_name == app.name  # gRPC clients send the application name as metadata
    assert set(args.engine) <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert {d.name for d in app.deployments} <= {Ingress.name, EngineServer.name}
    assert not any(d.name == EngineServer.name for d in app.deployments)  # its options come from args
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)
    # ServeConfig's own host/ports are for `orthrus-serve up`; here the proxies' options rule
    assert not {"host", "http_port", "grpc_port"} & set(raw["applications"][0]["args"])


def test_the_gpu_config_is_a_real_deployment():
    args = ServeConfig.model_validate(load("serve.yaml")["applications"][0]["args"])
    assert args.replica_num_gpus >= 1 and args.autoscaling is not None and args.autoscaling.max_replicas > 1
    assert args.router.kind == "prefix"
    assert args.index.redis_url and args.index.redis_password_env  # shared index, password from a Secret
    assert "@" not in args.index.redis_url  # no credentials in the config
    assert load("serve.yaml")["proxy_location"] == "EveryNode"


def test_the_tp2_config_is_the_gpu_config_with_two_ranks_per_replica():
    gpu, tp2 = (load(n)["applications"][0]["args"] for n in ("serve.yaml", "serve-tp2.yaml"))
    cfg = ServeConfig.model_validate(tp2)
    assert cfg.tensor_parallel_size == cfg.replica_num_gpus == 2 and cfg.model  # not the built-in (9 heads)
    opts = engine_options(cfg)
    assert opts["placement_group_bundles"] == [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 3.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    same = {"model", "engine", "replica_num_cpus", "replica_num_gpus"}
    assert {k: v for k, v in tp2.items() if k not in same} == {k: v for k, v in gpu.items() if k not in same}
    assert {k: v for k, v in tp2["engine"].items() if k != "tensor_parallel_size"} == gpu["engine"]


def test_the_cpu_config_runs_on_one_machine():
    raw = load("serve-cpu.yaml")
    args = ServeConfig.model_validate(raw["applications"][0]["args"])
    assert args.replica_num_gpus == 0 and not args.replica_resources
    assert args.index.redis_url is None  # the in-process index
    assert raw["proxy_location"] == "HeadOnly" and raw["http_options"]["host"] == "127.0.0.1"


def test_the_multinode_config_puts_engines_on_workers():
    raw = load("local/serve.yaml")
    args = ServeConfig.model_validate(raw["applications"][0]["args"])
    assert args.replica_resources == {"orthrus_engine": 1} and args.replica_num_cpus == 0
    assert raw["proxy_location"] == "HeadOnly"  # one machine: one proxy per port
    assert args.index.redis_password_env == "ORTHRUS_REDIS_PASSWORD"
    script = (CLUSTER / "local" / "multinode.sh").read_text()
    assert "orthrus_engine" in script and "ORTHRUS_REDIS_PASSWORD" in script and "local/serve.yaml" in script


def test_replica_resources_and_password_env_reach_the_deployment():
    opts = engine_options(ServeConfig(replica_resources={"orthrus_engine": 1}, replica_num_gpus=2,
                                      index={"redis_url": "redis://r:6379/1", "redis_password_env": "PW"}))
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 2.0, "resources": {"orthrus_engine": 1.0}}
    kwargs = opts["request_router_config"].request_router_kwargs
    assert kwargs["redis_url"] == "redis://r:6379/1" and kwargs["redis_password_env"] == "PW"
    assert "resources" not in engine_options(ServeConfig())["ray_actor_options"]


def test_prefix_index_takes_the_password_from_the_environment(password_redis, monkeypatch):
    from orthrus_serve.redis_prefix_index import RedisPrefixIndex
    from orthrus_serve.redis_prefix_index import RedisPrefixIndex

    url = password_redis.url(db=2)
    monkeypatch.setenv("TEST_REDIS_PW", password_redis.password)
    index = RedisPrefixIndex.from_env(url, "pw-test", 30.0, password_env="TEST_REDIS_PW")
    assert isinstance(index, RedisPrefixIndex)
    index.heartbeat("r1")
    index.publish("r1", [("stored", ["h1", "h2"])])
    assert index.lookup(["h1", "h2"]) == {"r1": 2}
    assert password_redis.client(db=2).hexists("orthrus:pw-test:hb", "r1")

    # Without it, Redis refuses; the index degrades (no match, no exception) as when Redis is down.
    monkeypatch.delenv("TEST_REDIS_PW")
    blind = RedisPrefixIndex.from_env(url, "pw-test", 30.0, password_env="TEST_REDIS_PW")
    blind.heartbeat("r2")
    assert blind.lookup(["h1", "h2"]) == {}
