#!/usr/bin/env bash
# The generation engine's speed on this machine, in one run:
# 1. continuous batching: total decode tokens/s at 1, 4, 16 and 64 sequences (random
#    128-token prompts, 64 tokens each), and the KV cache per sequence, for the default model;
# 2. each KV cache kind at 16 sequences (growing, 8-bit, 4-bit, rotating 64);
# 3. speculative decoding: SmolLM2 f32 alone, then drafted by its 4-bit version (2 and 3 draft
#    tokens), alternating, on a chat prompt.
# With MLX_PYTHON set (a python with mlx-lm), mlx_lm.benchmark runs the same batch sizes (up to
# 16, in the first round) on the same weights (models/smollm2-f32) right after lmx, as the peer.
# Usage: [MLX_PYTHON=/tmp/mlxenv/bin/python] scripts/bench/engine_speed.sh [LMX] [ROUNDS]
# Needs models/SmolLM2-135M-Instruct-f32 and models/smollm2-4bit for part 3 (see run_lora.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
LMX=${1:-target/release/lmx}; ROUNDS=${2:-2}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $RAYON_NUM_THREADS threads"
for round in $(seq "$ROUNDS"); do
  for b in 1 4 16 64; do
    echo "batch $b: $("$LMX" benchmark -p 128 -g 64 -n 1 -b "$b" 2>/dev/null | tail -1)"
    # MLX on the CPU is slow (about 20 prompt tokens/s here): once, up to 16 sequences.
    if [ -n "${MLX_PYTHON:-}" ] && [ "$round" = 1 ] && [ "$b" -le 16 ]; then
      echo "mlx batch $b: $("$MLX_PYTHON" -m mlx_lm benchmark --model models/smollm2-f32 -p 128 -g 64 -n 1 -b "$b" 2>/dev/null | tail -1)"
    fi
  done
  for kv in "--kv-bits 8 --quantized-kv-start 0" "--kv-bits 4 --quantized-kv-start 0" "--max-kv-size 64"; do
    echo "batch 16 $kv: $("$LMX" benchmark -p 128 -g 64 -n 1 -b 16 $kv 2>/dev/null | tail -1)"
  done
  if [ -d models/SmolLM2-135M-Instruct-f32 ] && [ -d models/smollm2-4bit ]; then
    for draft in none 2 3; do
      args=(); [ "$draft" != none ] && args=(--draft-model models/smollm2-4bit --num-draft-tokens "$draft")
      out=$("$LMX" generate --model models/SmolLM2-135M-Instruct-f32 -p "Write a short poem about the sea." -m 100 --ignore-eos "${args[@]}" 2>&1 >/dev/null)
      echo "speculative draft=$draft: $(echo "$out" | grep -E '^(Generation|Draft)' | tr '\n' ' ')"
    done
  fi
done
