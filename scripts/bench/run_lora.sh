#!/usr/bin/env bash
# LoRA training speed and peak memory: lmx beside PyTorch + PEFT (and optionally mlx_lm.lora),
# same data (scripts/bench/data/lora: 64 records of 60-64 tokens, every batch 4 x 65), LoRA
# rank 8 / scale 20 on q/k/v/o/gate/up/down of the last 16 layers, Adam at 1e-5, 2 threads.
# lmx: the report over iterations 9-24 (after the heap has grown); PEFT: iterations 3-24.
# Usage: scripts/bench/run_lora.sh [MLX_ITERS]   (MLX LM: ~30 s per step here; 0 skips it)
# Needs models/SmolLM2-135M-Instruct-{f32,bf16} (lmx convert --gguf ... [--dtype bfloat16])
# and models/smollm2-4bit (lmx convert --hf-path models/SmolLM2-135M-Instruct-bf16 -q).
set -euo pipefail
cd "$(dirname "$0")/../.."
MLX_ITERS=${1:-0}
DATA=scripts/bench/data/lora
OUT=$(mktemp -d)
for m in models/SmolLM2-135M-Instruct-f32 models/SmolLM2-135M-Instruct-bf16 models/smollm2-4bit; do
  for gc in "" --grad-checkpoint; do
    rm -rf "$OUT/ad"
    target/release/lmx lora --model "$m" --train --data "$DATA" --iters 24 --steps-per-report 8 \
      --steps-per-eval 100000 --val-batches 1 --adapter-path "$OUT/ad" $gc 2>&1 \
      | grep "Iter 24: Train" | sed "s|^|lmx $m $gc: |"
  done
done
python3 scripts/bench/peer_peft_lora.py --model models/SmolLM2-135M-Instruct-f32 --data "$DATA" --iters 24 | grep RESULT
python3 scripts/bench/peer_peft_lora.py --model models/SmolLM2-135M-Instruct-bf16 --data "$DATA" --iters 24 --dtype bfloat16 | grep RESULT
if [ "$MLX_ITERS" != 0 ]; then
  python3 scripts/bench/peer_mlx_lora.py --model models/SmolLM2-135M-Instruct-bf16 --data "$DATA" --iters "$MLX_ITERS" | grep RESULT
fi
rm -rf "$OUT"
