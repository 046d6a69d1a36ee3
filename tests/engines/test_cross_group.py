"""The cross-group plan (docs/ARCHITECTURE.md §1.3): in one verify+draft pass the sequences that carry
drafts verify them (AR view) while about half of the others draft (anchor and MASK rows through the
twins); the roles swap at the next pass. Greedy output stays the base model's (HF oracle, fp32).
"""

import pytest
from support.tiny_models import hf_greedy

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.draft_policy import Plan

# ragged prompts (one token; page edges of 16-token pages) and budgets (one stops inside a block)
PROMPTS = [[5], list(range(1, 18)), [9, 3, 7], list(range(20, 53)), [40, 41, 42, 43, 44, 45, 46]]
MAX_TOKENS = [16, 16, 7, 16, 12]


@pytest.fixture(scope="module")
def llm(causal_qwen3_dir):
    return LLM(str(causal_qwen3_dir), num_pages=64)


def _passes(llm) -> list[tuple[list[int], list[int]]]:
    """Spy on the verify+draft passes: (verify rows, MASK rows per slot) of each sequence, per pass."""
    seen, run = [], llm.core.runner.verify_and_draft

    def spy(seqs, blocks, ms):
        seen.append(([len(b) for b in blocks], list(ms)))
        return run(seqs, blocks, ms)

    llm.core.runner.verify_and_draft = spy
    return seen


@pytest.mark.parametrize("k", [2, 3, 4])
def test_cross_group_output_is_plain_ar(llm, causal_qwen3_hf, k):
    """Several ragged sequences under a fixed cross-group plan: the AR oracle's tokens; passes really mix one
    group's verify rows with another group's draft block, never more drafters than half the batch."""
    seen = _passes(llm)
    llm.core.scheduler.policy = lambda batch: Plan(k, cross=True)
    try:
        outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_TOKENS])
    finally:
        llm.core.runner.__dict__.pop("verify_and_draft")
    for out, prompt, n in zip(outs, PROMPTS, MAX_TOKENS):
        assert list(out.token_ids) == hf_greedy(causal_qwen3_hf, prompt, n), prompt
    mixed = [(vs, ms) for vs, ms in seen if any(m > 0 for m in ms) and any(v > 1 and m == 0 for v, m in zip(vs, ms))]
    assert mixed, seen  # verify rows of carried drafts and a draft block in the same pass
    for vs, ms in seen:
        assert sum(m > 0 for m in ms) <= (len(ms) + 1) // 2 and all(m <= k - 1 for m in ms)
        assert all(v == 1 for v, m in zip(vs, ms) if m > 0)  # a drafter verifies its anchor only
    assert sum(o.accepted_tokens for o in outs) > 0
    assert llm.core.pages.num_free == llm.core.pages.num_pages


def test_cross_group_between_other_plans_stays_exact(llm, causal_qwen3_hf):
    """Drafts a cross-group pass carried into an AR, two-pass or fused step are verified there, and a cross
    step after a fused one verifies what that one drafted."""
    plans = [Plan(3, cross=True), Plan(1), Plan(4, cross=True), Plan(3, fused=True), Plan(2, cross=True), Plan(4),
             Plan(4, cross=True)]
    steps = iter(range(10**6))
    llm.core.scheduler.policy = lambda batch: plans[next(steps) % len(plans)]
    outs = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=16, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == [hf_greedy(causal_qwen3_hf, p, 16) for p in PROMPTS[:3]]
    assert llm.core.pages.num_free == llm.core.pages.num_pages
