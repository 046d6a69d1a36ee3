"""One pydantic config for the whole application, loadable from YAML; the same dict is the app
builder's args in a Serve config / KubeRay serveConfigV2."""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orthrus_serve.auth import DEFAULT_API_KEY_ENV


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_tokens_per_s_per_replica: float = Field(100.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    prefill_weight: float = Field(0.2, ge=0)  # what a prefilled prompt token costs, in generated tokens
    kv_high_usage: float = Field(0.9, gt=0, le=1)  # mean KV usage at which one more replica is wanted


class RouterSettings(_Strict):
    kind: Literal["prefix", "pow2"] = "prefix"
    imbalance_threshold: int = Field(8, ge=0)  # ongoing-request gap beyond which load wins over cache
    min_match_blocks: int = Field(1, ge=1)


class IndexSettings(_Strict):
    redis_url: str | None = None  # None: the in-process index (single node)
    # An environment variable that holds the Redis password (on Kubernetes, from a Secret). It is
    # read by each process that connects, so the password appears in no config or dashboard.
    redis_password_env: str | None = None
    # TLS to Redis: a `rediss://` URL; this PEM file holds the CA certificates that sign the
    # server's certificate (None: the system's roots). It must exist on every node.
    redis_ca_file: str | None = None
    heartbeat_s: float = Field(1.0, gt=0)
    heartbeat_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _ca_file_needs_tls(self) -> "IndexSettings":
        if self.redis_ca_file is not None and not (self.redis_url or "").startswith("rediss://"):
            raise ValueError("index.redis_ca_file is for TLS: the redis_url must start with rediss://")
        return self


class HealthSettings(_Strict):
    """When an engine replica counts as broken (unhealthy to Serve, unroutable to the router): its engine
    thread stopped, or `min_failures` requests in a row failed in the engine over `failing_for_s`."""
    min_failures: int = Field(3, ge=1)
    failing_for_s: float = Field(10.0, ge=0)
    check_period_s: float = Field(2.0, gt=0)  # Serve's health_check_period_s


class InputLimits(_Strict):
    """What one request may carry (README, Security); past a limit: HTTP 413 (the body), 408 (a body
    still arriving after body_timeout_s) or 400 / gRPC
    INVALID_ARGUMENT naming the field. gRPC messages are also capped by the proxy's 4 MiB receive limit."""

    max_request_bytes: int = Field(4 << 20, ge=1024)  # an HTTP body
    body_timeout_s: float = Field(30.0, gt=0)  # how long an HTTP body may take to arrive (408 past it)
    max_stop_strings: int = Field(16, ge=0)
    max_stop_string_chars: int = Field(1024, ge=1)  # each stop string
    max_stop_token_ids: int = Field(256, ge=0)


class ServeConfig(_Strict):
    app_name: str = "orthrus"
    model: str | None = None  # local directory; None = the built-in model
    head: str | None = None
    engine: dict[str, Any] = Field(default_factory=dict)  # orthrus_engines.EngineArgs fields
    num_replicas: int = Field(1, ge=1)  # used when autoscaling is off
    autoscaling: AutoscalingSettings | None = None
    router: RouterSettings = Field(default_factory=RouterSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    limits: InputLimits = Field(default_factory=InputLimits)
    replica_num_cpus: float = Field(1.0, ge=0)
    replica_num_gpus: float = Field(0.0, ge=0)  # with engine.tensor_parallel_size N > 1: N, or 0 (CPU ranks)
    replica_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per replica
    max_ongoing_requests: int = Field(64, ge=1)  # per engine replica (Serve's option)
    # Load shedding. Requests queued for an engine replica at each caller (Serve's max_queued_requests),
    # and requests waiting in each engine for a batch slot (EngineArgs.max_waiting_requests, unless
    # `engine` sets it): past either, HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED.
    max_queued_requests: int = Field(64, ge=1)
    max_waiting_requests: int = Field(64, ge=1)
    # API calls in flight at each ingress replica (a stream until it ends or is cancelled), our own bound:
    # past it HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED at once (Serve's would queue, or answer 503)
    max_ingress_requests: int = Field(1024, ge=1)
    retry_after_s: int = Field(1, ge=0)
    # A request's whole life (queueing, prefill, generation): past it HTTP 504 / gRPC DEADLINE_EXCEEDED and
    # the engine aborts it. None: no limit. A gRPC client's own deadline is honoured too.
    request_timeout_s: float | None = Field(300.0, gt=0)
    # How long a stopping replica (scale-down, rolling update) lets its in-flight requests finish: above
    # request_timeout_s, so a drain never cuts a request that is within its time.
    graceful_shutdown_timeout_s: float = Field(330.0, ge=0)
    health: HealthSettings = Field(default_factory=HealthSettings)
    # The environment variable that holds the API key (on Kubernetes, from a Secret). The ingress
    # replicas read it from their own environment, so the key is in no config, dashboard or log.
    # Unset (or None here): no key is asked for.
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    host: str = "127.0.0.1"  # where HTTP and gRPC listen (`orthrus-serve up`; README, Security)
    http_port: int = 8000
    grpc_port: int = 9000
    # HTTPS on the HTTP port (PEM files on the node; Serve's http_options.ssl_* in a Serve config
    # file). `orthrus-serve up` only. gRPC has no TLS in Ray's proxy: a gateway terminates it.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "ServeConfig":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (HTTPS needs both)")
        return self

    @model_validator(mode="after")
    def _devices_for_every_rank(self) -> "ServeConfig":
        tp = self.tensor_parallel_size
        if tp > 1 and self.replica_num_gpus not in (0, tp):
            raise ValueError(f"replica_num_gpus must equal engine.tensor_parallel_size ({tp}: one GPU per rank) "
                             f"or be 0 (ranks on CPU), got {self.replica_num_gpus}")
        if tp > 1 and self.replica_num_cpus <= 0:
            raise ValueError("replica_num_cpus must be > 0 with engine.tensor_parallel_size > 1 (each rank's CPUs "
                             "are a bundle of the replica's placement group)")
        return self

    @property
    def tensor_parallel_size(self) -> int:
        """engine.tensor_parallel_size; a bad value is left for EngineArgs to name."""
        tp = self.engine.get("tensor_parallel_size", 1)
        return tp if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1 else 1

    @model_validator(mode="after")
    def _engine_backend(self) -> "ServeConfig":
        """engine.backend: "torch" (default) or "trtllm", which needs tensorrt_llm (refused, named, without it)."""
        from orthrus_engines.trtllm import validate_backend

        if validate_backend(self.backend, field="engine.backend") == "trtllm" and self.replica_num_gpus < 1:
            raise ValueError("engine.backend: 'trtllm' runs on GPUs: set replica_num_gpus (one per "
                             "engine.tensor_parallel_size rank)")
        return self

    @property
    def backend(self) -> str:
        """engine.backend: "torch" (default) or "trtllm"."""
        return self.engine.get("backend", "torch")

    @property
    def served_model_name(self) -> str:
        from pathlib import PurePath

        return PurePath(self.model).name if self.model else "SmolLM2-135M-Instruct"

    @property
    def index_namespace(self) -> str:
        """Redis keys are per application and model (page hashes are also seeded by the model)."""
        return f"{self.app_name}:{self.served_model_name}"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
