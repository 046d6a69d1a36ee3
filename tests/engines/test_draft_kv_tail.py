"""`draft_kv: "tail"` (Issue 21, TensorRT-LLM's one-model draft contract): the two-pass cycle's draft
block writes its K/V into the uncommitted tail slots and reads them back from the cache; the verify
pass overwrites them. Output, counters and the committed cache are those of the transient draft and
of HF greedy; the tail slots really are written by the draft pass."""

import os
import random

import pytest
import torch
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine.kv_bookkeeping import rewind_kv_lens
from orthrus_engines.errors import OrthrusInputError


if not torch.cuda.is_available():  # before Triton is first imported (orthrus_kernels imports it lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 96
MAX_NEW = 12
# ragged: a 1-token prompt (nothing to prefill), page edges with 16-token pages, a long one
PROMPTS = [[random.Random(n).randrange(VOCAB - 1) for _ in range(n)] for n in (1, 40, 7, 17, 3)]
# the default anchor view (a plain bidirectional block) and the causal anchor run in the two-pass cycle
VIEWS = {"plain": ("llama", None), "causal": ("qwen3", "causal")}


class Models:
    """Checkpoints written on first use and their memoised HF greedy continuations."""

    def __init__(self, root):
        self.root, self.paths, self.hf, self.memo = root, {}, {}, {}

    def path(self, view: str) -> str:
        if view not in self.paths:
            family, anchor_view = VIEWS[view]
            self.paths[view] = str(write_orthrus(self.root / view, family, seed=2, anchor_view=anchor_view))
        return self.paths[view]

    def oracle(self, view: str, prompt: list[int], n: int) -> list[int]:
        if view not in self.hf:
            self.hf[view] = hf_model(self.path(view), VIEWS[view][0])
        key = (view, tuple(prompt))
        if key not in self.memo:
            self.memo[key] = hf_greedy(self.hf[view], prompt, MAX_NEW)
        return self.memo[key][:n]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("draft_kv"))


def _params(n: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _engine(models, view: str, draft_kv: str, k: int, **kw):
    llm = LLM(models.path(view), block_size=k, fused_cycle=False, draft_kv=draft_kv, **({"num_pages": 64} | kw))
    assert llm.core.orthrus_step.draft_writes_tail == (draft_kv == "tail")
    assert not llm.core.fused
    return llm


def _run(llm, prompts, max_tokens) -> list[tuple[list[int], dict]]:
    outs = llm.generate(prompts, [_params(n) for n in max_tokens])
    return [(list(o.token_ids), o.counters()) for o in outs]


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("view", list(VIEWS))
def test_tail_matches_transient_and_hf(models, view, k):
    """Ragged batch, K = 2..8, a request stopping inside a block: the same tokens, forward passes,
    drafted and accepted counts with the draft block in the tail slots as with it transient, and HF's."""
    max_tokens = [MAX_NEW, MAX_NEW, 5, MAX_NEW, 1]
    tail = _run(_engine(models, view, "tail", k), PROMPTS, max_tokens)
    transient = _run(_engine(models, view, "transient", k), PROMPTS, max_tokens)
    assert tail == transient
    for (tokens, _), prompt, n in zip(tail, PROMPTS, max_tokens):
        assert tokens == models.oracle(view, prompt, n)
    assert sum(c["drafted_tokens"] for _, c in tail) > 0


@pytest.mark.parametrize("view", list(VIEWS))
def test_tail_with_a_prefix_cache_hit(models, view):
    """A second request sharing a 16-token page with the first starts from the cached page and writes
    its draft blocks only past it; same output and counters as transient, and HF's."""
    first = PROMPTS[1][:20]
    second = first[:16] + [5, 9, 11]
    results = {}
    for draft_kv in ("tail", "transient"):
        llm = _engine(models, view, draft_kv, 4)
        results[draft_kv] = _run(llm, [first], [MAX_NEW]) + _run(llm, [second], [MAX_NEW])
        assert results[draft_kv][1][1]["cached_prompt_tokens"] == 16
    assert results["tail"] == results["transient"]
    assert [t for t, _ in results["tail"]] == [models.oracle(view, p, MAX_NEW) for p in (first, second)]


def test_tail_under_preemption(models):
    """A page pool too small for the batch: preemption by recompute, the same output and counters."""
    runs = {}
    for draft_kv in ("tail", "transient"):
        llm = _engine(models, "plain", draft_kv, 8, num_pages=16, page_size=4)
        runs[draft_kv] = _run(llm, PROMPTS, [MAX_NEW] * len(PROMPTS))
        assert llm.core.stats()["num_preemptions"] > 0, "the pool was meant to be too small"
        assert llm.core.pages.num_free == llm.core.pages.num_pages
    assert runs["tail"] == runs["transient"]
    assert [t for t, _ in runs["tail"]] == [models.oracle("plain", p, MAX_NEW) for p in PROMPTS]


def _slots(seq, positions: range, page_size: int) -> list[int]:
    return [seq.page_table[p // page_size] * page_size + p % page_size for p in positions]


@pytest.mark.parametrize("view", list(VIEWS))
def test_draft_writes_the_tail_and_verify_overwrites_it(models, view, monkeypatch):
    """One decode step, K = 4: after the draft pass the tail slots (positions num_cached ..
    num_cached + 3) hold the draft block's K/V in "tail" mode (untouched when transient); after the
    verify pass every slot up to num_cached + 3 equals the transient run's, and the committed length
    is the rewound kv length."""
    k, prompt = 4, PROMPTS[3]
    seen = {}
    for draft_kv in ("tail", "transient"):
        engine = _engine(models, view, draft_kv, k).core
        for kc, vc in engine.runner.kv_cache:  # a known starting content for the slots nobody wrote yet
            kc.zero_(), vc.zero_()
        engine.add_request("r", prompt, _params())
        seq = engine.seqs["r"]
        while seq.in_prefill:
            engine.step()
        n0 = seq.num_cached
        tail = _slots(seq, range(n0, n0 + k), engine.page_size)  # the pages are already there for K positions
        before = [(kc[tail].clone(), vc[tail].clone()) for kc, vc in engine.runner.kv_cache]
        after_draft = []
        verify = engine.runner.verify

        def spy(seqs, blocks, verify=verify, tail=tail, engine=engine, after_draft=after_draft):
            after_draft.extend((kc[tail].clone(), vc[tail].clone()) for kc, vc in engine.runner.kv_cache)
            return verify(seqs, blocks)

        monkeypatch.setattr(engine.runner, "verify", spy)
        (out,) = engine.step()
        changed = [not torch.equal(b[0], a[0]) and not torch.equal(b[1], a[1]) for b, a in zip(before, after_draft)]
        assert all(changed) if draft_kv == "tail" else not any(changed), (draft_kv, changed)
        new = len(out.token_ids)
        assert seq.num_cached == rewind_kv_lens([n0 + k], [k], [new])[0]
        slots = _slots(seq, range(n0 + k), engine.page_size)
        seen[draft_kv] = ([(kc[slots].clone(), vc[slots].clone()) for kc, vc in engine.runner.kv_cache], out.token_ids)
    assert seen["tail"][1] == seen["transient"][1]
    for (kt, vt), (kr, vr) in zip(seen["tail"][0], seen["transient"][0]):
        assert torch.equal(kt, kr) and torch.equal(vt, vr)


def test_tail_with_the_triton_backend(models):
    """The Triton kernels (Triton's interpreter on CPU) run the written draft block too: the same tokens
    and counters as the torch backend's transient draft, and HF's."""
    pytest.importorskip("triton")
    prompts, new = [PROMPTS[2], PROMPTS[4]], [6, 4]
    outs = {}
    for backend, draft_kv in (("triton", "tail"), ("torch", "transient")):
        llm = _engine(models, "causal", draft_kv, 4, num_pages=32, page_size=4, attention_backend=backend)
        assert llm.core.runner.attention_backend == backend
        outs[backend] = _run(llm, prompts, new)
    assert outs["triton"] == outs["torch"]
    assert [t for t, _ in outs["triton"]] == [models.oracle("causal", p, n) for p, n in zip(prompts, new)]


def test_unknown_draft_kv_is_refused(models):
    with pytest.raises(OrthrusInputError) as e:
        LLM(models.path("plain"), block_size=4, num_pages=16, draft_kv="written")
    assert e.value.field == "draft_kv"


def test_tail_draft_refuses_a_block_without_pages(models):
    """The draft pass never writes past the sequence's pages (the scheduler gives them before the step;
    a runner called without them refuses, and the step would fall back to plain AR)."""
    from types import SimpleNamespace

    runner = _engine(models, "plain", "tail", 4, num_pages=8, page_size=4).core.runner
    seq = SimpleNamespace(request_id="r", token_ids=[1] * 8, num_cached=7, page_table=[0, 1], forward_passes=0)
    with pytest.raises(RuntimeError, match="position 10"):
        runner.draft([seq], [4], write_tail=True)
    seq.page_table = [0, 1, 2]  # positions 7..10 fit now
    assert runner.draft([seq], [4], write_tail=True).shape[0] == 3
