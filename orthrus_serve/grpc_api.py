"""gRPC request reading, response filling and status mapping for the ingress."""

import asyncio
import functools
import logging
from typing import TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from ray.serve.exceptions import BackPressureError

from orthrus_engines import OrthrusInputError, RequestOutput
from orthrus_serve import structured_fields
from orthrus_serve.api import orthrus_pb2 as pb
from orthrus_serve.errors import REPLICA_LOST, EngineFailed, Overloaded, TimedOut, message
from orthrus_serve.request_prep import SAMPLING_FIELDS, PreparedRequest, RequestPreparer

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


class Unauthenticated(Exception):
    """A call without the API key."""


def parse(cls: type[M], data: bytes | M) -> M:
    """The request message `data`, serialized as Ray's proxy passes it on (grpc_service). Bytes protobuf refuses
    raise an OrthrusInputError naming the string field that is not UTF-8, or "request" (not a `cls` at all)."""
    if isinstance(data, Message):  # a proxy registered with the generated servicer function parsed it already
        return data
    try:
        return cls.FromString(data)
    except DecodeError:
        pass
    try:
        loose = _strings_as_bytes(cls).FromString(data)
    except DecodeError:
        raise OrthrusInputError("request", f"not a valid {cls.DESCRIPTOR.full_name} message (protobuf)") from None
    for field, value in loose.ListFields():
        if cls.DESCRIPTOR.fields_by_name[field.name].type != FieldDescriptor.TYPE_STRING:
            continue
        named = [(field.name, value)] if isinstance(value, bytes) else \
            [(f"{field.name}[{i}]", v) for i, v in enumerate(value)]  # a repeated field's entries
        for name, text in named:
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OrthrusInputError(name, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    raise OrthrusInputError("request", f"not a valid {cls.DESCRIPTOR.full_name} message (protobuf)")


@functools.cache
def _strings_as_bytes(cls: type[Message]) -> type[Message]:
    """`cls` with its string fields as bytes fields (the same wire format, with no UTF-8 check)."""
    file = descriptor_pb2.FileDescriptorProto()
    cls.DESCRIPTOR.file.CopyToProto(file)
    messages = list(file.message_type)
    while messages:  # every message type, nested ones too
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.type == FieldDescriptor.TYPE_STRING:
                field.type = FieldDescriptor.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(cls.DESCRIPTOR.full_name))


def sampling_fields(request: pb.GenerateRequest) -> dict:
    """The sampling fields a GenerateRequest sets (an unset optional field keeps SamplingParams' default)."""
    fields = {f: getattr(request, f) for f in SAMPLING_FIELDS
              if not request.DESCRIPTOR.fields_by_name[f].has_presence or request.HasField(f)}
    fields["stop"], fields["stop_token_ids"] = list(request.stop), list(request.stop_token_ids)
    fields["logit_bias"] = dict(request.logit_bias)
    if (structured := structured_fields.from_grpc(request)) is not None:
        fields["structured"] = structured
    return fields


def prepare(prep: RequestPreparer, data: bytes | pb.GenerateRequest) -> PreparedRequest:
    """A GenerateRequest (serialized: `parse`) as a prepared request (the ingress runs this off its event loop)."""
    request = parse(pb.GenerateRequest, data)
    if request.prompt and request.prompt_token_ids:
        raise OrthrusInputError("prompt", "give prompt or prompt_token_ids, not both")
    if request.prompt_token_ids:
        ids = prep.inputs.token_ids(list(request.prompt_token_ids), "prompt_token_ids")
    else:
        ids = prep.inputs.text_ids(request.prompt, "prompt")
    return prep.prepare(ids, sampling_fields(request), request.request_id or None)


def copy_counters(msg: pb.GenerateResponse, out: RequestOutput, counters: dict[str, int] | None = None) -> None:
    """The finish reason and the counters (the response's fields have the counters' names): `out`'s, or the
    request's `counters` (`RequestAccumulator.counters()`) where given."""
    msg.finish_reason = out.finish_reason or ""
    for name, value in (counters if counters is not None else out.counters()).items():
        setattr(msg, name, value)


def logprob_messages(out: RequestOutput) -> list[pb.TokenLogprob]:
    """The output's token logprobs (and their alternatives) as messages."""
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in out.logprobs or []]


def copy_logprobs(msg: pb.GenerateResponse, out: RequestOutput) -> None:
    """The delta's token logprobs, appended."""
    msg.logprobs.extend(logprob_messages(out))


def unary_response(request_id: str, result: RequestOutput) -> pb.GenerateResponse:
    """The whole request (`RequestAccumulator.result()`): completion 0 in the top fields, every completion
    in `completions`, the request's counters."""
    msg = pb.GenerateResponse(request_id=request_id, text=result.text, token_ids=result.token_ids)
    copy_counters(msg, result)
    copy_logprobs(msg, result)
    msg.completions.extend(pb.Completion(index=s.index, text=s.text, token_ids=s.token_ids,
                                         finish_reason=s.finish_reason or "", completion_tokens=s.completion_tokens,
                                         logprobs=logprob_messages(s))
                           for s in result.outputs)
    return msg


def set_error(ctx, e: BaseException) -> None:
    """The status of a failed call; details are one line of text, never a traceback."""
    if isinstance(e, Unauthenticated):
        ctx.set_code(grpc.StatusCode.UNAUTHENTICATED)
        ctx.set_details(str(e))
    elif isinstance(e, OrthrusInputError):
        ctx.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        ctx.set_details(message(e))
    elif isinstance(e, (Overloaded, BackPressureError)):
        ctx.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        ctx.set_details(str(e) if isinstance(e, Overloaded) else "the server is at capacity; retry later")
    elif isinstance(e, TimedOut):
        ctx.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
        ctx.set_details(str(e))
    elif isinstance(e, EngineFailed):
        ctx.set_code(grpc.StatusCode.INTERNAL)
        ctx.set_details(str(e))
    elif isinstance(e, REPLICA_LOST):
        ctx.set_code(grpc.StatusCode.UNAVAILABLE)
        ctx.set_details("the engine replica serving this request was lost; retry")
    elif isinstance(e, asyncio.CancelledError):
        ctx.set_code(grpc.StatusCode.CANCELLED)
    else:
        log.exception("request failed")
        ctx.set_code(grpc.StatusCode.INTERNAL)
        ctx.set_details(first_line(f"{type(e).__name__}: {message(e)}"))


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
