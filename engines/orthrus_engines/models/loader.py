"""Model sources, and building a model from one.

Sources: an official Orthrus checkpoint (`model_type: orthrus`, `*_diff` tensors), a plain HF base
checkpoint (twins copied from the AR view, a mask token chosen), an Orthrus head stored apart from
its base (only the twin tensors, official names), and the built-in default.

Every parameter must come from the checkpoint (tied embeddings share one tensor; the twins of a plain
base are copies of the AR view; a head replaces them); anything missing is an error, never garbage.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from orthrus_engines.errors import OrthrusInputError
from orthrus_engines.models.checkpoint import checkpoint_has_twins, checkpoint_names, iter_checkpoint, load_tensors
from orthrus_engines.models.heads import apply_head, read_head_metadata
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
    has_twins = checkpoint_has_twins(path)
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


def build_model(src: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int) -> OrthrusModel:
    with torch.device(device):
        model = OrthrusModel(src.shape, src.hf_config, max_positions).to(dtype)
    loaded = load_tensors(model, iter_checkpoint(src.path))
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
