"""The `auto` draft-length policy: K = 1 when drafts are rejected, a long K when they are accepted,
exploration after long stretches of plain AR, and the engine following it without changing output."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import write_base, write_orthrus

from orthrus_engines import LLM, OrthrusInputError, SamplingParams
from orthrus_engines.engine.draft_policy import AcceptanceStats, AutoDraftPolicy, ForwardTimes, Plan

VOCAB = 96
TIMES = {1: 0.050, 2: 0.080, 4: 0.085, 8: 0.090, 16: 0.100, 32: 0.140, 64: 0.250, 128: 0.480}  # a CPU-like curve


def _policy(accept: bool, max_k: int = 8) -> AutoDraftPolicy:
    stats = AcceptanceStats(max_k)
    for _ in range(200):
        stats.record(max_k - 1, max_k - 1 if accept else 0)
    return AutoDraftPolicy(max_k, ForwardTimes(dict(TIMES)), stats)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_always_rejected_chooses_plain_ar(batch):
    assert _policy(accept=False).choose(batch).k == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_always_accepted_chooses_a_long_block(batch):
    assert _policy(accept=True).choose(batch).k == 8


def test_choice_follows_the_cost_curve():
    """Full acceptance, but a cost curve where a pass over many tokens costs as much as their AR
    steps (compute bound): drafting cannot pay back the extra draft pass."""
    p = _policy(accept=True)
    p.times = ForwardTimes({n: 0.01 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)})
    assert p.choose(4).k == 1


def test_partial_acceptance_picks_an_intermediate_k():
    stats = AcceptanceStats(8)
    for _ in range(400):  # drafts 1 and 2 nearly always accepted, later ones never
        stats.record(7, 2)
    p = AutoDraftPolicy(8, ForwardTimes({n: 0.05 + 0.0001 * n for n in (1, 8, 64, 128)}), stats)
    assert p.choose(1).k == 3


def _fused_policy(accepted: int, times: dict[int, float], max_k: int = 8) -> AutoDraftPolicy:
    """Only the verify+draft cycle (two-pass K capped at 1): K draft positions, position 1 (the AR's
    own token) always accepted."""
    stats = AcceptanceStats(max_k + 1)
    for _ in range(400):
        stats.record(max_k, 1 + accepted)
    return AutoDraftPolicy(1, ForwardTimes(dict(times)), AcceptanceStats(1), fused_k=max_k,
                           fused_times=ForwardTimes(dict(times)), fused_stats=stats)


def test_fused_cycle_policy():
    """One pass of K x K rows per sequence: AR when drafts after the first are rejected, the full
    block when all are accepted and rows are cheap, and K = 1 when a pass costs per row (K x K rows
    cannot be paid back by K tokens)."""
    cheap = {n: 0.05 + 0.0001 * n for n in (1, 8, 64, 256, 1024)}
    assert _fused_policy(0, cheap).choose(4) == Plan(1)
    assert _fused_policy(7, cheap).choose(4) == Plan(8, fused=True)
    assert _fused_policy(2, cheap).choose(1) == Plan(3, fused=True)  # positions 2 and 3 accepted: K = 3 verifies them
    assert _fused_policy(7, {n: 0.01 * n for n in (1, 8, 64, 256)}).choose(1) == Plan(1)
    p = _fused_policy(7, cheap)
    # 3 tokens from 9 rows per sequence (the rates hold a little of the prior: 1%)
    assert p.expected_rate(Plan(3, fused=True), 2) == pytest.approx(2 * 3 / p.fused_times(2 * 9), rel=0.01)
    ar_before, fused_before = p.times(4), p.fused_times(16)
    p.observe_step([(16, 1.0)], 1.0, fused=True)  # a slow verify+draft pass moves only its own curve
    assert p.times(4) == ar_before and p.fused_times(16) > fused_before


def _both_cycles(fused_cost: float) -> AutoDraftPolicy:
    """A causal-anchor head: both cycles have drafts 1-3 accepted (position 1 is the AR's own token)
    and later ones rejected. Verify passes cost as a CPU's do; a verify+draft pass of n rows costs
    `fused_cost` times a verify pass of n rows."""
    times = {n: 0.05 + 0.0004 * n for n in (1, 4, 8, 16, 64, 256)}
    two, fused = AcceptanceStats(8, prior_weight=0), AcceptanceStats(4, prior_weight=0)
    for _ in range(400):
        two.record(7, 3)
        fused.record(3, 3)
    return AutoDraftPolicy(8, ForwardTimes(times), two, fused_k=3,
                           fused_times=ForwardTimes({n: fused_cost * t for n, t in times.items()}), fused_stats=fused)


def test_policy_picks_the_cycle_as_well_as_k():
    """Two passes of K = 4 commit 4 tokens for 2 passes; one verify+draft pass of K = 3 commits 3
    tokens for 1 pass of 9 rows: which wins depends on what a verify+draft pass costs here."""
    assert _both_cycles(fused_cost=1.0).choose(1) == Plan(3, fused=True)
    assert _both_cycles(fused_cost=1.9).choose(1) == Plan(4)  # a CPU where the fused pass is dear
    p = _both_cycles(fused_cost=1.9)
    assert p.expected_rate(Plan(4), 1) > p.expected_rate(Plan(3, fused=True), 1) > p.expected_rate(Plan(1), 1)


def test_exploring_refreshes_the_cycle_known_least():
    """On plain AR for long, the policy scouts each cycle in turn: the one whose evidence faded most."""
    p = _both_cycles(fused_cost=1.0)
    p.stats = AcceptanceStats(8, prior=[0.0] * 7, prior_weight=0)
    p.fused_stats = AcceptanceStats(4, prior=[0.0] * 3, prior_weight=0)
    p.fused_stats.record(3, 1)
    scouts = set()
    for _ in range(2000):
        plan = p.choose(1)
        if plan.k > 1:
            scouts.add(plan)
            (p.fused_stats.record(plan.k, 1) if plan.fused else p.stats.record(plan.k - 1, 0))
    assert scouts == {Plan(8), Plan(3, fused=True)}


def test_rates_are_non_increasing_and_decay():
    stats = AcceptanceStats(4, prior=[0.9, 0.9, 0.9])
    stats.record(3, 3)
    r = stats.rates()
    assert r == sorted(r, reverse=True) and all(0 <= x <= 1 for x in r)
    before = stats.evidence
    stats.tick()
    assert stats.evidence < before


def test_explores_after_a_long_stretch_of_plain_ar():
    p = _policy(accept=False)
    explore = []
    for step in range(3000):
        k = p.choose(1).k
        if k > 1:
            explore.append(step)
            p.stats.record(k - 1, 0)  # what the engine records for the exploring step
    assert explore, "never re-measured acceptance"
    assert len(explore) < 30, f"explored {len(explore)} times in 3000 steps"  # rare: each one refreshes the evidence


def test_step_overhead_is_learnt_and_counted():
    """Time outside the passes is learnt from every step. A large fixed cost per step favours
    fewer, longer steps: with drafts accepted half the time, K = 1 wins on pass time alone and
    drafting wins once each step costs far more than its passes."""
    stats = AcceptanceStats(4, prior=[0.5, 0.5, 0.5], prior_weight=50)  # enough evidence: no exploring
    p = AutoDraftPolicy(4, ForwardTimes({n: 0.01 * (1 + n / 8) for n in (1, 2, 4, 8, 16)}), stats)
    assert p.choose(1).k == 1
    for _ in range(50):
        p.observe_step([(1, 0.01)], step_seconds=0.21)  # plain steps: 0.2 s outside the pass
        p.observe_step([(2, 0.011), (2, 0.011)], step_seconds=0.222)
    assert p.overhead == pytest.approx(0.2, rel=1e-3)
    assert p.times(2) == pytest.approx(0.011, rel=1e-3)
    assert p.choose(1).k > 1


def test_one_stall_cannot_lock_the_policy_into_drafting():
    """Drafts never accepted; one plain step stalls 10 ms outside its pass (a GC pause). The stall
    counts as at most 3x the overhead, and drafting steps keep the overhead current too."""
    stats = AcceptanceStats(8, prior=[0.0] * 7, prior_weight=50)
    p = AutoDraftPolicy(8, ForwardTimes({1: 0.0005, 8: 0.0006, 64: 0.001}), stats, min_evidence=0.0)
    p.observe_step([(1, 0.0005)], step_seconds=0.0008)
    p.observe_step([(1, 0.0005)], step_seconds=0.0105)
    drafted = 0
    for _ in range(200):
        k = p.choose(1).k
        drafted += k > 1
        passes = [(k, 0.0006), (k, 0.0006)] if k > 1 else [(1, 0.0005)]
        p.observe_step(passes, step_seconds=sum(s for _, s in passes) + 0.0003)
        if k > 1:
            stats.record(k - 1, 0)
    assert drafted <= 5, drafted


def test_forward_times_beyond_the_ladder_are_proportional_and_clamped():
    t = ForwardTimes({1: 0.01, 256: 0.06})
    assert t(512) == pytest.approx(0.12)  # T(top) * n / top
    t.observe(300, 5.0)  # a stall on a new, larger shape: informs T(256), clamped to 3x
    assert t.ns == [1, 256] and t(256) == pytest.approx(0.06 + 0.2 * (0.18 - 0.06))
    t.observe(264, 0.0595)  # slightly fast: the curve beyond the top stays proportional, never falls
    assert t(512) > t(256) > t(128)


@pytest.mark.parametrize("gain, drafts", [(1.03, False), (1.10, True)])
def test_drafting_must_win_by_a_margin(gain, drafts):
    """Flat T(n): a K = 8 cycle costs two AR steps and commits 1 + 7r tokens, so it is expected to be
    (1 + 7r) / 2 times AR. A 3% edge is within the model's error and stays AR; 10% drafts."""
    r = (2 * gain - 1) / 7
    p = AutoDraftPolicy(8, ForwardTimes({1: 0.01, 64: 0.01}), AcceptanceStats(8, prior=[r] * 7, prior_weight=1000))
    assert p.expected_rate(8, 1) == pytest.approx(gain * p.expected_rate(1, 1))
    assert (p.choose(1).k == 8) is drafts


def test_forward_times_interpolate_and_learn():
    t = ForwardTimes({1: 1.0, 4: 4.0})
    assert t(2) == pytest.approx(2.0) and t(8) == pytest.approx(8.0)
    t.observe(4, 2.0)
    assert t(4) == pytest.approx(3.6)
    t.observe(2.5, 0.0)  # between two measured points: both move, T(2.5) by 0.2 of the (clamped) error
    assert t.ns == [1, 4] and t(2.5) == pytest.approx(2.3 - 0.2 * (2.3 - 2.3 / 3))


# -- the engine -----------------------------------------------------------------------------------
def _always_accepting(tmp_path):
    """A model whose final norm is zero: every logit is 0, both views always pick token 0, so every
    draft is accepted."""
    path = write_base(tmp_path / "const", "llama", seed=5)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.zeros_like(tensors["model.norm.weight"])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_engine_drafts_long_blocks_when_all_are_accepted(tmp_path):
    llm = LLM(str(_always_accepting(tmp_path)))
    assert llm.core.policy is not None and llm.core.block_size == 8
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=64, ignore_eos=True))[0]
    assert out.token_ids == [0] * 64
    assert out.accepted_tokens >= 50  # nearly every step drafted the full block


def _always_rejected(llm: LLM, token: int) -> LLM:
    """Make every draft `token`, which the test checks the AR view never emits."""
    draft = llm.core.runner.draft

    def wrong_draft(seqs, ks):
        logits = draft(seqs, ks).clone()
        logits[:, token] = logits.max() + 1.0
        return logits

    llm.core.runner.draft = wrong_draft
    return llm


def test_engine_falls_back_to_ar_when_drafts_are_rejected(tmp_path):
    path = write_orthrus(tmp_path / "noisy", "llama", seed=6, twin_noise=3.0)
    raw = json.loads((path / "config.json").read_text())
    prompts, params = [[1, 2, 3], [7, 8, 9, 10]], SamplingParams(max_tokens=60, ignore_eos=True)
    ar = LLM(str(path), block_size=1).generate(prompts, params)
    never = min(set(range(VOCAB)) - {t for o in ar for t in o.token_ids})
    auto = _always_rejected(LLM(str(path)), never)
    fixed = _always_rejected(LLM(str(path), block_size=raw["block_size"]), never)
    a, f = auto.generate(prompts, params), fixed.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in f] == [o.token_ids for o in ar]  # lossless
    assert sum(o.accepted_tokens for o in a + f) == 0  # every draft rejected
    assert sum(o.drafted_tokens for o in a) < 0.25 * sum(o.drafted_tokens for o in f)
    assert sum(o.forward_passes for o in a) < sum(o.forward_passes for o in f)


def test_request_block_size_overrides_the_policy(tmp_path):
    llm = LLM(str(_always_accepting(tmp_path)))
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=12, ignore_eos=True, block_size=1))[0]
    assert out.drafted_tokens == 0


@pytest.mark.parametrize("value", ["fast", 0, -2, 2.5, True])
def test_bad_block_size_names_the_field(tmp_path, value):
    with pytest.raises(OrthrusInputError, match="block_size"):
        LLM(str(write_base(tmp_path / "b", "llama", seed=1)), block_size=value)


def test_start_up_timing_fits_a_short_window(tmp_path):
    """The forward-time ladder never runs past the model window (nor the KV cache)."""
    llm = LLM(str(write_base(tmp_path / "b", "llama", seed=2)), max_model_len=40, num_pages=4, page_size=16)
    assert llm.core.policy is not None and max(llm.core.policy.times.ns) <= 40
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))[0].completion_tokens == 8
