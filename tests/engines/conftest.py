from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import hf_model, write_orthrus


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run only small ops: one intra-op thread is much faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(family="llama", **kw)`: the directory of a tiny random Orthrus checkpoint, written once
    per session for each set of arguments (`support.tiny_models.write_orthrus`'s, and `lm_head_scale`:
    the LM head multiplied by it, for sharper logits). Shared: copy it before changing its files."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", lm_head_scale: float | None = None, **kw) -> Path:
        key = (family, lm_head_scale, tuple(sorted(kw.items())))
        if key not in made:
            path = write_orthrus(tmp_path_factory.mktemp(f"tiny-{family}") / "m", family, **kw)
            if lm_head_scale is not None:
                tensors = load_file(str(path / "model.safetensors"))
                tensors["lm_head.weight"] = tensors["lm_head.weight"] * lm_head_scale
                save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def causal_qwen3_dir(tiny_model):
    """A tiny causal-anchor Qwen3 Orthrus (its two-pass drafts are often accepted): logits processing, logprobs."""
    return tiny_model("qwen3", seed=4, twin_noise=0.03, anchor_view="causal")


@pytest.fixture(scope="session")
def causal_qwen3_hf(causal_qwen3_dir):
    """Its base model in HF transformers, the fp32 oracle."""
    return hf_model(causal_qwen3_dir, "qwen3")
