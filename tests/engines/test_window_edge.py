"""The window edge: no pass of any kind addresses a position at or past max_model_len, so a request
whose prompt + max_tokens fills the window ends with "length" and exact greedy output, in both
decode cycles; the runner refuses such a position with a clear error rather than an index error."""

import pytest
from single_pass import prefill_to_anchor
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.errors import OrthrusInputError

WINDOW = 64
# (prompt length, max_tokens): two requests filling the window exactly, at different times, and one not
REQUESTS = [(40, WINDOW - 40), (7, WINDOW - 7), (12, 10), (25, WINDOW - 25), (51, WINDOW - 51), (33, WINDOW - 33)]


@pytest.fixture(scope="module", params=["causal", "diffusion"])
def model(request, tmp_path_factory):
    """A causal-anchor head (fused cycle: verify+draft passes) and an official-format one (two-pass)."""
    view = request.param
    path = write_orthrus(tmp_path_factory.mktemp("edge") / view, "qwen3", seed=7, twin_noise=0.05,
                         anchor_view=view, vocab_size=16)  # a small vocabulary: drafts are often accepted
    return view, path, hf_model(path, "qwen3")


def _spy_positions(runner) -> list[tuple[str, int]]:
    """Record (pass kind, largest position) of every pass the runner makes."""
    seen: list[tuple[str, int]] = []
    run = runner._run

    def spy(seqs, ids, positions, meta, diffusion, ar_rows=None, *rest):
        kind = "verify+draft" if diffusion and len(ids) > len(ar_rows or ids) else "draft" if diffusion else "ar"
        seen.append((kind, int(positions.max())))
        return run(seqs, ids, positions, meta, diffusion, ar_rows, *rest)

    runner._run = spy
    return seen


@pytest.mark.parametrize("k", range(2, 9))
def test_requests_filling_the_window_finish_with_length_and_exact(model, k):
    view, path, hf = model
    llm = LLM(str(path), block_size=k, max_model_len=WINDOW, page_size=4, num_pages=64)
    eng = llm.core
    assert eng.max_model_len == WINDOW and eng.fused == (view == "causal")
    seen = _spy_positions(eng.runner)
    prompts = [[(3 * i + j) % 15 for j in range(n)] for i, (n, _) in enumerate(REQUESTS)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in REQUESTS]
    outs = llm.generate(prompts, params)
    for p, (_, m), o in zip(prompts, REQUESTS, outs):
        assert o.finish_reason == "length", (o.finish_reason, o.error)
        assert list(o.token_ids) == hf_greedy(hf, p, m)
    assert max(pos for _, pos in seen) < WINDOW
    kinds = {kind for kind, _ in seen}
    assert kinds == ({"ar", "verify+draft"} if view == "causal" else {"ar", "draft"})
    assert max(pos for _, pos in seen) >= WINDOW - 2  # the edge was reached: the window's last token was committed
    assert sum(o.drafted_tokens for o in outs) > 0
    assert eng.pages.num_free == eng.pages.num_pages


def test_max_tokens_past_the_window_is_refused(model):
    _, path, _ = model
    llm = LLM(str(path), block_size=3, max_model_len=WINDOW, page_size=4, num_pages=64)
    with pytest.raises(OrthrusInputError) as e:
        llm.core.add_request("r", [t % 15 for t in range(40)], SamplingParams(max_tokens=WINDOW - 39))
    assert e.value.field == "max_tokens"


def test_runner_refuses_a_position_past_the_window(model):
    """A block crossing the edge (the scheduler never builds one) fails with a clear error."""
    _, path, _ = model
    eng = LLM(str(path), block_size=3, max_model_len=WINDOW, page_size=4, num_pages=64).core
    seq = eng.add_request("r", [t % 15 for t in range(WINDOW - 3)], SamplingParams(max_tokens=3))
    prefill_to_anchor(eng, [seq], lookahead=8)
    with pytest.raises(RuntimeError, match=f"position {WINDOW}, outside the window of {WINDOW}"):
        eng.runner.verify([seq], [[seq.token_ids[-1], 1, 2, 3, 4]])  # positions 60..64
    if eng.runner.anchor_causal:
        with pytest.raises(RuntimeError, match=f"position {WINDOW},"):
            eng.runner.verify_and_draft([seq], [[seq.token_ids[-1], 1]], [3])  # MASK rows after slot 61: 62..64
    eng.abort_request("r")
    assert eng.pages.num_free == eng.pages.num_pages
