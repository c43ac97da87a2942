#!/usr/bin/env bash
# Decode attention over long caches on the GPU machine (issue 11): greedy tokens of the llama
# fixture after a 700-token prompt on the CPU and the GPU (f32 must be equal; bf16 and 4-bit
# printed), bf16 graph steps against normal steps, then decode of a random Llama-3-8B shape in
# 4 bits after a 128- and a 4096-token prompt with the kernel that loads 8 keys a warp before
# using them and with the one that took a key at a time (LMX_CUDA_DECODE_KEYS=1), alternating.
# Usage there: scripts/cuda/decode_attention.sh   (results in $OUT/decode-attention.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup decode-attention decode-attention.txt
log "# CUDA decode attention, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
fixture_folder llama
sed -i 's/"max_position_embeddings": 256/"max_position_embeddings": 2048/' "$W/llama/config.json"
word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
long=$(python3 -c "import random; random.seed(1); print(' '.join(random.choice('abc') for _ in range(700)))")
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p "$long" -m 40 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
for m in llama llama-4bit; do
  c=$(gen "$W/$m" cpu float32); g=$(gen "$W/$m" cuda float32)
  [ "$c" = "$g" ] && log "$m f32, 700-token prompt, 40 tokens: cuda equals cpu" || log "$m f32: cuda DIFFERS from cpu: [$c] vs [$g]"
  b=$(gen "$W/$m" cuda bfloat16); n=$(LMX_CUDA_GRAPH=0 gen "$W/$m" cuda bfloat16); o=$(LMX_CUDA_DECODE_KEYS=1 gen "$W/$m" cuda bfloat16)
  log "$m bf16: graphs vs normal steps $([ "$b" = "$n" ] && echo equal || echo DIFFER); 8 keys vs 1 key a warp $([ "$b" = "$o" ] && echo equal || echo differ)"
done
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/l8-4bit" --device cuda $1 2>&1 | tail -1; }
for r in 1 2; do
  for keys in 8 1; do
    sw=""; [ $keys = 1 ] && sw=1
    log "round $r, $keys keys a warp, 4096-token context: $(LMX_CUDA_DECODE_KEYS=$sw bench '-p 4096 -g 256 -n 1')"
  done
done
for keys in 8 1; do
  sw=""; [ $keys = 1 ] && sw=1
  log "$keys keys a warp, 128-token context: $(LMX_CUDA_DECODE_KEYS=$sw bench '-p 128 -g 256 -n 1')"
done
