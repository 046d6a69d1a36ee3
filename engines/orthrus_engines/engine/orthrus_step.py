"""The Orthrus step: what one batch computes and which tokens each of its sequences commits.

- prefill: the prompt's chunks are cached; the last chunk of a prompt also commits its first token
  (as the official generate's first pass does);
- the two-pass cycle (docs/ARCHITECTURE.md §1): a draft pass for the sequences with K > 1, then one
  verify pass for all. A sequence carrying drafts from a fused pass verifies them instead;
- the fused cycle (causal-anchor heads): one pass verifies the drafts the last pass made and drafts
  K - 1 more after every verify slot; the block after the last accepted slot becomes the next drafts.

Faults: one sequence's own (its sampler) is its result, and the others carry on; one in the draft
path makes the step plain AR (output unchanged), logged and counted; one in a shared pass raises,
and the engine fails the batch.
"""

import logging
import time
from dataclasses import dataclass

import torch

from orthrus_engines.engine.draft_policy import AcceptanceStats
from orthrus_engines.engine.logits_processors import process_row, process_rows
from orthrus_engines.engine.model_runner import ModelRunner
from orthrus_engines.engine.sampler import (greedy_accept, probs_from_logits, sample, seeded_draws, speculative_accept,
                                            token_logprobs)
from orthrus_engines.engine.scheduler import DecodeBatch, PrefillBatch
from orthrus_engines.engine.sequence import Sequence

log = logging.getLogger(__name__)
Result = list[int] | Exception  # the tokens a sequence commits this step, or its own fault


@dataclass
class StepTiming:
    """What the draft policy learns from a decode step: (rows, seconds) of each pass and the cycle."""

    passes: list[tuple[int, float]]
    fused: bool


class OrthrusStep:
    def __init__(self, runner: ModelRunner, acceptance: AcceptanceStats, fused_acceptance: AcceptanceStats,
                 draft_kv: str = "transient"):
        self.runner = runner
        # "tail": the two-pass draft block writes its K/V into the tail slots the verify pass overwrites
        # (the fused cycle's blocks stay transient: they overlap the positions of its own verify rows)
        self.draft_writes_tail = draft_kv == "tail"
        self.acceptance = acceptance  # the two-pass cycle's, by draft position
        self.fused_acceptance = fused_acceptance  # the fused cycle's (position 1: the AR's own token)
        self.num_draft_fallbacks = 0  # steps whose draft path failed and that ran as plain AR

    def run(self, batch: PrefillBatch | DecodeBatch) -> tuple[list[tuple[Sequence, Result]], StepTiming | None]:
        """Each sequence's result, and the timing of a decode step (None after a draft fallback)."""
        if isinstance(batch, PrefillBatch):
            return self.prefill(batch), None
        return self.fused(batch) if batch.fused else self.two_pass(batch)

    def prefill(self, batch: PrefillBatch) -> list[tuple[Sequence, Result]]:
        """Cache the chunks; results only for the sequences whose chunk ends with their anchor."""
        logits = self.runner.prefill(batch.seqs, batch.ends)
        argmax = logits.argmax(-1).tolist() if logits is not None else []
        results, row = [], 0
        for seq, end in zip(batch.seqs, batch.ends):
            emits = end == len(seq.token_ids)
            seq.num_cached = end - emits  # committing counts the anchor's row, as after a verify
            if emits:
                results.append((seq, self._try_accept(seq, [], None, logits[row : row + 1], argmax[row : row + 1])))
                row += 1
        return results

    # -- the two-pass cycle ---------------------------------------------------------------------
    def two_pass(self, batch: DecodeBatch) -> tuple[list[tuple[Sequence, Result]], StepTiming | None]:
        start = time.perf_counter()
        seqs = batch.seqs
        passes: list[tuple[int, float]] = []  # (rows, seconds up to logits on the host): the policy's T(n)
        drafted = self._draft_blocks(seqs, batch.ks, passes, start)
        drafts, q_probs = drafted or ([[] for _ in seqs], [None] * len(seqs))  # None: plain AR this step
        blocks = [[s.token_ids[-1]] + d for s, d in zip(seqs, drafts)]
        verify_start = time.perf_counter()
        logits = self.runner.verify(seqs, blocks)
        argmax = logits.argmax(-1).tolist()
        passes.append((sum(len(b) for b in blocks), time.perf_counter() - verify_start))
        results, row = [], 0
        for seq, block, q in zip(seqs, blocks, q_probs):
            k, carried = len(block), bool(seq.next_drafts)
            seq.next_drafts, seq.next_draft_probs = [], None  # verified now (or dropped by a fallback)
            new = self._try_accept(seq, block[1:], q, logits[row : row + k], argmax[row : row + k])
            if not isinstance(new, Exception):
                self._count(seq, k - 1, len(new) - 1)
                if carried and k > 1:  # a fused pass's drafts: its positions count the AR's own token first
                    self.fused_acceptance.record(k, len(new))
                elif k > 1:
                    self.acceptance.record(k - 1, len(new) - 1)
            results.append((seq, new))
            row += k
        return results, StepTiming(passes, fused=False) if drafted is not None else None

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
            batch = ([seqs[i] for i in drafting], [ks[i] for i in drafting])
            logits = self.runner.draft(*batch, write_tail=True) if self.draft_writes_tail else self.runner.draft(*batch)
            _check_finite(logits)
            argmax = logits.argmax(-1).tolist()
            passes.append((sum(ks[i] for i in drafting), time.perf_counter() - start))
            row = 0
            for i in drafting:
                n = ks[i] - 1
                drafts[i], q_probs[i] = self._draw(seqs[i], logits[row : row + n], argmax[row : row + n], [])
                row += n
        except Exception as e:
            self._draft_fallback(e)
            return None
        return drafts, q_probs

    # -- the fused cycle ------------------------------------------------------------------------
    def fused(self, batch: DecodeBatch) -> tuple[list[tuple[Sequence, Result]], StepTiming | None]:
        """A cycle that verifies j drafts counts as j + 1 drafted positions in the acceptance stats (draft
        position 1 of a causal-anchor head is the AR's own next token). A fault in the draft path: the
        step verifies the anchors only and drafts nothing (the carried drafts are dropped)."""
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
        results, running, chosen, row, mrow = [], [], [], 0, 0  # running: (seq, drafts verified, new, m)
        for seq, block, m in zip(seqs, blocks, ms):
            drafts, v = block[1:], len(block)
            q = seq.next_draft_probs[: len(drafts)] if seq.next_draft_probs is not None else None
            new = self._try_accept(seq, drafts, q, ar_logits[row : row + v], argmax[row : row + v])
            if isinstance(new, Exception):
                results.append((seq, new))
            else:
                a = len(new) - 1
                chosen += range(mrow + a * m, mrow + (a + 1) * m)  # the block after the last accepted slot
                running.append((seq, len(drafts), new, m))
            row, mrow = row + v, mrow + v * m
        next_drafts = self._next_drafts(running, mask_hidden, chosen)
        passes = [(sum(len(b) * (1 + m) for b, m in zip(blocks, ms)), time.perf_counter() - start)]  # one pass
        for (seq, drafted, new, _), (drafts, q) in zip(running, next_drafts):
            self._count(seq, drafted, len(new) - 1)
            if drafted:
                self.fused_acceptance.record(drafted + 1, len(new))
            seq.next_drafts, seq.next_draft_probs = drafts, q
            results.append((seq, new))
        return results, StepTiming(passes, fused=any(ms)) if self.num_draft_fallbacks == fallbacks else None

    def _next_drafts(self, running: list[tuple], mask_hidden: torch.Tensor | None, chosen: list[int]
                     ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Each sequence's next drafts (and their q) from the chosen MASK rows; none after a fault in the
        draft path (an exception, non-finite logits)."""
        none: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(running)
        if not chosen:
            return none
        try:
            logits = self.runner.logits(mask_hidden, chosen)
            _check_finite(logits)
            argmax = logits.argmax(-1).tolist()
            out, row = [], 0
            for seq, _, new, m in running:  # drafts for the positions after the tokens this step commits
                out.append(self._draw(seq, logits[row : row + m], argmax[row : row + m], new) if m else ([], None))
                row += m
            return out
        except Exception as e:
            self._draft_fallback(e)
            return none

    # -- drafting and acceptance ----------------------------------------------------------------
    def _draft_fallback(self, e: Exception) -> None:
        """A fault in the draft path: this step verifies without drafts, i.e. runs as plain AR."""
        self.num_draft_fallbacks += 1
        log.warning("draft path failed (%s: %s); this step runs as plain AR", type(e).__name__, e,
                    exc_info=not isinstance(e, FloatingPointError))

    @staticmethod
    def _count(seq: Sequence, drafted: int, accepted: int) -> None:
        seq.drafted_tokens += drafted
        seq.accepted_tokens += accepted

    @staticmethod
    def _draw(seq: Sequence, logits: torch.Tensor, argmax: list[int], committed: list[int]
              ) -> tuple[list[int], torch.Tensor | None]:
        """Drafts for the positions after the sequence's tokens and the `committed` ones this step adds: their
        argmax (greedy), the seeded draws from q (seeded), or samples and the q they came from."""
        start = len(seq.token_ids) + len(committed)
        if seq.processors:
            return OrthrusStep._draw_processed(seq, logits, seq.token_ids + committed)
        if seq.params.greedy:
            return argmax, None
        if seq.seeded:
            return seeded_draws(logits, seq.params, seq.params.seed, start), None
        q = probs_from_logits(logits, seq.params).cpu()
        return [sample(q[j], seq.generator) for j in range(len(argmax))], q

    @staticmethod
    def _draw_processed(seq: Sequence, logits: torch.Tensor, history: list[int]
                        ) -> tuple[list[int], torch.Tensor | None]:
        """Drafts one at a time, each from its row processed after the drafts drawn before it."""
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        for j in range(logits.shape[0]):
            row = process_row(seq.processors, history + drafts, logits[j])[None]
            if seq.params.greedy:
                drafts.append(int(row.argmax()))
            elif seq.seeded:
                drafts += seeded_draws(row, seq.params, seq.params.seed, len(history) + j)
            else:
                q_rows.append(probs_from_logits(row, seq.params).cpu()[0])
                drafts.append(sample(q_rows[-1], seq.generator))
        return drafts, torch.stack(q_rows) if q_rows else None

    @staticmethod
    def _try_accept(seq: Sequence, drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor,
                    argmax: list[int]) -> Result:
        """Tokens a step commits: accepted drafts and one more, from the AR logits of `[anchor, drafts...]`.
        Seeded: the drafts equal to the AR's own seeded draws, then its draw at the first mismatch (or
        after the last draft): exactly plain AR with that noise. A fault here is this sequence's alone."""
        try:
            if seq.processors:  # the AR rows as plain AR decoding with these processors sees them
                logits = process_rows(seq.processors, seq.token_ids, drafts, logits)
                argmax = logits.argmax(-1).tolist()
            if seq.params.greedy:
                new = greedy_accept(drafts, argmax)
            elif seq.seeded:
                new = greedy_accept(drafts, seeded_draws(logits, seq.params, seq.params.seed, len(seq.token_ids)))
            else:
                p = probs_from_logits(logits, seq.params).cpu()
                new = speculative_accept(drafts, q, p, seq.generator) if drafts else [sample(p[0], seq.generator)]
            if seq.params.logprobs is not None:  # the AR rows the committed tokens were chosen from
                seq.step_logprobs = token_logprobs(logits, seq.params, new)
            return new
        except Exception as e:
            return e


def fused_block_limit(model_k: int) -> int:
    """The longest K whose verify+draft pass keeps at most one block (`model_k` rows) of transient
    K/V per sequence: K verify rows, each followed by K - 1 transient rows."""
    return max(k for k in range(1, model_k + 1) if k * (k - 1) <= model_k)


def _check_finite(logits: torch.Tensor) -> None:
    """Draft logits with NaN or inf (bf16 overflow) must not become drafts or sampling weights."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite draft logits")
