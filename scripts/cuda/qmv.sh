#!/usr/bin/env bash
# The integer (int8-activation, dp4a) quantized decode products on the GPU machine (issue 11):
# perplexity of 4- and 8-bit fixtures on the CPU, on the GPU with the integer kernels and on
# the GPU with the float kernel (`LMX_CUDA_QMV=float`), greedy tokens on the CPU and the GPU,
# then decode speed of the random Llama-3-8B shape in 4 and 8 bits, each kernel and rows per
# warp (SWEEP=1), batch 1 and batched, and how a decode step's time splits between the host
# queueing kernels and the device.
# Usage there: scripts/cuda/qmv.sh   (results in $OUT/qmv.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup qmv qmv.txt
log "# CUDA quantized products, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m 12 --temp 0 --ignore-chat-template 2>/dev/null | head -1; }
for a in llama qwen3_moe; do
  fixture_folder $a
  word_vocab "$W/$a"
  for b in 4 8; do
    $LMX convert --hf-path "$W/$a" -q --q-bits $b --q-group-size 32 --mlx-path "$W/$a-$b" > /dev/null 2>&1
    for dt in float32 bfloat16; do
      log "perplexity $a $b-bit $dt: cpu [$(ppl "$W/$a-$b" cpu $dt)] cuda int8 [$(ppl "$W/$a-$b" cuda $dt)] cuda float [$(LMX_CUDA_QMV=float ppl "$W/$a-$b" cuda $dt)]"
      c=$(gen "$W/$a-$b" cpu $dt); g=$(gen "$W/$a-$b" cuda $dt)
      log "greedy $a $b-bit $dt: cpu [$c] cuda [$g] $([ "$c" = "$g" ] && echo equal || echo DIFFER)"
    done
  done
done
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
# Host time to queue a decode step's kernels vs the device's time after it (LMX_TRACE_STEPS).
trace() { LMX_TRACE_STEPS=1 $LMX benchmark --model "$W/llama-8b-$1" --device cuda -p 128 -g 128 -n 1 2>&1 | awk '/lmx-step: tokens 1 /{n++; i+=$5; w+=$7} END {printf "%d steps, issue %.2f ms, wait %.2f ms per step", n, i/n, w/n}'; }
for b in 4 8; do
  log "$b-bit decode, float kernel: $(LMX_CUDA_QMV=float bench ${b}bit '-p 128 -g 128 -n 2')"
  [ -n "${SWEEP:-}" ] && for r in 1 2 4; do log "$b-bit decode, int8 kernel, $r rows per warp: $(LMX_CUDA_QMV_ROWS=$r bench ${b}bit '-p 128 -g 128 -n 2')"; done
  log "$b-bit decode, int8 kernel: $(bench ${b}bit '-p 128 -g 128 -n 2')"
  log "$b-bit decode step times: $(trace ${b}bit)"
  log "$b-bit batched decode -b 8, float: $(LMX_CUDA_QMV=float bench ${b}bit "-p 128 -g 64 -n 1 -b 8")"
  log "$b-bit batched decode -b 8, int8: $(bench ${b}bit "-p 128 -g 64 -n 1 -b 8")"
done
log "bf16 decode (the same run's reference): $(bench bf16 '-p 128 -g 128 -n 2')"
log "bf16 decode step times: $(trace bf16)"
# candle's per-thread streams with cudarc's event tracking (the default before session 12).
for m in 4bit bf16; do log "$m decode, LMX_CUDA_STREAM=per-thread: $(LMX_CUDA_STREAM=per-thread bench $m '-p 128 -g 128 -n 2')"; done
for b in 4 8; do log "weights llama-8b-${b}bit: $(du -sb "$W/llama-8b-${b}bit/model.safetensors" | cut -f1) bytes"; done
