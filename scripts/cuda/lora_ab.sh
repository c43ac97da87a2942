#!/usr/bin/env bash
# A switch of LoRA training on the GPU machine, measured both ways in one call: the random
# Llama-3.2-1B and Llama-3-8B shapes, LoRA r8 on every linear, batch 4 x 512, bf16 compute,
# bf16 and 4-bit bases, SWITCH=1 and SWITCH=0 alternating, then transformers + PEFT on the same
# bf16 folder. SWITCH (default LMX_GRAD_MARKERS: gradient slots as markers,
# scripts/cuda/patch_candle_backprop.py, whose losses must be equal both ways) names the
# environment variable; SHAPES="1b 8b", BASES="bf16 4bit", ROUNDS_1B=2 and ROUNDS_8B=1 choose the
# runs. lmx-core's training tests (GPU and CPU) run first.
# Usage there: [SWITCH=NAME] scripts/cuda/lora_ab.sh   (results in $OUT/lora-ab-NAME.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
SWITCH=${SWITCH:-LMX_GRAD_MARKERS}
cuda_setup lora-ab "lora-ab-$SWITCH.txt"
log "# LoRA with $SWITCH=1 and =0, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
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
for shape in ${SHAPES:-1b 8b}; do
  rounds=$([ $shape = 1b ] && echo "${ROUNDS_1B:-2}" || echo "${ROUNDS_8B:-1}")
  SHAPE=$shape BITS=4 python3 scripts/cuda/make_random_llama.py "$W/m$shape" 2>&1 | tail -1 | tee -a "$RES"
  for round in $(seq "$rounds"); do
    for base in ${BASES:-bf16 4bit}; do
      for on in 1 0; do
        out=$(env "$SWITCH=$on" $LMX lora --model "$W/m$shape-$base" --train --data "$W/data" --iters 12 --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-report 6 --steps-per-eval 1000 --val-batches 1 --dtype bfloat16 --adapter-path "$W/ad" 2>&1)
        log "$shape $base $SWITCH=$on round $round: $(echo "$out" | grep -E 'Iter 12: Train|rror' | head -1)"
      done
    done
  done
  python3 scripts/cuda/peer_peft.py "$W/m$shape-bf16" 2>&1 | grep -E "PEFT|Error" | sed "s/^/$shape /" | tee -a "$RES"
  rm -rf "$W/m$shape"*
done
