#!/usr/bin/env bash
# One GPU round (issue 11): lmx's bf16 matrix-vector kernel for a decode step's few rows
# (`LMX_CUDA_MATVEC=0`: cuBLAS, as before) and programmatic dependent launch (`LMX_CUDA_PDL=1`:
# lmx's kernels launched with programmatic stream serialization), each against the same binary
# without it: lmx-core's GPU tests (with PDL too), greedy tokens (graphs against normal steps
# with the kernel; PDL on and off), then Llama-3-8B-shaped decode interleaved: bf16 with and
# without the kernel and at 1, 2 and 4 rows a block, 4-bit with and without PDL, batch 8.
# Usage there: scripts/cuda/matvec_pdl.sh   (results in $OUT/matvec-pdl.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup mvpdl matvec-pdl.txt
log "# bf16 matvec + PDL, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
tests() { timeout 150 "$W/tests" --test-threads 1 "$@" 2>&1 | grep -E "FAILED|panicked|left|right|test result|max error" | head -30; }
tests matvec | sed 's/^/default: /' | tee -a "$RES"
LMX_CUDA_PDL=1 tests matvec pick_greedy bf16_pairs quant:: cuda gpu fused_ skinny | sed 's/^/PDL=1: /' | tee -a "$RES"
log "(${SECONDS}s)"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
log "llama bf16 greedy with the kernel, graphs vs normal steps: $(same "$(gen "$W/llama")" "$(LMX_CUDA_GRAPH=0 gen "$W/llama")"); kernel vs cuBLAS (rounding differs; for information): $(same "$(gen "$W/llama")" "$(LMX_CUDA_MATVEC=0 gen "$W/llama")")"
eq() { log "$1 greedy, PDL=1 vs 0: graphs $(same "$(LMX_CUDA_PDL=1 gen "$W/$1")" "$(gen "$W/$1")"); normal steps $(same "$(LMX_CUDA_GRAPH=0 LMX_CUDA_PDL=1 gen "$W/$1")" "$(LMX_CUDA_GRAPH=0 gen "$W/$1")")"; }
eq llama-4
eq llama
log "(${SECONDS}s)"

BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s: models written)"
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -p 128 -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*"; }
for round in 1 2; do
  log "round $round bf16: kernel [$(bench bf16 -g 256)] cuBLAS [$(LMX_CUDA_MATVEC=0 bench bf16 -g 256)]"
done
log "bf16 rows a block: 1 [$(LMX_CUDA_MATVEC_ROWS=1 bench bf16 -g 256)] 4 [$(LMX_CUDA_MATVEC_ROWS=4 bench bf16 -g 256)]; kernel + PDL=1 [$(LMX_CUDA_PDL=1 bench bf16 -g 256)]"
log "bf16 batch 8: kernel [$(bench bf16 -b 8 -g 128)] cuBLAS [$(LMX_CUDA_MATVEC=0 bench bf16 -b 8 -g 128)]"
log "(${SECONDS}s)"
for round in 1 2; do
  log "round $round 4bit: PDL=0 [$(bench 4bit -g 256)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -g 256)]"
done
[ $SECONDS -lt 500 ] && log "4bit batch 8: PDL=0 [$(bench 4bit -b 8 -g 128)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -b 8 -g 128)]"
for p in 0 1; do
  [ $SECONDS -lt 540 ] && LMX_CUDA_PDL=$p LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-bf16" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk -v p=$p '{i+=$5; w+=$7; n++} END {printf "PDL=%s bf16 graph steps: issue %.3f ms, wait %.3f ms (n=%d)\n", p, i/n, w/n, n}' | tee -a "$RES"
done
log "(${SECONDS}s)"
