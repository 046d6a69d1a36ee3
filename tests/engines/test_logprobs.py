"""Log probabilities are the AR view's at every output position, whichever pass proposed the token: equal
to HF's (fp32 oracle) log-softmax of the same prefix, after temperature / top-k / top-p when sampling."""

import pytest
import torch

from orthrus_engines import LLM, OrthrusInputError, SamplingParams
from orthrus_engines.engine.sampler import filtered_logits

PROMPT = [5, 17, 3, 42, 8, 1, 77]


def oracle_logprobs(hf, output: list[int], params: SamplingParams) -> torch.Tensor:
    """[len(output), V]: the log-probabilities each output token was chosen from, by HF in one forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + output])).logits[0, len(PROMPT) - 1 : -1].float()
    return torch.log_softmax(logits if params.greedy else filtered_logits(logits, params), -1)


def check(out, want: torch.Tensor, top_n: int) -> None:
    assert len(out.logprobs) == len(out.token_ids)
    for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == t
        assert lp.logprob == pytest.approx(want[i, t].item(), abs=1e-4)
        vals, ids = want[i].topk(top_n)
        finite = [(j, v) for j, v in zip(ids.tolist(), vals.tolist()) if v > float("-inf")]
        assert [j for j, _ in lp.top] == [j for j, _ in finite]
        assert [v for _, v in lp.top] == pytest.approx([v for _, v in finite], abs=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=5, seed=3), dict(temperature=1.3)],
                         ids=["greedy", "seeded_top_k", "sampled"])
def test_logprobs_are_the_ar_views_at_every_position(causal_qwen3_dir, causal_qwen3_hf, fused, sampling):
    """Batched with a request that asks for none, K = 4: the tokens that came from accepted drafts carry the
    AR view's values too (and the request without logprobs gets none)."""
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=3, **sampling)
    llm = LLM(str(causal_qwen3_dir), block_size=4, fused_cycle=fused, num_pages=64)
    out, other = llm.generate([PROMPT, PROMPT[:4]], [params, SamplingParams(max_tokens=20, ignore_eos=True)])
    assert out.drafted_tokens > 0 and (fused or out.accepted_tokens > 0) and other.logprobs is None
    check(out, oracle_logprobs(causal_qwen3_hf, out.token_ids, params), 3)


def test_top_k_drops_alternatives_and_zero_gives_only_the_token(causal_qwen3_dir, causal_qwen3_hf):
    """top_k = 2 leaves two finite alternatives whatever logprobs asks; logprobs = 0: the token's value only."""
    llm = LLM(str(causal_qwen3_dir), block_size=3, num_pages=64)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=2, seed=1, ignore_eos=True, logprobs=5)
    out = llm.generate([PROMPT], params)[0]
    assert all(len(lp.top) == 2 for lp in out.logprobs)
    check(out, oracle_logprobs(causal_qwen3_hf, out.token_ids, params), 5)
    bare = llm.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0))[0]
    assert all(lp.top == [] for lp in bare.logprobs) and len(bare.logprobs) == 8


def test_a_stop_inside_a_block_cuts_the_logprobs_with_the_tokens(causal_qwen3_dir):
    """Tokens after a stop token are dropped with their logprobs (the block was longer)."""
    llm = LLM(str(causal_qwen3_dir), block_size=4, num_pages=64)
    full = llm.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1))[0]
    stop = full.token_ids[5]
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1, stop_token_ids=[stop]))[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]
    assert [lp.token_id for lp in cut.logprobs] == cut.token_ids
    assert [lp.logprob for lp in cut.logprobs] == [lp.logprob for lp in full.logprobs[: len(cut.token_ids)]]


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True, "3"])
def test_bad_logprobs_are_named(bad):
    with pytest.raises(OrthrusInputError, match="logprobs"):
        SamplingParams(logprobs=bad)
