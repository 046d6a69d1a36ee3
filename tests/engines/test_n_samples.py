"""n > 1 samples of one prompt (SamplingParams.n): sample i is the request with seed + i (vLLM's rule), greedy
samples are equal, the prompt is prefilled once (the other samples wait for the first, then take its full
pages from the prefix cache), usage counts the prompt once, and an abort ends every sample."""

import asyncio

import pytest
import torch

from orthrus_engines import LLM, AsyncEngine, OrthrusInputError, SamplingParams
from orthrus_engines.sampling_params import MAX_N

VOCAB = 96
PAGE = 16


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=41, twin_noise=0.05)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=str(model_dir), block_size=4, num_pages=64)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def test_seeded_samples_equal_single_requests_with_seed_plus_index(llm):
    prompt, sp = tokens(21, 1), dict(max_tokens=14, temperature=1.0, ignore_eos=True)
    out = llm.generate(prompt, SamplingParams(n=3, seed=100, **sp))[0]
    singles = llm.generate([prompt] * 3, [SamplingParams(seed=100 + i, **sp) for i in range(3)])
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert [o.token_ids for o in out.outputs] == [s.token_ids for s in singles]
    assert [o.text for o in out.outputs] == [s.text for s in singles]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3  # their own seed streams
    assert (out.token_ids, out.finish_reason) == (singles[0].token_ids, singles[0].finish_reason)
    # usage: the prompt once, the completions summed
    assert out.prompt_tokens == 21 and out.completion_tokens == 3 * 14
    assert out.drafted_tokens == sum(o.drafted_tokens for o in out.outputs)
    assert out.forward_passes == sum(o.forward_passes for o in out.outputs)


def test_greedy_samples_are_equal(llm):
    prompt = tokens(9, 2)
    out = llm.generate(prompt, SamplingParams(n=4, max_tokens=12))[0]
    single = llm.generate(prompt, SamplingParams(max_tokens=12))[0]
    assert [o.token_ids for o in out.outputs] == [single.token_ids] * 4
    assert [(o.index, o.token_ids) for o in single.outputs] == [(0, single.token_ids)]  # n = 1: one output


def test_prompt_is_prefilled_once(llm):
    """The first sample prefills the 40-token prompt; the others hit its 2 full pages (all but the last
    prompt token are cached: 39 -> 32) and prefill 8 tokens each, not 40."""
    llm.reset_prefix_cache()
    before = llm.core.stats()["num_prefill_tokens"]
    out = llm.generate(tokens(40, 3), SamplingParams(n=3, max_tokens=4, temperature=0.9, seed=5))[0]
    assert llm.core.stats()["num_prefill_tokens"] - before == 40 + 2 * 8
    assert [o.cached_prompt_tokens for o in out.outputs] == [0, 32, 32]
    assert (out.prompt_tokens, out.cached_prompt_tokens) == (40, 0)  # the prompt once, as it was served


def test_abort_ends_every_sample_and_frees_pages(llm):
    core = llm.core
    core.add_request("ab", tokens(30, 4), SamplingParams(n=3, max_tokens=40, ignore_eos=True))
    seen = set()
    while len(seen) < 3:  # every sample is decoding
        seen |= {d.index for d in core.step() if d.token_ids}
    outs = core.abort("ab")
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert core.abort("ab") == [] and not core.has_unfinished()
    assert core.pages.num_free == core.pages.num_pages


@pytest.mark.parametrize("n", [0, -1, MAX_N + 1, 1.5, True, "2"])
def test_bad_n_is_named(n):
    with pytest.raises(OrthrusInputError) as e:
        SamplingParams(n=n)
    assert e.value.field == "n"


def test_async_engine_streams_samples_by_index(model_dir, llm):
    """The stream interleaves the samples' deltas, each tagged with its index; put together, each equals
    the offline sample; abort ends every sample's stream."""
    prompt, sp = tokens(26, 6), SamplingParams(n=3, max_tokens=15, temperature=0.8, seed=9, ignore_eos=True)
    want = llm.generate(prompt, sp)[0]
    engine = AsyncEngine(model=str(model_dir), block_size=4, num_pages=64)

    async def run():
        deltas = [d async for d in engine.generate("s", prompt, sp)]
        got: dict[int, list[int]] = {}
        for d in deltas:
            got.setdefault(d.index, []).extend(d.token_ids)
        assert [got[i] for i in range(3)] == [o.token_ids for o in want.outputs]
        assert sum(d.finished for d in deltas) == 3 and deltas[-1].finished
        order = [d.index for d in deltas if d.token_ids]
        assert order != sorted(order)  # interleaved, not one sample after another
        aborted = []
        async for d in engine.generate("ab", prompt, SamplingParams(n=3, max_tokens=60, ignore_eos=True)):
            if d.token_ids and not aborted:
                engine.abort("ab")
            aborted.append(d)
        assert sorted(d.index for d in aborted if d.finished) == [0, 1, 2]
        assert all(d.finish_reason == "abort" for d in aborted if d.finished)
        before = engine.stats()["num_generated_tokens"]
        stream = engine.generate("gone", prompt, SamplingParams(n=3, max_tokens=400, ignore_eos=True))
        await anext(stream)
        await stream.aclose()  # the caller leaves: every sample is aborted, every page freed
        for _ in range(2000):
            s = engine.stats()
            if not (s["num_running"] or s["num_waiting"]):
                break
            await asyncio.sleep(0.01)
        assert s["num_free_pages"] == s["num_pages"] and s["num_generated_tokens"] - before < 400  # none ran out

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
