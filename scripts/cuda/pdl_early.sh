#!/usr/bin/env bash
# One GPU round (issue 11): the integer products loading their first weights before waiting
# for their input (`LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1`; the bf16 matrix-vector kernel too), beside PDL as it was and PDL off;
# and flash attention's lazy rescaling at 3 blocks a multiprocessor for heads of 128 (the
# default now) beside 1 block (`LMX_CUDA_FLASH_BLOCKS=1`). lmx-core's GPU tests with the early
# loads, greedy tokens equal across the switches, then Llama-3-8B-shaped 4-bit decode (rates
# and the recorded steps' device time) and 4096-token bf16 prefill, alternating.
# Usage there: scripts/cuda/pdl_early.sh   (results in $OUT/pdl-early.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup early pdl-early.txt
log "# early weights + flash b3, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
tests() { timeout 150 "$W/tests" --test-threads 1 "$@" 2>&1 | grep -E "FAILED|panicked|left|right|test result|max error" | head -30; }
tests flash_attention prefill_attention | sed 's/^/flash: /' | tee -a "$RES"
LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 tests quant:: decode_attention_codes matvec | sed 's/^/EARLY: /' | tee -a "$RES"
log "(${SECONDS}s)"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 8 --q-group-size 32 --mlx-path "$W/llama-8" > /dev/null 2>&1
for m in llama-4 llama-8; do
  log "$m greedy, EARLY vs PDL=0: graphs $(same "$(LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 gen "$W/$m")" "$(gen "$W/$m")"); normal steps $(same "$(LMX_CUDA_GRAPH=0 LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 gen "$W/$m")" "$(LMX_CUDA_GRAPH=0 gen "$W/$m")")"
done
log "(${SECONDS}s)"

BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s: models written)"
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "(prompt|generation)_tps=[0-9.]*" | tr '\n' ' '; }
for round in 1 2; do
  log "round $round 4bit -g 256: PDL=0 [$(bench 4bit -p 128 -g 256)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -p 128 -g 256)] EARLY [$(LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 bench 4bit -p 128 -g 256)]"
done
trace() { LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-$1" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk -v n="$2" '{i+=$5; w+=$7; k++} END {printf "%s graph steps: issue %.3f ms, wait %.3f ms (n=%d)\n", n, i/k, w/k, k}' | tee -a "$RES"; }
for round in 1 2; do
  trace 4bit "PDL=0"; LMX_CUDA_PDL=1 trace 4bit "PDL=1"; LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 trace 4bit "EARLY"
done
log "(${SECONDS}s)"
log "bf16 -g 256: PDL=0 [$(bench bf16 -p 128 -g 256)] PDL=1 [$(LMX_CUDA_PDL=1 bench bf16 -p 128 -g 256)] EARLY [$(LMX_CUDA_PDL=1 LMX_CUDA_PDL_EARLY=1 bench bf16 -p 128 -g 256)]"
for round in 1 2; do
  [ $SECONDS -lt 520 ] && log "round $round bf16 prefill 4096: b3 (default) [$(bench bf16 -p 4096 -g 1)] 1 block [$(LMX_CUDA_FLASH_BLOCKS=1 bench bf16 -p 4096 -g 1)]"
done
[ $SECONDS -lt 560 ] && log "4bit prefill 4096: [$(bench 4bit -p 4096 -g 1)]"
log "(${SECONDS}s)"
