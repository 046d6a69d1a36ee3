"""The dense training passes see exactly what inference sees: the teacher equals the HF model, and
a training block's diffusion logits equal the engine's paged draft pass for the same anchor."""

import pytest
import torch
from single_pass import prefill_to_anchor
from support.tiny_models import hf_model, write_base, write_orthrus

from orthrus_engines import LLM, SamplingParams
from orthrus_engines.models.loader import ANCHOR_VIEWS
from orthrus_engines.training.dense import student_blocks, teacher_forward

VOCAB = 96


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_teacher_matches_hf(tmp_path, family):
    path = write_base(tmp_path / family, family, seed=3)
    llm = LLM(str(path), block_size=1, device="cpu")
    model = llm.core.runner.model
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    hidden, kvs = teacher_forward(model, ids)
    ref = hf_model(path, family)(ids).logits
    torch.testing.assert_close(model.logits(hidden), ref, rtol=1e-4, atol=1e-4)
    assert len(kvs) == model.shape.num_layers and kvs[0][0].shape == (2, 40, 2, 16)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("anchor_view", ["diffusion", "ar", "causal"])
def test_student_block_matches_engine_draft(tmp_path, family, anchor_view):
    """With "causal", slot 0 of the student block is the teacher's own row, so the engine's first
    draft matching it is the AR view's next-token prediction."""
    K = 5
    path = write_orthrus(tmp_path / family, family, seed=4, twin_noise=0.1, anchor_view=anchor_view)
    llm = LLM(str(path), block_size=K, device="cpu", page_size=4)
    eng, model = llm.core, llm.core.runner.model
    mask_id = eng.runner.mask_token_id
    ids = torch.randint(0, VOCAB - 1, (1, 30), generator=torch.Generator().manual_seed(1))
    anchors = torch.tensor([[1, 6, 13, 22]])
    hidden_t, kvs = teacher_forward(model, ids)
    with torch.no_grad():
        views = [anchor_view] + [v for v in ANCHOR_VIEWS if v != anchor_view]
        blocks = (student_blocks(model, ids, anchors, K, mask_id, hidden_t, kvs, v)[0, :, : K - 1] for v in views)
        student, *others = (model.logits(b) for b in blocks)
    for other in others:  # the option matters
        assert not torch.allclose(student, other, atol=1e-3)
    for a, p in enumerate(anchors[0].tolist()):
        seq = eng.add_request(f"r{p}", ids[0, : p + 1].tolist(), SamplingParams(max_tokens=16))
        prefill_to_anchor(eng, [seq], K)  # with the block's look-ahead pages
        engine_draft = eng.runner.draft([seq], [K])
        torch.testing.assert_close(student[a], engine_draft, rtol=1e-4, atol=1e-4)
        eng.abort_request(f"r{p}")


@pytest.mark.parametrize("anchor_view", ANCHOR_VIEWS)
def test_batched_draft_of_mixed_block_sizes_equals_one_at_a_time(tmp_path, anchor_view):
    """Rows of every sequence in a batched draft pass (the anchor rows included) line up."""
    path = write_orthrus(tmp_path / "m", "qwen3", seed=5, twin_noise=0.1, anchor_view=anchor_view)
    eng = LLM(str(path), block_size=5, device="cpu", page_size=4).core
    ks = [5, 2, 4]
    seqs = []
    for i, n in enumerate([7, 3, 12]):
        seq = eng.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=16))
        seqs.append(seq)
    prefill_to_anchor(eng, seqs, max(ks))
    batched = eng.runner.draft(seqs, ks)
    alone = torch.cat([eng.runner.draft([s], [k]) for s, k in zip(seqs, ks)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
