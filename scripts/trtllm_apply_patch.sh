#!/usr/bin/env bash
# Apply orthrus_engines/trtllm's core wiring (the ORTHRUS spec-dec mode and its factories) to the installed
# tensorrt_llm. Idempotent: an already patched install is left as it is. Fails if the patch does not fit
# (a TensorRT-LLM other than the one the patch was written against: see the package docstring).
set -euo pipefail
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PATCH=${PATCH:-$(ls "$HERE"/engines/orthrus_engines/trtllm/patches/*.patch | head -1)}
# find_spec locates the package without importing it (the import needs a GPU driver)
SITE=$("$PY" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("tensorrt_llm")
sys.exit("tensorrt_llm is not installed") if spec is None else print(os.path.dirname(os.path.dirname(spec.origin)))')
cd "$SITE"
if git apply --check --reverse "$PATCH" 2>/dev/null; then
  echo "already applied: $PATCH in $SITE"
elif git apply --check "$PATCH"; then
  git apply "$PATCH" && echo "applied: $PATCH in $SITE"
else
  echo "the patch does not fit this tensorrt_llm ($SITE); it was written for the commit in $PATCH" >&2
  exit 1
fi
