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
trace() { LMX_TRACE_STEPS=1 $LMX generate --model "$W/l-4bit" --device cuda -p 'a b c' -m ${N:-300} --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -200 | awk -v n="$1" '{w+=$7; k++} END {printf "%-34s device %.3f ms a step (n=%d)\n", n, w/k, k}' | tee -a "$RES"; }
for round in 1 2; do
  trace "default (split past 128, 8 warps)"
  LMX_CUDA_ATTENTION_SPLIT=1024 trace "no split"
  LMX_CUDA_ATTENTION_SPLIT=64 trace "split past 64"
  LMX_CUDA_ATTENTION_WARPS=4 trace "4 warps"
  LMX_CUDA_ATTENTION_WARPS=16 trace "16 warps"
  LMX_CUDA_ATTENTION_MERGE=0 trace "merging launch"
  LMX_CUDA_ABLATE=attention trace "no attention"
done
log "(${SECONDS}s)"
