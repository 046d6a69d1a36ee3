"""The application builder: usable from `orthrus-serve up` and as a Serve `import_path`
(`orthrus_serve.app:build_app`, the ServeConfig dict as `args`)."""

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from orthrus_serve.config import ServeConfig
from orthrus_serve.engine_server import EngineServer
from orthrus_serve.ingress import Ingress

GRPC_SERVICER = "orthrus_serve.grpc_service.add_OrthrusServicer_to_server"  # requests reach the ingress unparsed
GRPC_HEALTH_SERVICER = "orthrus_serve.grpc_health.add_HealthServicer_to_server"  # grpc.health.v1, for probes
GRPC_SERVICERS = [GRPC_SERVICER, GRPC_HEALTH_SERVICER]  # Serve's gRPCOptions.grpc_servicer_functions
# Serve's max_ongoing_requests on the ingress is max_ingress_requests plus this: the calls past our bound reach
# the ingress and get their 429 at once (rather than wait in Serve's queue), and health checks always get in
INGRESS_SPARE_REQUESTS = 64


def replica_bundles(cfg: ServeConfig) -> list[dict[str, float]]:
    """A replica's placement group under tensor parallelism (N ranks): bundle 0 is the replica actor
    (rank 0) with all N GPUs, since the replica starts ranks 1..N-1 as its own worker processes and
    they use its devices (rank r: cuda:r of the GPUs Ray gave the replica); bundles 1..N-1 reserve
    each worker rank's CPUs. Deployed STRICT_PACK: every rank on one node (they meet on loopback).
    With `engine.backend: trtllm` TensorRT-LLM's Ray orchestrator starts the N ranks as Ray actors of one
    GPU each: bundle 0 is the replica alone (no GPU), bundles 1..N one GPU each for them (the engine points
    TensorRT-LLM at them: trtllm.mapping.worker_bundle_indices)."""
    tp = cfg.tensor_parallel_size
    if cfg.backend == "trtllm":
        replica = {"CPU": cfg.replica_num_cpus, **cfg.replica_resources}
        workers = [{"CPU": max(1.0, cfg.replica_num_cpus), "GPU": 1.0}] * tp  # an actor schedules with 1 CPU
        return [{k: v for k, v in replica.items() if v > 0}] + workers
    replica = {"CPU": cfg.replica_num_cpus, "GPU": cfg.replica_num_gpus, **cfg.replica_resources}
    workers = [{"CPU": cfg.replica_num_cpus}] * (tp - 1)
    return [{k: v for k, v in replica.items() if v > 0}] + workers


def engine_options(cfg: ServeConfig) -> dict:
    opts: dict = {
        "ray_actor_options": {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus,
                              **({"resources": dict(cfg.replica_resources)} if cfg.replica_resources else {})},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,  # per caller (the ingress replicas' handles)
        "health_check_period_s": cfg.health.check_period_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    if cfg.tensor_parallel_size > 1:
        opts["placement_group_bundles"] = replica_bundles(cfg)
        opts["placement_group_strategy"] = "STRICT_PACK"
        if cfg.backend == "trtllm":  # the GPUs are the Ray workers' (bundles 1..N), not the replica's
            opts["ray_actor_options"]["num_gpus"] = 0
    if cfg.router.kind == "prefix":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="orthrus_serve.router:PrefixAwareRouter",
            request_router_kwargs={
                "redis_url": cfg.index.redis_url, "namespace": cfg.index_namespace,
                "imbalance_threshold": cfg.router.imbalance_threshold,
                "min_match_blocks": cfg.router.min_match_blocks,
                "heartbeat_timeout_s": cfg.index.heartbeat_timeout_s,
                "redis_password_env": cfg.index.redis_password_env,
                "redis_ca_file": cfg.index.redis_ca_file,
            },
            request_routing_stats_period_s=1.0,
        )
    a = cfg.autoscaling
    if a is None:
        opts["num_replicas"] = cfg.num_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1), "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": max(2 * a.metrics_interval_s, 2.0),
            # Ray 2.60 also applies its own delays around a custom policy (defaults 30 s / 600 s;
            # both sets together never agree on a change): the policy's delays are the ones.
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "policy": {"policy_function": "orthrus_serve.autoscaling:ThroughputPolicy",
                       "policy_kwargs": {"target_tokens_per_s": a.target_tokens_per_s_per_replica,
                                         "upscale_delay_s": a.upscale_delay_s,
                                         "downscale_delay_s": a.downscale_delay_s,
                                         "prefill_weight": a.prefill_weight,
                                         "requests_per_replica": cfg.max_ongoing_requests,
                                         "kv_high_usage": a.kv_high_usage}},
        }
    return opts


def build_app(args: dict | None = None) -> Application:
    cfg = ServeConfig.model_validate(args or {})
    engine = EngineServer.options(**engine_options(cfg)).bind(cfg.model_dump())
    # The config names the API key's variable, never the key: the ingress reads the key itself. The ingress
    # streams too: a rolling update or scale-down of it drains like the engine's.
    ingress = Ingress.options(graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
                              max_ongoing_requests=cfg.max_ingress_requests + INGRESS_SPARE_REQUESTS)
    return ingress.bind(engine, cfg.model_dump())
