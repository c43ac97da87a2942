#!/usr/bin/env bash
# One GPU round (issue 11): the residual add + norm with a thread's 8 values in registers
# (`LMX_CUDA_NORM8=0`: the kernel before, a thread per 4 values reading back what it wrote).
# lmx-core's GPU test of it (bit-equal to the add, then the norm; its codes the product's own),
# the llama fixture's greedy tokens both ways (must be equal: the same bits), then recorded
# steps' device time (`step_ms`), random Llama-3-8B shape in MLX 4-bit and Llama-3.2-1B shape in
# 4-bit and bf16, two rounds alternating.
# Usage there: scripts/cuda/norm8.sh   (results in $OUT/norm8.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup norm8 norm8.txt
log "# add + norm in registers, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
for t in add_rms_norm_on_the_gpu decode_attention_codes; do
  s=$SECONDS; r=$(timeout 180 "$W/tests" --test-threads 1 "$t" 2>&1); rc=$?
  log "$t: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
  [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right|differ" | tail -5 | tee -a "$RES"
done
gen() { $LMX generate --model "$1" --device cuda -p 'a b c a b' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
for m in llama llama-4; do
  log "$m greedy, registers vs before: $(same "$(gen "$W/$m")" "$(LMX_CUDA_NORM8=0 gen "$W/$m")")"
done
SHAPE=8b BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
SHAPE=1b BF16=1 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l1" 2>&1 | tail -1
ls "$W"
for round in 1 2; do
  for m in l8-4bit l1-4bit l1-bf16; do
    [ -d "$W/$m" ] || continue
    step_ms "$W/$m" "$m registers"
    LMX_CUDA_NORM8=0 step_ms "$W/$m" "$m before"
  done
done
log "(${SECONDS}s)"
