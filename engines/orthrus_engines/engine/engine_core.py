"""The engine core: the components it is built from, request intake, and the loop: schedule a batch,
run the Orthrus step on it, postprocess each sequence's tokens into output deltas."""

import logging
import time
from pathlib import Path

import torch

from orthrus_engines.config import EngineArgs
from orthrus_engines.engine.detokenizer import Detokenizer
from orthrus_engines.engine.draft_policy import AcceptanceStats, AutoDraftPolicy
from orthrus_engines.engine.grammar import Grammars
from orthrus_engines.engine.model_runner import ModelRunner
from orthrus_engines.engine.orthrus_step import OrthrusStep, fused_block_limit
from orthrus_engines.engine.output_processor import OutputProcessor
from orthrus_engines.engine.page_manager import PageManager
from orthrus_engines.engine.scheduler import PrefillBatch, Scheduler
from orthrus_engines.engine.sequence import Sequence
from orthrus_engines.engine.tp_worker import TensorParallelRunner, tensor_parallel_active
from orthrus_engines.engine.waiting_bound import check_room
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.inputs import InputProcessor, Prompt, load_tokenizer
from orthrus_engines.models.builtin import default_head
from orthrus_engines.models.checkpoint import checkpoint_fingerprint
from orthrus_engines.models.heads import read_head_metadata
from orthrus_engines.models.loader import model_dir, resolve_model
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineCore:
    """The synchronous engine: requests in, one batched Orthrus step at a time, output deltas out."""

    def __init__(self, args: EngineArgs):
        args.check_backend()
        self.args = args
        self.max_waiting_requests = args.resolve_max_waiting_requests()
        path = model_dir(args.model)
        self.tokenizer_path = Path(args.tokenizer).expanduser() if args.tokenizer else path
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        src = resolve_model(path, default_head(args.model, args.head), self.tokenizer)
        self.source = src
        bs = args.block_size
        auto = bs is None or bs == "auto"
        if not auto and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
            raise OrthrusInputError("block_size", f"must be 'auto' or an integer >= 1, got {bs!r}")
        self.block_size = src.block_size if auto else bs  # the longest block drafted
        self.device = args.resolve_device()
        self.dtype = args.resolve_dtype(self.device)
        self.vocab_size = src.hf_config.vocab_size
        window = getattr(src.hf_config, "max_position_embeddings", 4096)
        self.max_model_len = min(args.max_model_len or window, window)
        tp = args.resolve_tensor_parallel_size(src.shape, self.device)
        num_pages = args.num_pages or max(  # per rank: each holds its share of the KV heads
            1, args.kv_cache_bytes(self.device) // ModelRunner.bytes_per_page(src, self.dtype, args.page_size, tp))
        self.max_model_len = min(self.max_model_len, num_pages * args.page_size)
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len)
        backend = args.resolve_attention_backend(self.device)
        runner_kwargs = dict(src=src, device=self.device, dtype=self.dtype, page_size=args.page_size,
                             num_pages=num_pages, max_model_len=self.max_model_len,
                             pack_weights=args.cpu_packed_weights, compile=args.compile, attention_backend=backend,
                             cuda_graphs=args.resolve_cuda_graphs(self.device, backend, tp),
                             max_num_seqs=args.max_num_seqs)
        if tp == 1 and tensor_parallel_active():
            raise RuntimeError("a tensor-parallel engine holds this process's torch.distributed group; "
                               "close it before building a one-rank engine")
        self.runner = ModelRunner(**runner_kwargs) if tp == 1 else TensorParallelRunner(runner_kwargs, tp)
        self.fused = args.fused_cycle and self.runner.anchor_causal  # the verify+draft cycle is available
        # its V x (K - 1) transient rows per sequence (V <= K) stay within one block (docs/ARCHITECTURE.md §1)
        self.fused_k = min(self.block_size, fused_block_limit(src.block_size)) if self.fused else 0
        fingerprint = checkpoint_fingerprint(path, self.tokenizer)  # as stored: replicas in any dtype share prefixes
        self.pages = PageManager(num_pages, args.page_size, fingerprint, args.enable_prefix_cache)
        prior = read_head_metadata(src.head_path).get("acceptance_by_position") if src.head_path else None
        # draft positions: K - 1 in the two-pass cycle; K in the fused one (position 1 there is the AR's own
        # next token, whose row the pass verifies anyway)
        self.acceptance = AcceptanceStats(self.block_size, prior)
        self.fused_acceptance = AcceptanceStats(self.fused_k + 1, prior) if self.fused else self.acceptance
        self.policy: AutoDraftPolicy | None = None
        if auto and self.block_size > 1:
            top = min(args.max_num_batched_tokens, args.max_num_seqs * self.block_size, self.max_model_len, 256)
            self.policy = AutoDraftPolicy.calibrate(self.runner, self.block_size, top, self.acceptance, self.fused_k,
                                                    self.fused_acceptance)
        self.scheduler = Scheduler(self.pages, args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len,
                                   self.fused_k, self.policy.choose if self.policy is not None else None)
        self.orthrus_step = OrthrusStep(self.runner, self.acceptance, self.fused_acceptance, args.resolve_draft_kv())
        self.output = OutputProcessor(self._eos_ids(), self.max_model_len)
        self.grammars = Grammars(self.tokenizer, str(self.tokenizer_path), self.vocab_size, self._eos_ids())
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples
        self.num_generated_tokens = 0
        self.num_prefill_tokens = 0  # prompt positions prefill passes computed (prefix-cache hits are not)
        self.closed = False

    def _eos_ids(self) -> set[int]:
        ids = getattr(self.source.hf_config, "eos_token_id", None)
        out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        return out

    @property
    def page_size(self) -> int:
        return self.pages.page_size

    @property
    def fingerprint(self) -> str:
        return self.pages.seed

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        return self.inputs.prompt_ids(prompt)

    @property
    def seqs(self) -> dict[str, Sequence]:
        """Each unfinished request's first unfinished sample (its one sequence for n = 1)."""
        return {rid: samples[0] for rid, samples in self.requests.items()}

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> Sequence:
        """Queue a request; its first sample's sequence. With n > 1 the other samples wait until the first
        has prefilled the prompt, then take its full pages from the prefix cache (each prefills at most the
        last page), and sample i is seeded with seed + i."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise OrthrusInputError("sampling_params", f"must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if self.closed:
            raise RuntimeError("the engine is closed")
        if request_id in self.requests:
            raise OrthrusInputError("request_id", f"{request_id!r} is already running")
        check_room(len(self.scheduler.waiting), self.max_waiting_requests)
        ids = self.inputs.prompt_ids(prompt)
        self.inputs.check_request(ids, params)
        k = 1 if not params.use_diffusion else (params.block_size or self.block_size)
        auto_k = self.policy is not None and params.use_diffusion and params.block_size is None
        shares = self.pages.enable_prefix_cache and len(ids) - 1 >= self.page_size  # a full page to share
        samples: list[Sequence] = []
        for i in range(params.n):
            detok = Detokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
            leader = samples[0] if samples and shares else None
            samples.append(Sequence(request_id, ids, params.sample_params(i) if params.n > 1 else params, k, detok,
                                    auto_k, self.output.eos_ids, index=i, leader=leader))
            if params.structured is not None:  # the grammar's mask last, after any other processing
                samples[-1].processors.append(self.grammars.processor(params.structured, len(ids)))
        self.requests[request_id] = samples
        for seq in samples:
            self.scheduler.add(seq)
        return samples[0]

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Abort every unfinished sample of a request: their last deltas (none for an unknown request)."""
        outs = []
        for seq in self.requests.pop(request_id, []):
            self.scheduler.remove(seq)
            seq.finish_reason = "abort"
            outs.append(self.output.delta(seq))
        return outs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """`abort`, for a caller of one sample: the first aborted sample's delta, or None."""
        outs = self.abort(request_id)
        return outs[0] if outs else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step: schedule, run, postprocess ---------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if self.policy is not None and self.device.type == "cuda":
            torch.cuda.synchronize()  # the policy times this step's passes, not a pass still running
        if isinstance(batch, PrefillBatch):
            self.num_prefill_tokens += sum(end - seq.num_cached for seq, end in zip(batch.seqs, batch.ends))
        start = time.perf_counter()
        try:
            results, timing = self.orthrus_step.run(batch)
        except Exception as e:  # a shared pass: no one sequence to blame, the batch fails (the engine serves on)
            log.exception("engine step failed")
            results, timing = [(seq, e) for seq in batch.seqs], None
        if isinstance(batch, PrefillBatch):  # chunks that commit no token yet: their full pages are valid KV
            settled = {id(seq) for seq, _ in results}
            for seq in batch.seqs:
                if id(seq) not in settled:
                    self.pages.register_full_pages(seq)
        outs = [self._postprocess(seq, new) for seq, new in results]
        if self.policy is not None and timing is not None:
            self.policy.observe_step(timing.passes, time.perf_counter() - start, fused=timing.fused)
        return outs

    def _postprocess(self, seq: Sequence, new: list[int] | Exception) -> RequestOutput:
        """Commit a step's tokens (the anchor and the accepted drafts now hold valid KV), or fail the
        sequence: a fault here (its detokenizer, its stop strings) is its own."""
        if isinstance(new, Exception):
            return self._fail(seq, new)
        try:
            seq.num_cached += len(new)
            self.num_generated_tokens += self.output.commit(seq, new)
            seq.num_cached = min(seq.num_cached, len(seq.token_ids) - 1)  # a stop inside the block
            self.pages.register_full_pages(seq)
            if seq.finished:
                return self._finish(seq)
            self.pages.trim(seq)
            return self.output.delta(seq)
        except Exception as e:
            return self._fail(seq, e)

    def _fail(self, seq: Sequence, e: Exception) -> RequestOutput:
        log.error("request %s failed: %s: %s", seq.request_id, type(e).__name__, e, exc_info=e)
        seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
        return self._finish(seq)

    def _finish(self, seq: Sequence) -> RequestOutput:
        self.scheduler.remove(seq)
        samples = self.requests.get(seq.request_id, [])
        if seq in samples:
            samples.remove(seq)
            if not samples:
                del self.requests[seq.request_id]
        return self.output.delta(seq)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every request with an error (the last resort after an internal failure)."""
        outs = []
        for seq in [seq for samples in self.requests.values() for seq in samples]:
            seq.finish_reason, seq.error = "error", error
            outs.append(self._finish(seq))
        return outs

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); the engine takes no request after it."""
        self.closed = True
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after changing weights in place); a `cleared` event follows."""
        self.pages.clear_prefix_cache()

    # -- introspection (for the serving layer and tests) ----------------------------------------
    def drain_prefix_events(self) -> list[tuple[str, list[str]]]:
        return self.pages.drain_events()

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_pages": self.pages.num_free,
            "num_pages": self.pages.num_pages,
            "kv_usage": 1 - self.pages.num_free / self.pages.num_pages,
            "num_generated_tokens": self.num_generated_tokens,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_draft_fallbacks": self.orthrus_step.num_draft_fallbacks,
        }
