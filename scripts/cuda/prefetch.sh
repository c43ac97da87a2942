#!/usr/bin/env bash
# One GPU round (issue 11): programmatic dependent launch with the products' lead prefetch.
# With `LMX_CUDA_PDL=1` each quantized or bf16 product's first blocks start its weights' first
# `LMX_CUDA_PREFETCH_MB` megabytes (default 16) into L2 before they wait for the kernel before
# them, so weights stream during the small kernels between products (`LMX_CUDA_PDL=graph`: PDL
# launches only in recorded steps). Checks: lmx-core's product
# tests under PDL, fixture greedy tokens with PDL on and off (graphs and normal steps); then the
# random Llama-3-8B shape's decode, variants of one binary interleaved, and the recorded step's
# device time.
# Usage there: scripts/cuda/prefetch.sh   (results in $OUT/prefetch.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup prefetch prefetch.txt
log "# PDL + lead prefetch, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
[ -f target/cuda/release/lmx-core-tests.xz ] && xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
tests() { timeout 120 "$W/tests" --test-threads 1 "$@" 2>&1 | grep -E "FAILED|panicked|left|right|test result|max error" | head -30; }
[ -x "$W/tests" ] && LMX_CUDA_PDL=1 tests quant:: matvec | sed 's/^/PDL=1: /' | tee -a "$RES"
log "(${SECONDS}s)"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
eq() { log "$1 greedy, PDL=1 vs 0: graphs $(same "$(LMX_CUDA_PDL=1 gen "$W/$1")" "$(gen "$W/$1")"); normal steps $(same "$(LMX_CUDA_GRAPH=0 LMX_CUDA_PDL=1 gen "$W/$1")" "$(LMX_CUDA_GRAPH=0 gen "$W/$1")")"; }
eq llama-4
log "llama-4 greedy, PDL=graph vs 0: graphs $(same "$(LMX_CUDA_PDL=graph gen "$W/llama-4")" "$(gen "$W/llama-4")")"
log "(${SECONDS}s)"

BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s: models written)"
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -p 128 -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*" | cut -d= -f2; }
for round in 1 2; do
  log "round $round 4bit -g 256: PDL=0 [$(bench 4bit -g 256)] PDL=1 lead 0 [$(LMX_CUDA_PDL=1 LMX_CUDA_PREFETCH_MB=0 bench 4bit -g 256)] 8 MB [$(LMX_CUDA_PDL=1 LMX_CUDA_PREFETCH_MB=8 bench 4bit -g 256)] 16 MB [$(LMX_CUDA_PDL=1 bench 4bit -g 256)] 32 MB [$(LMX_CUDA_PDL=1 LMX_CUDA_PREFETCH_MB=32 bench 4bit -g 256)]"
done
log "(${SECONDS}s)"
for round in 1; do
  log "round $round bf16 -g 256: PDL=0 [$(bench bf16 -g 256)] PDL=1 16 MB [$(LMX_CUDA_PDL=1 bench bf16 -g 256)] 32 MB [$(LMX_CUDA_PDL=1 LMX_CUDA_PREFETCH_MB=32 bench bf16 -g 256)]"
done
log "(${SECONDS}s)"
trace() { LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-$1" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk '{i+=$5; w+=$7; n++} END {printf "issue %.3f ms, wait %.3f ms (n=%d)", i/n, w/n, n}'; }
for m in 4bit; do
  [ $SECONDS -lt 330 ] && log "$m graph steps: PDL=0 [$(trace $m)] PDL=1 16 MB [$(LMX_CUDA_PDL=1 trace $m)] PDL=1 lead 0 [$(LMX_CUDA_PDL=1 LMX_CUDA_PREFETCH_MB=0 trace $m)]"
done
[ $SECONDS -lt 360 ] && log "4bit batch 8 -g 128: PDL=0 [$(bench 4bit -b 8 -g 128)] PDL=1 [$(LMX_CUDA_PDL=1 bench 4bit -b 8 -g 128)] PDL=graph [$(LMX_CUDA_PDL=graph bench 4bit -b 8 -g 128)]"
log "(${SECONDS}s)"
