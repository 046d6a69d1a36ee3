"""CPU fp32 engines keep oneDNN-packed copies of the linear weights; they must compute the same linears."""

import pytest
import torch
import torch.nn.functional as F
from orthrus_engines import LLM, SamplingParams
from orthrus_engines.models.layers import (
    PACKABLE,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    pack_weights_for_cpu,
)
from torch import nn

from support.tiny_models import write_orthrus


def _filled(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_packed_linears_match_plain(rows):
    layers = nn.ModuleDict({
        "column_bias": _filled(ColumnParallelLinear(48, [32, 16, 16], bias=True)),
        "row": _filled(RowParallelLinear(80, 48)),
        "lm_head": _filled(ParallelLMHead(300, 48)),
    })
    x = {n: torch.randn(rows, 80 if n == "row" else 48) for n in layers}
    plain = {n: m(x[n]) for n, m in layers.items()}
    pack_weights_for_cpu(layers)
    assert all(m.packed is not None for m in layers.values())
    for n, m in layers.items():
        torch.testing.assert_close(m(x[n]), plain[n], rtol=1e-5, atol=1e-4)
        assert m.weight.numel() > 0  # the plain weight stays: the model can still be read and saved


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_packs_on_cpu_fp32_and_can_opt_out(tmp_path, family):
    path = str(write_orthrus(tmp_path / family, family))
    packed = LLM(path, block_size=4, num_pages=64)
    plain = LLM(path, block_size=4, num_pages=64, cpu_packed_weights=False)
    linears = lambda llm: [m for m in llm.core.runner.model.modules() if isinstance(m, PACKABLE)]
    assert all(m.packed is not None for m in linears(packed))
    assert all(m.packed is None for m in linears(plain))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5] * 20]
    a, b = packed.generate(prompts, params), plain.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_plain_linear_is_f_linear():
    m = _filled(RowParallelLinear(8, 4))
    x = torch.randn(2, 8)
    assert torch.equal(m(x), F.linear(x, m.weight))
