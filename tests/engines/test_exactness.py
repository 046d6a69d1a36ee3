"""Lossless decoding (docs/ARCHITECTURE.md §1): greedy Orthrus output is token-identical to HF transformers
greedy `generate` of the same base weights in fp32, whatever K, the batch, the arrival order, the
page pool and the diffusion weights are.

Tiny random checkpoints; every model is written once per module and every HF oracle answer is
memoised, so the whole file stays fast.
"""

import random

import pytest
import torch
from safetensors.torch import load_file
from support.tiny_models import hf_greedy, hf_model, write_base, write_orthrus

from orthrus_engines import LLM, EngineCore, SamplingParams

FAMILIES = ["qwen3", "llama"]
VOCAB = 96  # tiny_config's vocabulary; the Orthrus mask token is VOCAB - 1
MAX_NEW = 16  # the oracle's horizon; greedy continuations are prefixes of one another


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB - 1) for _ in range(n)] for n in lengths]


# Lengths cover a 1-token prompt (nothing to prefill), page edges (16, 17, 33 with 16-token pages)
# and the longest prompt the brief asks for (40).
PROMPTS = _prompts(0, [1, 40, 7, 16, 17, 3, 33, 24])
# Per-request max_tokens: most run to the horizon, some stop inside a block (K is clamped to the
# tokens a request may still emit), one emits a single token.
MAX_TOKENS = [MAX_NEW, MAX_NEW, 5, MAX_NEW, 11, 1, MAX_NEW, 9]


class Zoo:
    """Checkpoints written on first use (once per module) and their memoised HF greedy oracle."""

    def __init__(self, root):
        self.root = root
        self.paths: dict[tuple, object] = {}
        self.hf: dict[tuple, object] = {}
        self.memo: dict[tuple, list[int]] = {}

    def path(self, kind: str, family: str, tie: bool = False):
        key = (kind, family, tie)
        if key not in self.paths:
            d = self.root / f"{kind}-{family}-{'tied' if tie else 'untied'}"
            if kind.startswith("orthrus-"):  # same weights as "orthrus", another anchor view ("orthrus-ar")
                self.paths[key] = write_orthrus(d, family, seed=3 if tie else 0, tie=tie, anchor_view=kind[8:])
            else:
                writer = write_orthrus if kind == "orthrus" else write_base
                self.paths[key] = writer(d, family, seed=3 if tie else 0, tie=tie)
        return self.paths[key]

    def oracle(self, kind: str, family: str, prompt: list[int], n: int, tie: bool = False) -> list[int]:
        assert n <= MAX_NEW
        key = (kind, family, tie)
        if key not in self.hf:
            self.hf[key] = hf_model(self.path(kind, family, tie), family)
        mkey = key + (tuple(prompt),)
        if mkey not in self.memo:
            self.memo[mkey] = hf_greedy(self.hf[key], prompt, MAX_NEW)
        return self.memo[mkey][:n]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("exactness"))


def _params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def _assert_exact(outs, prompts, max_tokens, expect):
    """Compare each output with `expect(prompt, n)` and say where the first mismatch is."""
    assert len(outs) == len(prompts)
    for i, (out, prompt, n) in enumerate(zip(outs, prompts, max_tokens)):
        want = expect(prompt, n)
        got = list(out.token_ids)
        if got != want:
            at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            pytest.fail(f"request {i} (prompt of {len(prompt)} tokens): first mismatch at output token {at}\n"
                        f"  engine: {got}\n  HF:     {want}")
        assert out.finish_reason == "length", (i, out.finish_reason)
        assert out.completion_tokens == n


def _assert_drained(engine: EngineCore):
    assert not engine.has_unfinished()
    assert engine.pages.num_free == engine.pages.num_pages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2, 8, 32])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_greedy_matches_hf(zoo, family, k, batch):
    """A batch of prompts of different lengths decodes exactly like HF greedy, for every K."""
    prompts, max_tokens = PROMPTS[:batch], MAX_TOKENS[:batch]
    llm = LLM(str(zoo.path("orthrus", family)), block_size=k, num_pages=64)
    outs = llm.generate(prompts, [_params(n) for n in max_tokens])
    _assert_exact(outs, prompts, max_tokens, lambda p, n: zoo.oracle("orthrus", family, p, n))
    drafted = sum(o.drafted_tokens for o in outs)
    accepted = sum(o.accepted_tokens for o in outs)
    if k == 1:
        assert drafted == accepted == 0, "K = 1 is plain AR decoding: nothing is drafted"
    else:
        assert drafted > 0, "K > 1 must draft (otherwise this test only checks AR decoding)"
        assert accepted <= drafted
    if batch == 8 and k > 1:  # both the accept and the reject path ran in this batch
        assert 0 < accepted < drafted, (accepted, drafted)
    _assert_drained(llm.core)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("view", ["ar", "causal"])
def test_anchor_views_match_hf(zoo, family, k, view):
    """A model whose draft anchors use the AR projections (`anchor_view: "ar"`), or are computed
    exactly as the AR view computes them ("causal"), is as lossless (test_training_views checks
    that its drafts are what training taught). With "causal" the first draft is the AR's own next
    token, so it is accepted in every cycle."""
    llm = LLM(str(zoo.path(f"orthrus-{view}", family)), block_size=k, num_pages=64)
    assert llm.core.runner.anchor_ar and llm.core.runner.anchor_causal == (view == "causal")
    outs = llm.generate(PROMPTS, [_params(n) for n in MAX_TOKENS])
    _assert_exact(outs, PROMPTS, MAX_TOKENS, lambda p, n: zoo.oracle("orthrus", family, p, n))
    accepted, drafted = sum(o.accepted_tokens for o in outs), sum(o.drafted_tokens for o in outs)
    assert 0 < accepted < drafted or (view == "causal" and k == 2 and accepted == drafted)
    _, drafted, accepted = llm.core.acceptance.snapshot()
    assert (accepted[0] == drafted[0]) == (view == "causal"), (accepted, drafted)
    _assert_drained(llm.core)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 8])
def test_requests_arriving_while_others_run(zoo, family, k):
    """Requests added between steps (while earlier ones are mid-decode, with per-request K and
    plain AR among them) still decode exactly; every request finishes once, pages all come back."""
    engine: EngineCore = LLM(str(zoo.path("orthrus", family)), block_size=k, num_pages=64).core
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    expected: dict[str, tuple[list[int], int]] = {}

    def add(i: int, **kw):
        rid = f"r{i}"
        engine.add_request(rid, PROMPTS[i], _params(MAX_TOKENS[i], **kw))
        expected[rid] = (PROMPTS[i], MAX_TOKENS[i])

    def step():
        for d in engine.step():
            assert d.request_id not in finished, f"{d.request_id} produced output after finishing"
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                finished[d.request_id] = d.finish_reason

    for i in (1, 0, 3):
        add(i)
    for _ in range(3):
        step()
    running = [engine.seqs[r] for r in ("r0", "r1", "r3") if r in engine.seqs]
    assert any(s.completion_tokens > 0 for s in running), "the first wave should be mid-decode"
    add(2)
    add(6, block_size=32)
    add(4, use_diffusion=False)
    for _ in range(2):
        step()
    add(7, block_size=3)
    add(5)
    while engine.has_unfinished():
        step()

    assert set(finished) == set(expected)
    assert all(r == "length" for r in finished.values()), finished
    for rid, (prompt, n) in expected.items():
        want = zoo.oracle("orthrus", family, prompt, n)
        assert tokens[rid] == want, f"{rid}: engine {tokens[rid]} != HF {want}"
    _assert_drained(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_independent_of_batch_composition(zoo, family):
    """A prompt decodes to the same tokens alone, inside a batch of 8, in a reordered batch and in a
    batch mixing K per request (1 .. 32) in one step."""
    path = str(zoo.path("orthrus", family))
    llm = LLM(path, block_size=8, num_pages=64)
    params = [_params(MAX_NEW)] * len(PROMPTS)
    alone = {i: llm.generate([PROMPTS[i]], params[:1])[0].token_ids for i in (1, 3, 5)}
    batched = llm.generate(PROMPTS, params)
    order = list(reversed(range(len(PROMPTS))))
    reordered = llm.generate([PROMPTS[i] for i in order], params)
    mixed_ks = [1, 2, 3, 8, 32, 5, 1, 16]
    mixed = llm.generate(PROMPTS, [_params(MAX_NEW, block_size=k) for k in mixed_ks])

    for i, toks in alone.items():
        assert batched[i].token_ids == toks, f"prompt {i}: batch of 8 differs from alone"
    for pos, i in enumerate(order):
        assert reordered[pos].token_ids == batched[i].token_ids, f"prompt {i}: reordered batch differs"
    expect = lambda p, n: zoo.oracle("orthrus", family, p, n)  # noqa: E731
    _assert_exact(batched, PROMPTS, [MAX_NEW] * len(PROMPTS), expect)
    _assert_exact(mixed, PROMPTS, [MAX_NEW] * len(PROMPTS), expect)
    assert all(o.drafted_tokens == 0 for o, k in zip(mixed, mixed_ks) if k == 1)
    assert all(o.drafted_tokens > 0 for o, k in zip(mixed, mixed_ks) if k > 1)
    _assert_drained(llm.core)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(zoo, family, tie):
    """The LM head is the embedding matrix exactly when the config ties them; decoding is exact."""
    path = zoo.path("orthrus", family, tie=tie)
    llm = LLM(str(path), block_size=8, num_pages=64)
    model = llm.core.runner.model
    embed, head = model.embed_tokens.weight, model.lm_head.weight
    if tie:
        assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
        assert head.data_ptr() == embed.data_ptr()
    else:
        stored = load_file(str(path / "model.safetensors"))["lm_head.weight"]
        torch.testing.assert_close(head.detach().cpu(), stored, rtol=0, atol=0)
        assert not torch.equal(head, embed)
    prompts, max_tokens = PROMPTS[:4], [MAX_NEW] * 4
    outs = llm.generate(prompts, [_params(n) for n in max_tokens])
    _assert_exact(outs, prompts, max_tokens, lambda p, n: zoo.oracle("orthrus", family, p, n, tie=tie))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 8])
def test_plain_base_checkpoint(zoo, family, k):
    """A plain HF checkpoint (no *_diff tensors): twins are copies of the AR view; decoding is exact."""
    llm = LLM(str(zoo.path("base", family)), block_size=k, num_pages=64)
    for layer in llm.core.runner.model.layers:
        ar, diff = layer.self_attn.ar.state_dict(), layer.self_attn.diff.state_dict()
        assert ar.keys() == diff.keys()
        assert all(torch.equal(ar[n], diff[n]) for n in ar)
    prompts, max_tokens = PROMPTS[:4], MAX_TOKENS[:4]
    outs = llm.generate(prompts, [_params(n) for n in max_tokens])
    _assert_exact(outs, prompts, max_tokens, lambda p, n: zoo.oracle("base", family, p, n))
    if k > 1:
        assert sum(o.drafted_tokens for o in outs) > 0


def _run_bounded(engine: EngineCore, max_steps: int = 400) -> dict[str, list[int]]:
    """Step the engine to completion, failing (instead of hanging) if it stops making progress."""
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
    s = engine.scheduler
    pytest.fail(f"engine made no progress in {max_steps} steps: running "
                f"{[(q.request_id, q.num_cached, len(q.page_table)) for q in s.running]}, waiting "
                f"{[(q.request_id, q.num_cached, len(q.page_table)) for q in s.waiting]}, "
                f"free pages {engine.pages.num_free}/{engine.pages.num_pages}, preemptions {s.num_preemptions}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 8])
def test_exact_under_preemption(zoo, family, k):
    """A page pool too small for the whole batch forces preemption by recompute; still exact."""
    engine = LLM(str(zoo.path("orthrus", family)), block_size=k, num_pages=20, page_size=4).core
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, _params(MAX_NEW))
    tokens = _run_bounded(engine)
    for i, p in enumerate(PROMPTS):
        assert tokens[f"r{i}"] == zoo.oracle("orthrus", family, p, MAX_NEW), f"request {i}"
    assert engine.stats()["num_preemptions"] > 0, "the pool was meant to be too small"
    _assert_drained(engine)


def test_no_livelock_when_waiting_request_holds_prefix_pages(zoo):
    """A request waiting behind a preempted one must not keep prefix-hit pages the preempted one
    needs: the engine has to drain (here: 5 pages; `a` needs all 5 by its end, `b` waits holding
    the 2 cached pages of its prompt), with exact output."""
    engine = LLM(str(zoo.path("orthrus", "qwen3")), block_size=1, num_pages=5).core
    shared = PROMPTS[6]  # 33 tokens: two full pages
    engine.add_request("warm", shared, _params(1))  # leaves the 2 pages cached (and free)
    _run_bounded(engine)
    long = PROMPTS[1]  # 40 tokens + 40 new = 80 positions = the whole pool
    engine.add_request("a", long, SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("b", shared, _params(8))
    tokens = _run_bounded(engine, max_steps=300)
    assert tokens["b"] == zoo.oracle("orthrus", "qwen3", shared, 8)
    assert tokens["a"][:MAX_NEW] == zoo.oracle("orthrus", "qwen3", long, MAX_NEW) and len(tokens["a"]) == 40
    _assert_drained(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_with_prefix_cache_hits(zoo, family):
    """Prompts that reuse cached prefix pages (a repeat, and a shared 32-token prefix with a new
    tail) decode exactly like HF."""
    llm = LLM(str(zoo.path("orthrus", family)), block_size=8, num_pages=64)
    long = PROMPTS[1]  # 40 tokens
    first = llm.generate([long], [_params(MAX_NEW)])
    branch = long[:32] + _prompts(7, [5])[0]
    prompts = [long, branch, PROMPTS[2]]
    outs = llm.generate(prompts, [_params(MAX_NEW)] * 3)
    assert first[0].cached_prompt_tokens == 0
    assert outs[0].cached_prompt_tokens >= 32 and outs[1].cached_prompt_tokens == 32
    _assert_exact(first + outs, [long] + prompts, [MAX_NEW] * 4, lambda p, n: zoo.oracle("orthrus", family, p, n))
    _assert_drained(llm.core)


# -- the built-in model -----------------------------------------------------------------------
BUILTIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
BUILTIN_NEW = 32


@pytest.fixture(scope="module")
def builtin_oracle(builtin_dir):
    """HF greedy continuations of the built-in model (fp32), EOS disabled so lengths match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_dir))
    model = AutoModelForCausalLM.from_pretrained(str(builtin_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = {}
    with torch.no_grad():
        for text in BUILTIN_PROMPTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=BUILTIN_NEW,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
            out[text] = (ids[0].tolist(), gen[0, ids.shape[1]:].tolist())
            assert len(out[text][1]) == BUILTIN_NEW
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [8, 1])
def test_builtin_model_matches_hf(builtin_dir, builtin_oracle, k):
    """The built-in SmolLM2 model: 3 text prompts, 32 greedy tokens, identical to HF generate."""
    llm = LLM(str(builtin_dir), block_size=k, num_pages=64)
    outs = llm.generate(BUILTIN_PROMPTS, _params(BUILTIN_NEW))
    for text, out in zip(BUILTIN_PROMPTS, outs):
        prompt_ids, want = builtin_oracle[text]
        assert llm.core.tokenize(text) == prompt_ids
        assert out.prompt_tokens == len(prompt_ids)
        assert out.token_ids == want, f"{text!r}:\n  engine {out.token_ids}\n  HF     {want}"
        assert out.finish_reason == "length"
    if k > 1:
        assert sum(o.drafted_tokens for o in outs) > 0
