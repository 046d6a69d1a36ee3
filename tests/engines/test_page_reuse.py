"""Look-ahead pages a decode step trims are the ones the next step takes back: a long decode next to
a cached prefix evicts none of it while pages with nothing cached in them are free."""

import pytest
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams

PAGE = 4


@pytest.fixture(scope="module", params=["causal", "diffusion"])
def model(request, tmp_path_factory):
    """A causal-anchor head (the fused cycle) and an official-format one (draft + verify: drafts often
    rejected, so the look-ahead often reaches a page the next step takes again)."""
    path = write_orthrus(tmp_path_factory.mktemp("reuse") / "m", "qwen3", seed=8, anchor_view=request.param)
    return path, hf_model(path, "qwen3"), request.param == "causal"


def test_long_decode_keeps_a_cached_prefix(model):
    path, hf, fused = model
    # 21 pages: the prefix's 5 and the long decode's 16 (64 positions, look-ahead included) at its longest
    llm = LLM(str(path), block_size=3, page_size=PAGE, num_pages=21)
    eng = llm.core
    assert eng.fused == fused
    prefix = [(5 * i) % 90 + 1 for i in range(21)]
    llm.generate([prefix], SamplingParams(max_tokens=1, ignore_eos=True))
    stored = [h for kind, hs in eng.drain_prefix_events() if kind == "stored" for h in hs]
    assert len(stored) == 5  # 20 positions, the first token's anchor included: 5 full pages

    long_prompt = [7, 3, 9, 1, 4]
    out = llm.generate([long_prompt], SamplingParams(max_tokens=59, ignore_eos=True))[0]
    assert list(out.token_ids) == hf_greedy(hf, long_prompt, 59)
    assert out.forward_passes > 20  # many steps, each trimming and taking back its look-ahead
    removed = [h for kind, hs in eng.drain_prefix_events() if kind == "removed" for h in hs]
    assert not removed, f"{len(removed)} cached prefix pages evicted with free pages to spare"

    again = llm.generate([prefix + [2]], SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert again.cached_prompt_tokens == 20
    assert eng.pages.num_free == eng.pages.num_pages
