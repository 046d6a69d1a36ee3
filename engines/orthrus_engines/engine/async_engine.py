"""The online engine: many concurrent `generate` streams share one continuous batch.

The engine runs in one background thread (torch releases the GIL in its kernels). Callers on any
asyncio loop submit requests and receive `RequestOutput` deltas; a caller that stops iterating
(cancelled, closed, or just gone) aborts its request, so nothing it held stays allocated. A request
with n > 1 streams the deltas of its samples as they come, each tagged with its `index`, and ends
when every sample has finished.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orthrus_engines.config import engine_args_from
from orthrus_engines.engine.engine_core import EngineCore
from orthrus_engines.inputs import Prompt
from orthrus_engines.errors import EngineDeadError, OrthrusInputError
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    """The torch backend's `engine.replica.ReplicaEngine`."""

    def __init__(self, model: str | None = None, block_size: int | None = None, **engine_args):
        self.core = EngineCore(engine_args_from(model, block_size, engine_args))
        self.tokenizer = self.core.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._dead = False  # the thread failed: set under the lock, so no request is added after it
        self._thread = threading.Thread(target=self._loop, name="orthrus-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """Whether the engine thread still serves (it stops only on shutdown or an internal failure; a failed
        thread is dead from the moment it fails, while it still tells its callers)."""
        return not self._dead and self._thread.is_alive()

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        loop, out_q = asyncio.get_running_loop(), asyncio.Queue()
        done = loop.create_future()
        with self._lock:
            if not self.is_alive:  # a command would wait forever for a thread that is gone
                raise EngineDeadError("the engine thread has stopped")
            if request_id in self._streams:
                raise OrthrusInputError("request_id", f"{request_id!r} is already running")
            self._streams[request_id] = _Stream(loop, out_q, getattr(params, "n", 1))
            self._commands.put(("add", request_id, prompt, params, done))
        try:
            await done  # validation errors (OrthrusInputError) surface here, in the caller
            unfinished = params.n
            while True:
                item = await out_q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                unfinished -= item.finished
                if not unfinished:
                    return
        finally:
            with self._lock:
                still_running = self._streams.pop(request_id, None) is not None
            if still_running:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        return self.core.stats()

    def model_info(self) -> dict:
        """The model facts a serving replica reports (engine.replica.MODEL_INFO_KEYS)."""
        core = self.core
        return {
            "model": str(core.source.path),
            "tokenizer": str(core.tokenizer_path),  # where the engine's tokenizer came from: the ingress loads it
            "block_size": core.block_size,
            "max_model_len": core.max_model_len,
            "page_size": core.page_size,
            "vocab_size": core.vocab_size,
            "prefix_fingerprint": core.fingerprint,
        }

    def drain_prefix_events(self) -> list[tuple[str, list[str]]]:
        return self.core.drain_prefix_events()

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # a step still running keeps its workers; they exit with this process
            self.core.close()  # tensor-parallel workers stop now, not when the engine is collected

    # -- engine thread ------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
            if target is not None and not isinstance(out, BaseException) and out.finished:
                target.unfinished -= 1
            if target is not None and (isinstance(out, BaseException) or not target.unfinished):
                del self._streams[request_id]
        if target is not None:
            target.loop.call_soon_threadsafe(target.queue.put_nowait, out)

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, done = cmd
            loop = done.get_loop()
            try:
                self.core.add_request(rid, prompt, params)  # tokenizes here: one thread owns the tokenizer
                loop.call_soon_threadsafe(_resolve, done, None)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                with self._lock:
                    self._streams.pop(rid, None)
                loop.call_soon_threadsafe(_resolve, done, e)
        elif cmd[0] == "abort":
            for out in self.core.abort(cmd[1]):  # every sample of the request
                self._deliver(out, cmd[1])

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the thread dies: its callers hear it rather than wait forever
            log.exception("the engine thread failed")
            error = EngineDeadError(f"the engine thread failed: {type(e).__name__}: {e}")
            with self._lock:
                self._dead = True
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            while True:  # requests not yet added: their callers wait on `done`
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[-1].get_loop().call_soon_threadsafe(_resolve, cmd[-1], error)

    def _serve(self) -> None:
        while not self._stopped:
            try:
                cmd = self._commands.get(block=not self.core.has_unfinished())
                if cmd[0] == "stop":
                    return
                self._handle(cmd)
                continue  # drain all pending commands before the next step
            except queue.Empty:
                pass
            try:
                outs = self.core.step()
            except Exception as e:  # a scheduler bug must not leave callers waiting forever
                log.exception("engine step failed outside a batch")
                outs = self.core.fail_all(f"{type(e).__name__}: {e}")
            for out in outs:
                self._deliver(out, out.request_id)


@dataclass
class _Stream:
    """Where a request's deltas go: its caller's loop and queue; ends when no sample is unfinished."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    unfinished: int


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
