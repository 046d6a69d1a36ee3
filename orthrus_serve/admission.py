"""The bound on requests in flight at one ingress replica (ServeConfig.max_ingress_requests). Past it a request is
refused at once with `Overloaded` (HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED), where Serve's own bound
on the ingress would queue it or answer 503 / UNAVAILABLE. A request holds its slot from its arrival (before its
body is read) until it ends: a stream until its last chunk, its failure or its cancellation. The ingress runs
its requests on one event loop, so the count needs no lock."""

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from orthrus_serve.errors import Overloaded


class InFlightLimit:
    def __init__(self, limit: int):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"max_ingress_requests must be an integer >= 1, got {limit!r}")
        self.limit, self.count = limit, 0

    def acquire(self) -> "Slot":
        """A slot for one request (release it when the request ends), or Overloaded when all are taken."""
        if self.count >= self.limit:
            raise Overloaded(f"the server is at capacity ({self.limit} requests in flight at this ingress, "
                             "max_ingress_requests); retry later")
        self.count += 1
        return Slot(self)


class Slot:
    """One request's place in an InFlightLimit; releasing it twice releases it once."""

    def __init__(self, limit: InFlightLimit):
        self._limit, self.released = limit, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limit.count -= 1

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SlotStreamingResponse(StreamingResponse):
    """An HTTP stream that holds its request's slot until it has been sent, has failed or was cancelled (the
    client went away), and closes its chunk generator then, so the generator's own cleanup (the engine aborting
    the request) runs at once rather than when the generator is collected."""

    def __init__(self, content, slot: Slot, **kwargs):
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if (aclose := getattr(self.body_iterator, "aclose", None)) is not None:
                    await aclose()
            finally:
                self.slot.release()
