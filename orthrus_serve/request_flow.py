"""One request's way through the engine replicas (the ingress's side): a replica that dies before the first
token has the request retried once on another, the request's time limit covers its whole life, and the
engine's failures become the errors the APIs report (errors.py)."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentResponseGenerator

from orthrus_engines import EngineDeadError, EngineOverloaded, RequestOutput
from orthrus_serve.errors import REPLICA_LOST, EngineFailed, Overloaded, TimedOut, message

log = logging.getLogger(__name__)
RETRYABLE = REPLICA_LOST + (EngineDeadError,)  # the replica is gone or broken; the request never started


async def _within(gen: DeploymentResponseGenerator, deadline: float | None) -> AsyncIterator[RequestOutput]:
    """`gen`'s items until `deadline` (event-loop time); past it, TimedOut (the caller cancels `gen`)."""
    loop = asyncio.get_running_loop()
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            out = await asyncio.wait_for(gen.__anext__(), remaining)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TimedOut("the request ran past the server's time limit (request_timeout_s)") from None
        yield out


async def guarded(open_stream: Callable[[], DeploymentResponseGenerator],
                  timeout_s: float | None) -> AsyncIterator[RequestOutput]:
    """The deltas of `open_stream()` (a streaming call to a replica, chosen by the router), within `timeout_s`.
    Raises Overloaded, TimedOut, EngineFailed, or a REPLICA_LOST error once the request has started."""
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    retried = False
    while True:
        gen, started, ended = None, False, False
        try:
            gen = open_stream()
            async for out in _within(gen, deadline):
                started = True
                if out.finish_reason == "error":
                    raise EngineFailed(out.error or "the engine failed the request")
                yield out
            ended = True
            return
        except RETRYABLE as e:
            if started or retried:
                raise
            retried = True
            log.warning("engine replica lost before the first token (%s); retrying once", message(e).splitlines()[0])
        except (BackPressureError, EngineOverloaded) as e:
            raise Overloaded(f"the server is at capacity ({message(e)}); retry later") from None
        finally:
            if not ended and gen is not None:  # timed out, failed, or the caller went away: the replica aborts it
                gen.cancel()
