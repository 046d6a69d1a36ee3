"""Health: an engine replica's own check (Serve calls `check_health`; raising has the replica
replaced) and the application's, which `/health` and gRPC Health/Check report."""

import time
from collections.abc import Callable

ENGINE_DEPLOYMENT = "OrthrusEngine"


class EngineUnhealthy(RuntimeError):
    pass


class EngineHealth:
    """An engine replica is unhealthy when its engine thread has stopped, or when its steps keep
    failing: at least `min_failures` requests in a row ended in an engine error, with none
    finishing well in between, over at least `failing_for_s` (a single failed step fails its whole
    batch at one instant, and does not by itself condemn the replica)."""

    def __init__(self, engine, min_failures: int = 3, failing_for_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.engine, self.min_failures, self.failing_for_s, self.clock = engine, min_failures, failing_for_s, clock
        self.failures = 0
        self.first_failure_at: float | None = None
        self.last_failure_at: float | None = None
        self.last_error: str | None = None

    def record(self, finish_reason: str | None, error: str | None = None) -> None:
        """Called with each finished request's outcome ("error" or a good reason; "abort" counts as neither)."""
        if finish_reason == "error":
            now = self.clock()
            if self.failures == 0:
                self.first_failure_at = now
            self.failures, self.last_failure_at, self.last_error = self.failures + 1, now, error
        elif finish_reason in ("stop", "length"):
            self.failures, self.first_failure_at, self.last_failure_at = 0, None, None

    def problem(self) -> str | None:
        """Why this replica is broken, or None while it is healthy."""
        if not self.engine.is_alive:
            return "the engine thread has stopped"
        span_s = (self.last_failure_at - self.first_failure_at) if self.failures else 0.0
        if self.failures >= self.min_failures and span_s >= self.failing_for_s:
            return f"the last {self.failures} requests failed over {span_s:.0f} s; last error: {self.last_error}"
        return None

    def check(self) -> None:
        if (problem := self.problem()) is not None:
            raise EngineUnhealthy(problem)


def engine_deployment_health(app_name: str) -> tuple[bool, dict]:
    """(healthy, details) of the application's engine deployment as Serve's controller sees it:
    healthy while at least one replica runs (and so passes `check_health`) and the deployment is
    not UNHEALTHY. Blocking (one controller call): run it off the event loop."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    engine = app.deployments.get(ENGINE_DEPLOYMENT) if app is not None else None
    if engine is None:
        return False, {"engine_replicas": 0, "engine_status": "NOT_FOUND"}
    running = engine.replica_states.get("RUNNING", 0)
    status = str(getattr(engine.status, "value", engine.status))
    return running > 0 and status != "UNHEALTHY", {"engine_replicas": running, "engine_status": status}
