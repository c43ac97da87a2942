#!/usr/bin/env bash
# One GPU round (issue 11): fewer dependent memory round trips in two small decode kernels, the
# residual add + norm with a thread's 8 values in registers (`LMX_CUDA_NORM8=0`: the kernel
# before, a thread per 4 values reading back what it wrote) and decode attention keeping a
# head's outputs for their codes and merging its splits with every load at once
# (`LMX_CUDA_ATTENTION_KEEP=0`: as before). lmx-core's GPU tests of them (bit-equal to the
# kernels before; codes the product's own), the llama fixture's greedy tokens each way (must be
# equal: the same bits), then recorded steps' device time (`step_ms`), random Llama-3-8B shape
# in MLX 4-bit and Llama-3.2-1B shape in 4-bit and bf16, two rounds alternating.
# Usage there: scripts/cuda/small_kernels.sh   (results in $OUT/small-kernels.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup smallk small-kernels.txt
log "# add + norm in registers, attention keeping its outputs, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
for t in add_rms_norm_on_the_gpu decode_attention; do
  for keep in 1 0; do
    s=$SECONDS; r=$(LMX_CUDA_ATTENTION_KEEP=$keep timeout 180 "$W/tests" --test-threads 1 "$t" 2>&1); rc=$?
    log "[keep $keep] $t: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
    [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right|differ" | tail -5 | tee -a "$RES"
  done
done
gen() { $LMX generate --model "$1" --device cuda -p 'a b c a b' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
for m in llama llama-4; do
  log "$m greedy, norm in registers vs before: $(same "$(gen "$W/$m")" "$(LMX_CUDA_NORM8=0 gen "$W/$m")"); attention keeping vs before: $(same "$(gen "$W/$m")" "$(LMX_CUDA_ATTENTION_KEEP=0 gen "$W/$m")"); graphs vs normal steps: $(same "$(gen "$W/$m")" "$(LMX_CUDA_GRAPH=0 gen "$W/$m")")"
done
SHAPE=8b BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
SHAPE=1b BF16=1 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l1" 2>&1 | tail -1
ls "$W"
for round in 1 2; do
  for m in l8-4bit l1-4bit l1-bf16; do
    [ -d "$W/$m" ] || continue
    step_ms "$W/$m" "$m both"
    LMX_CUDA_NORM8=0 step_ms "$W/$m" "$m norm as before"
    LMX_CUDA_ATTENTION_KEEP=0 step_ms "$W/$m" "$m attention as before"
    LMX_CUDA_NORM8=0 LMX_CUDA_ATTENTION_KEEP=0 step_ms "$W/$m" "$m neither"
  done
done
log "(${SECONDS}s)"
