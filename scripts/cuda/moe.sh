#!/usr/bin/env bash
# Mixture-of-experts models on the GPU machine (issue 15): the qwen3_moe, mixtral and qwen2_moe fixtures
# (Hugging Face layout) and MLX LM's conversions of them (stacked experts, float and 4-bit):
# perplexity on the CPU and the GPU in f32 (equal to the printed digits) and bf16, and greedy
# tokens on both; then the random Qwen3-MoE shape's decode (scripts/bench/make_random_moe.py)
# with 2, 8 and 64 experts per token.
# Usage there: scripts/cuda/moe.sh   (results in $OUT/moe.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup moe moe.txt
log "# MoE on CUDA, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for a in qwen3_moe mixtral qwen2_moe; do
  fixture_folder $a
  # A word for every id, so that the generated tokens show in the text.
  word_vocab "$W/$a"
  for q in f32 q4; do
    mkdir -p "$W/$a-mlx-$q" && cp tests/fixtures/${a}_mlx/$q/* "$W/$a-mlx-$q/" && cp "$W/$a/tokenizer.json" "$W/$a-mlx-$q/"
  done
  for m in $a $a-mlx-f32 $a-mlx-q4; do
    for dt in float32 bfloat16; do log "perplexity $m $dt: cpu [$(ppl "$W/$m" cpu $dt)] cuda [$(ppl "$W/$m" cuda $dt)]"; done
    log "greedy $m f32: cpu [$($LMX generate --model "$W/$m" --device cpu --dtype float32 -p 'a b c a' -m 8 --temp 0 --ignore-chat-template 2>/dev/null | head -1)] cuda [$($LMX generate --model "$W/$m" --device cuda --dtype float32 -p 'a b c a' -m 8 --temp 0 --ignore-chat-template 2>/dev/null | head -1)]"
  done
done
python3 scripts/bench/make_random_moe.py "$W/moe" 2 | tee -a "$RES"
$LMX convert --hf-path "$W/moe" -q --mlx-path "$W/moe-4bit" > /dev/null 2>&1
for k in 2 8 64; do
  d="$W/moe-4bit-k$k"; mkdir -p "$d"; ln -sf "$W/moe-4bit/model.safetensors" "$d/model.safetensors"; cp "$W/moe-4bit/tokenizer.json" "$d/"
  python3 -c "import json; c = json.load(open('$W/moe-4bit/config.json')); c['num_experts_per_tok'] = $k; json.dump(c, open('$d/config.json', 'w'))"
  log "random MoE 4-bit, $k of 64 experts, cuda: $($LMX benchmark --model "$d" --device cuda -p 128 -g 64 -n 3 2>&1 | tail -1)"
done
