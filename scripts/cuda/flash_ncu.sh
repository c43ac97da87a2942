#!/usr/bin/env bash
# One flash attention launch under Nsight Compute (issue 11): a 4-layer Llama-3-8B-shaped bf16
# model (head size 128), a 4096-token prefill, the 3rd flash kernel (the second 2048-token
# chunk's first layer: 2048 queries over 4096 keys) with the full section set: throughput,
# occupancy, warp stalls. Usage there: scripts/cuda/flash_ncu.sh   (results in $OUT/flash-ncu.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup flash-ncu flash-ncu.txt
log "# flash attention under ncu, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
LAYERS=4 BITS= python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1 | tee -a "$RES"
for v in "" 3; do
  log "## LMX_CUDA_FLASH_BLOCKS=$v"
  LMX_CUDA_FLASH_BLOCKS=$v ncu --kernel-name regex:lmx_flash --launch-skip 4 --launch-count 1 --set full --print-details all \
    "$LMX" benchmark --model "$W/l8-bf16" --device cuda -p 4096 -g 1 -n 1 2>&1 | grep -vE '^\s*$|^==PROF==' | grep -vE '^\s+-{5,}' >> "$RES"
done
