"""gRPC request reading, response filling and status mapping for the ingress."""

import asyncio
import logging

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.request_prep import SAMPLING_FIELDS, PreparedRequest, RequestPreparer

log = logging.getLogger(__name__)
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class Unauthenticated(Exception):
    """A call without the API key."""


def message(e: BaseException) -> str:
    """The error's own message (str() of an error re-raised by Ray is the remote traceback)."""
    return str(e.cause) if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else str(e)


def sampling_fields(request: pb.GenerateRequest) -> dict:
    """The sampling fields a GenerateRequest sets (an unset optional field keeps SamplingParams' default)."""
    fields = {f: getattr(request, f) for f in SAMPLING_FIELDS
              if not request.DESCRIPTOR.fields_by_name[f].has_presence or request.HasField(f)}
    fields["stop"], fields["stop_token_ids"] = list(request.stop), list(request.stop_token_ids)
    return fields


def prepare(prep: RequestPreparer, request: pb.GenerateRequest) -> PreparedRequest:
    """A GenerateRequest as a prepared request (the ingress runs this off its event loop)."""
    if request.prompt and request.prompt_token_ids:
        raise OrthrusInputError("prompt", "give prompt or prompt_token_ids, not both")
    if request.prompt_token_ids:
        ids = prep.inputs.token_ids(list(request.prompt_token_ids), "prompt_token_ids")
    else:
        ids = prep.inputs.text_ids(request.prompt, "prompt")
    return prep.prepare(ids, sampling_fields(request), request.request_id or None)


def copy_counters(msg: pb.GenerateResponse, out: RequestOutput) -> None:
    """The finish reason and the counters (the response's fields have the counters' names)."""
    msg.finish_reason = out.finish_reason or ""
    for name, value in out.counters().items():
        setattr(msg, name, value)


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
