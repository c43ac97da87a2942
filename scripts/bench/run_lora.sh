#!/usr/bin/env bash
# LoRA training speed and peak memory: lmx beside PyTorch + PEFT and mlx_lm.lora, same data
# (scripts/bench/lora_data.py), batch 4, LoRA rank 8 / scale 20 on the last 16 layers, Adam at
# 1e-5, one pass over the 16 batches. Usage: scripts/bench/run_lora.sh [MLX_ITERS]
# Needs models/SmolLM2-135M-Instruct-{f32,bf16} (lmx convert --gguf ... --dtype ...) and
# models/smollm2-4bit (lmx convert -q); MLX_ITERS=0 skips MLX LM (about 30 s per step here).
set -euo pipefail
cd "$(dirname "$0")/../.."
MLX_ITERS=${1:-3}
DATA=$(mktemp -d)
python3 scripts/bench/lora_data.py "$DATA"
LMX=target/release/lmx
lmx_run() {
  rm -rf "$DATA/ad"
  $LMX lora --model "$1" --train --data "$DATA" --iters 16 --steps-per-report 16 --steps-per-eval 100000 \
    --val-batches 1 --adapter-path "$DATA/ad" 2>&1 | grep "Iter 16: Train" | sed "s|^|lmx $1: |"
}
lmx_run models/SmolLM2-135M-Instruct-f32
lmx_run models/SmolLM2-135M-Instruct-bf16
lmx_run models/smollm2-4bit
python3 scripts/bench/peft_lora.py --model models/SmolLM2-135M-Instruct-f32 --data "$DATA" --iters 16 | grep RESULT
python3 scripts/bench/peft_lora.py --model models/SmolLM2-135M-Instruct-bf16 --data "$DATA" --iters 16 --dtype bfloat16 | grep RESULT
if [ "$MLX_ITERS" != 0 ]; then
  for m in models/SmolLM2-135M-Instruct-bf16 models/smollm2-4bit; do
    rm -rf "$DATA/mad"
    mlx_lm.lora --model "$m" --train --data "$DATA" --iters "$MLX_ITERS" --steps-per-report "$MLX_ITERS" \
      --steps-per-eval 100000 --val-batches 1 --adapter-path "$DATA/mad" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -iE "tok|peak|it/s" | tail -3 | sed "s|^|mlx $m: |"
  done
fi
rm -rf "$DATA"
