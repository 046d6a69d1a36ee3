"""Faults inside a step (EngineCore.step): one sequence's fault fails that request alone, a fault in the
draft path makes the step plain AR with unchanged output, a fault in the shared verify pass fails its
batch; the engine keeps serving and every page comes back in each case."""

import pytest
import torch
from support.tiny_models import write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.engine import orthrus_step

VOCAB = 96
PROMPTS = {"a": [5, 17, 33, 2, 9], "b": list(range(10, 31)), "c": [70, 1, 44, 8, 8, 3, 60, 12, 19]}
MAX_TOKENS = 14


@pytest.fixture(scope="module", params=["two_pass", "fused"])
def model(request, tmp_path_factory):
    """A tiny Orthrus checkpoint: with a diffusion-anchor head (draft pass + verify pass) or a
    causal-anchor one (one verify+draft pass per cycle)."""
    anchor = "causal" if request.param == "fused" else None
    return request.param, write_orthrus(tmp_path_factory.mktemp("faults") / request.param, "llama", seed=9,
                                        twin_noise=0.05, anchor_view=anchor)


def new_llm(model, block_size: int = 4) -> LLM:
    kind, path = model
    llm = LLM(model=str(path), block_size=block_size, num_pages=64)
    assert llm.core.fused == (kind == "fused")
    return llm


def params(sampled: bool) -> dict[str, SamplingParams]:
    """Greedy "a" and "c"; "b" greedy or sampled with a seed."""
    b = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=3) if sampled else None
    return {rid: (b if rid == "b" and b else SamplingParams(max_tokens=MAX_TOKENS)) for rid in PROMPTS}


def run(llm: LLM, ps: dict[str, SamplingParams], setup=lambda eng: None) -> dict[str, dict]:
    """All requests in one batch; per request: tokens, finish reason, error."""
    eng = llm.core
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, ps[rid])
    setup(eng)
    got = {rid: {"tokens": [], "reason": None, "error": None} for rid in PROMPTS}
    while eng.has_unfinished():
        for d in eng.step():
            got[d.request_id]["tokens"] += d.token_ids
            if d.finished:
                got[d.request_id] |= {"reason": d.finish_reason, "error": d.error}
    assert eng.pages.num_free == eng.pages.num_pages
    return got


class BrokenDetokenizer:
    def __init__(self, after: int):
        self.left = after

    def add(self, token_id: int) -> str:
        self.left -= 1
        if self.left == 0:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "boom")
        return ""

    def flush(self) -> str:
        return ""


@pytest.mark.parametrize("fault", ["detokenizer", "sampler"])
def test_one_faulty_request_fails_alone(model, fault, monkeypatch):
    sampled = fault == "sampler"
    ref = run(new_llm(model), params(sampled))
    assert all(r["reason"] == "length" and len(r["tokens"]) == MAX_TOKENS for r in ref.values())
    llm, ps = new_llm(model), params(sampled)

    def setup(eng):
        if fault == "detokenizer":
            eng.seqs["b"].detok = BrokenDetokenizer(after=3)
        else:
            for name in ("probs_from_logits", "seeded_draws"):  # "b" is seeded: the second one is its sampler
                real = getattr(orthrus_step, name)

                def broken(logits, p, *rest, real=real):
                    if p is ps["b"] and eng.seqs["b"].completion_tokens >= 2:
                        raise RuntimeError("boom: bad probabilities")
                    return real(logits, p, *rest)

                monkeypatch.setattr(orthrus_step, name, broken)

    got = run(llm, ps, setup)
    assert got["b"]["reason"] == "error" and "boom" in got["b"]["error"]
    assert got["b"]["tokens"] == ref["b"]["tokens"][: len(got["b"]["tokens"])]
    for rid in ("a", "c"):
        assert got[rid] == ref[rid]
    monkeypatch.undo()
    assert run(llm, params(sampled)) == ref  # and the engine keeps serving


@pytest.mark.parametrize("fault", ["nan", "inf", "raise"])
@pytest.mark.parametrize("sampled", [False, True])
def test_draft_fault_falls_back_to_plain_ar(model, fault, sampled, monkeypatch):
    """Non-finite draft logits or a failing draft pass: the step verifies the anchor alone, so the output
    is plain AR's (the same tokens as K = 1, sampled ones too, with the same seed), and it is counted."""
    ar = run(new_llm(model, block_size=1), params(sampled))
    llm = new_llm(model)
    runner = llm.core.runner
    poison = {"nan": float("nan"), "inf": float("inf")}.get(fault)

    def broken(real):
        def call(*args):
            if poison is None:
                raise RuntimeError("draft pass failed")
            out = real(*args)
            if isinstance(out, tuple):  # verify_and_draft: AR logits, MASK hidden states
                return out[0], out[1] * poison
            return out * poison
        return call

    name = "verify_and_draft" if llm.core.fused else "draft"
    monkeypatch.setattr(runner, name, broken(getattr(runner, name)))
    assert run(llm, params(sampled)) == ar
    assert llm.core.stats()["num_draft_fallbacks"] > 0


def test_shared_pass_fault_fails_its_batch_and_engine_recovers(model, monkeypatch):
    """The verify pass fails (in the fused cycle: verify+draft, then the plain verify it falls back to)."""
    ref = run(new_llm(model), params(False))
    llm = new_llm(model)
    runner = llm.core.runner
    calls = {"n": 0, "armed": True}

    def broken(real):
        def call(*args):
            calls["n"] += 1
            if calls["armed"]:
                raise RuntimeError("device fault")
            return real(*args)
        return call

    monkeypatch.setattr(runner, "verify", broken(runner.verify))
    monkeypatch.setattr(runner, "verify_and_draft", broken(runner.verify_and_draft))
    got = run(llm, params(False))
    calls["armed"] = False
    fused = llm.core.fused
    assert calls["n"] == 1 + fused  # one decode step
    for rid, r in got.items():  # the prefill committed each request's first token before the fault
        assert r == {"tokens": ref[rid]["tokens"][:1], "reason": "error", "error": "RuntimeError: device fault"}
    assert llm.core.stats()["num_draft_fallbacks"] == fused
    assert run(llm, params(False)) == ref
