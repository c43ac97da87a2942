#!/usr/bin/env bash
# One GPU round (issue 11): MLX 3- and 6-bit models with their codes widened to 4 and 8 bits as
# they load (the default now, as on the CPU: the integer kernels) beside the codes as stored
# (`LMX_CUDA_WIDEN=0`: the float kernels). Perplexity of the llama fixture at 3 and 6 bits on
# the CPU and both ways on the GPU, then Llama-3-8B-shaped decode and prefill both ways, with
# peak memory.
# Usage there: scripts/cuda/widen.sh   (results in $OUT/widen.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup widen widen.txt
log "# widened codes on the GPU, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
fixture_folder llama
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" ${3:+--dtype $3} 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for b in 3 6; do
  $LMX convert --hf-path "$W/llama" -q --q-bits $b --q-group-size 32 --mlx-path "$W/llama-$b" > /dev/null 2>&1
  for dt in float32 bfloat16; do
    log "perplexity llama-$b $dt: cpu [$(ppl "$W/llama-$b" cpu $dt)] cuda widened [$(ppl "$W/llama-$b" cuda $dt)] cuda as stored [$(LMX_CUDA_WIDEN=0 ppl "$W/llama-$b" cuda $dt)]"
  done
done
gen() { $LMX generate --model "$1" --device cuda -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
log "greedy llama-6 bf16, graphs vs normal steps (widened): $(same "$(gen "$W/llama-6")" "$(LMX_CUDA_GRAPH=0 gen "$W/llama-6")")"
log "(${SECONDS}s)"
BF16=0 BITS="6 3" python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
log "(${SECONDS}s: models written)"
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "(prompt|generation)_tps=[0-9.]*|peak_memory[a-z_]*=[0-9.]*" | tr '\n' ' '; }
for round in 1 2; do
  for b in 6bit 3bit; do
    [ $SECONDS -lt 480 ] && log "round $round $b decode -p 128 -g 256: widened [$(bench $b -p 128 -g 256)] as stored [$(LMX_CUDA_WIDEN=0 bench $b -p 128 -g 256)]"
  done
done
for b in 6bit 3bit; do
  [ $SECONDS -lt 540 ] && log "$b prefill -p 4096 -g 1: widened [$(bench $b -p 4096 -g 1)] as stored [$(LMX_CUDA_WIDEN=0 bench $b -p 4096 -g 1)]"
done
log "(${SECONDS}s)"
