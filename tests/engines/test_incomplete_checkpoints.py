"""A checkpoint directory without all of its weights is refused, naming what is missing and where;
never built from uninitialised memory. PyTorch `.bin` checkpoints load like safetensors ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import write_orthrus

from orthrus_engines import LLM
from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.models.checkpoint import checkpoint_names, internal_name

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_orthrus(tmp_path_factory.mktemp("full") / "m", "qwen3", seed=4, twin_noise=0.1)


@pytest.fixture(scope="module")
def reference(full):
    return LLM(model=str(full), block_size=1, num_pages=8)


def with_config(full, dst):
    dst.mkdir()
    shutil.copy(full / "config.json", dst / "config.json")
    return dst


def refused(path) -> str:
    with pytest.raises(OrthrusInputError) as e:
        LLM(model=str(path), block_size=1, num_pages=8)
    assert e.value.field == "model" and str(path) in e.value.problem
    return e.value.problem


def greedy(llm: LLM) -> list[int]:
    from orthrus_engines import SamplingParams

    return llm.generate(PROMPT, SamplingParams(max_tokens=6))[0].token_ids


def test_names_map_both_ways(reference):
    """Every parameter's checkpoint names map back to it, shard by shard."""
    for name, _ in reference.core.runner.model.named_parameters():
        for shard, hf in enumerate(checkpoint_names(name)):
            assert internal_name(hf) == (name, shard)


def test_config_only_is_refused(full, tmp_path):
    assert "no weights" in refused(with_config(full, tmp_path / "bare"))


def test_missing_layer_tensor_is_named(full, tmp_path):
    d = with_config(full, tmp_path / "partial")
    tensors = load_file(str(full / "model.safetensors"))
    gone = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj_diff.weight"]
    for name in gone:
        save_file({k: v for k, v in tensors.items() if k != name}, str(d / "model.safetensors"))
        problem = refused(d)
        assert f"lacks 1 of" in problem and name in problem


def test_missing_shard_is_named(full, tmp_path):
    d = with_config(full, tmp_path / "sharded")
    tensors = load_file(str(full / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {k: fname for fname, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({k: tensors[k] for k in shards["model-00001-of-00002.safetensors"]},
              str(d / "model-00001-of-00002.safetensors"))
    assert "model-00002-of-00002.safetensors" in refused(d)


def test_pytorch_bin_checkpoint_loads_like_safetensors(full, reference, tmp_path):
    d = with_config(full, tmp_path / "bin")
    torch.save(load_file(str(full / "model.safetensors")), d / "pytorch_model.bin")
    llm = LLM(model=str(d), block_size=1, num_pages=8)
    assert llm.core.source.has_twins
    assert greedy(llm) == greedy(reference)
    for (name, a), (_, b) in zip(llm.core.runner.model.named_parameters(),
                                 reference.core.runner.model.named_parameters()):
        assert torch.equal(a, b), name


def test_pytorch_bin_with_code_is_refused(full, tmp_path):
    """weights_only: a pickle holding anything but tensors (here a module) is not unpickled."""
    d = with_config(full, tmp_path / "pickled")
    torch.save({"model.norm.weight": torch.nn.Linear(2, 2)}, d / "pytorch_model.bin")
    assert "weights-only" in refused(d)
