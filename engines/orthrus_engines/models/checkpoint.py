"""Checkpoint files and tensor names: which files hold a model's weights, how their tensors map onto
the model's parameters, and a dtype-independent digest of them.

Weights: `*.safetensors` files (the shards an index names, if it has one), else PyTorch
`pytorch_model*.bin` files, read with `torch.load(weights_only=True)` (tensors only, no code runs).
"""

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.models.orthrus import OrthrusModel


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors if it has any, else PyTorch .bin files;
    of a sharded checkpoint, the shards its index names (each must be there)."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (path / index).is_file():
            names = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise OrthrusInputError("model", f"{path}: shard files named by {index} are missing: {missing}")
            return [path / n for n in names]
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise OrthrusInputError("model", f"{path} holds no weights (*.safetensors or pytorch_model*.bin files)")


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - reported as bad input
        raise OrthrusInputError("model", f"{f} is not a weights-only PyTorch checkpoint ({type(e).__name__}: {e}); "
                                         "convert it to safetensors") from e


def _iter_file(f: Path):
    """(name, tensor) pairs of one weight file, read one at a time (.bin files are memory-mapped)."""
    if f.suffix == ".safetensors":
        with safe_open(f, "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)
    else:
        yield from _load_bin(f).items()


def _file_keys(f: Path) -> list[str]:
    if f.suffix == ".safetensors":
        with safe_open(f, "pt") as st:
            return list(st.keys())
    return list(_load_bin(f))


def _file_samples(f: Path, n: int):
    """(name, dtype, shape, first n elements) of each tensor of one weight file, the elements as stored."""
    if f.suffix != ".safetensors":
        for k, t in _load_bin(f).items():
            yield k, str(t.dtype), tuple(t.shape), t.reshape(-1)[:n]
        return
    with safe_open(f, "pt") as st:
        for k in st.keys():
            part = st.get_slice(k)
            shape = tuple(part.get_shape())
            t = part[:1] if len(shape) > 1 else part[:n] if shape else st.get_tensor(k)
            yield k, part.get_dtype(), shape, t.reshape(-1)[:n]


def weights_digest(path: Path, n: int = 64) -> bytes:
    """A digest of the AR view's weights as stored in the checkpoint: each tensor's name, dtype, shape and
    first n elements. The same whatever dtype or device the model runs in, however the files are sharded,
    and whatever head is applied (the twins never write the KV cache)."""
    samples = []
    for f in checkpoint_files(path):
        for name, dtype, shape, t in _file_samples(f, n):
            mapped = internal_name(name)
            if mapped is not None and ".diff." not in mapped[0]:
                samples.append((name, dtype, shape, t.contiguous().view(torch.uint8).numpy().tobytes()))
    h = hashlib.sha256()
    for name, dtype, shape, raw in sorted(samples):
        h.update(f"{name}:{dtype}:{shape}:".encode())
        h.update(raw)
    return h.digest()


def checkpoint_fingerprint(path: Path, tokenizer) -> str:
    """The prefix hash chain's seed for a checkpoint directory and its tokenizer (prefix_hash.model_fingerprint
    of its config.json, the tokenizer's vocabulary and `weights_digest`): every backend serving the same
    checkpoint names the same prefixes the same way."""
    from orthrus_engines.prefix_hash import model_fingerprint

    vocab = tokenizer.get_vocab() if tokenizer is not None else None
    return model_fingerprint(json.loads((path / "config.json").read_text()), vocab, weights_digest(path))


def checkpoint_has_twins(path: Path) -> bool:
    return any("_diff." in k for f in checkpoint_files(path) for k in _file_keys(f))


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def internal_name(hf_name: str) -> tuple[str, int] | None:
    """Checkpoint tensor name -> (our parameter name, shard index), or None if not ours."""
    if hf_name in ("model.embed_tokens.weight", "model.norm.weight"):
        return hf_name.removeprefix("model."), 0
    if hf_name == "lm_head.weight":
        return hf_name, 0
    m = _LAYER.fullmatch(hf_name)
    if not m:
        return None
    i, rest = m.groups()
    pre = f"layers.{i}."
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return pre + rest, 0
    if rest.startswith("mlp."):
        part, kind = rest[4:].split(".")
        if part in ("gate_proj", "up_proj"):
            return pre + f"mlp.gate_up.{kind}", int(part == "up_proj")
        if part == "down_proj":
            return pre + f"mlp.down.{kind}", 0
        return None
    if rest.startswith("self_attn."):
        part, kind = rest[10:].split(".")
        view = "diff" if part.endswith("_diff") else "ar"
        base = part.removesuffix("_diff")
        if base in _QKV:
            return pre + f"self_attn.{view}.qkv.{kind}", _QKV[base]
        if base == "o_proj":
            return pre + f"self_attn.{view}.o.{kind}", 0
        if base in ("q_norm", "k_norm"):
            return pre + f"self_attn.{view}.{base}.{kind}", 0
    return None


def checkpoint_names(name: str) -> list[str]:
    """Our parameter name -> its checkpoint tensor names, one per shard (the inverse of `internal_name`)."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return ["model." + name]
    if name == "lm_head.weight":
        return [name]
    _, i, rest = name.split(".", 2)
    pre = f"model.layers.{i}."
    if rest.startswith("mlp."):
        part, kind = rest[4:].split(".")
        return [f"{pre}mlp.{p}.{kind}" for p in (("gate_proj", "up_proj") if part == "gate_up" else ("down_proj",))]
    if rest.startswith("self_attn."):
        view, part, kind = rest[10:].split(".")
        parts = tuple(_QKV) if part == "qkv" else ("o_proj",) if part == "o" else (part,)
        return [f"{pre}self_attn.{p}{'_diff' if view == 'diff' else ''}.{kind}" for p in parts]
    return [pre + rest]


def load_tensors(model: OrthrusModel, tensors, only_twins: bool = False) -> set[str]:
    """Copy (checkpoint name, tensor) pairs into the model; returns the checkpoint names copied."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for hf_name, tensor in tensors:
        mapped = internal_name(hf_name)
        if mapped is None or (only_twins and ".diff." not in mapped[0]):
            continue
        name, shard = mapped
        if name == "lm_head.weight" and model.shape.tie_word_embeddings:
            continue
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            param.data.copy_(tensor)
        else:
            loader(param, tensor.to(param.dtype), shard)
        filled.add(hf_name)
    return filled


def iter_checkpoint(path: Path):
    for f in checkpoint_files(path):
        yield from _iter_file(f)
