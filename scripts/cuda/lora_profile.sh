#!/usr/bin/env bash
# Where a LoRA training step's time goes on the GPU (issue 11): the random Llama-3.2-1B shape
# (SHAPE=8b: Llama-3-8B's; the folders keep the name l1b),
# LoRA rank 8 on every linear layer, batch 4 x 512, bf16 compute. First the wall-clock step
# (12 iterations, `lmx lora`'s report; bf16 and 4-bit bases, the taped training ops on and off,
# LMX_TAPED_OPS, or SWITCH=NAME: that variable at 1 and 0; BASES="bf16 4bit": which bases, in
# order), then every kernel of one iteration (ITERS=N: N) and the first validation
# batch under ncu (gpu__time_duration), summed per kernel name (scripts/cuda/kernel_sums.py);
# then PEFT's kernels for the same step under torch.profiler (scripts/cuda/peer_peft.py
# --profile). Kernel time far below the wall-clock step means the host (launches, allocations)
# sets the pace, not the card. Extra environment passes through.
# Usage there: scripts/cuda/lora_profile.sh   (results in $OUT/lora-profile.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup lora-profile lora-profile.txt
log "# LoRA step profile, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SHAPE=${SHAPE:-1b} python3 scripts/cuda/make_random_llama.py "$W/l1b" 2>&1 | tail -1 | tee -a "$RES"
mkdir -p "$W/data"
python3 -c "
import json, random
random.seed(0)
for split, n in [('train', 64), ('valid', 4)]:
    open('$W/data/' + split + '.jsonl', 'w').write('\n'.join(json.dumps({'text': ' '.join(random.choice('abc') for _ in range(510))}) for _ in range(n)))
"
lora() { $LMX lora --train --data "$W/data" --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-eval 1000 --val-batches 1 --dtype bfloat16 --adapter-path "$W/ad" "$@"; }
# SWITCH (default LMX_TAPED_OPS) is set to 1, then 0, for each base in BASES.
SWITCH=${SWITCH:-LMX_TAPED_OPS}
for m in ${BASES:-bf16 4bit bf16 4bit}; do
  for on in 1 0; do
    log "wall clock, $m base, $SWITCH=$on: $(export "$SWITCH=$on"; lora --model "$W/l1b-$m" --iters 12 --steps-per-report 6 2>&1 | grep -E 'Iter 12: Train|rror' | head -1)"
  done
done
ITERS=${ITERS:-1}
timeout 300 ncu --metrics gpu__time_duration.sum --csv $LMX lora --model "$W/l1b-bf16" --train --data "$W/data" --batch-size 4 --max-seq-length 512 --num-layers -1 --learning-rate 1e-5 --steps-per-eval 1000 --val-batches 1 --dtype bfloat16 --adapter-path "$W/ad" --iters $ITERS --steps-per-report 1 > "$W/ncu.csv" 2> "$W/ncu.err"
tail -2 "$W/ncu.err" | tee -a "$RES"
log "## lmx: kernels of $ITERS training iterations (and one validation batch), per iteration"
python3 scripts/cuda/kernel_sums.py "$W/ncu.csv" $ITERS 40 | tee -a "$RES"
[ "${PEFT:-1}" = 0 ] && exit 0
log "## PEFT (torch.profiler, one step after warm-up)"
python3 scripts/cuda/peer_peft.py "$W/l1b-bf16" --profile 2>&1 | tail -45 | tee -a "$RES"
