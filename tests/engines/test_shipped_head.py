"""The head shipped for the built-in model: small, loaded by default, and measurably trained."""

import pytest
import torch

from orthrus_engines import LLM
from orthrus_engines.engine.orthrus_step import fused_block_limit
from orthrus_engines.models.builtin import SHIPPED_HEAD
from orthrus_engines.models.heads import read_head_metadata

pytestmark = pytest.mark.slow


def test_shipped_head_is_small_and_described():
    assert SHIPPED_HEAD.is_file()
    assert SHIPPED_HEAD.stat().st_size <= 25 * 2**20
    meta = read_head_metadata(SHIPPED_HEAD)
    assert meta["block_size"] >= 2 and meta["rank"] > 0 and meta["blocks_seen"] > 0
    # the auto policy's prior, measured in the two-pass cycle at the head's K: every draft position the policy
    # reads (K - 1; the fused cycle's positions line up with them), the first the AR's own token
    assert meta["anchor_view"] == "causal"
    prior = meta["acceptance_by_position"]
    assert len(prior) >= meta["block_size"] - 1 and prior[0] == 1.0 and prior == sorted(prior, reverse=True)


def test_builtin_model_loads_the_shipped_head_by_default(builtin_dir):
    default = LLM(block_size=8).core
    untrained = LLM(head="none", block_size=8).core
    assert default.source.head_path == SHIPPED_HEAD and untrained.source.head_path is None
    assert default.source.block_size == read_head_metadata(SHIPPED_HEAD)["block_size"]
    assert default.fused and default.fused_k == fused_block_limit(default.source.block_size)
    d, u = default.runner.model.layers[0].self_attn, untrained.runner.model.layers[0].self_attn
    assert torch.equal(u.diff.qkv.weight, u.ar.qkv.weight)  # untrained twins are AR copies
    assert not torch.equal(d.diff.qkv.weight, d.ar.qkv.weight)
    assert torch.equal(d.ar.qkv.weight, u.ar.qkv.weight)  # the AR view is untouched
