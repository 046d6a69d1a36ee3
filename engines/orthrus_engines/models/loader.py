"""Model sources and weight loading.

Sources: an official Orthrus checkpoint (`model_type: orthrus`, `*_diff` tensors), a plain HF base
checkpoint (twins copied from the AR view, a mask token chosen), an Orthrus head stored apart from
its base (only the twin tensors, official names), and the built-in default.

Weights: `*.safetensors` files (the shards an index names, if it has one), else PyTorch
`pytorch_model*.bin` files, read with `torch.load(weights_only=True)` (tensors only, no code runs).
Every parameter must come from the checkpoint (tied embeddings share one tensor; the twins of a plain
base are copies of the AR view; a head replaces them); anything missing is an error, never garbage.
"""

import hashlib

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.models.orthrus import ModelShape, OrthrusModel

FAMILIES = {"llama": False, "qwen3": True}  # model_type -> has q/k norms
DEFAULT_BLOCK_SIZE = 8  # K for a base checkpoint that names none
# How a draft block's anchor row is computed, the MASK rows using the twins in every case: with the
# twins (the paper's diffusion view); with the AR view's projections ("ar"); or exactly as the AR
# view computes it, its projections and only the prefix and itself visible ("causal"), so that the
# first draft is the AR's own next token. A head trained with one must run with it.
ANCHOR_VIEWS = ("diffusion", "ar", "causal")


@dataclass
class ModelSource:
    path: Path
    hf_config: object  # transformers config of the base family
    family: str
    block_size: int
    mask_token_id: int
    has_twins: bool  # the checkpoint carries *_diff tensors
    head_path: Path | None = None
    anchor_view: str = "diffusion"  # one of ANCHOR_VIEWS

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_hf(self.hf_config, FAMILIES[self.family])


def model_dir(model: str | Path | None) -> Path:
    """The local directory of a model; None = the built-in default (converted on first use)."""
    if model is None:
        from orthrus_engines.models.builtin import builtin_model_dir

        return builtin_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise OrthrusInputError("model", f"{str(model)!r} is not a local model directory with a config.json")
    return path


def resolve_model(path: Path, head: str | Path | None = None, tokenizer=None) -> ModelSource:
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text())
    family = raw.get("base_model_type", "qwen3") if raw.get("model_type") == "orthrus" else raw.get("model_type")
    if family not in FAMILIES:
        raise OrthrusInputError("model", f"model_type {raw.get('model_type')!r} is not supported (llama, qwen3, orthrus)")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "base_model_type", "architectures", "auto_map")}
    hf_config = AutoConfig.for_model(family, **fields)
    has_twins = _checkpoint_has_twins(path)
    block_size = int(raw.get("block_size") or DEFAULT_BLOCK_SIZE)
    mask = raw.get("mask_token_id")
    anchor_view = raw.get("anchor_view", "diffusion")
    if head is not None:
        head_path = Path(head).expanduser()
        if not head_path.is_file():
            raise OrthrusInputError("head", f"{str(head)!r} is not a file")
        meta = read_head_metadata(head_path)
        block_size = int(meta.get("block_size", block_size))
        mask = meta.get("mask_token_id", mask)
        anchor_view = meta.get("anchor_view", "diffusion")  # the head replaces all twins; older heads: diffusion
    else:
        head_path = None
    if anchor_view not in ANCHOR_VIEWS:
        raise OrthrusInputError("head" if head is not None else "model",
                                f"anchor_view {anchor_view!r} is not one of {list(ANCHOR_VIEWS)}")
    if mask is None:
        mask = choose_mask_token(hf_config.vocab_size, tokenizer)
    return ModelSource(path, hf_config, family, block_size, int(mask), has_twins, head_path, anchor_view)


def choose_mask_token(vocab_size: int, tokenizer) -> int:
    """An id the model never sees in text: a padded embedding row if there is one, otherwise the
    highest added special token that is not BOS/EOS/PAD/UNK and not used by the chat template."""
    if tokenizer is None:
        return vocab_size - 1
    if vocab_size > len(tokenizer):
        return len(tokenizer)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = tokenizer.chat_template or ""
    added = sorted(tokenizer.added_tokens_decoder.items(), reverse=True)
    for tid, tok in added:
        if tid not in reserved and tok.content not in template and tid < vocab_size:
            return tid
    return vocab_size - 1


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


def _checkpoint_has_twins(path: Path) -> bool:
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


def _iter_checkpoint(path: Path):
    for f in checkpoint_files(path):
        yield from _iter_file(f)


def build_model(src: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int) -> OrthrusModel:
    with torch.device(device):
        model = OrthrusModel(src.shape, src.hf_config, max_positions).to(dtype)
    loaded = load_tensors(model, _iter_checkpoint(src.path))
    twins_elsewhere = not src.has_twins or src.head_path is not None  # copies of the AR view, or the head's
    missing = [hf for name, _ in model.named_parameters() for hf in checkpoint_names(name)  # tied: named once
               if hf not in loaded and not (twins_elsewhere and "_diff." in hf)]
    if missing:
        raise OrthrusInputError("model", f"{src.path} lacks {len(missing)} of the model's tensors, e.g. {missing[:4]}")
    if not src.has_twins:
        model.copy_ar_to_twins()
    if src.head_path is not None:
        apply_head(model, src.head_path)
    return model.eval()


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
