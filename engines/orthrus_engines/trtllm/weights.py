"""Checkpoint names to the TensorRT-LLM model's names, and the low-rank heads merged at load.

An Orthrus checkpoint holds a Qwen3/Llama base plus per-layer twins `self_attn.{q,k,v,o}_proj_diff.*` and
(Qwen3) `self_attn.{q,k}_norm_diff.weight`. In `OrthrusForCausalLM` the twin of layer i is
`model.layers.i.self_attn.twin`, a TensorRT-LLM attention module whose `qkv_proj` is fused from
`q_proj`/`k_proj`/`v_proj` by the release's weight mapper, so the twins are renamed to
`self_attn.twin.{q,k,v,o}_proj.*` / `self_attn.twin.{q,k}_norm.weight` and loaded like the AR view.

A low-rank head (engines/orthrus_engines/models/heads.py) stores `self_attn.{qkv,o}_proj_diff.lora_{A,B}`:
the twin weight is the AR weight plus B @ A, the fused qkv delta split into [q, k, v] rows. Pure torch:
tested on CPU (tests/engines/test_trtllm_weights.py).
"""

import re

import torch

from orthrus_engines.errors import OrthrusInputError

_TWIN = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.)(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)_diff\.(weight|bias)$")
_LORA = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(qkv|o)_proj_diff\.lora_([AB])$")


def twin_name(name: str) -> str:
    """The TensorRT-LLM parameter name of a checkpoint tensor (unchanged unless it is a twin)."""
    m = _TWIN.match(name)
    return f"{m.group(1)}twin.{m.group(2)}.{m.group(3)}" if m else name


def is_twin(name: str) -> bool:
    return _TWIN.match(name) is not None


def merge_lowrank(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], num_heads: int,
                  num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Full twin tensors under checkpoint names (`*_proj_diff.weight`) from a low-rank head's factors and
    the base's AR weights; the AR q/k norms are copied to the twin norms where the base has them."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    layers = sorted({int(m.group(1)) for m in map(_LORA.match, lora) if m})
    if not layers:
        raise OrthrusInputError("head", "the low-rank head holds no *_proj_diff.lora_A/B tensors")
    out: dict[str, torch.Tensor] = {}
    for i in layers:
        pre = f"model.layers.{i}.self_attn."
        for proj, parts in (("qkv", (("q_proj", q), ("k_proj", kv), ("v_proj", kv))), ("o", (("o_proj", None),))):
            a, b = lora.get(f"{pre}{proj}_proj_diff.lora_A"), lora.get(f"{pre}{proj}_proj_diff.lora_B")
            if a is None or b is None:
                raise OrthrusInputError("head", f"layer {i} lacks {proj}_proj_diff.lora_A or lora_B")
            delta = b.float() @ a.float()
            sizes = [size if size is not None else delta.shape[0] for _, size in parts]
            if sum(sizes) != delta.shape[0]:
                raise OrthrusInputError("head", f"layer {i} {proj} delta: {delta.shape[0]} rows, not {sum(sizes)}")
            for (name, _), chunk in zip(parts, delta.split(sizes)):
                ar = base.get(f"{pre}{name}.weight")
                if ar is None:
                    raise OrthrusInputError("model", f"the base checkpoint lacks {pre}{name}.weight")
                out[f"{pre}{name}_diff.weight"] = (ar.float() + chunk).to(ar.dtype)
            # the AR biases (Qwen2-style q/k/v bias) and q/k norms are the twin's starting point
            for name in ("q_proj", "k_proj", "v_proj") if proj == "qkv" else ():
                if f"{pre}{name}.bias" in base:
                    out[f"{pre}{name}_diff.bias"] = base[f"{pre}{name}.bias"]
        for norm in ("q_norm", "k_norm"):
            if f"{pre}{norm}.weight" in base:
                out[f"{pre}{norm}_diff.weight"] = base[f"{pre}{norm}.weight"]
    return out


def orthrus_weights(weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None, num_layers: int,
                    num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The checkpoint (plus an optional head file's tensors, which win) with twins renamed for the
    TensorRT-LLM model; every layer must end up with its twin projections."""
    merged = dict(weights)
    if head:
        lora = {k: v for k, v in head.items() if ".lora_" in k}
        if lora:
            merged.update(merge_lowrank(weights, lora, num_heads, num_kv_heads, head_dim))
        merged.update({k: v for k, v in head.items() if ".lora_" not in k})
    missing = [i for i in range(num_layers) if f"model.layers.{i}.self_attn.o_proj_diff.weight" not in merged]
    if missing:
        raise OrthrusInputError("model", f"no Orthrus twins (*_proj_diff) for layers {missing[:4]}"
                                f"{'...' if len(missing) > 4 else ''}; pass a head file (head_path)")
    return {twin_name(k): v for k, v in merged.items()}
