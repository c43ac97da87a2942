#!/usr/bin/env bash
# One-row quantized products on a grid of one wave (`qmv8p`, issue 11) on the GPU machine:
# greedy tokens and perplexities of 4- and 8-bit fixtures (groups of 32 and 64) on the CPU, on
# the GPU with the persistent kernel and with a block per R rows (`LMX_CUDA_QMV=blocks`); then
# decode of the random Llama-3-8B shape in 4 and 8 bits, both kernels alternating, blocks per
# multiprocessor and rows per block swept; each kernel's time in one decode step under ncu,
# and ncu's throughput, occupancy and stall sections for the four products of one layer.
# Usage there: scripts/cuda/qmv_persist.sh   (results in $OUT/qmv-persist.txt, $OUT/*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup qmvp qmv-persist.txt
log "# one-wave quantized products, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m 40 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
for a in llama qwen3_moe; do
  fixture_folder $a
  word_vocab "$W/$a"
  for b in 4 8; do
    for gs in 32 64; do
      $LMX convert --hf-path "$W/$a" -q --q-bits $b --q-group-size $gs --mlx-path "$W/$a-$b-$gs" > /dev/null 2>&1
      for dt in float32 bfloat16; do
        c=$(gen "$W/$a-$b-$gs" cpu $dt); s=$(gen "$W/$a-$b-$gs" cuda $dt); k=$(LMX_CUDA_QMV=blocks gen "$W/$a-$b-$gs" cuda $dt)
        log "greedy $a $b-bit g$gs $dt: persistent vs cpu $([ "$c" = "$s" ] && echo equal || echo "DIFFER [$c] [$s]"); persistent vs blocks $([ "$k" = "$s" ] && echo equal || echo "DIFFER [$k]")"
      done
      log "perplexity $a $b-bit g$gs f32: cpu [$(ppl "$W/$a-$b-$gs" cpu float32)] cuda persistent [$(ppl "$W/$a-$b-$gs" cuda float32)] blocks [$(LMX_CUDA_QMV=blocks ppl "$W/$a-$b-$gs" cuda float32)]"
    done
  done
done
BITS="4 8" BF16=0 python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for m in 4bit 8bit; do
  for round in 1 2; do
    log "round $round $m decode, persistent: $(bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m decode, blocks:     $(LMX_CUDA_QMV=blocks bench $m '-p 128 -g 256 -n 2')"
  done
  for n in 2 4 8; do log "$m decode, persistent, $n blocks per SM: $(LMX_CUDA_QMV_BLOCKS_PER_SM=$n bench $m '-p 128 -g 256 -n 2')"; done
  r=2; [ $m = 8bit ] && r=4
  log "$m decode, persistent, $r rows per block: $(LMX_CUDA_QMV_ROWS=$r bench $m '-p 128 -g 256 -n 2')"
done
export LMX
OUT=${OUT:-.} bash scripts/cuda/profile.sh "$W/llama-8b-4bit" profile-4bit > /dev/null 2>&1; head -16 "${OUT:-.}/profile-4bit.txt" | tee -a "$RES"
LMX_CUDA_QMV=blocks OUT=${OUT:-.} bash scripts/cuda/profile.sh "$W/llama-8b-4bit" profile-4bit-blocks > /dev/null 2>&1; head -8 "${OUT:-.}/profile-4bit-blocks.txt" | tee -a "$RES"
sections() { ncu --kernel-name "regex:$1" --launch-skip 40 --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats "$LMX" generate --model "$W/llama-8b-4bit" --device cuda -p 'a b c' -m 3 --temp 0 --ignore-chat-template 2>/dev/null | grep -vE "^==PROF==|^\s*$|----" > "${OUT:-.}/$2.txt"; }
sections 'lmx_qmv8p_bf16_4' ncu-persistent
LMX_CUDA_QMV=blocks sections 'lmx_qmv8x?_bf16_4_._1' ncu-blocks
