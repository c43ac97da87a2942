#!/usr/bin/env bash
# LoRA / QLoRA training speed on the GPU machine (issue 11): the random Llama-3-8B shape (or 1B),
# LoRA on every linear layer (lmx's default keys, rank 8), batch 4 x 512 tokens, in bf16 and on
# the 4-bit base (QLoRA), with gradient checkpointing (CKPT_ONLY=0: also without), beside transformers + PEFT
# on the same bf16 folder (scripts/cuda/peer_peft.py). Trained tokens/s and peak memory.
# Usage there: [SHAPE=1b] [RUNS="bf16 --dtype bfloat16;..."] scripts/cuda/lora_speed.sh   (results in $OUT/lora-speed-SHAPE.txt)
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
# Without gradient checkpointing an 8B model's activations do not fit (session 13: out of
# memory on 139 GB in float32 and in bfloat16); with it, bfloat16 compute as PEFT's, and the
# 4-bit base in lmx's default float32 too. CKPT_ONLY=0 adds the runs without checkpointing.
runs=("bf16 --dtype bfloat16 --grad-checkpoint" "4bit --dtype bfloat16 --grad-checkpoint" "4bit --grad-checkpoint")
[ "${CKPT_ONLY:-1}" = 0 ] && runs+=("bf16 --dtype float32" "bf16 --dtype bfloat16" "4bit --dtype float32" "4bit --dtype bfloat16")
# RUNS="base flags;base flags;...": these runs instead.
[ -n "${RUNS:-}" ] && IFS=';' read -ra runs <<< "$RUNS"
for r in "${runs[@]}"; do
  set -- $r; m=$1; shift
  log "lmx lora $m $*: $($LMX lora --model "$W/l8b-$m" --train --data "$W/data" --iters 12 --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-report 6 --steps-per-eval 1000 --val-batches 1 "$@" --adapter-path "$W/ad" 2>&1 | grep -E 'Iter 12: Train|rror' | head -1)"
done
python3 scripts/cuda/peer_peft.py "$W/l8b-bf16" 2>&1 | grep -E "PEFT|Error" | tee -a "$RES"
