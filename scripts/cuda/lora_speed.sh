#!/usr/bin/env bash
# LoRA / QLoRA training speed on the GPU machine (issue 11): the random Llama-3-8B shape (or 1B),
# LoRA on every linear layer (lmx's default keys, rank 8), batch 4 x 512 tokens, in bf16 and on
# the 4-bit base (QLoRA), computing in float32 and in bfloat16, beside transformers + PEFT
# on the same bf16 folder (scripts/cuda/peer_peft.py). Trained tokens/s and peak memory.
# Usage there: [SHAPE=1b] scripts/cuda/lora_speed.sh   (results in $OUT/lora-speed-SHAPE.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
SHAPE=${SHAPE:-8b}
cuda_setup lora-speed "lora-speed-$SHAPE.txt"
log "# LoRA speed on CUDA, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SHAPE=$SHAPE BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8b" 2>&1 | tail -1 | tee -a "$RES"
mkdir -p "$W/data"
python3 -c "
import json, random
random.seed(0)
for split, n in [('train', 64), ('valid', 4)]:
    open('$W/data/' + split + '.jsonl', 'w').write('\n'.join(json.dumps({'text': ' '.join(random.choice('abc') for _ in range(510))}) for _ in range(n)))
"
# In float32 (lmx's default) an 8B model's activations do not fit (session 13: out of memory
# on 139 GB); bfloat16 compute as PEFT's.
for m in bf16 4bit; do
  for dt in float32 bfloat16; do
    log "lmx lora $m, compute $dt: $($LMX lora --model "$W/l8b-$m" --train --data "$W/data" --iters 12 --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-report 6 --steps-per-eval 1000 --val-batches 1 --dtype $dt --adapter-path "$W/ad" 2>&1 | grep -E 'Iter 12: Train|rror' | head -1)"
  done
done
python3 scripts/cuda/peer_peft.py "$W/l8b-bf16" 2>&1 | grep -E "PEFT|Error" | tee -a "$RES"
