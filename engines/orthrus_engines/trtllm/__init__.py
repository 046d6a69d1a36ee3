"""Orthrus as a one-model speculative mode in TensorRT-LLM's PyTorch backend (`tensorrt_llm._torch`).

Written against one upstream revision, read file by file from the public source index:
    TensorRT-LLM main at commit 051edebb761177165b477835167762b73cdd3114 (1.3 development line: PARD
    and DFlash one-model modes present). The release tag containing it could not be resolved here
    (the repository mirror is 2.5 GB, over this environment's fetch limit); scripts/trtllm_check.sh
    installs a 1.3.x release and refuses to go on unless patches/<commit>.patch applies to it.

Parts: `model` (OrthrusForCausalLM over the Qwen3 classes, a twin attention per layer on the AR
layer's KV pool), `worker` (OrthrusWorker: verify with greedy or rejection-sampling acceptance, then one
twin pass that writes the block's K/V into the uncommitted tail slots), `config`
(OrthrusDecodingConfig), `block`/`weights` (pure torch, CPU-tested), and `patches/` (the core wiring:
the ORTHRUS mode in `SpeculativeDecodingMode` and its factories). This package imports without
TensorRT-LLM; `register()` needs it. It has not been executed: see docs/BENCHMARKS.md.
"""

import importlib.util

from orthrus_engines.errors import OrthrusInputError

UPSTREAM_REPO = "NVIDIA/TensorRT-LLM"
UPSTREAM_COMMIT = "051edebb761177165b477835167762b73cdd3114"
PATCH_FILE = f"patches/{UPSTREAM_COMMIT[:12]}.patch"
BACKENDS = ("torch", "trtllm")


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def require_tensorrt_llm(field: str = "backend") -> None:
    """Refuse the trtllm backend, naming the missing package, when tensorrt_llm cannot be imported."""
    if not tensorrt_llm_available():
        raise OrthrusInputError(field, "'trtllm' needs the tensorrt_llm package (NVIDIA's TensorRT-LLM 1.3.x "
                                "with this project's patch: scripts/trtllm_apply_patch.sh); it is not installed")


def validate_backend(backend: str, field: str = "backend") -> str:
    if backend not in BACKENDS:
        raise OrthrusInputError(field, f"must be one of {BACKENDS}, got {backend!r}")
    if backend == "trtllm":
        require_tensorrt_llm(field)
    return backend


def register() -> None:
    """Import the model (registers `OrthrusForCausalLM` with TensorRT-LLM's auto model) and the config;
    call before building `tensorrt_llm.LLM`."""
    require_tensorrt_llm()
    from orthrus_engines.trtllm import config, model  # noqa: F401
