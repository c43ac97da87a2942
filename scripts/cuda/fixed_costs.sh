#!/usr/bin/env bash
# One GPU round (issue 11): what a decode costs besides its steady steps. Each time a cache's
# buffers grow (every 256 positions) a recorded sequence runs a normal step and records anew;
# `lmx benchmark` counts that in its rate. Llama-3-8B shape: 4-bit and bf16 rates at 64, 256
# and 1024 generated tokens, with buffers growing 256 positions at a time (default) and 1024 or
# 2048 (`LMX_KV_GRAPH_STEP`); the trace of every step of a 600-token generation (the normal and
# recording steps in full, the replays summarized per 100); 8-bit at 2 and 4 rows a block.
# Usage there: scripts/cuda/fixed_costs.sh   (results in $OUT/fixed-costs.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup fixed fixed-costs.txt
log "# fixed costs, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s: models written)"
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -p 128 -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*" | cut -d= -f2; }
for round in 1 2; do
  for m in 4bit bf16; do
    log "round $round $m: -g 64 [$(bench $m -g 64)] -g 256 [$(bench $m -g 256)] -g 1024 [$(bench $m -g 1024)]; step 1024: -g 256 [$(LMX_KV_GRAPH_STEP=1024 bench $m -g 256)] -g 1024 [$(LMX_KV_GRAPH_STEP=1024 bench $m -g 1024)]; step 2048: -g 1024 [$(LMX_KV_GRAPH_STEP=2048 bench $m -g 1024)]"
  done
done
log "(${SECONDS}s)"
log "8bit rows a block: 2 (default) [$(bench 8bit -g 256)] 4 [$(LMX_CUDA_QMV_ROWS=4 bench 8bit -g 256)] 2 [$(bench 8bit -g 256)] 4 [$(LMX_CUDA_QMV_ROWS=4 bench 8bit -g 256)]"
for m in 4bit bf16; do
  LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-$m" --device cuda -p 'a b c' -m 600 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step" > "$W/trace-$m.txt"
  log "$m trace, 600 tokens: normal and recording steps:"
  awk '/eager/ || $5 > 0.5 {print NR": "$0}' "$W/trace-$m.txt" | tee -a "$RES"
  awk '/graph/ {n++; i+=$5; w+=$7; u+=$10; g+=$12} n == 100 {printf "100 replays: issue %.3f wait %.3f upload %.3f gap %.3f ms\n", i/n, w/n, u/n, g/n; n=0; i=0; w=0; u=0; g=0}' "$W/trace-$m.txt" | tee -a "$RES"
done
log "(${SECONDS}s)"
