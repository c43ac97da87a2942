#!/usr/bin/env bash
# Prefill on the GPU machine (issue 11): perplexity of the fixtures on the CPU and the GPU
# (whole-sequence forwards: causal attention with soft-capping and sliding windows), f32 and
# bf16; then prefill speed of the random Llama-3.2-1B and Llama-3-8B shapes, bf16 and 4-bit,
# with the fused causal softmax and without it (LMX_CUDA_CAUSAL_SOFTMAX=0), and decode
# (graphs) for reference. Usage there: scripts/cuda/prefill.sh   (results in $OUT/prefill.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup prefill prefill.txt
log "# CUDA prefill, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 64 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for a in llama gemma2 mistral qwen3 gpt_oss; do
  fixture_folder $a
  for dt in float32 bfloat16; do
    log "perplexity $a $dt: cpu [$(ppl "$W/$a" cpu $dt)] cuda [$(ppl "$W/$a" cuda $dt)] cuda composed [$(LMX_CUDA_CAUSAL_SOFTMAX=0 ppl "$W/$a" cuda $dt)]"
  done
done
SHAPE=1b BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-1b" 2>&1 | tail -1 | tee -a "$RES"
BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/$1" --device cuda $2 2>&1 | tail -1; }
for m in llama-1b-bf16 llama-1b-4bit llama-8b-bf16 llama-8b-4bit; do
  for p in 2048 4096; do
    log "$m prefill $p, fused softmax: $(bench $m "-p $p -g 1 -n 2")"
    log "$m prefill $p, composed:      $(LMX_CUDA_CAUSAL_SOFTMAX=0 bench $m "-p $p -g 1 -n 2")"
  done
done
log "llama-8b-4bit decode (graphs): $(bench llama-8b-4bit '-p 128 -g 256 -n 2')"
log "llama-8b-bf16 decode (graphs): $(bench llama-8b-bf16 '-p 128 -g 256 -n 2')"
