#!/usr/bin/env bash
# Two lmx binaries (e.g. the commit before a change and after it) on the same model folders,
# alternating run by run so drift on a shared machine hits both alike: decode and prefill
# (`lmx benchmark`) for f32, bf16 and 4-bit, and LoRA training it/s (24 iterations, the
# report over iterations 9-24) for f32 and 4-bit. Odd rounds run the old binary first, even
# rounds the new one.
# Usage: scripts/bench/before_after.sh OLD_LMX NEW_LMX [ROUNDS]
# Needs models/SmolLM2-135M-Instruct-{f32,bf16} and models/smollm2-4bit (see run_lora.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=$1; NEW=$2; ROUNDS=${3:-2}
export RAYON_NUM_THREADS=2
DATA=scripts/bench/data/lora
OUT=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  order="OLD NEW"
  [ $((round % 2)) = 0 ] && order="NEW OLD"
  for m in models/SmolLM2-135M-Instruct-f32 models/SmolLM2-135M-Instruct-bf16 models/smollm2-4bit; do
    for which in $order; do
      bin=${!which}
      echo "round $round $which $m: $("$bin" benchmark --model "$m" -p 128 -g 64 -n 3 2>/dev/null | tail -1)"
    done
  done
  for m in models/SmolLM2-135M-Instruct-f32 models/smollm2-4bit; do
    for which in $order; do
      bin=${!which}
      rm -rf "$OUT/ad"
      "$bin" lora --model "$m" --train --data "$DATA" --iters 24 --steps-per-report 8 --steps-per-eval 100000 \
        --val-batches 1 --adapter-path "$OUT/ad" 2>&1 | grep "Iter 24: Train" | sed "s|^|round $round $which lora $m: |"
    done
  done
done
rm -rf "$OUT"
