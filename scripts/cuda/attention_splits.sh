#!/usr/bin/env bash
# One GPU round (issue 11): decode attention over short caches. A recorded step's attention
# takes one split (32 blocks for Llama-3-8B's heads) up to 512 cached positions, and a 4-bit
# token's device time grew ~0.1 ms per 100 positions (docs/cuda/2026-12-03-fixed-costs.txt).
# Variants of one binary: warps per block (`LMX_CUDA_ATTENTION_WARPS`, 8 by default) and the
# length beyond which it splits (`LMX_CUDA_ATTENTION_SPLIT`, 512): lmx-core's GPU test of decode
# attention under each, then Llama-3-8B-shaped 4-bit decode at 256 and 1024 generated tokens,
# then a 600-token trace (device time per 100 replays).
# Usage there: scripts/cuda/attention_splits.sh   (results in $OUT/attention-splits.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup asplit attention-splits.txt
log "# decode attention splits, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
VARIANTS=("" "LMX_CUDA_ATTENTION_SPLIT=128" "LMX_CUDA_ATTENTION_WARPS=16" "LMX_CUDA_ATTENTION_WARPS=16 LMX_CUDA_ATTENTION_SPLIT=128")
for v in "${VARIANTS[@]}"; do
  env $v timeout 60 "$W/tests" --test-threads 1 decode_attention_on_the_gpu bf16_matvec 2>&1 | grep -E "FAILED|panicked|test result|max error" | sed "s/^/[${v:-default}] /" | tee -a "$RES"
done
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s)"
bench() { env $1 $LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*" | cut -d= -f2; }
for round in 1 2; do
  for v in "${VARIANTS[@]}"; do
    [ $SECONDS -lt 330 ] && log "round $round [${v:-default}] 4bit: -g 256 [$(bench "$v" -g 256)] -g 1024 [$(bench "$v" -g 1024)]"
  done
done
for v in "" "LMX_CUDA_ATTENTION_WARPS=16 LMX_CUDA_ATTENTION_SPLIT=128"; do
  [ $SECONDS -lt 400 ] || break
  env $v LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 600 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" > "$W/trace.txt"
  log "[${v:-default}] 600-token trace:"
  awk '{n++; w+=$7} n == 100 {printf "  100 replays: wait %.3f ms\n", w/n; n=0; w=0}' "$W/trace.txt" | tee -a "$RES"
done
log "(${SECONDS}s)"
