#!/usr/bin/env bash
# Matrices sharing an input (q/k/v, gate/up) multiplied in one launch on the GPU machine
# (issue 11): greedy tokens of the 4- and 8-bit llama and qwen3 fixtures on the CPU and the GPU
# (graphs on), then decode of the random Llama-3-8B shape in 4 and 8 bits, batch 1 and 8,
# with one launch per group and with one per matrix (`LMX_CUDA_QMV_SEPARATE=1`), alternating.
# Usage there: scripts/cuda/qmv_many.sh   (results in $OUT/qmv_many.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup qmv-many qmv_many.txt
log "# CUDA grouped quantized products, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m 40 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
for a in llama qwen3; do
  fixture_folder $a
  word_vocab "$W/$a"
  for b in 4 8; do
    $LMX convert --hf-path "$W/$a" -q --q-bits $b --q-group-size 32 --mlx-path "$W/$a-$b" > /dev/null 2>&1
    for dt in float32 bfloat16; do
      c=$(gen "$W/$a-$b" cpu $dt); g=$(gen "$W/$a-$b" cuda $dt); s=$(LMX_CUDA_QMV_SEPARATE=1 gen "$W/$a-$b" cuda $dt)
      log "greedy $a $b-bit $dt, 40 tokens: cuda vs cpu $([ "$c" = "$g" ] && echo equal || echo DIFFER); one launch vs separate $([ "$s" = "$g" ] && echo equal || echo DIFFER)"
    done
  done
done
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for b in 4 8; do
  for round in 1 2; do
    log "round $round $b-bit decode, one launch: $(bench ${b}bit '-p 128 -g 256 -n 2')"
    log "round $round $b-bit decode, separate:   $(LMX_CUDA_QMV_SEPARATE=1 bench ${b}bit '-p 128 -g 256 -n 2')"
  done
  log "$b-bit batch 8, one launch: $(bench ${b}bit '-p 128 -g 64 -n 1 -b 8')"
  log "$b-bit batch 8, separate:   $(LMX_CUDA_QMV_SEPARATE=1 bench ${b}bit '-p 128 -g 64 -n 1 -b 8')"
done
