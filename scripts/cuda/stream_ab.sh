#!/usr/bin/env bash
# One stream per GPU with cudarc's event tracking off (the default since session 12) against
# candle's per-thread default streams with tracking (`LMX_CUDA_STREAM=per-thread`; the first
# run, docs/cuda/2026-11-30-stream-ab.txt, had them the other way round), on the GPU
# machine: fixture perplexities on both (they must agree with the CPU), decode and prefill
# timings of a random Llama-3-8B shape alternating the two, and the fused RMS norm's 4096-token
# prefill that hit a device-side assert on per-thread streams (LMX_CUDA_FUSED_NORM=1).
# Usage there: scripts/cuda/stream_ab.sh   (results in $OUT/stream-ab.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup stream stream-ab.txt
log "# stream A/B, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
for a in llama qwen3 gemma2; do fixture_folder $a; done
$LMX convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for m in llama qwen3 gemma2 llama-4bit; do
  for dt in float32 bfloat16; do
    log "perplexity $m $dt: cpu [$(ppl "$W/$m" cpu $dt)] cuda own [$(ppl "$W/$m" cuda $dt)] cuda per-thread [$(LMX_CUDA_STREAM=per-thread ppl "$W/$m" cuda $dt)]"
  done
done
python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for round in 1 2; do
  for m in 4bit bf16; do
    log "round $round $m decode own:        $(bench $m '-p 128 -g 256 -n 3')"
    log "round $round $m decode per-thread: $(LMX_CUDA_STREAM=per-thread bench $m '-p 128 -g 256 -n 3')"
  done
done
for m in 4bit bf16; do
  log "$m prefill 4096 own:        $(bench $m '-p 4096 -g 1 -n 2')"
  log "$m prefill 4096 per-thread: $(LMX_CUDA_STREAM=per-thread bench $m '-p 4096 -g 1 -n 2')"
done
for i in 1 2 3 4; do
  log "fused norm bf16 prefill 4096 own, run $i: $(LMX_CUDA_FUSED_NORM=1 bench bf16 '-p 4096 -g 16 -n 1')"
done
log "fused norm bf16 decode own: $(LMX_CUDA_FUSED_NORM=1 bench bf16 '-p 128 -g 256 -n 3')"
