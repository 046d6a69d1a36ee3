"""Pure translations between this project's serving types and TensorRT-LLM's LLM API (no tensorrt_llm
import: CPU-tested in tests/engines/test_trtllm_mapping.py against objects shaped like TensorRT-LLM's).

- `sampling_kwargs`: our SamplingParams -> the keyword arguments of `tensorrt_llm.SamplingParams`; what has
  no TensorRT-LLM counterpart is refused with OrthrusInputError naming our field.
- `engine_kwargs`: our EngineArgs -> the keyword arguments of `tensorrt_llm.LLM` (kv_cache_config and
  speculative_config as dicts, built into their classes by the engine); unmappable settings refused by name.
- `StreamState` / `delta_from_output`: one request's cumulative `CompletionOutput`s -> our RequestOutput deltas.
- `stats_from_iteration`: one iteration-stats dict (`LLM.get_stats_async`) -> our `stats()` keys.
- `PrefixEventMapper`: KV-cache events (`LLM.get_kv_cache_events_async`) -> our ("stored"/"removed", page hashes).

Shapes read from TensorRT-LLM's public source (`executor/result.py` CompletionOutput, `_utils.py`
KVCacheEventSerializer, the iteration-stats JSON): see docs/ARCHITECTURE.md, "TensorRT-LLM backend".
"""

from dataclasses import dataclass

from orthrus_engines.config import EngineArgs
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.outputs import RequestOutput, TokenLogprob
from orthrus_engines.prefix_hash import next_page_hash
from orthrus_engines.sampling_params import SamplingParams

MIN_DRAFT_LEN = 3  # OrthrusDecodingConfig's floor (trtllm/config.py)
KV_CACHE_FRACTION = 0.4  # of free GPU memory, as the torch engine's default on CUDA
KV_EVENT_BUFFER = 4096  # KV-cache events TensorRT-LLM buffers between our drains
# TensorRT-LLM's finish reasons -> ours (stop | length | abort | error)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "error"}
# EngineArgs fields the trtllm backend has no counterpart for: refused unless left at their defaults
UNMAPPED_ENGINE_ARGS = ("num_pages", "kv_cache_gb", "compile", "attention_backend", "cpu_packed_weights")


def sampling_kwargs(params: SamplingParams) -> dict:
    """`tensorrt_llm.SamplingParams(**sampling_kwargs(params))`. Greedy is temperature 0 (top-k/top-p and
    the seed then play no part, as in the torch engine); logprobs: TensorRT-LLM returns at least the
    sampled token's, so 0 asks it for 1 and `delta_from_output` keeps `params.logprobs` alternatives."""
    params.validate()
    if params.logits_processors:
        raise OrthrusInputError("logits_processors", "the trtllm backend runs no Python logits processors")
    if params.block_size is not None:
        raise OrthrusInputError("block_size", "the trtllm backend drafts the engine's max_draft_len for every "
                                "request; a per-request block size is not available")
    if not params.use_diffusion:
        raise OrthrusInputError("use_diffusion", "the trtllm backend cannot switch one request to plain AR")
    kw: dict = {"max_tokens": params.max_tokens, "ignore_eos": params.ignore_eos, "detokenize": True,
                "return_perf_metrics": True}  # per-request draft/accept counts (`request_perf_metrics`)
    if params.greedy:
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = float(params.temperature)
        if params.top_p < 1:
            kw["top_p"] = float(params.top_p)
        if params.top_k > 0:
            kw["top_k"] = params.top_k
        if params.seed is not None:
            kw["seed"] = params.seed
    if params.stop:
        kw["stop"] = list(params.stop)
    if params.stop_token_ids:
        kw["stop_token_ids"] = list(params.stop_token_ids)
    if params.logprobs is not None:
        kw["logprobs"] = max(1, params.logprobs)
    return kw


def draft_len(block_size: int) -> int | None:
    """TensorRT-LLM's max_draft_len for our block size K: the K - 1 drafts of the two-pass cycle; None for
    K = 1 (plain AR, no speculative config). OrthrusDecodingConfig needs at least MIN_DRAFT_LEN."""
    if block_size == 1:
        return None
    if block_size - 1 < MIN_DRAFT_LEN:
        raise OrthrusInputError("block_size", f"the trtllm backend needs a block size of 1 (AR) or >= "
                                f"{MIN_DRAFT_LEN + 1} ({MIN_DRAFT_LEN}+ drafts per cycle), got {block_size}")
    return block_size - 1


def engine_kwargs(args: EngineArgs, model: str, tokenizer: str, block_size: int, max_model_len: int,
                  head: str | None, anchor_view: str) -> dict:
    """`tensorrt_llm.LLM(**kw)` for our engine settings, with `kv_cache_config` and `speculative_config`
    as dicts (KvCacheConfig / OrthrusDecodingConfig arguments). TP > 1 runs on the Ray orchestrator."""
    defaults = EngineArgs()
    for name in UNMAPPED_ENGINE_ARGS:
        if getattr(args, name) != getattr(defaults, name):
            raise OrthrusInputError(name, "has no counterpart in the trtllm backend (it sizes its KV cache as "
                                    f"{KV_CACHE_FRACTION:.0%} of free GPU memory); leave it unset")
    if args.device not in (None, "cuda"):
        raise OrthrusInputError("device", f"the trtllm backend runs on CUDA only, got {args.device!r}")
    if args.draft_kv not in ("transient", "tail"):
        raise OrthrusInputError("draft_kv", f"must be 'transient' or 'tail', got {args.draft_kv!r}")
    tp = args.tensor_parallel_size
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise OrthrusInputError("tensor_parallel_size", f"must be an integer >= 1, got {tp!r}")
    kw: dict = {
        "model": model, "tokenizer": tokenizer, "tensor_parallel_size": tp,
        "max_batch_size": args.max_num_seqs, "max_num_tokens": args.max_num_batched_tokens,
        "max_seq_len": max_model_len, "enable_iter_perf_stats": True,
        "kv_cache_config": {"tokens_per_block": args.page_size, "enable_block_reuse": args.enable_prefix_cache,
                            "event_buffer_max_size": KV_EVENT_BUFFER if args.enable_prefix_cache else 0,
                            "free_gpu_memory_fraction": KV_CACHE_FRACTION},
        "speculative_config": None,
    }
    if args.dtype is not None:
        kw["dtype"] = args.dtype
    if tp > 1:
        kw["orchestrator_type"] = "ray"
    d = draft_len(block_size)
    if d is not None:
        kw["speculative_config"] = {"max_draft_len": d, "speculative_model": model, "head_path": head,
                                    "anchor_view": anchor_view}
    return kw


@dataclass
class StreamState:
    """What one request has delivered so far (TensorRT-LLM's outputs are cumulative)."""

    request_id: str
    prompt_tokens: int
    page_size: int
    num_logprobs: int | None = None  # the request's `logprobs`
    sent_tokens: int = 0
    sent_text: int = 0
    cached_prompt_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def counters(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.sent_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens}


def _perf(completion, *path: str) -> int:
    """An integer from `completion.request_perf_metrics.<path>`, 0 where TensorRT-LLM did not report it."""
    obj = getattr(completion, "request_perf_metrics", None)
    for name in path:
        obj = getattr(obj, name, None)
    return int(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else 0


def _logprob(entry, token_id: int, n: int) -> TokenLogprob:
    """One position of TensorRT-LLM's logprobs: {token_id: Logprob(logprob, rank)} (the top-k and the
    sampled token) or, in older releases, the sampled token's float."""
    if not isinstance(entry, dict):
        return TokenLogprob(token_id, float(entry), [])
    value = lambda lp: float(getattr(lp, "logprob", lp))  # noqa: E731 - Logprob or a bare float
    ranked = sorted(entry.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 0, -value(kv[1])))
    own = entry.get(token_id)
    return TokenLogprob(token_id, value(own) if own is not None else float("nan"),
                        [(t, value(lp)) for t, lp in ranked[:n]])


def delta_from_output(state: StreamState, completion, finished: bool, aborted: bool = False) -> RequestOutput:
    """Our delta from TensorRT-LLM's `CompletionOutput` (cumulative `token_ids`, `text`, `logprobs`;
    `finish_reason` in stop|length|cancelled|timeout). Tokens already sent stay sent: if TensorRT-LLM cuts
    a stop sequence from tokens streamed earlier, the cut is not taken back. Counters: prompt_tokens,
    completion_tokens; cached_prompt_tokens from reused KV blocks; drafted/accepted from the request's
    speculative-decoding metrics where reported (else 0); forward_passes is not reported (0)."""
    ids = list(completion.token_ids or [])
    text = completion.text or ""
    new_ids, new_text = ids[state.sent_tokens:], text[state.sent_text:]
    logprobs = None
    if state.num_logprobs is not None:
        entries = list(completion.logprobs or [])[state.sent_tokens:len(ids)]
        logprobs = [_logprob(e, t, state.num_logprobs) for e, t in zip(entries, new_ids)]
    state.sent_tokens, state.sent_text = max(state.sent_tokens, len(ids)), max(state.sent_text, len(text))
    reused = _perf(completion, "kv_cache_metrics", "num_reused_blocks")  # totals: kept where not reported again
    state.cached_prompt_tokens = max(state.cached_prompt_tokens, min(reused * state.page_size, state.prompt_tokens))
    state.drafted_tokens = max(state.drafted_tokens, _perf(completion, "speculative_decoding", "total_draft_tokens"))
    state.accepted_tokens = max(state.accepted_tokens,
                                _perf(completion, "speculative_decoding", "total_accepted_draft_tokens"))
    reason = error = None
    if finished or aborted:
        reason = "abort" if aborted else FINISH_REASONS.get(completion.finish_reason, "stop")
        if reason == "error":
            error = f"TensorRT-LLM finished the request with {completion.finish_reason!r}"
    return RequestOutput(state.request_id, new_ids, new_text, finished or aborted, reason, error,
                         logprobs=logprobs, **state.counters)


def stats_from_iteration(stat: dict | None, in_flight: int, generated: int) -> dict:
    """Our `stats()` from TensorRT-LLM's latest iteration stats (numActiveRequests, numQueuedRequests,
    kvCacheStats{maxNumBlocks, freeNumBlocks, usedNumBlocks}) and this engine's own count of requests in
    flight: a request submitted and not active counts as waiting, and an idle engine (nothing in flight)
    reports nothing running and no KV in use, whatever the last (stale) iteration said."""
    stat = stat or {}
    kv = stat.get("kvCacheStats") or {}
    total, free = int(kv.get("maxNumBlocks", 0)), int(kv.get("freeNumBlocks", 0))
    used = int(kv.get("usedNumBlocks", total - free))
    running = min(int(stat.get("numActiveRequests", 0)), in_flight)
    spec = stat.get("specDecodingStats") or {}
    return {
        "num_running": running,
        "num_waiting": in_flight - running,
        "kv_usage": used / total if total and in_flight else 0.0,
        "num_pages": total,
        "num_free_pages": free if in_flight else total,
        "num_generated_tokens": generated,
        "iteration_draft_tokens": int(spec.get("numDraftTokens", 0)),
        "iteration_accepted_tokens": int(spec.get("numAcceptedTokens", 0)),
    }


def worker_bundle_indices(tp: int) -> str:
    """TRTLLM_RAY_BUNDLE_INDICES for a replica's placement group (orthrus_serve.app.replica_bundles under
    backend trtllm): bundle 0 holds the replica, bundles 1..tp one GPU each for TensorRT-LLM's Ray workers."""
    return ",".join(str(i) for i in range(1, tp + 1))


class PrefixEventMapper:
    """TensorRT-LLM's KV-cache events -> our prefix events. A stored event names its blocks by TensorRT-LLM's
    own hashes but carries each block's tokens and its parent's hash, so each full block (`page_size`
    tokens) is renamed with our hash chain (`prefix_hash.next_page_hash`, seeded with the fingerprint)
    and remembered for its removal. A block whose parent was never seen (events lost) or that is not
    full cannot be named; it and its descendants in that event are skipped."""

    def __init__(self, seed: str, page_size: int):
        self.seed, self.page_size = seed, page_size
        self.ours: dict[int, str] = {}  # TensorRT-LLM block hash -> our page hash

    def apply(self, event: dict) -> list[tuple[str, list[str]]]:
        data = event.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            parent = data.get("parent_hash")
            h = self.seed if parent is None else self.ours.get(parent)
            stored: list[str] = []
            for block in data.get("blocks") or []:
                tokens = [t["token_id"] if isinstance(t, dict) else int(t) for t in block.get("tokens") or []]
                if h is None or len(tokens) != self.page_size:
                    break
                h = next_page_hash(h, tokens)
                self.ours[block["block_hash"]] = h
                stored.append(h)
            return [("stored", stored)] if stored else []
        if kind == "removed":
            removed = [h for h in (self.ours.pop(b, None) for b in data.get("block_hashes") or []) if h is not None]
            return [("removed", removed)] if removed else []
        return []  # "created" (the pool's size) and "updated" (cache level, priority) change no prefix
