"""The HTTP surface's guards: the body's size limit (413) and time limit (408), and OpenAI's error shape for the
errors Starlette and FastAPI would otherwise answer in their own ({"detail": ...}): an unknown path (404), a wrong
method (405), a request FastAPI cannot validate (400, as vLLM answers it) and anything unexpected (500, no
traceback)."""

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from orthrus_serve.openai_api import error_body

log = logging.getLogger(__name__)
_INT_DIGITS = 19  # a Content-Length longer than this is past any limit (and int() of 4300+ digits raises)


class RequestTooLarge(Exception):
    """An HTTP body past limits.max_request_bytes (413)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes (limits.max_request_bytes)")


class BodyTimeout(Exception):
    """An HTTP body still arriving after limits.body_timeout_s (408): a slow or stalled upload would otherwise
    hold its ingress slot (max_ingress_requests) for as long as its client keeps the connection open."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the request body did not arrive within {timeout_s:g} s (limits.body_timeout_s)")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, up to `limit` bytes within `timeout_s`: refused by its Content-Length before any of it is read,
    as soon as what arrives (chunked, or a Content-Length that lies) passes the limit, or at the time limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > _INT_DIGITS or int(declared) > limit):
        raise RequestTooLarge(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(timeout_s) from None
    return b"".join(chunks)


def body_refused(e: RequestTooLarge | BodyTimeout) -> JSONResponse:
    """413 or 408 in OpenAI's error shape, naming the body."""
    if isinstance(e, BodyTimeout):
        return JSONResponse(error_body(str(e), "body", code="request_timeout"), status_code=408)
    return JSONResponse(error_body(str(e), "body", code="request_too_large"), status_code=413)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        message = f"{e.detail} ({request.method} {request.url.path})"
        return JSONResponse(error_body(message, None, kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # loc starts with "body"/"query"
        return JSONResponse(error_body(f"{field}: {first.get('msg', 'invalid request')}", field), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", None, "server_error"), status_code=500)
