"""Tiny random Llama / Qwen3 checkpoints written to disk, and the HF oracle for them."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tiny_config(family: str, vocab_size: int = 96, tie: bool = False, **over) -> dict:
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg["rope_theta"] = 10000.0
    cfg.update(over)
    return cfg


def write_base(path: Path, family: str, seed: int = 0, **cfg_over) -> Path:
    """A plain HF checkpoint (no twins) with random weights, written with transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **tiny_config(family, **cfg_over))
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than HF's init: sharper, less tie-prone logits
            p.normal_(0, 0.15)
    model.save_pretrained(path)
    return path


def write_orthrus(path: Path, family: str, seed: int = 0, twin_noise: float = 0.05, anchor_view: str | None = None,
                  **cfg_over) -> Path:
    """An official-format Orthrus checkpoint: the base plus `*_diff` twins (AR weights + noise),
    `model_type: orthrus`, `block_size`, `mask_token_id` (and `anchor_view` if given)."""
    write_base(path, family, seed, **cfg_over)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name in list(tensors):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if f".self_attn.{part}." in name:
                twin = name.replace(f".{part}.", f".{part}_diff.")
                t = tensors[name]
                tensors[twin] = t + twin_noise * torch.randn(t.shape, generator=g)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="orthrus", base_model_type=family, block_size=8, mask_token_id=raw["vocab_size"] - 1)
    if anchor_view is not None:
        raw["anchor_view"] = anchor_view
    (path / "config.json").write_text(json.dumps(raw))
    return path


def hf_model(path: Path, family: str):
    """The base model in HF transformers, fp32 (works for Orthrus directories too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((Path(path) / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "base_model_type", "architectures", "block_size", "mask_token_id",
                                                    "anchor_view")}
    cfg = AutoConfig.for_model(family, **fields)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    state = {k: v for k, v in load_file(str(Path(path) / "model.safetensors")).items() if "_diff." not in k}
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()
