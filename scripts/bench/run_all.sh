#!/usr/bin/env bash
# The default model's speed beside its peers, in one run on one machine (docs/BENCHMARKS.md).
# Needs: a release build of lmx, pip packages llama-cpp-python, gguf, mlx[cpu], mlx-lm, and
# the f32 / bf16 model folders and GGUFs of the same weights:
#   target/release/lmx convert --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path models/SmolLM2-135M-Instruct-f32
#   target/release/lmx convert --hf-path models/SmolLM2-135M-Instruct-f32 --dtype bfloat16 --mlx-path models/SmolLM2-135M-Instruct-bf16
#   python scripts/bench/make_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/SmolLM2-135M-Instruct-F32.gguf f32
#   python scripts/bench/make_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/SmolLM2-135M-Instruct-BF16.gguf bf16
# Usage: scripts/bench/run_all.sh [PROMPT_TOKENS] [GEN_TOKENS] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-128}; G=${2:-64}; N=${3:-3}
export RAYON_NUM_THREADS=2
for prec in f32 bf16; do
  up=$(echo $prec | tr a-z A-Z)
  echo "== $prec: lmx (folder)"
  target/release/lmx benchmark --model models/SmolLM2-135M-Instruct-$prec -p $P -g $G -n $N 2>/dev/null | tail -1
  echo "== $prec: llama.cpp ($up GGUF)"
  python3 scripts/bench/peer_llama_cpp.py models/SmolLM2-135M-Instruct-$up.gguf $P $G $N 2 | tail -1
  if [ "${SKIP_MLX:-0}" != 1 ]; then
    echo "== $prec: mlx_lm.benchmark (mlx[cpu])"
    mlx_lm.benchmark --model models/SmolLM2-135M-Instruct-$prec -p $P -g $G -n 1 2>/dev/null | tail -1
  fi
done
