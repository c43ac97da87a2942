#!/usr/bin/env bash
# Gradient slots as markers (scripts/cuda/patch_candle_backprop.py) on the GPU machine: LoRA
# training of the random Llama-3.2-1B and Llama-3-8B shapes, LoRA r8 on every linear, batch
# 4 x 512, bf16 and 4-bit bases, with the patched backward and with candle's zeros
# (LMX_GRAD_MARKERS=0) alternating, then transformers + PEFT on the same bf16 folder. The
# losses must be equal both ways (0 + g = g); the rates and peaks are the comparison.
# Usage there: scripts/cuda/grad_markers.sh   (results in $OUT/grad-markers.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup grad-markers grad-markers.txt
log "# Gradient markers, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
# lmx-core's tests that train through candle's backward (gradient checks, fused passes), CPU and GPU.
if [ -f target/cuda/release/lmx-core-tests.xz ]; then
  xz -dc target/cuda/release/lmx-core-tests.xz > "$W/core-tests" && chmod +x "$W/core-tests"
  log "lmx-core tests (grad, fused, skinny, lora, cross_entropy): $("$W/core-tests" --test-threads 1 grad fused skinny lora cross_entropy 2>&1 | grep -E '^test result|FAILED|panicked' | head -5)"
fi
mkdir -p "$W/data"
python3 -c "
import json, random
random.seed(0)
for split, n in [('train', 64), ('valid', 4)]:
    open('$W/data/' + split + '.jsonl', 'w').write('\n'.join(json.dumps({'text': ' '.join(random.choice('abc') for _ in range(510))}) for _ in range(n)))
"
# ROUNDS_1B / ROUNDS_8B: alternating rounds a shape (2 and 1: an 8B round takes minutes).
for shape in 1b 8b; do
  rounds=$([ $shape = 1b ] && echo "${ROUNDS_1B:-2}" || echo "${ROUNDS_8B:-1}")
  SHAPE=$shape BITS=4 python3 scripts/cuda/make_random_llama.py "$W/m$shape" 2>&1 | tail -1 | tee -a "$RES"
  for round in $(seq "$rounds"); do
    for base in bf16 4bit; do
      for markers in 1 0; do
        out=$(LMX_GRAD_MARKERS=$markers $LMX lora --model "$W/m$shape-$base" --train --data "$W/data" --iters 12 --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-report 6 --steps-per-eval 1000 --val-batches 1 --dtype bfloat16 --adapter-path "$W/ad" 2>&1)
        log "$shape $base markers=$markers round $round: $(echo "$out" | grep -E 'Iter 12: Train|rror' | head -1)"
      done
    done
  done
  python3 scripts/cuda/peer_peft.py "$W/m$shape-bf16" 2>&1 | grep -E "PEFT|Error" | sed "s/^/$shape /" | tee -a "$RES"
  rm -rf "$W/m$shape"*
done
