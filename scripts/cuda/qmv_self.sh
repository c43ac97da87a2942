#!/usr/bin/env bash
# One-row quantized products that code x inside their own blocks (`qmv8s`, issue 11) on the
# GPU machine: greedy tokens and perplexities of 4- and 8-bit fixtures (groups of 32 and 64)
# on the CPU, on the GPU with the self-coding kernel and with the separate coding launch
# (`LMX_CUDA_QMV=coded`); then decode of the random Llama-3-8B shape in 4 and 8 bits, both
# kernels alternating, blocks per multiprocessor and rows per block swept, then each kernel's
# time in one decode step (graphs on) under ncu.
# Usage there: scripts/cuda/qmv_self.sh   (results in $OUT/qmv-self.txt, $OUT/profile-*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup qmvs qmv-self.txt
log "# self-coding quantized products, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
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
        c=$(gen "$W/$a-$b-$gs" cpu $dt); s=$(gen "$W/$a-$b-$gs" cuda $dt); k=$(LMX_CUDA_QMV=coded gen "$W/$a-$b-$gs" cuda $dt)
        log "greedy $a $b-bit g$gs $dt: self vs cpu $([ "$c" = "$s" ] && echo equal || echo "DIFFER [$c] [$s]"); self vs coded $([ "$k" = "$s" ] && echo equal || echo "DIFFER [$k]")"
      done
      log "perplexity $a $b-bit g$gs f32: cpu [$(ppl "$W/$a-$b-$gs" cpu float32)] cuda self [$(ppl "$W/$a-$b-$gs" cuda float32)] coded [$(LMX_CUDA_QMV=coded ppl "$W/$a-$b-$gs" cuda float32)]"
    done
  done
done
BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for m in 4bit 8bit; do
  for round in 1 2; do
    log "round $round $m decode, self-coding: $(bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m decode, coded:       $(LMX_CUDA_QMV=coded bench $m '-p 128 -g 256 -n 2')"
  done
  for n in 4 16; do log "$m decode, self-coding, $n blocks per SM: $(LMX_CUDA_QMV_BLOCKS_PER_SM=$n bench $m '-p 128 -g 256 -n 2')"; done
  r=2; [ $m = 8bit ] && r=4
  for r in $r; do log "$m decode, self-coding, $r rows per block: $(LMX_CUDA_QMV_ROWS=$r bench $m '-p 128 -g 256 -n 2')"; done
  log "$m batched decode -b 8: $(bench $m '-p 128 -g 64 -n 1 -b 8')"
done
log "bf16 decode (reference): $(bench bf16 '-p 128 -g 256 -n 2')"
export LMX
for m in 4bit; do OUT=${OUT:-.} bash scripts/cuda/profile.sh "$W/llama-8b-$m" profile-$m > /dev/null 2>&1; head -30 "${OUT:-.}/profile-$m.txt" | tee -a "$RES"; done
