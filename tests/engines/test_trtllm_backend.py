"""orthrus_engines.trtllm without TensorRT-LLM: the import, the backend refusals, and its pure-torch parts
(the draft block's tensors against kv_bookkeeping's proven contract; the low-rank head merge)."""

import importlib.util

import pytest
import torch

from orthrus_engines import LLM
from orthrus_engines.config import EngineArgs
from orthrus_engines.engine import kv_bookkeeping as kvb
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.trtllm import block, weights
from orthrus_serve.config import ServeConfig

no_trtllm = pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm installed")


def test_import_needs_no_tensorrt_llm():
    import orthrus_engines.trtllm as t

    assert len(t.UPSTREAM_COMMIT) == 40 and t.BACKENDS == ("torch", "trtllm")


def test_the_check_script_installs_the_pinned_release():
    import re
    from pathlib import Path

    import orthrus_engines.trtllm as t

    script = (Path(__file__).parents[2] / "scripts" / "trtllm_check.sh").read_text()
    assert re.search(r"TRTLLM_VERSION=\$\{TRTLLM_VERSION:-([^}]+)\}", script).group(1) == t.RELEASE
    assert (Path(t.__file__).parent / t.PATCH_FILE).is_file()


@no_trtllm
def test_llm_refuses_trtllm_naming_the_package():
    with pytest.raises(OrthrusInputError, match="tensorrt_llm") as e:
        LLM(backend="trtllm")
    assert e.value.field == "backend"


@no_trtllm
def test_serve_config_refuses_trtllm_naming_the_package():
    with pytest.raises(ValueError, match="engine.backend: 'trtllm' needs the tensorrt_llm package"):
        ServeConfig(engine={"backend": "trtllm"})


def test_torch_is_the_default_backend_and_unknown_ones_are_refused():
    assert EngineArgs().backend == "torch"
    EngineArgs().check_backend()
    assert ServeConfig().engine.get("backend", "torch") == "torch"
    with pytest.raises(OrthrusInputError, match="backend"):
        EngineArgs(backend="vllm").check_backend()


@pytest.mark.parametrize("causal_anchor", [False, True])
@pytest.mark.parametrize("block_len", [1, 4, 33])
def test_block_mask_is_kv_bookkeepings_packed_mask(block_len, causal_anchor):
    words = -(-block_len // 32)
    assert torch.equal(block.block_packed_mask(block_len, causal_anchor, words),
                       kvb.packed_block_mask([block_len], causal_anchor=causal_anchor))
    wide = block.block_packed_mask(block_len, causal_anchor, words + 1)  # padded to the metadata's width
    assert torch.equal(wide[:, :words], kvb.packed_block_mask([block_len], causal_anchor=causal_anchor))
    assert not wide[:, words:].any()


def test_block_kv_lens_follow_the_contract():
    # iteration of 2D = 8 rows per request at kv_len past + 8; requests committed 1, 3 and 5 tokens
    iteration, accepted, D = torch.tensor([18, 40, 8]), torch.tensor([1, 3, 5]), 4
    committed = block.committed_lens(iteration, 2 * D, accepted)
    assert committed.tolist() == [11, 35, 5]
    kv = block.draft_kv_lens(committed, D + 1)
    assert kv.tolist() == kvb.draft_kv_lens(committed.tolist(), [D + 1] * 3)
    assert block.rewind_kv_lens(kv, D + 1, 0).tolist() == kvb.rewind_kv_lens(kv.tolist(), [D + 1] * 3, [0] * 3)
    starts = kvb.query_starts(kv.tolist(), [D + 1] * 3)
    assert block.block_position_ids(committed, D + 1).view(3, -1)[:, 0].tolist() == starts == committed.tolist()


def test_block_inputs_and_draft_rows():
    ids = block.block_input_ids(torch.tensor([7, 9]), 99, 3)
    assert ids.tolist() == [7, 99, 99, 9, 99, 99]
    assert block.draft_gather_rows(2, 3).tolist() == [0, 1, 3, 4]


def test_twin_names():
    pre = "model.layers.3.self_attn."
    assert weights.twin_name(f"{pre}q_proj_diff.weight") == f"{pre}twin.q_proj.weight"
    assert weights.twin_name(f"{pre}k_norm_diff.weight") == f"{pre}twin.k_norm.weight"
    assert weights.twin_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_lowrank_head_merges_to_ar_plus_delta():
    torch.manual_seed(0)
    H, KV, Dh, hidden, r = 4, 2, 8, 32, 3
    q, kv = H * Dh, KV * Dh
    pre = "model.layers.0.self_attn."
    base = {f"{pre}q_proj.weight": torch.randn(q, hidden), f"{pre}k_proj.weight": torch.randn(kv, hidden),
            f"{pre}v_proj.weight": torch.randn(kv, hidden), f"{pre}o_proj.weight": torch.randn(hidden, q),
            f"{pre}q_norm.weight": torch.randn(Dh), f"{pre}k_norm.weight": torch.randn(Dh)}
    head = {f"{pre}qkv_proj_diff.lora_A": torch.randn(r, hidden),
            f"{pre}qkv_proj_diff.lora_B": torch.randn(q + 2 * kv, r),
            f"{pre}o_proj_diff.lora_A": torch.randn(r, q), f"{pre}o_proj_diff.lora_B": torch.randn(hidden, r)}
    out = weights.orthrus_weights(base, head, 1, H, KV, Dh)
    delta = head[f"{pre}qkv_proj_diff.lora_B"] @ head[f"{pre}qkv_proj_diff.lora_A"]
    for name, chunk in zip(("q_proj", "k_proj", "v_proj"), delta.split([q, kv, kv])):
        torch.testing.assert_close(out[f"{pre}twin.{name}.weight"], base[f"{pre}{name}.weight"] + chunk)
    o_delta = head[f"{pre}o_proj_diff.lora_B"] @ head[f"{pre}o_proj_diff.lora_A"]
    torch.testing.assert_close(out[f"{pre}twin.o_proj.weight"], base[f"{pre}o_proj.weight"] + o_delta)
    assert torch.equal(out[f"{pre}twin.q_norm.weight"], base[f"{pre}q_norm.weight"])
    assert torch.equal(out[f"{pre}q_proj.weight"], base[f"{pre}q_proj.weight"])  # the AR view untouched


def test_checkpoint_without_twins_is_refused():
    base = {"model.layers.0.self_attn.o_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(OrthrusInputError, match="twins"):
        weights.orthrus_weights(base, None, 1, 1, 1, 2)
