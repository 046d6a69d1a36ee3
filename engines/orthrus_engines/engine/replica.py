"""The replica-engine interface: what a serving replica (orthrus_serve's EngineServer) needs from the engine
behind it, so that the router, prefix index, autoscaler and both APIs work the same over every backend.

Implemented by the torch `AsyncEngine` (backend "torch") and by `orthrus_engines.trtllm.async_engine.
TrtllmAsyncEngine` (backend "trtllm"); `build_replica_engine` picks one by `engine_args["backend"]`.
tests/engines/test_replica_engine_contract.py holds every backend to the same contract.
"""

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from orthrus_engines.inputs import Prompt
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.sampling_params import SamplingParams

# What `stats()` reports on every backend (the router reads num_running/num_waiting, the autoscaler
# num_waiting/kv_usage, the replica's metrics num_waiting/kv_usage); a backend may add keys.
STATS_KEYS = ("num_running", "num_waiting", "kv_usage", "num_pages", "num_free_pages", "num_generated_tokens")
# What `model_info()` reports: the ingress builds its tokenizer, checks and page hashes from it.
MODEL_INFO_KEYS = ("model", "tokenizer", "block_size", "max_model_len", "page_size", "vocab_size", "prefix_fingerprint")
# Kinds of `drain_prefix_events()` entries: (kind, page hashes); "cleared" carries none.
PREFIX_EVENT_KINDS = ("stored", "removed", "cleared")


@runtime_checkable
class ReplicaEngine(Protocol):
    """An online engine serving many concurrent request streams.

    `generate` yields `RequestOutput` deltas (new tokens and text; counters are totals so far) and ends
    with one whose `finished` is set; invalid input raises OrthrusInputError naming the field before
    anything is yielded; a caller that stops iterating aborts its request. `abort` ends a request by id
    (its stream then finishes with finish_reason "abort"). `drain_prefix_events` returns, and forgets,
    what the prefix cache stored and removed since the last call, as full-page hashes of
    `orthrus_engines.prefix_hash` seeded with `model_info()["prefix_fingerprint"]`."""

    @property
    def is_alive(self) -> bool: ...

    def generate(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
                 ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def model_info(self) -> dict: ...

    def drain_prefix_events(self) -> list[tuple[str, list[str]]]: ...

    def shutdown(self) -> None: ...


def build_replica_engine(model: str | None, head: str | None, engine_args: dict) -> ReplicaEngine:
    """The engine for `engine_args["backend"]` ("torch" by default; "trtllm" refused, naming tensorrt_llm,
    where that package is not installed)."""
    from orthrus_engines.trtllm import validate_backend

    if validate_backend(engine_args.get("backend", "torch")) == "trtllm":
        from orthrus_engines.trtllm.async_engine import TrtllmAsyncEngine

        return TrtllmAsyncEngine(model, head=head, **engine_args)
    from orthrus_engines.engine.async_engine import AsyncEngine

    return AsyncEngine(model, head=head, **engine_args)
