"""The synchronous engine: requests in, one batched Orthrus step at a time, output deltas out."""

import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import torch

from orthrus_engines.config import EngineArgs
from orthrus_engines.engine.page_manager import PageManager
from orthrus_engines.engine.detokenizer import Detokenizer
from orthrus_engines.engine.draft_policy import AcceptanceStats, AutoDraftPolicy, ForwardTimes
from orthrus_engines.engine.model_runner import ModelRunner
from orthrus_engines.engine.sampler import greedy_accept, probs_from_logits, sample, seeded_draws, speculative_accept
from orthrus_engines.engine.scheduler import DecodeBatch, PrefillBatch, Scheduler
from orthrus_engines.engine.sequence import Sequence, Status
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.inputs import InputProcessor, Prompt, load_tokenizer
from orthrus_engines.models.builtin import default_head
from orthrus_engines.models.loader import model_dir, read_head_metadata, resolve_model, weights_digest
from orthrus_engines.outputs import RequestOutput
from orthrus_engines.prefix_hash import model_fingerprint
from orthrus_engines.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
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
        num_pages = args.num_pages or max(
            1, args.kv_cache_bytes(self.device) // ModelRunner.bytes_per_page(src, self.dtype, args.page_size))
        self.max_model_len = min(self.max_model_len, num_pages * args.page_size)
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len)
        self.runner = ModelRunner(src, self.device, self.dtype, args.page_size, num_pages, self.max_model_len,
                                  args.cpu_packed_weights, args.compile,
                                  attention_backend=args.resolve_attention_backend(self.device))
        self.fused = args.fused_cycle and self.runner.anchor_causal  # the verify+draft cycle is available
        # its V x (K - 1) transient rows per sequence (V <= K) stay within one block (docs/ARCHITECTURE.md §1)
        self.fused_k = min(self.block_size, fused_block_limit(src.block_size)) if self.fused else 0
        fingerprint = model_fingerprint(  # of the checkpoint as stored: replicas in any dtype share prefixes
            json.loads((path / "config.json").read_text()),
            self.tokenizer.get_vocab() if self.tokenizer is not None else None,
            weights_digest(path),
        )
        self.pages = PageManager(num_pages, args.page_size, fingerprint, args.enable_prefix_cache)
        prior = read_head_metadata(src.head_path).get("acceptance_by_position") if src.head_path else None
        # draft positions: K - 1 in the two-pass cycle; K in the fused one (position 1 there is the AR's own
        # next token, whose row the pass verifies anyway)
        self.acceptance = AcceptanceStats(self.block_size, prior)
        self.fused_acceptance = AcceptanceStats(self.fused_k + 1, prior) if self.fused else self.acceptance
        self.policy: AutoDraftPolicy | None = None
        if auto and self.block_size > 1:
            top = min(args.max_num_batched_tokens, args.max_num_seqs * self.block_size, self.max_model_len, 256)
            ladder = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= top} | {top})
            self.runner.time_forward(min(8, top))  # warm-up; larger n are extrapolated, and refined online
            times = ForwardTimes({n: self.runner.time_forward(n, repeats=3) for n in ladder})  # min of 3: no stall
            self.policy = AutoDraftPolicy(self.block_size, times, self.acceptance, fused_k=self.fused_k,
                                          fused_times=self._fused_times(top), fused_stats=self.fused_acceptance)
        self.scheduler = Scheduler(self.pages, args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len,
                                   self.fused_k, self.policy.choose if self.policy is not None else None)
        self.eos_ids = self._eos_ids()
        self.seqs: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        self.num_draft_fallbacks = 0  # steps whose draft path failed and that ran as plain AR

    def _fused_times(self, top: int) -> ForwardTimes | None:
        """Start-up timing of verify+draft passes: one sequence at K = 2, 3, 4, 6, 8 .., then batches
        of full blocks up to `top` rows (beyond: proportional, as for verify passes)."""
        if not self.fused:
            return None
        K = self.fused_k
        shapes = {k * k: (k, 1) for k in {2, 3, 4, 6, 8, 12, 16, 24, 32, K} if k <= K and (k * k <= top or k == 2)}
        shapes |= {b * K * K: (K, b) for b in (2, 4, 8, 16) if b * K * K <= top}
        return ForwardTimes({n: self.runner.time_verify_and_draft(k, b, repeats=3) for n, (k, b) in shapes.items()})

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

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise OrthrusInputError("sampling_params", f"must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if request_id in self.seqs:
            raise OrthrusInputError("request_id", f"{request_id!r} is already running")
        ids = self.inputs.prompt_ids(prompt)
        self.inputs.check_request(ids, params)
        k = 1 if not params.use_diffusion else (params.block_size or self.block_size)
        auto_k = self.policy is not None and params.use_diffusion and params.block_size is None
        detok = Detokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        seq = Sequence(request_id, ids, params, k, detok, auto_k)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        return self._delta(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -----------------------------------------------------------------------------
    # Faults: one sequence's (its sampler, detokenizer, stop strings) fails that request alone; one in
    # the draft path makes the step plain AR (output unchanged); one in the shared verify or prefill
    # pass fails the requests of the batch not settled yet. The engine keeps serving in every case.
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        outs: list[RequestOutput] = []  # appended as sequences settle: a later fault cannot undo them
        try:
            if isinstance(batch, PrefillBatch):
                self._prefill(batch, outs)
            elif batch.fused:
                self._decode_fused(batch, outs)
            else:
                self._decode_two_pass(batch, outs)
        except Exception as e:  # the shared pass: no one sequence to blame
            log.exception("engine step failed")
            settled = {o.request_id for o in outs}
            outs += [self._fail(seq, e) for seq in batch.seqs if seq.request_id not in settled]
        return outs

    def _prefill(self, batch: PrefillBatch, outs: list[RequestOutput]) -> None:
        """Cache the chunks; a chunk that ends with the anchor also commits the next token from its
        logits, as the official generate's first pass does (1 prefill pass + 2 per cycle)."""
        logits = self.runner.prefill(batch.seqs, batch.ends)
        argmax = logits.argmax(-1).tolist() if logits is not None else []
        row = 0
        for seq, end in zip(batch.seqs, batch.ends):
            emits = end == len(seq.token_ids)
            seq.num_cached = end - emits  # _settle counts the anchor's row, as after a verify
            if not emits:
                self.pages.register_full_pages(seq)
                continue
            try:
                new = self._accept(seq, [], None, logits[row : row + 1], argmax[row : row + 1])
                outs.append(self._settle(seq, new))
            except Exception as e:
                outs.append(self._fail_one(seq, e))
            row += 1

    def _fail(self, seq: Sequence, e: Exception) -> RequestOutput:
        seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
        return self._finish(seq)

    def _fail_one(self, seq: Sequence, e: Exception) -> RequestOutput:
        """A fault of this sequence alone: it fails, the rest of the batch carries on."""
        log.exception("request %s failed", seq.request_id)
        return self._fail(seq, e)

    def _draft_fallback(self, e: Exception) -> None:
        """A fault in the draft path: this step verifies without drafts, i.e. runs as plain AR."""
        self.num_draft_fallbacks += 1
        log.warning("draft path failed (%s: %s); this step runs as plain AR", type(e).__name__, e,
                    exc_info=not isinstance(e, FloatingPointError))

    def _decode_two_pass(self, batch: DecodeBatch, outs: list[RequestOutput]) -> None:
        """A draft pass for the sequences with K > 1, then one verify pass for all (docs/ARCHITECTURE.md §1).
        A sequence that carries drafts from a fused pass verifies them instead of drafting."""
        if self.policy is not None and self.device.type == "cuda":
            torch.cuda.synchronize()  # the policy times this step's passes, not a prefill still running
        start = time.perf_counter()
        seqs = batch.seqs
        passes: list[tuple[int, float]] = []  # (tokens, seconds up to logits on the host): the policy's T(n)
        drafted = self._draft_blocks(seqs, batch.ks, passes, start)
        drafts, q_probs = drafted or ([[] for _ in seqs], [None] * len(seqs))  # None: plain AR this step
        blocks = [[s.token_ids[-1]] + d for s, d in zip(seqs, drafts)]
        verify_start = time.perf_counter()
        logits = self.runner.verify(seqs, blocks)
        argmax = logits.argmax(-1).tolist()
        passes.append((sum(len(b) for b in blocks), time.perf_counter() - verify_start))
        row = 0
        for seq, block, q in zip(seqs, blocks, q_probs):
            k, carried = len(block), bool(seq.next_drafts)
            seq.next_drafts, seq.next_draft_probs = [], None  # verified now (or dropped by a fallback)
            try:
                new = self._accept(seq, block[1:], q, logits[row : row + k], argmax[row : row + k])
                seq.drafted_tokens += k - 1
                seq.accepted_tokens += len(new) - 1
                if carried and k > 1:  # a fused pass's drafts: its positions count the AR's own token first
                    self.fused_acceptance.record(k, len(new))
                elif k > 1:
                    self.acceptance.record(k - 1, len(new) - 1)
                outs.append(self._settle(seq, new))
            except Exception as e:
                outs.append(self._fail_one(seq, e))
            row += k
        if self.policy is not None and drafted is not None:
            self.policy.observe_step(passes, time.perf_counter() - start)

    def _draft_blocks(self, seqs: list[Sequence], ks: list[int], passes: list[tuple[int, float]], start: float
                      ) -> tuple[list[list[int]], list[torch.Tensor | None]] | None:
        """The drafts of each sequence (none where K = 1) and the q they were sampled from; None after a
        fault in the draft path (an exception, non-finite logits)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        q_probs: list[torch.Tensor | None] = [None] * len(seqs)
        for i, s in enumerate(seqs):  # drafts carried from a fused pass are verified, not drafted again
            if s.next_drafts:
                drafts[i] = s.next_drafts[: ks[i] - 1]
                q_probs[i] = s.next_draft_probs[: ks[i] - 1] if s.next_draft_probs is not None else None
        drafting = [i for i, k in enumerate(ks) if k > 1 and not seqs[i].next_drafts]
        if not drafting:
            return drafts, q_probs
        try:
            logits = self.runner.draft([seqs[i] for i in drafting], [ks[i] for i in drafting])
            _check_finite(logits)
            argmax = logits.argmax(-1).tolist()
            passes.append((sum(ks[i] for i in drafting), time.perf_counter() - start))
            row = 0
            for i in drafting:
                n = ks[i] - 1
                drafts[i], q_probs[i] = self._draw(seqs[i], logits[row : row + n], argmax[row : row + n],
                                                   len(seqs[i].token_ids))
                row += n
        except Exception as e:
            self._draft_fallback(e)
            return None
        return drafts, q_probs

    def _decode_fused(self, batch: DecodeBatch, outs: list[RequestOutput]) -> None:
        """One pass: each sequence verifies the drafts its last pass made and drafts K - 1 more after
        every verify slot; the block after the last accepted slot becomes the next drafts. The AR's
        own next token is draft position 1 of a causal-anchor head, so a cycle that verifies j drafts
        counts as j + 1 drafted positions in the acceptance stats. A fault in the draft path: the step
        verifies the anchors only and drafts nothing (the carried drafts are dropped)."""
        if self.policy is not None and self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        seqs = batch.seqs
        blocks = [[s.token_ids[-1]] + s.next_drafts[: v - 1] for s, v in zip(seqs, batch.vs)]
        ms = [k - 1 for k in batch.ks]
        fallbacks = self.num_draft_fallbacks
        ar_logits, mask_hidden = None, None
        if any(ms):
            try:
                ar_logits, mask_hidden = self.runner.verify_and_draft(seqs, blocks, ms)
            except Exception as e:
                self._draft_fallback(e)
                blocks, ms = [[s.token_ids[-1]] for s in seqs], [0] * len(seqs)
        if ar_logits is None:  # a plain verify pass (of the anchors, and of any drafts still carried)
            ar_logits = self.runner.verify(seqs, blocks)
        argmax = ar_logits.argmax(-1).tolist()
        running, chosen, row, mrow = [], [], 0, 0  # running: (seq, drafts verified, new tokens, m)
        for seq, block, m in zip(seqs, blocks, ms):
            drafts, v = block[1:], len(block)
            try:
                q = seq.next_draft_probs[: len(drafts)] if seq.next_draft_probs is not None else None
                new = self._accept(seq, drafts, q, ar_logits[row : row + v], argmax[row : row + v])
            except Exception as e:
                outs.append(self._fail_one(seq, e))
            else:
                a = len(new) - 1
                chosen += range(mrow + a * m, mrow + (a + 1) * m)  # the block after the last accepted slot
                running.append((seq, len(drafts), new, m))
            row, mrow = row + v, mrow + v * m
        next_drafts = self._next_drafts(running, mask_hidden, chosen)
        passes = [(sum(len(b) * (1 + m) for b, m in zip(blocks, ms)), time.perf_counter() - start)]  # one pass
        for (seq, drafted, new, _), (drafts, q) in zip(running, next_drafts):
            try:
                seq.drafted_tokens += drafted
                seq.accepted_tokens += len(new) - 1
                if drafted:
                    self.fused_acceptance.record(drafted + 1, len(new))
                seq.next_drafts, seq.next_draft_probs = drafts, q
                outs.append(self._settle(seq, new))
            except Exception as e:
                outs.append(self._fail_one(seq, e))
        if self.policy is not None and self.num_draft_fallbacks == fallbacks:
            self.policy.observe_step(passes, time.perf_counter() - start, fused=any(ms))

    def _next_drafts(self, running: list[tuple], mask_hidden: torch.Tensor | None, chosen: list[int]
                     ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Fused cycle: each sequence's next drafts (and their q) from the chosen MASK rows; none after a
        fault in the draft path (an exception, non-finite logits)."""
        none: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(running)
        if not chosen:
            return none
        try:
            logits = self.runner.logits(mask_hidden, chosen)
            _check_finite(logits)
            argmax = logits.argmax(-1).tolist()
            out, row = [], 0
            for seq, _, new, m in running:  # drafts for the positions after the tokens this step commits
                start = len(seq.token_ids) + len(new)
                out.append(self._draw(seq, logits[row : row + m], argmax[row : row + m], start) if m else ([], None))
                row += m
            return out
        except Exception as e:
            self._draft_fallback(e)
            return none

    @staticmethod
    def _draw(seq: Sequence, logits: torch.Tensor, argmax: list[int], start: int
              ) -> tuple[list[int], torch.Tensor | None]:
        """Drafts for sequence positions start, start + 1, ..: their argmax (greedy), the seeded draws
        from q (seeded), or samples and the q they came from."""
        if seq.params.greedy:
            return argmax, None
        if seq.seeded:
            return seeded_draws(logits, seq.params, seq.params.seed, start), None
        q = probs_from_logits(logits, seq.params).cpu()
        return [sample(q[j], seq.generator) for j in range(len(argmax))], q

    @staticmethod
    def _accept(seq: Sequence, drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor,
                argmax: list[int]) -> list[int]:
        """Tokens a step commits: accepted drafts and one more, from the AR logits of `[anchor, drafts...]`.
        Seeded: the drafts equal to the AR's own seeded draws, then its draw at the first mismatch (or
        after the last draft): exactly plain AR with that noise."""
        if seq.params.greedy:
            return greedy_accept(drafts, argmax)
        if seq.seeded:
            return greedy_accept(drafts, seeded_draws(logits, seq.params, seq.params.seed, len(seq.token_ids)))
        p = probs_from_logits(logits, seq.params).cpu()
        return speculative_accept(drafts, q, p, seq.generator) if drafts else [sample(p[0], seq.generator)]

    def _settle(self, seq: Sequence, new: list[int]) -> RequestOutput:
        """Commit a step's tokens; the anchor and the accepted drafts now hold valid KV."""
        seq.num_cached += len(new)
        self._commit(seq, new)
        seq.num_cached = min(seq.num_cached, len(seq.token_ids) - 1)  # a stop inside the block
        self.pages.register_full_pages(seq)
        if seq.finished:
            return self._finish(seq)
        self.pages.trim(seq)
        return self._delta(seq)

    def _commit(self, seq: Sequence, tokens: list[int]) -> None:
        """Append tokens one by one, stopping at the first stop condition."""
        p = seq.params
        max_stop = max((len(s) for s in p.stop), default=0)
        stopped_by_string = False
        for t in tokens:
            seq.token_ids.append(t)
            self.num_generated_tokens += 1
            if seq.detok is not None:
                before = len(seq.text)
                seq.text += seq.detok.add(t)
                hit = _find_stop(seq.text, p.stop, max(0, before - max_stop + 1)) if p.stop else None
                if hit is not None:
                    seq.text = seq.text[:hit]
                    seq.finish_reason, stopped_by_string = "stop", True
                    break
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                seq.finish_reason = "stop"
                break
            if seq.completion_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
                break
        if seq.finish_reason is not None:
            seq.status = Status.FINISHED
            if seq.detok is not None and not stopped_by_string:
                seq.text += seq.detok.flush()

    def _finish(self, seq: Sequence) -> RequestOutput:
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)
        return self._delta(seq)

    def _delta(self, seq: Sequence) -> RequestOutput:
        """New tokens and text since the last delta; text that may still turn out to be the start
        of a stop string is held back until it cannot."""
        finished = seq.finish_reason is not None
        visible = len(seq.text)
        if not finished and seq.params.stop:
            visible -= max(len(s) for s in seq.params.stop) - 1
        visible = max(visible, seq.emitted_text)
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=seq.output_ids[seq.emitted_tokens :],
            text=seq.text[seq.emitted_text : visible],
            finished=finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            prompt_tokens=seq.prompt_tokens,
            cached_prompt_tokens=seq.cached_prompt_tokens,
            forward_passes=seq.forward_passes,
            drafted_tokens=seq.drafted_tokens,
            accepted_tokens=seq.accepted_tokens,
            completion_tokens=seq.completion_tokens,
        )
        seq.emitted_tokens, seq.emitted_text = seq.completion_tokens, visible
        return out

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Finish every request with an error (the last resort after an internal failure)."""
        outs = []
        for seq in list(self.seqs.values()):
            seq.finish_reason, seq.error = "error", error
            outs.append(self._finish(seq))
        return outs

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
            "num_preemptions": self.scheduler.num_preemptions,
            "num_draft_fallbacks": self.num_draft_fallbacks,
        }


def fused_block_limit(model_k: int) -> int:
    """The longest K whose verify+draft pass keeps at most one block (`model_k` rows) of transient
    K/V per sequence: K verify rows, each followed by K - 1 transient rows."""
    return max(k for k in range(1, model_k + 1) if k * (k - 1) <= model_k)


def _check_finite(logits: torch.Tensor) -> None:
    """Draft logits with NaN or inf (bf16 overflow) must not become drafts or sampling weights."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite draft logits")


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def engine_args_from(model: str | None, block_size: int | None, kwargs: dict) -> EngineArgs:
    names = {f.name for f in fields(EngineArgs)}
    unknown = set(kwargs) - names
    if unknown:
        raise OrthrusInputError(sorted(unknown)[0], f"unknown engine argument; known: {sorted(names)}")
    return EngineArgs(model=model, block_size=block_size, **kwargs)

