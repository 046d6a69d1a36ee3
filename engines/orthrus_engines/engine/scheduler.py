"""Continuous batching: admission by free pages, chunked prefill, preemption by recompute.

Each step is either a prefill step (chunks of prompts, at most `max_num_batched_tokens` tokens; a
prompt's last chunk also commits its first token) or a decode step (one Orthrus cycle for the
running sequences: a draft pass and a verify pass of K rows per sequence, or with a causal-anchor
head one verify+draft pass of K x K rows, or the cross-group plan's verify+draft pass in which about
half the sequences verify K rows and the others draft K). The plan of a decode step (K and cycle) comes from the
draft policy for the sequences that let it choose; the others keep their own K. When both kinds
of work are waiting, steps alternate, so a stream of long prompts cannot stall running requests.
The samples 1..n-1 of an n > 1 request hold admission until sample 0 has prefilled the prompt, so
they find its full pages in the prefix cache.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from orthrus_engines.engine.draft_policy import Plan
from orthrus_engines.engine.page_manager import PageManager
from orthrus_engines.engine.sequence import Sequence, Status


@dataclass
class PrefillBatch:
    seqs: list[Sequence]
    ends: list[int]  # cache positions [num_cached, end) this step; end = len(token_ids): a first token too


@dataclass
class DecodeBatch:
    seqs: list[Sequence]
    ks: list[int]  # block length per sequence (1 = plain AR step)
    vs: list[int]  # tokens verified per sequence: K, or 1 + the drafts it carries from a fused pass
    fused: bool = False  # one verify+draft pass, not a draft pass and a verify pass


class Scheduler:
    def __init__(self, pages: PageManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 fused_k: int = 0, policy: Callable[[int], Plan] | None = None):
        self.pages = pages
        self.fused_k = fused_k  # > 0: the fused cycle runs, with K at most this (the memory bound)
        self.policy = policy  # the draft policy: number of sequences it plans for -> Plan
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and return its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free_all(seq)
        seq.status = Status.FINISHED

    def block_length(self, seq: Sequence, plan: Plan | None = None, fused: bool = False) -> int:
        """K for this step: the plan's K (or the request's), capped in the fused cycle, cut at the
        request's tail as the official generate cuts it (a block reaching one slot past the last token
        it may emit: the same drafts, so never more passes), a last token alone being one AR pass;
        never past the window."""
        k = min(plan.k, seq.block_size) if plan is not None and seq.auto_k else seq.block_size
        k = min(k, self.fused_k) if fused else k
        return 1 if self._remaining(seq) <= 1 else self._within_room(seq, k)

    def verify_length(self, seq: Sequence) -> int:
        """Fused cycle: the anchor and every draft the sequence carries (they are paid for; a step of
        K = 1 after a drafting one still verifies them), up to the last token it may emit (the drafts
        for it are verified too, as in the two-pass block) and inside the window."""
        return self._within_room(seq, 1 + len(seq.next_drafts))

    def fused_block_length(self, seq: Sequence, k: int, v: int) -> int:
        """Fused cycle: K, but short enough that the MASK rows after the last of v verify slots (at
        positions up to num_cached + v - 1 + K - 1) stay inside the window."""
        return max(1, min(k, self._window(seq) - v + 1))

    def _within_room(self, seq: Sequence, n: int) -> int:
        """n block slots, but none past one slot beyond the last token the request may emit, nor past the
        window (at least 1)."""
        return max(1, min(n, self._remaining(seq) + 1, self._window(seq)))

    @staticmethod
    def _remaining(seq: Sequence) -> int:
        return seq.params.max_tokens - seq.completion_tokens

    def _window(self, seq: Sequence) -> int:
        """Positions left in the window from the anchor's on (the anchor sits at len - 1)."""
        return self.max_model_len - len(seq.token_ids) + 1

    @staticmethod
    def _cross_drafters(decodes: list[Sequence]) -> set[int]:
        """Cross-group plan: which sequences (ids) draft this pass. Those that carry drafts verify them; of
        the others, the earliest up to half the batch draft and the rest take a plain AR step, so that
        about half the batch verifies while the other half drafts and the roles swap at every pass."""
        free = [s for s in sorted(decodes, key=lambda s: s.arrival) if not s.next_drafts]
        return {id(s) for s in free[: (len(decodes) + 1) // 2]}

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.waits_for_leader():  # its prompt is being prefilled by its request's first sample
                return
            self.pages.match_prefix(seq)
            need = seq.prefill_target + self.block_length(seq)
            headroom = self.pages.pages_for(need) - len(seq.page_table) + len(self.running)  # 1 page/running seq
            fits = headroom <= self.pages.num_free or not self.running  # an empty engine takes anyone
            if not (fits and self.pages.ensure(seq, seq.prefill_target + 1)):  # the anchor's page too
                # Wait without holding pages: the hits keep their hashes and can be matched again.
                self.pages.free_all(seq)
                return
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.free_all(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        self._admit()
        prefills = [s for s in self.running if s.in_prefill]
        decodes = [s for s in self.running if not s.in_prefill]
        if prefills and (not decodes or not self._last_was_prefill):
            self._last_was_prefill = True
            budget, seqs, ends = self.max_num_batched_tokens, [], []
            for s in prefills:
                if budget <= 0:
                    break
                end = min(s.prefill_end, s.num_cached + budget)
                budget -= end - s.num_cached
                seqs.append(s)
                ends.append(end)
            return PrefillBatch(seqs, ends)
        self._last_was_prefill = False
        if not decodes:
            return None
        num_auto = sum(s.auto_k for s in decodes)
        plan = self.policy(num_auto) if self.policy is not None and num_auto else None
        cross = plan is not None and plan.cross and self.fused_k > 0  # it runs on the verify+draft pass
        fused = cross or (plan.fused if plan is not None else self.fused_k > 0)
        drafters = self._cross_drafters(decodes) if cross else set()
        batch, ks, vs, budget = [], [], [], self.max_num_batched_tokens
        for s in sorted(decodes, key=lambda s: s.arrival):
            if s.status != Status.RUNNING:
                continue  # preempted below
            if fused:  # v verify rows, each followed by a block of k - 1; in the cross plan only its drafters
                # draft (at the plan's K, uncapped: the others carry no blocks), the rest verify their carried
                # drafts or take the anchor alone (k = 1)
                v = self.verify_length(s)
                drafting = not cross or id(s) in drafters
                k = self.fused_block_length(s, self.block_length(s, plan, fused=not cross), v) if drafting else 1
                rows = v * k
            elif s.next_drafts:  # drafts carried from a fused pass: verified, nothing drafted
                k = v = rows = self.verify_length(s)
            else:
                k = v = rows = self.block_length(s, plan)
            if batch and rows > budget:
                break
            while not self.pages.ensure(s, s.num_cached + max(k, v)):
                victim = max((r for r in self.running if r not in batch), key=lambda r: r.arrival)
                self._preempt(victim)
                if victim is s:
                    break
            if s.status == Status.RUNNING:
                batch.append(s)
                ks.append(k)
                vs.append(v)
                budget -= rows
        return DecodeBatch(batch, ks, vs, fused) if batch else None
