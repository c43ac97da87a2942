#!/usr/bin/env bash
# LoRA training speed and peak memory: lmx beside PyTorch + PEFT (and optionally mlx_lm.lora),
# same data (scripts/bench/data/lora: 64 records of 60-64 tokens, every batch 4 x 65), LoRA
# rank 8 / scale 20 on q/k/v/o/gate/up/down of the last 16 layers, Adam at 1e-5, 2 threads.
# lmx: the report over iterations 9-24 (after the heap has grown); PEFT: iterations 3-24.
# Usage: scripts/bench/run_lora.sh [MLX_ITERS]   (MLX LM: ~30 s per step here; 0 skips it)
# Builds the model folders it needs (as scripts/bench/cpu_speed.sh: f32 and bf16 from the
# default GGUF, the MLX 4-bit from bf16, so bf16 scales and biases). PEFT: f32, bf16, and bf16
# with bitsandbytes NF4 beside lmx's 4-bit base (QLoRA). Needs torch, transformers, peft and
# bitsandbytes (pip).
set -euo pipefail
cd "$(dirname "$0")/../.."
MLX_ITERS=${1:-0}
DATA=scripts/bench/data/lora
OUT=$(mktemp -d)
LMX=target/release/lmx
[ -x $LMX ] || cargo build --release -p lmx-cli --bin lmx
scripts/fetch-default-model.sh
[ -d models/smollm2-f32 ] || $LMX convert --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path models/smollm2-f32
[ -d models/smollm2-bf16 ] || $LMX convert --hf-path models/smollm2-f32 --dtype bfloat16 --mlx-path models/smollm2-bf16
[ -d models/smollm2-4bit ] || $LMX convert --hf-path models/smollm2-bf16 -q --mlx-path models/smollm2-4bit
for m in models/smollm2-f32 models/smollm2-bf16 models/smollm2-4bit; do
  for gc in "" --grad-checkpoint; do
    rm -rf "$OUT/ad"
    $LMX lora --model "$m" --train --data "$DATA" --iters 24 --steps-per-report 8 \
      --steps-per-eval 100000 --val-batches 1 --adapter-path "$OUT/ad" $gc 2>&1 \
      | grep "Iter 24: Train" | sed "s|^|lmx $m $gc: |"
  done
done
python3 scripts/bench/peer_peft_lora.py --model models/smollm2-f32 --data "$DATA" --iters 24 | grep RESULT
python3 scripts/bench/peer_peft_lora.py --model models/smollm2-bf16 --data "$DATA" --iters 24 --dtype bfloat16 | grep RESULT
python3 scripts/bench/peer_peft_lora.py --model models/smollm2-bf16 --data "$DATA" --iters 24 --dtype bfloat16 --nf4 | grep RESULT
if [ "$MLX_ITERS" != 0 ]; then
  python3 scripts/bench/peer_mlx_lora.py --model models/smollm2-bf16 --data "$DATA" --iters "$MLX_ITERS" | grep RESULT
fi
rm -rf "$OUT"
