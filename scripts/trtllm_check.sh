#!/usr/bin/env bash
# Verify the TensorRT-LLM backend on a networked GPU host (e.g. NVIDIA's TensorRT-LLM 1.3 container):
# install the release, apply the patch, run the backend's CPU tests, then scripts/trtllm_check.py: the
# replica-engine contract tests on both backends, greedy output equal to plain AR on 20 prompts at TP 1 and 2,
# CUDA graphs on and off, tokens/s against the torch backend.
# Writes trtllm_check.json and prints one table. MODEL: an Orthrus Qwen3 checkpoint directory (HF layout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the pinned release (orthrus_engines.trtllm.RELEASE; its tag v1.3.0rc29, source commit c76f4a856447)
TRTLLM_VERSION=${TRTLLM_VERSION:-1.3.0rc29}
: "${MODEL:?set MODEL to an Orthrus Qwen3 checkpoint directory}"
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorrt_llm") is None)'; then
  "$PY" -m pip install --extra-index-url https://pypi.nvidia.com "tensorrt_llm==${TRTLLM_VERSION}"
fi
# the installed release must be the pinned one (metadata only: importing tensorrt_llm needs the driver)
"$PY" -c 'import importlib.metadata as m, sys
v, want = m.version("tensorrt_llm"), sys.argv[1]
sys.exit(None if v == want else f"tensorrt_llm {v} is installed; the pinned release is {want} (TRTLLM_VERSION)")' "$TRTLLM_VERSION"
"$PY" -m pip install -e kernels -e engines -e .
PYTHON="$PY" scripts/trtllm_apply_patch.sh
"$PY" -m pytest -q tests/engines/test_trtllm_backend.py tests/engines/test_trtllm_mapping.py
"$PY" scripts/trtllm_check.py --model "$MODEL" --out trtllm_check.json ${HEAD:+--head "$HEAD"}
