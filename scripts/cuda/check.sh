#!/usr/bin/env bash
# The one script to run on the GPU machine (issue 11): correctness checks, then timings,
# everything written to $OUT/results.txt (or ./cuda-results.txt). Needs the binary built here
# by scripts/build-cuda.sh (target/cuda/release/lmx.xz, carried with the working tree).
# Usage there: scripts/cuda/check.sh [--quick]   (--quick: the 1B shape instead of the 8B;
# PEER=0 skips the transformers peer)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup check results.txt
log "# lmx CUDA check, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"

# 1. Correctness: perplexity of the fixture models on the CPU and the GPU (f32 equal to the
# printed digits, bf16 within 0.1%), also quantized (4- and 8-bit, the MLX format's kernels).
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ARCHS="llama mistral qwen2 qwen3 gemma2 gemma3_text phi3"
for a in $ARCHS; do
  fixture_folder $a
done
# llama: a word per token id and a longer context, for the graph check below.
python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 1024; json.dump(c, open(p, 'w'))"
word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
$LMX convert --hf-path "$W/llama" -q --q-bits 8 --q-group-size 32 --mlx-path "$W/llama-8bit" > /dev/null 2>&1
# phi3's fused qkv_proj / gate_up_proj, quantized and read as row slices on the GPU.
$LMX convert --hf-path "$W/phi3" -q --q-group-size 32 --mlx-path "$W/phi3-4bit" > /dev/null 2>&1
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" ${3:+--dtype $3} 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for m in $ARCHS llama-4bit llama-8bit phi3-4bit; do
  for dt in float32 bfloat16; do
    log "perplexity $m $dt: cpu [$(ppl "$W/$m" cpu $dt)] cuda [$(ppl "$W/$m" cuda $dt)]"
  done
done
# Decode steps replayed as CUDA graphs give the tokens normal steps give (300 tokens: the cache
# grows past its first 256 positions and the step is recorded again).
gen() { $LMX generate --model "$1" --device cuda --dtype "$2" -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
for m in llama llama-4bit; do
  for dt in float32 bfloat16; do
    g=$(gen "$W/$m" $dt); e=$(LMX_CUDA_GRAPH=0 gen "$W/$m" $dt)
    log "greedy $m $dt, 300 tokens: graphs vs normal steps $([ -n "$g" ] && [ "$g" = "$e" ] && echo equal || echo DIFFER)"
  done
done
log "generate llama-4bit cuda: $($LMX generate --model "$W/llama-4bit" --device cuda -p 'a b c' -m 8 --temp 0 2>&1 | tail -3 | tr '\n' ' ')"
log "generate llama-4bit cpu:  $($LMX generate --model "$W/llama-4bit" --device cpu -p 'a b c' -m 8 --temp 0 2>&1 | tail -3 | tr '\n' ' ')"

# 2. Speed on random weights in a real shape (Llama-3-8B; --quick: Llama-3.2-1B).
SHAPE=8b; [ "${1:-}" = --quick ] && SHAPE=1b
SHAPE=$SHAPE python3 scripts/cuda/make_random_llama.py "$W/llama-$SHAPE" 2>&1 | tail -1 | tee -a "$RES"
for m in 4bit bf16; do
  log "benchmark llama-$SHAPE-$m decode (-p 128 -g 256): $($LMX benchmark --model "$W/llama-$SHAPE-$m" --device cuda -p 128 -g 256 -n 3 2>&1 | tail -1)"
  log "benchmark llama-$SHAPE-$m decode without graphs: $(LMX_CUDA_GRAPH=0 $LMX benchmark --model "$W/llama-$SHAPE-$m" --device cuda -p 128 -g 256 -n 3 2>&1 | tail -1)"
  log "benchmark llama-$SHAPE-$m prefill (-p 4096 -g 1): $($LMX benchmark --model "$W/llama-$SHAPE-$m" --device cuda -p 4096 -g 1 -n 2 2>&1 | tail -1)"
  log "weights llama-$SHAPE-$m: $(du -sb "$W/llama-$SHAPE-$m/model.safetensors" | cut -f1) bytes"
done
[ "${PEER:-1}" = 1 ] && log "$(python3 scripts/cuda/peer_transformers.py "$W/llama-$SHAPE-bf16" 2>&1 | tail -1)"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$RES"
