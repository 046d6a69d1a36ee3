"""CUDA graphs: the decode-time passes padded to a static shape (a batch bucket, Q rows per sequence,
pad rows that see nothing and store to a scratch slot) give exactly the unpadded passes' outputs. On
CPU the padded passes run eagerly (Triton's interpreter); the capture + replay test needs CUDA."""

import os

import pytest
import torch
from support.engine_steps import prefilled
from support.tiny_models import write_orthrus

from orthrus_engines import LLM, EngineArgs, SamplingParams
from orthrus_engines.engine.pass_padding import batch_buckets, choose_bucket

if not torch.cuda.is_available():  # before Triton is first imported (orthrus_kernels imports it lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    return write_orthrus(tmp_path_factory.mktemp("graphs") / "llama", "llama", seed=3, twin_noise=0.05,
                         anchor_view="causal", vocab_size=8)


def _engine(path, device="cpu", **kw):
    pytest.importorskip("triton")
    return LLM(str(path), block_size=4, num_pages=32, page_size=4, attention_backend="triton", device=device,
               max_num_seqs=8, **kw).core



PROMPTS = [[1, 2, 3, 4, 5], [6, 5, 4], list(range(8)) * 2]  # ragged, page-crossing


def _passes(runner, seqs):
    """Every decode-time pass kind over a ragged batch of 3 (bucket 4: one dummy sequence)."""
    blocks = [[p[-1]] + d for p, d in zip(PROMPTS, ([1, 2], [], [3]))]
    out = {
        "decode": runner.verify(seqs, [[p[-1]] for p in PROMPTS]),
        "draft": runner.draft(seqs, [4, 2, 3]),
        "draft_tail": runner.draft(seqs, [4, 4, 4], write_tail=True),
        "verify": runner.verify(seqs, blocks),
    }
    out["fused_ar"], out["fused_blocks"] = runner.verify_and_draft(seqs, blocks, [3, 2, 0])
    out["fused_uniform_ar"], out["fused_uniform_blocks"] = runner.verify_and_draft(seqs, [[1, 2]] * 3, [1] * 3)
    return out


@pytest.fixture(scope="module")
def cpu_engine(causal_model):
    eng = _engine(causal_model)
    return eng, prefilled(eng, PROMPTS)


def test_padded_passes_equal_unpadded(cpu_engine):
    eng, seqs = cpu_engine
    runner = eng.runner
    assert runner.graphs is None  # CPU: eager by default
    eager = _passes(runner, seqs)
    runner.graphs = runner.static_shape_passes(capture=False, max_num_seqs=8)
    try:
        padded = _passes(runner, seqs)
        assert runner.graphs.num_replays == 6  # every pass above ran padded
    finally:
        runner.graphs = None
    for name in eager:
        assert torch.equal(padded[name], eager[name]), name


def test_passes_above_the_largest_bucket_run_eagerly(cpu_engine):
    eng, seqs = cpu_engine
    runner = eng.runner
    runner.graphs = runner.static_shape_passes(capture=False, max_num_seqs=2)  # buckets 1, 2
    try:
        assert runner.graphs.buckets == [1, 2]
        runner.verify(seqs, [[p[-1]] for p in PROMPTS])  # 3 sequences
        assert runner.graphs.num_replays == 0
        runner.verify(seqs[:2], [[p[-1]] for p in PROMPTS[:2]])
        assert runner.graphs.num_replays == 1
        runner.graphs.max_rows = 4  # 2 sequences x 4 rows > 4 rows
        runner.draft(seqs[:2], [4, 4])
        assert runner.graphs.num_replays == 1
    finally:
        runner.graphs = None


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(1) == [1] and batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert [choose_bucket([1, 2, 4, 8], b) for b in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]


def test_cuda_graphs_default_and_enforce_eager():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert EngineArgs().resolve_cuda_graphs(cuda, "triton", 1)
    assert not EngineArgs(enforce_eager=True).resolve_cuda_graphs(cuda, "triton", 1)
    assert not EngineArgs().resolve_cuda_graphs(cpu, "triton", 1)
    assert not EngineArgs().resolve_cuda_graphs(cuda, "torch", 1)  # only the Triton kernels are captured
    assert not EngineArgs().resolve_cuda_graphs(cuda, "triton", 2)
    assert not EngineArgs(compile=True).resolve_cuda_graphs(cuda, "triton", 1)


@needs_cuda
def test_graph_replay_equals_padded_eager_on_cuda(causal_model):
    """Capture + replay gives bit for bit what the same padded pass gives eagerly (same kernels, same
    shapes), and within fp32 rounding what the unpadded pass gives."""
    eng = _engine(causal_model, device="cuda", dtype="float32")
    runner = eng.runner
    assert runner.graphs is not None and runner.graphs.capture
    seqs = prefilled(eng, PROMPTS)
    graphs = runner.graphs
    replayed = _passes(runner, seqs)
    replayed_again = _passes(runner, seqs)  # now from the captured graphs
    assert len(graphs.graphs) >= 5 and graphs.num_replays == 12
    runner.graphs = runner.static_shape_passes(capture=False, max_num_seqs=8)
    padded = _passes(runner, seqs)
    runner.graphs = None
    eager = _passes(runner, seqs)
    runner.graphs = graphs
    for name in eager:
        assert torch.equal(replayed_again[name], replayed[name]), name
        assert torch.equal(replayed[name], padded[name]), name
        torch.testing.assert_close(replayed[name], eager[name], rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("fused", [True, False], ids=["fused-cycle", "two-pass-cycle"])
def test_generate_with_graphs_equals_eager_on_cuda(causal_model, fused):
    prompts = [[1, 2, 3], [6, 5, 4, 3, 2, 1, 7, 6, 5], [2] * 17]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(causal_model), block_size=3, num_pages=32, page_size=4, device="cuda", dtype="float32",
                  fused_cycle=fused, enforce_eager=eager)
        assert (llm.core.runner.graphs is None) == eager
        outs[eager] = [list(o.token_ids) for o in llm.generate(prompts, params)]
        if not eager:
            assert llm.core.runner.graphs.num_replays > 0
    assert outs[False] == outs[True]
