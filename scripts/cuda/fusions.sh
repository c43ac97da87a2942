#!/usr/bin/env bash
# Decode-step fusions on the GPU machine (issue 11): the rotary embedding and cache write in
# one kernel (`LMX_CUDA_ROPE_KV=0`: four), each residual add fused into the norm after it
# (`LMX_CUDA_ADD_NORM=0`: an add and a norm), and the integer products compiled for more
# blocks per multiprocessor (`LMX_CUDA_QMV_MIN_BLOCKS`). Greedy tokens with graph steps (where
# the fused rotary write runs) against normal steps, the unfused kernels and the CPU; fixture
# perplexities CPU vs GPU; then decode of the random Llama-3-8B shape (4-bit, 8-bit, bf16)
# with each switch, alternating, and one 4-bit step's kernels under ncu.
# Usage there: scripts/cuda/fusions.sh   (results in $OUT/fusions.txt, $OUT/profile-*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup fusions fusions.txt
log "# decode-step fusions, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m "$4" --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
same() { python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None); print(f'equal ({len(a)} tokens)' if n is None and len(a) == len(b) else f'DIFFER at token {n} of {len(a)}/{len(b)}')" "$1" "$2"; }
for a in llama qwen3 gemma2 qwen3_moe; do
  fixture_folder $a
  python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"
  word_vocab "$W/$a"
  for dt in float32 bfloat16; do
    m=300; [ "$dt" = bfloat16 ] && m=100
    g=$(gen "$W/$a" cuda $dt $m); e=$(LMX_CUDA_GRAPH=0 gen "$W/$a" cuda $dt $m); u=$(LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 gen "$W/$a" cuda $dt $m); c=$(gen "$W/$a" cpu $dt $m)
    log "greedy $a $dt, $m tokens: graph vs normal steps $(same "$g" "$e"); fused vs unfused $(same "$g" "$u"); graph vs cpu $(same "$g" "$c")"
  done
  log "perplexity $a f32: cpu [$(ppl "$W/$a" cpu float32)] cuda [$(ppl "$W/$a" cuda float32)] unfused [$(LMX_CUDA_ADD_NORM=0 ppl "$W/$a" cuda float32)]; bf16: cpu [$(ppl "$W/$a" cpu bfloat16)] cuda [$(ppl "$W/$a" cuda bfloat16)]"
done
$LMX convert --hf-path "$W/llama" -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
log "greedy llama 4-bit f32, 300 tokens: graph vs cpu $(same "$(gen "$W/llama-4" cuda float32 300)" "$(gen "$W/llama-4" cpu float32 300)"); min blocks 8 vs default $(same "$(LMX_CUDA_QMV_MIN_BLOCKS=8 gen "$W/llama-4" cuda float32 300)" "$(gen "$W/llama-4" cuda float32 300)")"
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1 | sed 's/, peak_memory.*//'; }
for m in 4bit bf16 8bit; do
  rounds="1 2"; [ $m = 4bit ] || rounds=1
  for round in $rounds; do
    log "round $round $m, fused:              $(bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m, LMX_CUDA_ROPE_KV=0: $(LMX_CUDA_ROPE_KV=0 bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m, both off:           $(LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 bench $m '-p 128 -g 256 -n 2')"
  done
done
for m in 4bit 8bit; do for n in 8; do log "$m, LMX_CUDA_QMV_MIN_BLOCKS=$n: $(LMX_CUDA_QMV_MIN_BLOCKS=$n bench $m '-p 128 -g 256 -n 2')"; done; done
export LMX
OUT=${OUT:-.} bash scripts/cuda/profile.sh "$W/llama-8b-4bit" profile-4bit > /dev/null 2>&1; head -16 "${OUT:-.}/profile-4bit.txt" | tee -a "$RES"
