"""Everything a request holds comes back (docs/ARCHITECTURE.md §3): after finishing, aborting, stopping and
preemption every KV page is free again. Stops inside an accepted Orthrus block end the output at the
first stop, never past it (docs/ARCHITECTURE.md §1, known traps)."""

import pytest
import torch
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.prefix_hash import page_hashes

VOCAB = 96
K = 8


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", seed=11, twin_noise=0.05)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return hf_model(model_dir, "llama")


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def all_free(llm_or_engine) -> bool:
    eng = getattr(llm_or_engine, "core", llm_or_engine)
    return not eng.has_unfinished() and eng.pages.num_free == eng.pages.num_pages


def install_oracle_drafter(monkeypatch, engine, continuations: dict[tuple, list[int]]) -> None:
    """Replace the diffusion draft with one that proposes the oracle continuation, so every draft is
    accepted under greedy decoding: each step commits a whole block of K tokens."""
    vocab = engine.vocab_size

    def draft(seqs, ks):
        rows = []
        for seq, k in zip(seqs, ks):
            cont = continuations[tuple(seq.token_ids[: seq.prompt_tokens])]
            done = seq.completion_tokens
            for i in range(k - 1):
                rows.append(cont[done + i] if done + i < len(cont) else 0)
        logits = torch.full((len(rows), vocab), -10.0)
        logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 10.0
        return logits

    monkeypatch.setattr(engine.runner, "draft", draft)


def first_inside_block(seq: list[int], start: int) -> int:
    """An index j >= start whose token appears nowhere before it and that is not the last slot of a
    K-block (so tokens after it in the same accepted block exist and must be dropped)."""
    for j in range(start, len(seq)):
        if seq[j] not in seq[:j] and j % K != K - 1:
            return j
    raise AssertionError("no suitable stop position in the oracle output")


# -- finish, abort -----------------------------------------------------------------------------


def test_pages_free_after_finish(model_dir, oracle):
    """A batch of greedy requests of different lengths matches the oracle and frees every page."""
    llm = LLM(model=str(model_dir), block_size=K, num_pages=64)
    prompts = [tokens(5 + 7 * i, i) for i in range(6)]
    params = [SamplingParams(max_tokens=3 + 5 * i) for i in range(6)]
    outs = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == hf_greedy(oracle, p, sp.max_tokens)
        assert o.finish_reason == "length"
    assert all_free(llm)


def test_abort_mid_generation_frees_pages(model_dir, oracle):
    """Aborting a decoding and a waiting request returns their pages; the others finish correctly
    and the engine keeps serving."""
    llm = LLM(model=str(model_dir), block_size=K, num_pages=64, max_num_seqs=3)
    eng = llm.core
    prompts = {f"r{i}": tokens(10 + 7 * i, 20 + i) for i in range(5)}
    produced = {rid: [] for rid in prompts}
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=40))

    def step():
        for d in eng.step():
            produced[d.request_id] += d.token_ids

    while not (produced["r0"] and produced["r1"]):
        step()
    assert 0 < len(produced["r0"]) < 40
    assert eng.stats()["num_waiting"] == 2  # max_num_seqs=3
    for rid in ("r0", "r4"):  # one decoding, one waiting
        out = eng.abort_request(rid)
        assert out.finished and out.finish_reason == "abort"
    assert eng.abort_request("r0") is None  # already gone
    assert eng.abort_request("nope") is None
    while eng.has_unfinished():
        step()
    for rid in ("r1", "r2", "r3"):
        assert produced[rid] == hf_greedy(oracle, prompts[rid], 40)
    assert all_free(eng)
    p = tokens(12, 99)
    assert llm.generate(p, SamplingParams(max_tokens=10))[0].token_ids == hf_greedy(oracle, p, 10)
    assert all_free(eng)


def test_abort_during_chunked_prefill(model_dir):
    """A long prompt aborted between its prefill chunks returns all pages."""
    llm = LLM(model=str(model_dir), block_size=K, num_pages=64, max_num_batched_tokens=16)
    eng = llm.core
    eng.add_request("long", tokens(100, 5), SamplingParams(max_tokens=5))
    eng.step()
    seq = eng.seqs["long"]
    assert seq.in_prefill and seq.num_cached > 0 and eng.pages.num_free < eng.pages.num_pages
    assert eng.abort_request("long").finish_reason == "abort"
    assert all_free(eng)


def test_request_id_reusable_after_finish_and_abort(model_dir):
    llm = LLM(model=str(model_dir), block_size=K, num_pages=64)
    eng = llm.core
    eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=30))
    eng.step()
    eng.abort_request("x")
    eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=4))
    while eng.has_unfinished():
        eng.step()
    eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=4))
    while eng.has_unfinished():
        eng.step()
    assert all_free(eng)


# -- preemption --------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_cache", [True, False], ids=["prefix_cache", "no_prefix_cache"])
def test_preemption_under_a_tiny_pool_keeps_outputs_and_frees_pages(model_dir, oracle, enable_prefix_cache):
    """8 concurrent requests on an 8-page pool force preemption; greedy outputs still equal the
    oracle and every page is free at the end."""
    llm = LLM(model=str(model_dir), block_size=K, num_pages=8, enable_prefix_cache=enable_prefix_cache)
    prompts = [tokens(18 + i, 40 + i) for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40))
    assert llm.core.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(oracle, p, 40)
        assert o.finish_reason == "length"
    assert all_free(llm)


def test_preempted_sampled_requests_match_unpressured_engine(model_dir):
    """Seeded sampling is unaffected by preemption (recompute restores the same state)."""
    prompts = [tokens(20, 60 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=500 + i) for i in range(6)]
    tight = LLM(model=str(model_dir), block_size=K, num_pages=7)
    roomy = LLM(model=str(model_dir), block_size=K, num_pages=128)
    got = tight.generate(prompts, params)
    assert tight.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy.generate(prompts, params)]
    assert all_free(tight)


# -- stops inside an accepted block ------------------------------------------------------------


def test_stop_token_inside_accepted_block(model_dir, oracle, monkeypatch):
    """With every draft accepted, a stop token in the middle of a block ends the output there: the
    stop token is the last token, nothing after it is emitted, only pages of kept tokens are cached
    (`stored` events), and the pages are free."""
    prompt = tokens(9, 87)  # a greedy continuation that does not cycle at once
    ref = hf_greedy(oracle, prompt, 40)
    full_llm = LLM(model=str(model_dir), block_size=K, num_pages=64)
    install_oracle_drafter(monkeypatch, full_llm.core, {tuple(prompt): ref})
    full = full_llm.generate(prompt, SamplingParams(max_tokens=40))[0]
    assert full.token_ids == ref
    assert full.accepted_tokens == full.drafted_tokens > 0  # the drafter works: whole blocks

    llm = LLM(model=str(model_dir), block_size=K, num_pages=64)
    eng = llm.core
    install_oracle_drafter(monkeypatch, eng, {tuple(prompt): ref})
    # In the third block; the dropped rest of that block would complete page 1 (positions 16..31).
    j = first_inside_block(ref, 2 * K + 1)
    assert len(prompt) + j < 32 <= len(prompt) - 1 + 3 * K
    out = llm.generate(prompt, SamplingParams(max_tokens=40, stop_token_ids=[ref[j]]))[0]
    assert out.token_ids == ref[: j + 1]
    assert out.finish_reason == "stop"
    assert out.completion_tokens == j + 1
    assert all_free(llm)
    kept = prompt + out.token_ids
    stored = [h for kind, hs in eng.drain_prefix_events() if kind == "stored" for h in hs]
    assert stored == page_hashes(kept[:-1], 16, eng.fingerprint)  # page 0 only
    # A follow-up that reuses the cached pages is exact.
    monkeypatch.undo()
    follow = kept + [1, 2, 3]
    res = llm.generate(follow, SamplingParams(max_tokens=8))[0]
    assert res.cached_prompt_tokens == 16
    assert res.token_ids == hf_greedy(oracle, follow, 8)


def test_eos_inside_accepted_block_and_ignore_eos(tmp_path, oracle, monkeypatch):
    """The model's EOS inside an accepted block stops there; ignore_eos decodes past it."""
    prompt = tokens(9, 72)
    ref = hf_greedy(oracle, prompt, 40)
    j = first_inside_block(ref, K + 1)
    # Same seed, same weights (the module's model); only the config's EOS differs.
    d = write_orthrus(tmp_path / "eos", "llama", seed=11, twin_noise=0.05, eos_token_id=ref[j])
    llm = LLM(model=str(d), block_size=K, num_pages=64)
    install_oracle_drafter(monkeypatch, llm.core, {tuple(prompt): ref})
    out = llm.generate(prompt, SamplingParams(max_tokens=40))[0]
    assert out.token_ids == ref[: j + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"
    assert all_free(llm)


def test_stop_token_with_real_drafts_and_sampling(model_dir):
    """With real drafts (sampled, K=8), a stop token is always the last token and appears once."""
    llm = LLM(model=str(model_dir), block_size=K, num_pages=256)
    stop = 7
    params = [SamplingParams(max_tokens=30, temperature=1.0, seed=i, stop_token_ids=[stop]) for i in range(40)]
    outs = llm.generate([tokens(6, 80 + i) for i in range(40)], params)
    stopped = 0
    for o in outs:
        if o.finish_reason == "stop":
            stopped += 1
            assert o.token_ids[-1] == stop and stop not in o.token_ids[:-1]
        else:
            assert o.finish_reason == "length" and len(o.token_ids) == 30 and stop not in o.token_ids
    assert 0 < stopped < 40
    assert sum(o.accepted_tokens for o in outs) > 0
    assert all_free(llm)


# -- stop strings (built-in model with a real tokenizer) ---------------------------------------


@pytest.fixture(scope="module")
def builtin_llm(builtin_dir):
    return LLM(model=str(builtin_dir), block_size=K, num_pages=64)


@pytest.fixture(scope="module")
def builtin_ref(builtin_llm):
    """AR greedy reference on the built-in model: tokens and text."""
    prompt = "Once upon a time"
    out = builtin_llm.generate(prompt, SamplingParams(max_tokens=40, use_diffusion=False, ignore_eos=True))[0]
    return prompt, out.token_ids, out.text


def stop_cases(tok, ids: list[int], text: str) -> dict[str, list[str]]:
    """Stop strings inside the reference text: a span crossing a token boundary in the 2nd block, a
    word in the 3rd block, and two stops of which the second listed occurs first."""
    ends = [len(tok.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    b = ends[K + 3]  # end of token 11: inside the second accepted block
    span = text[b - 2 : b + 3]
    word_at = ends[2 * K + 2]
    word = text[word_at : word_at + 6]
    assert text.find(span) == b - 2 and text.find(word) == word_at, "pick other stop strings"
    return {"span": [span], "word": [word], "two": [word, span]}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["span", "word", "two"])
def test_stop_string_inside_accepted_block(builtin_llm, builtin_ref, monkeypatch, case):
    """A stop string completed inside an accepted block: the text ends right before it, the tokens
    end with the token that completed it, streamed deltas never show it, pages are freed."""
    prompt, ids, text = builtin_ref
    eng = builtin_llm.core
    stops = stop_cases(eng.tokenizer, ids, text)[case]
    install_oracle_drafter(monkeypatch, eng, {tuple(eng.tokenize(prompt)): ids})
    eng.add_request("s", prompt, SamplingParams(max_tokens=40, stop=stops, ignore_eos=True))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    out_text = "".join(d.text for d in deltas)
    out_ids = [t for d in deltas for t in d.token_ids]
    cut = min(text.find(s) for s in stops)
    assert deltas[-1].finish_reason == "stop"
    assert out_text == text[:cut]
    assert not any(s in out_text for s in stops)
    # The last token is the one that completed the stop string; nothing after it.
    j = next(i for i in range(len(ids)) if any(s in eng.tokenizer.decode(ids[: i + 1]) for s in stops))
    assert out_ids == ids[: j + 1]
    assert deltas[-1].accepted_tokens > 0
    assert all_free(eng)
