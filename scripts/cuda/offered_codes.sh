#!/usr/bin/env bash
# Norms and the SiLU product that also write their output coded for the next quantized
# product (issue 11; `LMX_CUDA_OFFERED_CODES=0`: each product codes its input in a launch of
# its own) on the GPU machine: greedy tokens of dense and 4/8-bit fixtures with graph steps
# against normal steps, every decode fusion off (`LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0
# LMX_CUDA_OFFERED_CODES=0`) and the CPU, fixture perplexities; then decode of the random
# Llama-3-8B shape (4-bit, 8-bit, bf16) with and without offered codes, alternating, and one
# 4-bit step's kernels under ncu.
# Usage there: scripts/cuda/offered_codes.sh   (results in $OUT/offered-codes.txt, $OUT/profile-*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup codes offered-codes.txt
log "# offered codes, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m "$4" --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
same() { python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None); print(f'equal ({len(a)} tokens)' if n is None and len(a) == len(b) else f'DIFFER at token {n} of {len(a)}/{len(b)}')" "$1" "$2"; }
for a in llama qwen3 phi3; do
  fixture_folder $a
  python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"
  word_vocab "$W/$a"
  $LMX convert --hf-path "$W/$a" -q --q-bits 4 --q-group-size 64 --mlx-path "$W/$a-4" > /dev/null 2>&1
  $LMX convert --hf-path "$W/$a" -q --q-bits 8 --q-group-size 32 --mlx-path "$W/$a-8" > /dev/null 2>&1
  for m in $a $a-4 $a-8; do
    for dt in float32 bfloat16; do
      n=200; [ "$dt" = bfloat16 ] && n=100
      g=$(gen "$W/$m" cuda $dt $n); e=$(LMX_CUDA_GRAPH=0 gen "$W/$m" cuda $dt $n); u=$(LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 LMX_CUDA_OFFERED_CODES=0 gen "$W/$m" cuda $dt $n); c=$(gen "$W/$m" cpu $dt $n)
      log "greedy $m $dt, $n tokens: graph vs normal steps $(same "$g" "$e"); fused vs unfused $(same "$g" "$u"); graph vs cpu $(same "$g" "$c")"
    done
    log "perplexity $m f32: cpu [$(ppl "$W/$m" cpu float32)] cuda [$(ppl "$W/$m" cuda float32)]"
  done
done
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1 | sed 's/, peak_memory.*//'; }
for m in 4bit 8bit; do
  rounds="1 2"; [ $m = 4bit ] || rounds=1
  for round in $rounds; do
    log "round $round $m, offered codes:            $(bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m, LMX_CUDA_OFFERED_CODES=0: $(LMX_CUDA_OFFERED_CODES=0 bench $m '-p 128 -g 256 -n 2')"
  done
done
log "bf16: $(bench bf16 '-p 128 -g 256 -n 2')"
log "4bit at 4096 context: $(bench 4bit '-p 4096 -g 128 -n 1')"
export LMX
OUT=${OUT:-.} bash scripts/cuda/profile.sh "$W/llama-8b-4bit" profile-4bit > /dev/null 2>&1; head -16 "${OUT:-.}/profile-4bit.txt" | tee -a "$RES"
