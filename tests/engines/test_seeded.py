"""Seeded sampling that drafting cannot change: a seeded request's output is a function of (model,
prompt, sampling params, seed) only. The token at sequence position t is the Gumbel-max draw
argmax_v(log p_t(v) + g(seed, t, v)) with counter-based noise g; drafts are drawn with the same noise and
accepted iff they equal the AR draw, so every block size, cycle, batch, preemption and prefix-cache hit
gives plain AR's tokens (and the HF oracle's, decoding with the same noise).
"""

import json

import numpy as np
import pytest
import torch
from scipy import stats
from support.tiny_models import hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.gumbel import GOLDEN, gumbel_noise, mix64_int, noise_bits, uniforms
from orthrus_engines.engine.sampler import filtered_logits, seeded_draws


VOCAB = 96
SP = dict(temperature=0.8, top_k=40, top_p=0.95, ignore_eos=True)


# -- the noise ---------------------------------------------------------------------------------


def _reference_bits(seed: int, t: int, v: int) -> int:
    """g's hash in plain Python (unsigned 64-bit): splitmix64 of the (seed, position) key's stream."""
    seed_key = mix64_int(seed + GOLDEN)
    row_key = mix64_int(mix64_int(t * GOLDEN + GOLDEN) ^ seed_key)
    return mix64_int(row_key + (v + 1) * GOLDEN)


@pytest.mark.parametrize("seed", [0, 7, -3, 2**63 + 5, 2**80 + 1])
def test_noise_bits_equal_the_integer_reference(seed):
    """The int64 torch ops (wrapping products, masked shifts) compute exactly the unsigned splitmix64."""
    positions = [0, 1, 5, 1000, 2**40]
    bits = noise_bits(seed, torch.tensor(positions), 64)
    for i, t in enumerate(positions):
        want = [_reference_bits(seed, t, v) for v in range(64)]
        assert [b & (2**64 - 1) for b in bits[i].tolist()] == want


def test_noise_is_a_function_of_seed_and_position():
    """Same (seed, t): same values, whichever rows are computed together; other seeds or positions:
    other values."""
    together = gumbel_noise(5, torch.arange(10, 20), 300)
    alone = torch.cat([gumbel_noise(5, torch.tensor([t]), 300) for t in range(10, 20)])
    assert torch.equal(together, alone)
    assert torch.equal(together, gumbel_noise(5, torch.arange(10, 20), 300))
    assert not torch.isclose(together, gumbel_noise(6, torch.arange(10, 20), 300)).any(-1).all()
    rows = gumbel_noise(5, torch.arange(0, 30), 300)
    assert len({tuple(r.tolist()) for r in rows}) == 30  # every position its own noise
    assert torch.isfinite(rows).all()


def test_noise_is_uniform_and_gumbel():
    """KS tests: the uniforms behind g are U(0, 1), also across seeds at one position (what a batch of
    seeded requests sees), and g is standard Gumbel."""
    u = uniforms(11, torch.arange(200), 500).flatten().double().numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    across_seeds = torch.cat([uniforms(s, torch.tensor([3]), 1) for s in range(4000)]).flatten().double().numpy()
    assert stats.kstest(across_seeds, "uniform").pvalue > 1e-3
    g = gumbel_noise(12, torch.arange(100), 500).flatten().double().numpy()
    assert stats.kstest(g, "gumbel_r").pvalue > 1e-3
    # and the test has power: a shifted Gumbel fails it
    assert stats.kstest(g + 0.05, "gumbel_r").pvalue < 1e-6


def test_seeded_draws_follow_the_filtered_distribution():
    """Gumbel-max over many positions of one logits row: the draws follow probs_from_logits (chi-square),
    and top-k / top-p dropped tokens are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9]])
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.97)
    z = filtered_logits(logits, params)[0]
    p = z.softmax(-1).double().numpy()
    assert (p == 0).sum() >= 2
    n = 20000
    draws = seeded_draws(logits.expand(n, -1), params, seed=99, start=0)
    counts = np.bincount(draws, minlength=8)
    assert counts[p == 0].sum() == 0
    expected = p[p > 0] / p[p > 0].sum() * n
    assert stats.chisquare(counts[p > 0], expected).pvalue > 1e-3


# -- the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    """A causal-anchor model (fused cycle) whose K = 32 lets the fused cycle take K up to 6."""
    d = write_orthrus(tmp_path_factory.mktemp("seeded") / "m", "qwen3", seed=4, twin_noise=0.03, anchor_view="causal")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "block_size": 32}))
    return d


@pytest.fixture(scope="module")
def oracle(causal_dir):
    return hf_model(causal_dir, "qwen3")


def hf_seeded(hf, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """AR decoding in HF with the seeded draw at each absolute position."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([ids])).logits[:, -1]
            z = filtered_logits(logits, params)
            ids.append(int((z + gumbel_noise(params.seed, torch.tensor([len(ids)]), z.shape[-1])).argmax()))
    return ids[len(prompt):]


PROMPT = [5, 17, 3, 42, 8, 1, 77]


def test_plain_ar_seeded_equals_the_hf_oracle(causal_dir, oracle):
    params = SamplingParams(max_tokens=24, seed=1234, **SP)
    got = LLM(str(causal_dir), block_size=1, num_pages=64).generate([PROMPT], params)[0].token_ids
    assert got == hf_seeded(oracle, PROMPT, 24, params)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
def test_seeded_output_is_the_same_for_every_block_size(causal_dir, oracle, fused):
    """K = 1..8 (the fused cycle caps K at 6 here) and "auto": the same tokens, those of the oracle;
    drafts are accepted often enough for blocks of several tokens to be committed."""
    params = SamplingParams(max_tokens=24, seed=77, **SP)
    want = hf_seeded(oracle, PROMPT, 24, params)
    accepted = 0
    for k in [*range(1, 9), "auto"]:
        llm = LLM(str(causal_dir), block_size=k, fused_cycle=fused, num_pages=64)
        assert llm.core.fused == fused
        out = llm.generate([PROMPT], params)[0]
        assert out.token_ids == want, k
        accepted += out.accepted_tokens
    assert accepted > 10


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
def test_seeded_output_ignores_batch_preemption_and_prefix_hits(causal_dir, oracle, fused):
    """Batched with other seeded, unseeded and greedy requests of other lengths, in a pool so small that
    requests are preempted, and again after its prompt is in the prefix cache: still the oracle's tokens."""
    prompt = list(range(3, 40))  # over two pages of 16: a prefix hit reuses them
    target = SamplingParams(max_tokens=30, seed=2024, **SP)
    want = hf_seeded(oracle, prompt, 30, target)
    others = [list(range(50, 50 + n)) for n in (5, 22, 13, 30)]
    other_params = [SamplingParams(max_tokens=30, seed=9, **SP), SamplingParams(max_tokens=30, **SP),
                    SamplingParams(max_tokens=30, ignore_eos=True), SamplingParams(max_tokens=25, seed=10, **SP)]
    llm = LLM(str(causal_dir), block_size=6, fused_cycle=fused, num_pages=14, page_size=8)
    outs = llm.generate(others[:2] + [prompt] + others[2:], other_params[:2] + [target] + other_params[2:])
    assert llm.core.scheduler.num_preemptions > 0
    assert outs[2].token_ids == want
    assert llm.generate([prompt], target)[0].token_ids == want  # its pages enter the cache again
    again = llm.generate([others[0], prompt], [other_params[1], target])[1]
    assert again.cached_prompt_tokens > 0
    assert again.token_ids == want


def test_seeded_requests_never_touch_their_generator(causal_dir, monkeypatch):
    """The generator is the unseeded path's; a seeded request drawing from it would make its output
    depend on how many drafts were drawn and checked."""
    import orthrus_engines.engine.orthrus_step as orthrus_step_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("a seeded request used the generator")

    monkeypatch.setattr(orthrus_step_mod, "sample", forbidden)
    monkeypatch.setattr(orthrus_step_mod, "speculative_accept", forbidden)
    for fused in (True, False):
        out = LLM(str(causal_dir), block_size=4, fused_cycle=fused, num_pages=64).generate(
            [PROMPT], SamplingParams(max_tokens=12, seed=3, **SP))[0]
        assert out.finish_reason == "length", out.error
