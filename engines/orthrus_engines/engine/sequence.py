"""A request's decoding state.

Invariant while decoding: the KV cache holds `num_cached` = len(token_ids) - 1 positions; the last
committed token (the anchor) is not cached yet. Before that, the prompt is prefilled in chunks, the
last of which takes the last prompt token too and commits the first output token.
"""

import enum
import itertools

import torch

from orthrus_engines.engine.detokenizer import Detokenizer
from orthrus_engines.engine.logits_processors import LogitsProcessor
from orthrus_engines.engine.penalties import sampling_processors
from orthrus_engines.outputs import TokenLogprob
from orthrus_engines.sampling_params import SamplingParams

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, block_size: int,
                 detokenizer: Detokenizer | None, auto_k: bool = False, eos_ids: set[int] = frozenset(),
                 index: int = 0, leader: "Sequence | None" = None):
        self.request_id = request_id
        self.index = index  # which sample of an n > 1 request (0 for n = 1)
        # n > 1: the request's first sample, whose prefill this one waits for (then the prefix cache holds the
        # prompt's full pages, and this one prefills only the rest); None once it has it, or never waits.
        self.leader = leader
        self.params = params
        self.token_ids: list[int] = list(prompt_ids)
        self.prompt_tokens = len(prompt_ids)
        self.block_size = block_size  # K for this request (1 = plain AR), the most the policy may pick
        self.auto_k = auto_k  # the engine's draft-length policy picks K each step
        # Applied alike to the AR and draft rows (engine/logits_processors.py): the params' penalties and
        # bias (`eos_ids`: what min_tokens masks besides the stop token ids), then the offline callables.
        self.processors: list[LogitsProcessor] = (
            sampling_processors(params, self.token_ids, self.prompt_tokens, eos_ids) + list(params.logits_processors))
        self.status = Status.WAITING
        self.arrival = next(_arrival)
        # Paged KV state.
        self.num_cached = 0
        self.page_table: list[int] = []
        self.page_hashes: list[str] = []  # hashes of the full pages registered in the prefix cache
        self.cached_prompt_tokens = 0
        # Verify+draft cycle: drafts for the positions after the anchor, made by the last pass (and the
        # probabilities they were sampled from, at temperature > 0 without a seed).
        self.next_drafts: list[int] = []
        self.next_draft_probs: torch.Tensor | None = None
        # Counters.
        self.forward_passes = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        # Output.
        self.detok = detokenizer
        self.text = ""
        self.emitted_tokens = 0  # output tokens already sent as deltas
        self.emitted_text = 0
        self.logprobs: list[TokenLogprob] = []  # per output token, if the request asked for them
        self.step_logprobs: list[TokenLogprob] | None = None  # the step's, until its tokens are committed
        self.finish_reason: str | None = None
        self.error: str | None = None
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

    def waits_for_leader(self) -> bool:
        """Whether the leader has not yet cached the prompt (it has once it commits a token, or finishes)."""
        if self.leader is not None and (self.leader.completion_tokens > 0 or self.leader.finished):
            self.leader = None
        return self.leader is not None

    @property
    def seeded(self) -> bool:
        """Sampled with a seed: counter-based noise per position (sampler.seeded_draws), never the generator,
        so the output does not depend on the block size, cycle or batch."""
        return self.params.seed is not None and not self.params.greedy

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_tokens :]

    @property
    def prefill_target(self) -> int:
        """Positions to cache before decoding: everything but the anchor."""
        return len(self.token_ids) - 1

    @property
    def prefill_end(self) -> int:
        """Where prefill stops: for a new request past the anchor, whose logits give the first token (as
        the official generate's first pass); for a recompute after preemption at the anchor, so that it
        resumes the very state it left (seeded sampling does not depend on preemption)."""
        return self.prefill_target + (self.completion_tokens == 0)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prefill_end

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
