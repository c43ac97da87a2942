#!/usr/bin/env bash
# One GPU round (issue 11): decode attention's splits merged by the last block of each head
# (the default since session 22) or by a second launch (`LMX_CUDA_ATTENTION_MERGE=0`), and its
# outputs coded for a 4-bit o_proj by the attention (default) or by the product
# (`LMX_CUDA_ATTENTION_CODES=0`): Llama-3-8B-shaped decode in 4 bits (64 and 256 generated
# tokens), alternating, then a 300-token trace of the recorded steps' device time with both and
# with neither.
# Usage there: scripts/cuda/merge_timing.sh   (results in $OUT/merge-timing.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup mtiming merge-timing.txt
log "# last-block merge, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { tps "$(env $1 $LMX benchmark --model "$W/l8-$2" --device cuda -p 128 -n 2 "${@:3}" 2>&1)"; }
word_vocab "$W/l8-4bit"
gen8() { env $1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'w5 w6 w7' -m 600 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | tr '\n' ' '; }
ref=$(gen8 "")
log "8B 4-bit greedy (600 tokens) against the default: normal steps $(same "$ref" "$(gen8 LMX_CUDA_GRAPH=0)"); a merging launch $(same "$ref" "$(gen8 LMX_CUDA_ATTENTION_MERGE=0)"); o_proj coding its input $(same "$ref" "$(gen8 LMX_CUDA_ATTENTION_CODES=0)")"
VARIANTS=("" "LMX_CUDA_ATTENTION_CODES=0" "LMX_CUDA_ATTENTION_MERGE=0 LMX_CUDA_ATTENTION_CODES=0")
for round in 1 2; do
  for v in "${VARIANTS[@]}"; do
    [ $SECONDS -lt 420 ] && log "round $round [${v:-merged and coded by attention}] 4bit -g 64 [$(bench "$v" 4bit -g 64)] -g 256 [$(bench "$v" 4bit -g 256)]"
  done
done
for v in "" "LMX_CUDA_ATTENTION_MERGE=0 LMX_CUDA_ATTENTION_CODES=0"; do
  [ $SECONDS -lt 500 ] || break
  env $v LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" > "$W/trace.txt"
  log "[${v:-merged and coded by attention}] 300-token trace:"
  awk '{n++; w+=$7} n == 100 {printf "  100 replays: wait %.3f ms\n", w/n; n=0; w=0}' "$W/trace.txt" | tee -a "$RES"
done
log "(${SECONDS}s)"
