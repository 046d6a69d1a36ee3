"""The ingress's bound on requests in flight (orthrus_serve.admission), on the CPU without a cluster: past the
bound a request is refused as overloaded (429 / RESOURCE_EXHAUSTED), and an HTTP stream holds its slot until
it has been sent, has failed or was cancelled, never longer. tests/serve/test_overload.py drives it end to end."""

import asyncio

import grpc
import pytest

from orthrus_serve import grpc_api
from orthrus_serve.admission import InFlightLimit, SlotStreamingResponse
from orthrus_serve.errors import Overloaded, http_error


class _Context:
    code = details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_past_the_bound_a_request_is_refused_as_overloaded_and_a_release_frees_one_slot():
    limit = InFlightLimit(2)
    first, _ = limit.acquire(), limit.acquire()
    with pytest.raises(Overloaded, match="max_ingress_requests") as refused:
        limit.acquire()
    assert http_error(refused.value)[:2] == (429, "rate_limit_error")
    ctx = _Context()
    grpc_api.set_error(ctx, refused.value)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.release()
    first.release()  # twice: once
    assert limit.count == 1
    with limit.acquire():
        assert limit.count == 2
    assert limit.count == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_the_bound_is_a_positive_integer(bad):
    with pytest.raises(ValueError, match="max_ingress_requests"):
        InFlightLimit(bad)


def _stream(limit: InFlightLimit, closed: list, fail: bool = False, chunks: int = 3):
    async def chunks_of():
        try:
            for i in range(chunks):
                if fail and i == 1:
                    raise RuntimeError("the stream failed")
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    return SlotStreamingResponse(chunks_of(), limit.acquire(), media_type="text/event-stream")


async def _send_to(sent: list, block_after: int | None = None, blocked: asyncio.Event | None = None):
    async def send(message):
        sent.append(message)
        if block_after is not None and len(sent) > block_after:
            blocked.set()
            await asyncio.Event().wait()  # a client that stopped reading: only a cancel ends this
    return send


async def _receive():
    await asyncio.Event().wait()  # no disconnect message: the stream ends by itself or by a cancel


SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}}


def test_a_stream_holds_its_slot_until_it_has_been_sent():
    async def run():
        limit, closed, sent = InFlightLimit(1), [], []
        response = _stream(limit, closed)
        assert limit.count == 1
        await response(SCOPE, _receive, await _send_to(sent))
        return limit.count, closed, sent

    count, closed, sent = asyncio.run(run())
    assert count == 0 and closed == [True]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_a_failed_stream_releases_its_slot():
    async def run():
        limit, closed = InFlightLimit(1), []
        with pytest.raises(RuntimeError, match="the stream failed"):
            await _stream(limit, closed, fail=True)(SCOPE, _receive, await _send_to([]))
        return limit.count, closed

    assert asyncio.run(run()) == (0, [True])


def test_a_cancelled_stream_releases_its_slot_and_closes_its_chunks_at_once():
    async def run():
        limit, closed, blocked = InFlightLimit(1), [], asyncio.Event()
        response = _stream(limit, closed, chunks=1000)
        task = asyncio.create_task(response(SCOPE, _receive, await _send_to([], 2, blocked)))
        await blocked.wait()  # mid-stream, as when the client goes away
        assert limit.count == 1 and not closed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return limit.count, closed

    assert asyncio.run(run()) == (0, [True])
