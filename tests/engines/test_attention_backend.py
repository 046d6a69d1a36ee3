"""EngineArgs.attention_backend: the engine with the Triton kernels (under Triton's interpreter on CPU)
generates exactly what the torch backend and HF generate, in the two-pass and the fused cycle, and
drafts as well (the drafts do not change greedy output, only how many are accepted)."""

import os

import pytest
import torch
from support.engine_steps import prefilled
from support.tiny_models import hf_greedy, hf_model, write_orthrus

from orthrus_engines import LLM, EngineArgs, OrthrusInputError, SamplingParams


if not torch.cuda.is_available():  # before Triton is first imported (orthrus_kernels imports it lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    # a vocabulary of 8: the random model's greedy text repeats itself, so drafts are often accepted
    return write_orthrus(tmp_path_factory.mktemp("backend") / "llama", "llama", seed=2, twin_noise=0.05,
                         anchor_view="causal", vocab_size=8)



@pytest.mark.parametrize("fused", [True, False], ids=["fused-cycle", "two-pass-cycle"])
def test_triton_backend_generates_what_torch_and_hf_generate(causal_model, fused):
    pytest.importorskip("triton")
    prompts = [[1, 2, 3], [6, 5, 4, 3, 2, 1, 7, 6, 5], [2] * 17]
    new = [6, 9, 5]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in new]
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(causal_model), block_size=3, num_pages=32, page_size=4, fused_cycle=fused,
                  attention_backend=backend)
        assert llm.core.runner.attention_backend == backend and llm.core.fused == fused
        outs[backend] = [(list(o.token_ids), o.accepted_tokens, o.forward_passes)
                         for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
    assert sum(accepted for _, accepted, _ in outs["torch"]) > 0
    hf = hf_model(causal_model, "llama")
    assert [ids for ids, _, _ in outs["triton"]] == [hf_greedy(hf, p, n) for p, n in zip(prompts, new)]


def test_triton_backend_passes_match_torch(causal_model):
    """The model's draft, verify and verify+draft passes (ragged batch, cached prefixes, page-crossing
    blocks) give the same logits with either backend."""
    pytest.importorskip("triton")
    prompts = [[1, 2, 3, 4, 5], [6, 5, 4], list(range(8)) * 2]
    engines = [LLM(str(causal_model), block_size=4, num_pages=32, page_size=4, attention_backend=b).core
               for b in ("torch", "triton")]
    results = []
    for eng in engines:
        seqs = prefilled(eng, prompts)
        drafts = eng.runner.draft(seqs, [4, 2, 3])
        blocks = [[p[-1]] + d for p, d in zip(prompts, ([1, 2], [], [3]))]
        ar, mask_hidden = eng.runner.verify_and_draft(seqs, blocks, [3, 2, 0])
        results.append((drafts, ar, mask_hidden, eng.runner.verify(seqs, blocks)))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_default_and_invalid_backend(causal_model):
    assert EngineArgs().resolve_attention_backend(torch.device("cpu")) == "torch"
    with pytest.raises(OrthrusInputError) as e:
        LLM(str(causal_model), block_size=3, num_pages=8, attention_backend="flash")
    assert e.value.field == "attention_backend"
