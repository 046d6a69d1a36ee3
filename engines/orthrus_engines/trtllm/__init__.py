"""Orthrus as a one-model speculative mode in TensorRT-LLM's PyTorch backend (`tensorrt_llm._torch`).

Pinned release: TensorRT-LLM v1.3.0rc29 (source commit c76f4a856447, as its PyPI metadata records), the
newest 1.3 release; scripts/trtllm_check.sh installs exactly it. The code was written against the files
of TensorRT-LLM main at commit 051edebb761177165b477835167762b73cdd3114 (1.3 development line: PARD and
DFlash one-model modes present), read file by file from the public source index: the tag's own tree could
not be brought here (the repository is 2.5 GB, over this environment's fetch limit), so the two were not
compared. The guard is scripts/trtllm_apply_patch.sh: it refuses to go on unless patches/<commit>.patch
applies to the installed release.

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
UPSTREAM_COMMIT = "051edebb761177165b477835167762b73cdd3114"  # the source the code was read from
RELEASE = "1.3.0rc29"  # the release scripts/trtllm_check.sh installs (tag v1.3.0rc29)
RELEASE_COMMIT = "c76f4a856447820aa1f994b053da7580d69b657d"  # that tag's source commit (PyPI metadata)
PATCH_FILE = f"patches/{UPSTREAM_COMMIT[:12]}.patch"
BACKENDS = ("torch", "trtllm")


def tensorrt_llm_available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def require_tensorrt_llm(field: str = "backend") -> None:
    """Refuse the trtllm backend, naming the missing package, when tensorrt_llm cannot be imported."""
    if not tensorrt_llm_available():
        raise OrthrusInputError(field, f"'trtllm' needs the tensorrt_llm package (NVIDIA's TensorRT-LLM {RELEASE} "
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
