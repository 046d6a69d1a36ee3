"""Sampling with Orthrus has exactly the AR sampling distribution (docs/ARCHITECTURE.md §1), and seeds reproduce.

Two paths: unseeded requests use speculative rejection sampling (their generator), seeded ones the
coupled Gumbel-max draws (test_seeded.py); both are tested against the exact distribution.

A tiny-vocabulary model (V = 8) makes the whole space of 3-token continuations (512 sequences)
enumerable: the exact AR distribution comes from the HF oracle, and the engine's empirical
distributions (Orthrus K = 4 and plain AR) are compared with it and with each other by chi-square
tests. Twins are AR + large noise, so drafts are sometimes accepted and sometimes rejected: both the
acceptance and the residual-sampling paths of speculative sampling are exercised.
"""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats
from support.tiny_models import hf_model, write_orthrus

import orthrus_engines.engine.orthrus_step as orthrus_step_mod
from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.sampler import sample, seeded_draws

V = 8  # vocabulary
PROMPT = [1, 2, 3]
L = 3  # generated tokens per sample
N = 3000  # samples per empirical distribution
P_MIN = 1e-3  # a correct sampler passes at this level; the seeds are fixed, so the test is deterministic
CONFIGS = {
    "t1": dict(temperature=1.0),
    "t0.8_topk5_topp0.9": dict(temperature=0.8, top_k=5, top_p=0.9),
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    # Sharper logits (fewer likely sequences) give the chi-square tests more power.
    return tiny_model("qwen3", seed=3, twin_noise=0.5, vocab_size=V, lm_head_scale=3.0)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=str(model_dir), block_size=4, num_pages=1200, max_num_seqs=1024, max_num_batched_tokens=8192)


@pytest.fixture(scope="module")
def fused_llm(model_dir, tmp_path_factory):
    """The same model with `anchor_view: "causal"`: one verify+draft pass per cycle."""
    import json
    import shutil

    d = tmp_path_factory.mktemp("sampling-causal") / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "anchor_view": "causal"}))
    llm = LLM(model=str(d), block_size=4, num_pages=1200, max_num_seqs=1024, max_num_batched_tokens=16384)
    assert llm.core.fused
    return llm


@pytest.fixture(scope="module")
def step_logits(model_dir):
    """HF oracle logits for every context: [V**(L-1), L, V], row = the first L-1 generated tokens."""
    hf = hf_model(model_dir, "qwen3")
    heads = list(itertools.product(range(V), repeat=L - 1))
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + list(h) for h in heads])).logits[:, len(PROMPT) - 1 :]
    return heads, logits.double().numpy()


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Reference temperature / top-k / top-p (keep the smallest top set reaching top_p), float64."""
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.sort(z)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        # A boundary this close to top_p would make float32 vs float64 disagree: ill-posed test.
        assert np.min(np.abs(np.cumsum(p[order]) - top_p)) > 1e-4
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def exact_distribution(step_logits, sp: dict) -> dict[tuple, float]:
    """Probability of every L-token continuation under AR sampling with these parameters."""
    heads, logits = step_logits
    by_head = dict(zip(heads, logits))
    out = {}
    for s in itertools.product(range(V), repeat=L):
        rows = by_head[s[:-1]]
        prob = 1.0
        for i, t in enumerate(s):
            prob *= filtered_probs(rows[i], **sp)[t]
        out[s] = prob
    return out


def sample_counts(llm, sp: dict, seeds, seeded: bool = False, length: int = L, **extra) -> tuple[Counter, float]:
    """Seeded requests (the coupled path), or unseeded ones (rejection sampling) whose generators are
    seeded from torch's global generator, itself seeded with seeds[0]: deterministic either way."""
    torch.manual_seed(seeds[0])
    params = [SamplingParams(max_tokens=length, seed=s if seeded else None, **sp, **extra) for s in seeds]
    outs = llm.generate([PROMPT] * len(params), params)
    assert all(len(o.token_ids) == length for o in outs)
    drafted = sum(o.drafted_tokens for o in outs)
    accepted = sum(o.accepted_tokens for o in outs)
    return Counter(tuple(o.token_ids) for o in outs), accepted / max(drafted, 1)


def gof_pvalue(counts: Counter, exact: dict[tuple, float]) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled."""
    n = sum(counts.values())
    assert all(exact[s] > 0 for s in counts), "sampled a sequence the filtered AR distribution forbids"
    keys = sorted(exact)
    e = np.array([exact[k] for k in keys]) * n
    o = np.array([counts[k] for k in keys], dtype=float)
    big = e >= 5
    e2, o2 = np.append(e[big], e[~big].sum()), np.append(o[big], o[~big].sum())
    if e2[-1] == 0:
        e2, o2 = e2[:-1], o2[:-1]
    return stats.chisquare(o2, e2 * o2.sum() / e2.sum()).pvalue


def two_sample_pvalue(a: Counter, b: Counter) -> float:
    """Chi-square homogeneity test of two samples; cells with fewer than 10 in total are pooled."""
    keys = sorted(set(a) | set(b))
    ca, cb = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    big = ca + cb >= 10
    table = np.array([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])
    if table[:, -1].sum() == 0:
        table = table[:, :-1]
    return stats.chi2_contingency(table)[1]


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["rejection", "coupled"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_orthrus_sampling_matches_ar_distribution(llm, step_logits, config, seeded):
    """Orthrus (K=4) samples, plain AR samples and the exact AR distribution all agree."""
    sp = CONFIGS[config]
    exact = exact_distribution(step_logits, sp)
    assert abs(sum(exact.values()) - 1) < 1e-9
    orthrus, acceptance = sample_counts(llm, sp, range(N), seeded)
    ar, _ = sample_counts(llm, sp, range(10**6, 10**6 + N), seeded, use_diffusion=False)
    # The test only means something if drafts are both accepted and rejected.
    assert 0.1 < acceptance < 0.95, acceptance
    p_orthrus, p_ar, p_two = gof_pvalue(orthrus, exact), gof_pvalue(ar, exact), two_sample_pvalue(orthrus, ar)
    assert p_orthrus > P_MIN, f"Orthrus vs exact AR: p={p_orthrus:.2e}"
    assert p_ar > P_MIN, f"plain AR vs exact AR: p={p_ar:.2e}"
    assert p_two > P_MIN, f"Orthrus vs plain AR samples: p={p_two:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["rejection", "coupled"])
def test_fused_cycle_sampling_matches_ar_distribution(fused_llm, step_logits, seeded):
    """The verify+draft cycle (drafts carried from one pass to the next, with their q) samples the
    exact AR distribution too."""
    sp = CONFIGS["t0.8_topk5_topp0.9"]
    counts, acceptance = sample_counts(fused_llm, sp, range(3 * 10**6, 3 * 10**6 + N), seeded)
    assert 0.1 < acceptance < 0.95, acceptance
    p = gof_pvalue(counts, exact_distribution(step_logits, sp))
    assert p > P_MIN, f"fused Orthrus vs exact AR: p={p:.2e}"


# -- long blocks: one cycle verifies >= 5 drafts ---------------------------------------------------

LONG = 7  # generated tokens: K = 7 (two-pass) verifies 6 drafts in its first cycle, K = 6 (fused) 5 in its second
LONG_SP = dict(temperature=0.8, top_k=5, top_p=0.85)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """V = 8 with sharp logits (the likely 7-token continuations are few), twins close to the AR, a
    causal anchor, and a model K of 32 so the fused cycle may take K = 6."""
    import json

    d = write_orthrus(tmp_path_factory.mktemp("long") / "m", "qwen3", seed=3, twin_noise=0.02, vocab_size=V,
                      anchor_view="causal")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 10.0
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "block_size": 32}))
    return d


@pytest.fixture(scope="module")
def likely_sequences(long_dir) -> dict[tuple, float]:
    """Every LONG-token continuation whose exact AR probability (HF, float64 filtering) gives it an
    expected count >= 5 in N samples: a tree search that drops prefixes below that."""
    hf, floor = hf_model(long_dir, "qwen3"), 5 / N
    frontier = {(): 1.0}
    for _ in range(LONG):
        heads = list(frontier)
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + list(h) for h in heads])).logits[:, -1].double().numpy()
        frontier = {h + (t,): frontier[h] * p for h, row in zip(heads, logits)
                    for t, p in enumerate(filtered_probs(row, **LONG_SP)) if frontier[h] * p >= floor}
    assert 0.5 < sum(frontier.values()) < 1  # most of the mass, in cells the test can see
    return frontier


def likely_pvalue(counts: Counter, likely: dict[tuple, float]) -> float:
    """Chi-square goodness of fit over the likely sequences and one cell for all the others."""
    n = sum(counts.values())
    keys = sorted(likely)
    e = np.array([likely[k] for k in keys]) * n
    o = np.array([counts[k] for k in keys], dtype=float)
    return stats.chisquare(np.append(o, n - o.sum()), np.append(e, n - e.sum())).pvalue


def long_counts(long_dir, fused: bool, k: int, seeded: bool) -> tuple[Counter, float, int]:
    """Samples, acceptance rate, and the most drafts one pass verified."""
    llm = LLM(model=str(long_dir), block_size=k, fused_cycle=fused, num_pages=2000, max_num_seqs=1024,
              max_num_batched_tokens=16384)
    runner, verified = llm.core.runner, [0]
    run = runner.verify_and_draft if fused else runner.verify

    def spy(seqs, blocks, *rest):
        verified[0] = max([verified[0]] + [len(b) - 1 for b in blocks])
        return run(seqs, blocks, *rest)

    setattr(runner, "verify_and_draft" if fused else "verify", spy)
    counts, acceptance = sample_counts(llm, LONG_SP, range(4 * 10**6, 4 * 10**6 + N), seeded, LONG, ignore_eos=True)
    return counts, acceptance, verified[0]


@pytest.mark.slow
@pytest.mark.parametrize("fused,k,seeded", [(False, 7, True), (True, 6, True), (True, 6, False)],
                         ids=["two_pass_k7_coupled", "fused_k6_coupled", "fused_k6_rejection"])
def test_long_blocks_sample_ar_distribution(long_dir, likely_sequences, fused, k, seeded):
    """Cycles that verify >= 5 drafts (accepted in runs, rejected anywhere) still sample exactly the AR
    distribution of 7-token continuations: the coupled path in both cycles, and rejection sampling
    with q carried from pass to pass in the fused cycle."""
    counts, acceptance, verified = long_counts(long_dir, fused, k, seeded)
    assert verified >= 5 and acceptance > 0.03, (verified, acceptance)
    p = likely_pvalue(counts, likely_sequences)
    assert p > P_MIN, f"K={k} fused={fused} seeded={seeded} vs exact AR: p={p:.2e}"


def _accept_every_coupled_draft(drafts, target):
    """Wrong: keeps the seeded drafts without comparing them with the AR draws."""
    return drafts + [target[len(drafts)]]


def _noise_by_block_slot(logits, params, seed, start):
    """Wrong: noise indexed by the slot in the block, not the sequence position (reused every cycle)."""
    return seeded_draws(logits, params, seed, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name,wrong", [("greedy_accept", _accept_every_coupled_draft),
                                        ("seeded_draws", _noise_by_block_slot)], ids=["accept_all", "slot_noise"])
def test_chi_square_detects_a_wrong_coupling(long_dir, likely_sequences, monkeypatch, name, wrong):
    """The long-block test has power against a wrong coupled sampler."""
    monkeypatch.setattr(orthrus_step_mod, name, wrong)
    counts, _, _ = long_counts(long_dir, False, 7, True)
    assert likely_pvalue(counts, likely_sequences) < 1e-6


def _accept_every_draft(drafts, q, p, generator):
    """Wrong: takes the drafts as they come (the output follows the draft distribution q)."""
    return drafts + [sample(p[len(drafts)], generator)]


def _resample_from_p(drafts, q, p, generator):
    """Wrong: on rejection samples from p instead of norm(max(p - q, 0)) (a classic bug)."""
    for i, d in enumerate(drafts):
        if torch.rand((), generator=generator).item() < min(1.0, (p[i, d] / q[i, d]).item()):
            continue
        return drafts[:i] + [sample(p[i], generator)]
    return drafts + [sample(p[len(drafts)], generator)]


@pytest.mark.slow
@pytest.mark.parametrize("wrong", [_accept_every_draft, _resample_from_p], ids=["accept_all", "resample_from_p"])
def test_chi_square_detects_a_wrong_sampler(llm, step_logits, monkeypatch, wrong):
    """The distribution test has power: subtly wrong acceptance rules fail it by a wide margin."""
    sp = CONFIGS["t1"]
    monkeypatch.setattr(orthrus_step_mod, "speculative_accept", wrong)
    counts, _ = sample_counts(llm, sp, range(2 * 10**6, 2 * 10**6 + N))  # unseeded: rejection sampling
    assert gof_pvalue(counts, exact_distribution(step_logits, sp)) < 1e-6


SEED_PROMPTS = [[1, 2, 3, 4, 5], [6, 5, 4], [2, 2, 2, 2, 2, 2, 2, 2], [7], [3, 1, 4, 1, 5, 2, 6]]


@pytest.mark.parametrize("use_diffusion", [True, False], ids=["orthrus", "ar"])
def test_seed_reproduces_alone_and_in_another_batch(llm, model_dir, use_diffusion):
    """The same seed gives the same tokens alone, inside a different batch and in a fresh engine."""
    sp = dict(max_tokens=20, temperature=1.0, top_p=0.95, use_diffusion=use_diffusion)
    target, seed = [4, 3, 2, 1], 1234
    alone = llm.generate(target, SamplingParams(seed=seed, **sp))[0].token_ids
    assert len(alone) == 20
    again = llm.generate(target, SamplingParams(seed=seed, **sp))[0].token_ids
    prompts = SEED_PROMPTS[:2] + [target] + SEED_PROMPTS[2:]
    params = [SamplingParams(seed=100 + i, **sp) for i in range(len(prompts))]
    params[2] = SamplingParams(seed=seed, **sp)
    batched = llm.generate(prompts, params)
    other = LLM(model=str(model_dir), block_size=4, num_pages=64)
    fresh = other.generate(target, SamplingParams(seed=seed, **sp))[0].token_ids
    assert again == alone
    assert batched[2].token_ids == alone
    assert fresh == alone
    # Seeds matter: other seeds give other outputs.
    others = [o.token_ids for i, o in enumerate(batched) if i != 2]
    assert len({tuple(t) for t in others}) == len(others)
    assert llm.generate(target, SamplingParams(seed=seed + 1, **sp))[0].token_ids != alone


def test_unseeded_requests_differ(llm):
    """Without a seed, identical sampled requests are not forced to the same output."""
    outs = llm.generate([[4, 3, 2, 1]] * 8, SamplingParams(max_tokens=12, temperature=1.0))
    assert len({tuple(o.token_ids) for o in outs}) > 1


@pytest.mark.parametrize("temperature", [1e-6, 1e-40])
def test_tiny_temperature_is_greedy(llm, temperature):
    """A valid but tiny temperature samples the argmax: it must not overflow into NaN probabilities
    and fail the request."""
    prompt = [4, 3, 2, 1]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=12))[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=temperature, seed=0))[0]
    assert out.finish_reason == "length", out.error
    assert out.token_ids == greedy.token_ids
