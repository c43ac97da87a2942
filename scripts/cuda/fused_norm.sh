#!/usr/bin/env bash
# The fused CUDA RMS norm (default since session 9) on the GPU machine: fixture perplexities on
# the CPU and the GPU, then the 4096-token prefill of a random Llama-3-8B shape that hit a
# device-side assert in session 5 (4 of 5 runs), repeated, and decode with the fused norm and
# with the composition (LMX_CUDA_FUSED_NORM=0).
# Usage there: scripts/cuda/fused_norm.sh   (results in $OUT/fused-norm.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup norm fused-norm.txt
log "# fused norm, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for a in llama qwen3 gemma2 gemma3_text phi3; do
  fixture_folder $a
  for dt in float32 bfloat16; do log "perplexity $a $dt: cpu [$(ppl "$W/$a" cpu $dt)] cuda [$(ppl "$W/$a" cuda $dt)]"; done
done
python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for i in 1 2 3 4 5; do log "bf16 prefill 4096 run $i: $(bench bf16 '-p 4096 -g 1 -n 2')"; done
for i in 1 2; do log "4bit prefill 4096 run $i: $(bench 4bit '-p 4096 -g 1 -n 2')"; done
for m in bf16 4bit; do
  log "$m decode fused: $(bench $m '-p 128 -g 256 -n 3')"
  log "$m decode composed: $(LMX_CUDA_FUSED_NORM=0 bench $m '-p 128 -g 256 -n 3')"
done
