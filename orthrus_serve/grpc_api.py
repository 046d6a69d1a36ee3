"""gRPC status mapping and response filling for the ingress."""

import asyncio
import logging

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from orthrus_engines import OrthrusInputError
from orthrus_serve.api import orthrus_pb2 as pb

log = logging.getLogger(__name__)
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class Unauthenticated(Exception):
    """A call without the API key."""


def message(e: BaseException) -> str:
    """The error's own message (str() of an error re-raised by Ray is the remote traceback)."""
    return str(e.cause) if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else str(e)


def copy_counters(msg: pb.GenerateResponse, delta: dict) -> None:
    msg.finish_reason = delta["finish_reason"] or ""
    msg.prompt_tokens = delta["prompt_tokens"]
    msg.cached_prompt_tokens = delta["cached_prompt_tokens"]
    msg.completion_tokens = delta["completion_tokens"]
    msg.forward_passes = delta["forward_passes"]
    msg.drafted_tokens = delta["drafted_tokens"]
    msg.accepted_tokens = delta["accepted_tokens"]


def set_error(ctx, e: BaseException) -> None:
    if isinstance(e, Unauthenticated):
        ctx.set_code(grpc.StatusCode.UNAUTHENTICATED)
        ctx.set_details(str(e))
    elif isinstance(e, OrthrusInputError):
        ctx.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        ctx.set_details(message(e))
    elif isinstance(e, BackPressureError):
        ctx.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        ctx.set_details("the server is at capacity; retry later")
    elif isinstance(e, REPLICA_LOST):
        ctx.set_code(grpc.StatusCode.UNAVAILABLE)
        ctx.set_details("the engine replica serving this request was lost; retry")
    elif isinstance(e, asyncio.CancelledError):
        ctx.set_code(grpc.StatusCode.CANCELLED)
    else:
        log.exception("request failed")
        ctx.set_code(grpc.StatusCode.INTERNAL)
        ctx.set_details(f"{type(e).__name__}: {e}")
