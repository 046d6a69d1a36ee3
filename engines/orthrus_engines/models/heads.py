"""Orthrus heads stored apart from their base: only the twin tensors (full, or low-rank deltas
relative to the AR view), with the head's settings in the file's metadata."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.models.checkpoint import load_tensors
from orthrus_engines.models.orthrus import OrthrusModel


def read_head_metadata(path: Path) -> dict:
    with safe_open(path, "pt") as st:
        meta = st.metadata() or {}
    return json.loads(meta.get("orthrus", "{}"))


def update_head_metadata(path: str | Path, **fields) -> None:
    """Add fields (e.g. the measured acceptance by position) to a head file's metadata."""
    from safetensors.torch import load_file

    meta = {**read_head_metadata(Path(path)), **fields}
    save_file(load_file(str(path)), str(path), metadata={"orthrus": json.dumps(meta)})


def apply_head(model: OrthrusModel, path: Path) -> None:
    """Full twins under official names, or low-rank deltas (`*_diff.lora_{A,B}`) relative to the AR view."""
    with safe_open(path, "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    if lora:
        model.copy_ar_to_twins()
        _add_lowrank(model, lora)
    filled = load_tensors(model, ((k, v) for k, v in tensors.items() if ".lora_" not in k), only_twins=True)
    if not filled and not lora:
        raise OrthrusInputError("head", f"{path} holds no Orthrus twin tensors (*_diff)")


def lowrank_key(layer: int, proj: str, factor: str) -> str:
    """Head tensor name of a low-rank twin factor: `proj` "qkv" (fused) or "o", `factor` "A" or "B";
    the twin's weight is the AR weight plus B @ A."""
    return f"model.layers.{layer}.self_attn.{proj}_proj_diff.lora_{factor}"


@torch.no_grad()
def _add_lowrank(model: OrthrusModel, lora: dict[str, torch.Tensor]) -> None:
    s = model.shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    for i, layer in enumerate(model.layers):
        d = layer.self_attn.diff
        for proj, param, parts in (("qkv", d.qkv.weight, [q, kv, kv]), ("o", d.o.weight, None)):
            a, b = lowrank_key(i, proj, "A"), lowrank_key(i, proj, "B")
            if a not in lora:
                raise OrthrusInputError("head", f"low-rank head lacks {a}")
            delta = (lora[b].float() @ lora[a].float()).to(param.dtype)
            for shard, chunk in enumerate(delta.split(parts) if parts else [delta]):
                local = torch.zeros_like(param)
                param.weight_loader(local, chunk.to(param.device), shard)  # this rank's slice of the delta
                param.add_(local)


def twin_state_dict(model: OrthrusModel) -> dict[str, torch.Tensor]:
    """The twins under official checkpoint names (world size 1)."""
    out: dict[str, torch.Tensor] = {}
    s = model.shape
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    for i, layer in enumerate(model.layers):
        d = layer.self_attn.diff
        pre = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            t = getattr(d.qkv, kind)
            if t is not None:
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                    out[f"{pre}{part}_diff.{kind}"] = chunk
        out[f"{pre}o_proj_diff.weight"] = d.o.weight
        if d.q_norm is not None:
            out[f"{pre}q_norm_diff.weight"] = d.q_norm.weight
            out[f"{pre}k_norm_diff.weight"] = d.k_norm.weight
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_head(model: OrthrusModel, path: str | Path, block_size: int, mask_token_id: int,
              tensors: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> None:
    """A head file: the twins (default: in full) plus metadata (block size, mask token, `extra`)."""
    meta = {"orthrus": json.dumps({"block_size": block_size, "mask_token_id": mask_token_id, **(extra or {})})}
    save_file(tensors if tensors is not None else twin_state_dict(model), str(path), metadata=meta)
