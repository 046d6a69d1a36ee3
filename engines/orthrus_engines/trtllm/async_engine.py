"""`TrtllmAsyncEngine`: the trtllm backend's `engine.replica.ReplicaEngine`, over TensorRT-LLM's async LLM API.

It builds `tensorrt_llm.LLM` (PyTorch backend) with the ORTHRUS one-model mode (`OrthrusDecodingConfig`,
after `register()`), TP = N on TensorRT-LLM's Ray orchestrator for N > 1 (inside a Serve replica: its
workers take bundles 1..N of the replica's placement group, see orthrus_serve.app.replica_bundles), and
serves each request as `LLM.generate_async(token_ids, SamplingParams, streaming=True)`, turning the
cumulative outputs into our deltas (`mapping.delta_from_output`). Stats and prefix events come from
`LLM.get_stats_async` / `LLM.get_kv_cache_events_async`, drained by a task on the caller's event loop.
Prompts are tokenized and checked here, exactly as the torch engine does; model facts and the prefix
fingerprint come from the same checkpoint files. Needs tensorrt_llm (with this project's patch) and CUDA;
it has not been executed in this project's environment (docs/BENCHMARKS.md).
"""

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from orthrus_engines.config import engine_args_from
from orthrus_engines.engine.waiting_bound import check_room, waiting_past_batch
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.inputs import InputProcessor, Prompt, load_tokenizer
from orthrus_engines.models.builtin import default_head
from orthrus_engines.models.checkpoint import checkpoint_fingerprint
from orthrus_engines.models.loader import model_dir, resolve_model
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.sampling_params import SamplingParams
from orthrus_engines.trtllm import register, require_tensorrt_llm
from orthrus_engines.trtllm.mapping import (PrefixEventMapper, StreamState, delta_from_output, engine_kwargs,
                                            sampling_kwargs, stats_from_iteration, worker_bundle_indices)

log = logging.getLogger(__name__)
POLL_S = 0.05  # how long one drain of stats / KV events waits for more
RAY_BUNDLES_ENV = "TRTLLM_RAY_BUNDLE_INDICES"  # TensorRT-LLM's Ray executor: bundles of the current placement group


class TrtllmAsyncEngine:
    def __init__(self, model: str | None = None, block_size: int | str | None = None, **engine_args):
        require_tensorrt_llm()
        args = engine_args_from(model, block_size, engine_args)
        if args.backend != "trtllm":
            raise OrthrusInputError("backend", f"TrtllmAsyncEngine serves backend 'trtllm', got {args.backend!r}")
        path = model_dir(args.model)
        self.tokenizer_path = Path(args.tokenizer).expanduser() if args.tokenizer else path
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        src = resolve_model(path, default_head(args.model, args.head), self.tokenizer)
        if src.family != "qwen3":
            raise OrthrusInputError("model", f"the trtllm backend serves Qwen3-based Orthrus checkpoints "
                                    f"(OrthrusForCausalLM over TensorRT-LLM's Qwen3), got {src.family!r}")
        bs = args.block_size
        if bs is None or bs == "auto":
            bs = src.block_size
        elif not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise OrthrusInputError("block_size", f"must be 'auto' or an integer >= 1, got {bs!r}")
        window = getattr(src.hf_config, "max_position_embeddings", 4096)
        self.model_path, self.block_size, self.page_size = path, bs, args.page_size
        self.vocab_size = src.hf_config.vocab_size
        self.max_model_len = min(args.max_model_len or window, window)
        self.fingerprint = checkpoint_fingerprint(path, self.tokenizer)
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len)
        self.prefix_cache = args.enable_prefix_cache
        self.max_num_seqs, self.max_waiting_requests = args.max_num_seqs, args.resolve_max_waiting_requests()
        kw = engine_kwargs(args, str(path), str(self.tokenizer_path), bs, self.max_model_len,
                           str(src.head_path) if src.head_path else None, src.anchor_view)
        self.llm = build_llm(kw)
        self._requests: dict[str, tuple] = {}  # request id -> (TensorRT-LLM result, its stop event, its loop)
        self._events: list[tuple[str, list[str]]] = []
        self._prefix = PrefixEventMapper(self.fingerprint, self.page_size)
        self._last_stat: dict | None = None
        self._generated = 0
        self._poller: asyncio.Task | None = None
        self.closed = False
        self._start_poller()

    @property
    def is_alive(self) -> bool:
        """Until shutdown. A failing TensorRT-LLM executor shows as requests ending in "error", which the
        replica's health check (orthrus_serve.health.EngineHealth) counts."""
        return not self.closed

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
                       ) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise OrthrusInputError("sampling_params", f"must be SamplingParams, got {type(params).__name__}")
        if self.closed:
            raise RuntimeError("the engine is closed")
        if request_id in self._requests:
            raise OrthrusInputError("request_id", f"{request_id!r} is already running")
        check_room(waiting_past_batch(len(self._requests), self.max_num_seqs), self.max_waiting_requests)
        ids = self.inputs.prompt_ids(prompt)
        self.inputs.check_request(ids, params)
        from tensorrt_llm import SamplingParams as TrtSamplingParams

        trt_params = TrtSamplingParams(**sampling_kwargs(params))
        self._start_poller()
        result = self.llm.generate_async(ids, sampling_params=trt_params, streaming=True)
        stop = asyncio.Event()
        self._requests[request_id] = (result, stop, asyncio.get_running_loop())
        state = StreamState(request_id, len(ids), self.page_size, params.logprobs)
        finished = False
        try:
            while not finished:
                try:
                    out = await _next_or_stop(result, stop)
                except StopAsyncIteration:
                    out = None
                except Exception as e:  # noqa: BLE001 - the request ends in an error, the engine goes on
                    log.exception("TensorRT-LLM request %s failed", request_id)
                    finished = True
                    yield RequestOutput(request_id, [], "", True, "error", f"{type(e).__name__}: {e}", **state.counters)
                    return
                if out is None:  # aborted, or the stream ended without a final output
                    finished = True
                    yield delta_from_output(state, _empty(), False, aborted=True)
                    return
                done = bool(out.finished)
                delta = delta_from_output(state, out.outputs[0], done)  # "cancelled" maps to abort
                self._generated += len(delta.token_ids)
                finished = delta.finished
                if delta.token_ids or delta.text or finished:
                    yield delta
        finally:
            self._requests.pop(request_id, None)
            if not finished:  # the caller stopped iterating: TensorRT-LLM frees the request's blocks on abort
                _abort_quietly(result)

    def abort(self, request_id: str) -> None:
        entry = self._requests.get(request_id)
        if entry is None:
            return
        result, stop, loop = entry
        _abort_quietly(result)
        loop.call_soon_threadsafe(stop.set)

    def stats(self) -> dict:
        return stats_from_iteration(self._last_stat, len(self._requests), self._generated)

    def model_info(self) -> dict:
        return {
            "model": str(self.model_path),
            "tokenizer": str(self.tokenizer_path),
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "page_size": self.page_size,  # = TensorRT-LLM's tokens_per_block
            "vocab_size": self.vocab_size,
            "prefix_fingerprint": self.fingerprint,
        }

    def drain_prefix_events(self) -> list[tuple[str, list[str]]]:
        events, self._events = self._events, []
        return events

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True  # the poller stops at its next turn
        for request_id in list(self._requests):
            self.abort(request_id)
        self.llm.shutdown()

    # -- stats and KV events -----------------------------------------------------------------------
    def _start_poller(self) -> None:
        if self._poller is not None and not self._poller.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside an event loop: the first generate starts it
            return
        self._poller = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while not self.closed:
            try:
                async for stat in _fresh(self.llm.get_stats_async(timeout=POLL_S)):
                    self._last_stat = stat
                if self.prefix_cache:
                    async for event in _fresh(self.llm.get_kv_cache_events_async(timeout=POLL_S)):
                        self._events.extend(self._prefix.apply(event))
            except Exception:  # noqa: BLE001 - stats are best effort: never end the poller
                log.exception("reading TensorRT-LLM stats / KV events failed")
            await asyncio.sleep(POLL_S)


def build_llm(kw: dict):
    """`tensorrt_llm.LLM` from `mapping.engine_kwargs`, after registering OrthrusForCausalLM."""
    register()
    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi import KvCacheConfig

    from orthrus_engines.trtllm.config import OrthrusDecodingConfig

    kw = dict(kw, kv_cache_config=KvCacheConfig(**kw["kv_cache_config"]))
    spec = kw.pop("speculative_config")
    if spec is not None:
        kw["speculative_config"] = OrthrusDecodingConfig(**spec)
    if kw.get("orchestrator_type") == "ray":
        use_replica_placement_group(kw["tensor_parallel_size"])
    return LLM(**kw)


def use_replica_placement_group(tp: int) -> None:
    """Inside a placement group (a Serve replica under TP), have TensorRT-LLM's Ray workers use bundles
    1..tp of it (TRTLLM_RAY_BUNDLE_INDICES) instead of creating a placement group of their own."""
    from ray.util import get_current_placement_group

    if RAY_BUNDLES_ENV not in os.environ and get_current_placement_group() is not None:
        os.environ[RAY_BUNDLES_ENV] = worker_bundle_indices(tp)


async def _next_or_stop(result, stop: asyncio.Event):
    """The stream's next output, or None once `stop` is set (an abort that TensorRT-LLM does not answer)."""
    step = asyncio.ensure_future(result.__anext__())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if step.done():
        stopped.cancel()
        return step.result()  # StopAsyncIteration and errors propagate
    step.cancel()
    return None


async def _fresh(items):
    """Items of a TensorRT-LLM IterationResult (dicts; JSON strings in some releases). Its iterator marks
    itself done after a timeout with nothing new; `mark_undone` makes every drain look again."""
    getattr(items, "mark_undone", lambda: None)()
    async for item in items:
        yield json.loads(item) if isinstance(item, str) else item


def _abort_quietly(result) -> None:
    try:
        if not getattr(result, "finished", False):
            result.abort()
    except Exception:  # noqa: BLE001 - a request already gone needs no abort
        log.debug("abort of a finished TensorRT-LLM request", exc_info=True)


def _empty():
    """A CompletionOutput with nothing new: what an aborted request's last delta is built from."""
    from types import SimpleNamespace

    return SimpleNamespace(token_ids=[], text="", logprobs=[], finish_reason="cancelled")
