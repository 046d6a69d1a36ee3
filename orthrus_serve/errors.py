"""What can go wrong with a request past its validation, as the ingress reports it: the error types, their
HTTP status / OpenAI error type and their gRPC status (grpc_api.set_error)."""

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class Overloaded(Exception):
    """A bounded queue is full (Serve's max_queued_requests, the engine's max_waiting_requests)."""


class TimedOut(Exception):
    """The request ran past the config's request_timeout_s."""


class EngineFailed(Exception):
    """The engine failed the request (its step raised): the message is the engine's error text."""


def message(e: BaseException) -> str:
    """The error's own message (str() of an error re-raised by Ray is the remote traceback)."""
    return str(e.cause) if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else str(e)


# error type -> (HTTP status, OpenAI error type); a lost replica is 503 "unavailable"
HTTP_ERRORS: dict[type, tuple[int, str]] = {
    Overloaded: (429, "rate_limit_error"),
    BackPressureError: (429, "rate_limit_error"),  # Serve's queue, met outside a request's stream
    TimedOut: (504, "timeout"),
    EngineFailed: (500, "server_error"),
}


def http_error(e: BaseException) -> tuple[int, str, str]:
    """(status, OpenAI error type, message) of a failed request."""
    for kind, (status, name) in HTTP_ERRORS.items():
        if isinstance(e, kind):
            return status, name, str(e) if kind is not BackPressureError else "the server is at capacity; retry later"
    if isinstance(e, REPLICA_LOST):
        return 503, "unavailable", "the engine replica serving this request was lost; retry"
    return 500, "server_error", f"{type(e).__name__}: {message(e).splitlines()[0] if message(e) else ''}"
