#!/usr/bin/env bash
# One-row quantized products with a warp per R rows (LMX_CUDA_QMV_LAYOUT=warp) against a block
# of 128 threads per R rows (the default) on the GPU machine (issue 11): greedy tokens of the
# 4- and 8-bit llama fixture on the CPU and the GPU in each layout, then decode of the random
# Llama-3.2-1B shape (graphs on) in 4 and 8 bits, alternating, and the warp layout's rows per
# warp. Usage there: scripts/cuda/qmv_layout.sh   (results in $OUT/qmv_layout.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup qmv-layout qmv_layout.txt
log "# CUDA product layouts, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
gen() { $LMX generate --model "$1" --device "$2" --dtype float32 -p 'a b c a b' -m 40 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
fixture_folder llama
word_vocab "$W/llama"
for b in 4 8; do
  $LMX convert --hf-path "$W/llama" -q --q-bits $b --q-group-size 32 --mlx-path "$W/llama-$b" > /dev/null 2>&1
  c=$(gen "$W/llama-$b" cpu); k=$(gen "$W/llama-$b" cuda); w=$(LMX_CUDA_QMV_LAYOUT=warp gen "$W/llama-$b" cuda)
  log "greedy llama $b-bit f32, 40 tokens: block vs cpu $([ "$k" = "$c" ] && echo equal || echo DIFFER); warp vs cpu $([ "$w" = "$c" ] && echo equal || echo DIFFER)"
done
SHAPE=1b BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/l1b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/l1b-$1" --device cuda -p 128 -g 256 -n 2 2>&1 | tail -1 | sed 's/, peak_memory.*//'; }
for b in 4 8; do
  for round in 1 2; do
    log "round $round $b-bit block: $(bench ${b}bit)"
    log "round $round $b-bit warp:  $(LMX_CUDA_QMV_LAYOUT=warp bench ${b}bit)"
  done
  for r in 1 2; do log "$b-bit warp, $r rows per warp: $(LMX_CUDA_QMV_LAYOUT=warp LMX_CUDA_QMV_ROWS=$r bench ${b}bit)"; done
done
