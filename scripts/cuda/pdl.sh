#!/usr/bin/env bash
# One GPU round (issue 11): programmatic dependent launch (`LMX_CUDA_PDL=1`: lmx's kernels
# launched with programmatic stream serialization, each waiting for the one before at its
# start) against the same binary without it: lmx-core's GPU tests with it, greedy tokens equal
# with and without it (4-bit and dense fixtures, recorded and normal steps), then
# Llama-3-8B-shaped decode interleaved (4- and 8-bit, batch 1 and 8).
# Usage there: scripts/cuda/pdl.sh   (results in $OUT/pdl.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup pdl pdl.txt
log "# PDL, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
LMX_CUDA_PDL=1 timeout 150 "$W/tests" --test-threads 1 pick_greedy bf16_pairs quant:: cuda gpu fused_ skinny 2>&1 | grep -E "FAILED|panicked|left|right|test result" | sed 's/^/PDL=1 tests: /' | tee -a "$RES"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
eq() { log "$1 greedy, PDL=1 vs 0: graphs $(same "$(LMX_CUDA_PDL=1 gen "$W/$1")" "$(gen "$W/$1")"); normal steps $(same "$(LMX_CUDA_GRAPH=0 LMX_CUDA_PDL=1 gen "$W/$1")" "$(LMX_CUDA_GRAPH=0 gen "$W/$1")")"; }
eq llama-4

BF16=0 BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -p 128 -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*"; }
for round in 1 2; do
  log "round $round 4bit: PDL=0 [$(bench 4bit -g 256)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -g 256)]"
done
eq llama
log "8bit: PDL=0 [$(bench 8bit -g 256)] PDL=1 [$(LMX_CUDA_PDL=1 bench 8bit -g 256)]"
log "8bit rows a block: default (2) [$(bench 8bit -g 256)] ROWS=4 [$(LMX_CUDA_QMV_ROWS=4 bench 8bit -g 256)] ROWS=1 [$(LMX_CUDA_QMV_ROWS=1 bench 8bit -g 256)]"
log "4bit batch 8 rows: default [$(bench 4bit -b 8 -g 128)] ROWS=4 [$(LMX_CUDA_QMV_ROWS=4 bench 4bit -b 8 -g 128)]"
log "4bit batch 8: PDL=0 [$(bench 4bit -b 8 -g 128)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -b 8 -g 128)]"
LMX_CUDA_PDL=1 LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk '{i+=$5; w+=$7; n++} END {printf "PDL=1 4bit graph steps: issue %.3f ms, wait %.3f ms (n=%d)\n", i/n, w/n, n}' | tee -a "$RES"
log "(${SECONDS}s)"
