#!/usr/bin/env bash
# One GPU round (issue 11): what the small fused kernels cost inside a recorded decode step.
# Random Llama-3-8B shape, MLX 4-bit (SHAPE=1b: Llama-3.2-1B); `LMX_TRACE_STEPS=1` gives each
# recorded step's device time; `LMX_CUDA_ABLATE` skips the named kernels (timing only: the
# text is wrong without them), one kind at a time and all together, two rounds alternating.
# Usage there: scripts/cuda/ablate.sh   (results in $OUT/ablate.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup ablate ablate.txt
log "# ablation of the fused kernels, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SH=${SHAPE:-8b}
SHAPE=$SH BF16=0 BITS="${BITS:-4}" python3 scripts/cuda/make_random_llama.py "$W/l" 2>&1 | tail -1
for round in 1 2; do
  step_ms "$W/l-${BITS:-4}bit" "all kernels"
  for a in norm silu attention rope norm,silu,attention,rope; do
    LMX_CUDA_ABLATE=$a step_ms "$W/l-${BITS:-4}bit" "without $a"
  done
done
log "(${SECONDS}s)"
