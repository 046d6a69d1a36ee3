#!/usr/bin/env bash
# The GPU check: one command for one H100/H200, no network, in at most 8 minutes. It uses the machine's
# own torch (2.11+cu130), triton (3.6) and transformers (5.17): the three packages install over them with
# --no-deps. Writes OUT/gpu_check.json, OUT/gpu_check.md (bench/gpu_check.py), OUT/pytest.txt, OUT/env.txt.
#   scripts/gpu_check.sh [OUT]        (OUT defaults to $OUT, as the device tool sets it)
# Steps: the CUDA tests (Triton kernels compiled vs the torch reference; CUDA graph capture + replay vs
# eager), then bench/gpu_check.py: kernels, graphs on vs off, bf16 vs fp32 greedy match rate, tokens/s.
set -uo pipefail
OUT=${1:-${OUT:?usage: $0 OUT}}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
START=$(date +%s)
$PY -m pip install -q --no-deps --no-build-isolation -e kernels -e engines -e . >"$OUT/pip.txt" 2>&1 \
    || echo "pip install failed (see pip.txt); running from the source tree" | tee -a "$OUT/env.txt"
export PYTHONPATH="$PWD/kernels:$PWD/engines:$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - >>"$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
for m in ("triton", "transformers", "safetensors", "tokenizers", "numpy", "pytest", "gguf"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PYEOF
cat "$OUT/env.txt"
# The CUDA tests (the kernels run compiled on a GPU); no pytest-timeout needed, hence the addopts override.
if $PY -c "import pytest" 2>/dev/null; then
    timeout 150 $PY -m pytest -q -o addopts="" -p no:cacheprovider \
        tests/kernels/test_triton_attention.py tests/engines/test_cuda_graphs.py >"$OUT/pytest.txt" 2>&1
    echo "CUDA tests: exit $? ($(tail -1 "$OUT/pytest.txt"))"
else
    echo "pytest missing: CUDA tests skipped" | tee "$OUT/pytest.txt"
fi
LEFT=$(( 450 - ($(date +%s) - START) ))
BUDGET=$(( LEFT - 120 > 60 ? LEFT - 120 : 60 ))  # throughput plans past it are skipped; the checks come first
timeout $(( LEFT > 60 ? LEFT : 60 )) $PY bench/gpu_check.py --out "$OUT" --budget-s "$BUDGET"
echo "gpu_check.py: exit $?; total $(( $(date +%s) - START )) s"
