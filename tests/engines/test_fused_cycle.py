"""The verify+draft pass of causal-anchor heads (ModelRunner.verify_and_draft, EngineCore._decode_fused).

Its diffusion block after verify slot j must be exactly the two-pass draft block whose causal anchor
is the token at slot j (test_training_views ties that one to training), its AR rows exactly the
verify pass; the engine built on it stays lossless and takes one pass per cycle.
"""

import pytest
import torch
from single_pass import prefill_to_anchor
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.draft_policy import Plan

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def causal_model(request, tmp_path_factory):
    family = request.param
    return family, write_orthrus(tmp_path_factory.mktemp("fused") / family, family, seed=6, twin_noise=0.1,
                                 anchor_view="causal")


def _prefilled(eng, tag: str, prompts: list[list[int]], lookahead: int = 8) -> list:
    """Requests cached up to their anchor (the last prompt token), with pages for `lookahead` more."""
    seqs = [eng.add_request(f"{tag}{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(prompts)]
    prefill_to_anchor(eng, seqs, lookahead)
    return seqs


def _abort(eng, seqs) -> None:
    for s in seqs:
        eng.abort_request(s.request_id)


def test_verify_and_draft_equals_verify_and_the_drafts_it_replaces(causal_model):
    """A batch mixing plain AR rows (m = 0), short and long blocks: AR logits equal a verify pass;
    block j equals a two-pass draft anchored at slot j's token (rows 1.. of that draft)."""
    _, path = causal_model
    prompts = [list(range(1, 8)), [5, 9, 2], list(range(20, 32))]
    drafts = [[11, 12], [], [40, 41, 42]]
    ms = [3, 0, 4]
    eng = LLM(str(path), block_size=8, device="cpu", page_size=4).core
    seqs = _prefilled(eng, "r", prompts)
    blocks = [[p[-1]] + d for p, d in zip(prompts, drafts)]
    ar, mask_hidden = eng.runner.verify_and_draft(seqs, blocks, ms)
    assert ar.shape[0] == sum(len(b) for b in blocks) and mask_hidden.shape[0] == sum(len(b) * m for b, m in zip(blocks, ms))

    ref = LLM(str(path), block_size=8, device="cpu", page_size=4).core
    verified = _prefilled(ref, "v", prompts)
    torch.testing.assert_close(ar, ref.runner.verify(verified, blocks), **TOL)
    _abort(ref, verified)
    row, mrow = 0, 0
    for i, (p, block, m) in enumerate(zip(prompts, blocks, ms)):
        for j in range(len(block)):
            if m >= 2:  # rows 0..m-2 of block j are slots 1..m-1 of the draft anchored at slot j
                seq = _prefilled(ref, f"d{i}.{j}.", [p + block[1 : j + 1]])
                want = ref.runner.draft(seq, [m + 1])
                got = eng.runner.logits(mask_hidden, list(range(mrow + j * m, mrow + (j + 1) * m)))
                torch.testing.assert_close(got[: m - 1], want[1:], **TOL)
                torch.testing.assert_close(ar[row + j], want[0], **TOL)  # slot 0 of that draft is the AR row
                _abort(ref, seq)
        row, mrow = row + len(block), mrow + len(block) * m


def test_verify_and_draft_keeps_only_the_verified_kv(causal_model):
    """The pass writes the K/V of exactly its AR rows, as a verify pass would; the blocks stay transient."""
    _, path = causal_model
    prompt, block = list(range(3, 14)), [13, 7, 8]
    a = LLM(str(path), block_size=8, device="cpu", page_size=4, enable_prefix_cache=False).core
    b = LLM(str(path), block_size=8, device="cpu", page_size=4, enable_prefix_cache=False).core
    (sa,), (sb,) = _prefilled(a, "a", [prompt]), _prefilled(b, "b", [prompt])
    assert sa.page_table == sb.page_table
    before = [(k.clone(), v.clone()) for k, v in a.runner.kv_cache]
    a.runner.verify_and_draft([sa], [block], [5])
    b.runner.verify([sb], [block])
    p = len(prompt) - 1
    written = torch.tensor([sa.page_table[i // 4] * 4 + i % 4 for i in range(p, p + len(block))])
    kept = torch.ones(a.runner.kv_cache[0][0].shape[0], dtype=torch.bool)
    kept[written] = False
    for (ka, va), (kb, vb), (k0, v0) in zip(a.runner.kv_cache, b.runner.kv_cache, before):
        torch.testing.assert_close(ka[written], kb[written], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va[written], vb[written], rtol=1e-5, atol=1e-5)
        assert torch.equal(ka[kept], k0[kept]) and torch.equal(va[kept], v0[kept])


@pytest.mark.parametrize("k", [2, 3])
def test_fused_cycle_is_lossless_and_one_pass_per_cycle(causal_model, k):
    """Greedy output equals HF for a batch of different prompt lengths, and that of the two-pass
    cycle; every pass commits its accepted drafts plus one token (the prefill pass, the first token;
    the last pass may be cut at max_tokens: so output = accepted + passes, or one less)."""
    family, path = causal_model
    prompts = [list(range(1, 1 + n)) for n in (3, 9, 17, 30)]
    new = [12, 20, 7, 16]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in new]
    fused = LLM(str(path), block_size=k, num_pages=64)
    assert fused.core.fused
    outs = fused.generate(prompts, params)
    hf = hf_model(path, family)
    for p, n, o in zip(prompts, new, outs):
        assert list(o.token_ids) == hf_greedy(hf, p, n)
        assert o.completion_tokens - o.accepted_tokens in (o.forward_passes, o.forward_passes - 1)
    assert sum(o.drafted_tokens for o in outs) > 0
    two = LLM(str(path), block_size=k, num_pages=64, fused_cycle=False)
    assert not two.core.fused
    outs2 = two.generate(prompts, params)
    assert [o.token_ids for o in outs2] == [o.token_ids for o in outs]
    for eng in (fused.core, two.core):
        assert eng.pages.num_free == eng.pages.num_pages


def test_fused_cycle_takes_fewer_passes(tmp_path):
    """With drafts that are often right (a vocabulary of 8, so the random model's greedy text repeats
    itself), one verify+draft pass per cycle commits more tokens per pass than draft + verify."""
    path = write_orthrus(tmp_path / "small", "qwen3", seed=2, twin_noise=0.05, anchor_view="causal", vocab_size=8)
    prompts = [[1, 2, 3, 4, 5], [6, 5, 4], [2, 2, 2, 2], [3, 1, 4, 1, 5, 2, 6]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    fused = LLM(str(path), block_size=5).generate(prompts, params)
    two = LLM(str(path), block_size=5, fused_cycle=False).generate(prompts, params)
    assert [o.token_ids for o in fused] == [o.token_ids for o in two]
    accepted, drafted = sum(o.accepted_tokens for o in fused), sum(o.drafted_tokens for o in fused)
    assert 0 < accepted < drafted, (accepted, drafted)
    passes, passes2 = sum(o.forward_passes for o in fused), sum(o.forward_passes for o in two)
    assert passes < passes2, (passes, passes2)


def test_fused_cycle_exact_under_preemption_and_stops(causal_model):
    """A pool too small for the batch (preemption by recompute keeps the pending drafts), and a stop
    token inside an accepted block: still exact, nothing past the stop."""
    family, path = causal_model
    hf = hf_model(path, family)
    prompts = [list(range(1, 1 + n)) for n in (5, 14, 22, 9)]
    eng = LLM(str(path), block_size=6, num_pages=7).core
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=24, ignore_eos=True))
    got: dict[str, list[int]] = {}
    for _ in range(2000):
        if not eng.has_unfinished():
            break
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
    assert eng.stats()["num_preemptions"] > 0
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf, p, 24), i
    want = hf_greedy(hf, prompts[1], 24)
    stop = want[10]
    cut = want[: want.index(stop) + 1]
    out = LLM(str(path), block_size=6).generate([prompts[1]], SamplingParams(max_tokens=24, stop_token_ids=[stop], ignore_eos=True))[0]
    assert list(out.token_ids) == cut and out.finish_reason == "stop"


def test_drafts_carried_into_a_plain_step_are_still_verified(causal_model):
    """The policy drafts once (K = 3), then picks K = 1: that step still verifies the 2 carried drafts
    (a plain verify pass of 3 rows), so exploring always yields acceptance evidence."""
    family, path = causal_model
    llm = LLM(str(path), num_pages=64)
    picks = iter([Plan(3, fused=True)])
    llm.core.scheduler.policy = lambda batch: next(picks, Plan(1, fused=True))
    prompt = list(range(1, 10))
    out = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert list(out.token_ids) == hf_greedy(hf_model(path, family), prompt, 12)
    assert out.drafted_tokens == 2 and llm.core.fused_acceptance.cycles == 1
    assert out.forward_passes == 12 - out.accepted_tokens  # each pass, the prefill too: one token + accepted


@pytest.mark.parametrize("block_size", ["auto", 8])
def test_transient_rows_stay_within_one_block(causal_model, block_size):
    """docs/ARCHITECTURE.md §1: at most one block (the model's K = 8 rows) of transient K/V per sequence. The
    fused cycle caps K at 3 (3 verify rows x 2 transient rows each), whatever K is asked for."""
    _, path = causal_model
    llm = LLM(str(path), block_size=block_size, num_pages=64)
    assert llm.core.fused_k == 3 and llm.core.source.block_size == 8
    run, most = llm.core.runner.verify_and_draft, []

    def spy(seqs, blocks, ms):
        most.append(max(len(b) * m for b, m in zip(blocks, ms)))
        return run(seqs, blocks, ms)

    llm.core.runner.verify_and_draft = spy
    llm.core.scheduler.policy = lambda batch: Plan(8, fused=True)  # the policy asks for more than the cap
    llm.generate([list(range(1, 12)), [4, 5]], SamplingParams(max_tokens=20, ignore_eos=True, block_size=None))
    llm.generate([[7, 8, 9]], SamplingParams(max_tokens=20, ignore_eos=True, block_size=8))
    assert most and max(most) == 6


def test_switching_cycles_between_steps_stays_exact(causal_model):
    """The policy may pick plain AR, the two-pass cycle or the fused cycle at every step. Drafts a
    fused pass carried into a two-pass step are verified there (no draft pass for that sequence),
    and the output is still the base model's greedy output, alone and batched."""
    family, path = causal_model
    hf = hf_model(path, family)
    llm = LLM(str(path), num_pages=64)
    plans = [Plan(3, fused=True), Plan(4), Plan(8), Plan(2, fused=True), Plan(1), Plan(4), Plan(3, fused=True),
             Plan(3, fused=True), Plan(2)]
    steps = iter(range(10**6))
    llm.core.scheduler.policy = lambda batch: plans[next(steps) % len(plans)]
    prompts = [list(range(1, 10)), [5, 6, 7], list(range(20, 41))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == [hf_greedy(hf, p, 20) for p in prompts]
    assert llm.core.fused_acceptance.cycles > 0 and llm.core.acceptance.cycles > 0  # both cycles ran
    assert llm.core.pages.num_free == llm.core.pages.num_pages
