#!/usr/bin/env bash
# One GPU round (issue 11): decode attention's settings by the recorded steps' device time
# (`LMX_TRACE_STEPS=1`), random Llama-3-8B shape, MLX 4-bit, 300 greedy tokens: the split
# threshold (`LMX_CUDA_ATTENTION_SPLIT`), warps a block (`LMX_CUDA_ATTENTION_WARPS`), the
# merging launch instead of the last block (`LMX_CUDA_ATTENTION_MERGE=0`), and attention
# skipped (`LMX_CUDA_ABLATE=attention`, timing only), two rounds.
# Usage there: scripts/cuda/attention_trace.sh   (results in $OUT/attention-trace.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup atrace attention-trace.txt
log "# decode attention settings, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SHAPE=${SHAPE:-8b} BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l" 2>&1 | tail -1
for round in 1 2; do
  step_ms "$W/l-4bit" "default (split past 128, 8 warps)"
  LMX_CUDA_ATTENTION_SPLIT=1024 step_ms "$W/l-4bit" "no split"
  LMX_CUDA_ATTENTION_SPLIT=64 step_ms "$W/l-4bit" "split past 64"
  LMX_CUDA_ATTENTION_WARPS=4 step_ms "$W/l-4bit" "4 warps"
  LMX_CUDA_ATTENTION_WARPS=16 step_ms "$W/l-4bit" "16 warps"
  LMX_CUDA_ATTENTION_MERGE=0 step_ms "$W/l-4bit" "merging launch"
  LMX_CUDA_ABLATE=attention step_ms "$W/l-4bit" "no attention"
done
log "(${SECONDS}s)"
