#!/usr/bin/env bash
# Quantized speed beside the peers, in one run (docs/BENCHMARKS.md): lmx 4-bit/8-bit (MLX
# format, written by lmx convert; byte-identical to mlx_lm.convert's), llama.cpp Q4_0/Q8_0 of
# the same weights, and mlx_lm.benchmark on the same folders.
# Prepare (once):
#   lmx convert --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --dtype bfloat16 --mlx-path models/smollm2-bf16
#   lmx convert --hf-path models/smollm2-bf16 -q --mlx-path models/smollm2-4bit
#   lmx convert --hf-path models/smollm2-bf16 -q --q-bits 8 --mlx-path models/smollm2-8bit
#   python scripts/bench/make_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-Q4_0.gguf q4_0   (and q8_0)
#   python scripts/bench/make_random_llama.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-bf16 models/llama-1b-random
#   lmx convert --hf-path models/llama-1b-random -q --mlx-path models/llama-1b-random-4bit   (and --q-bits 8 -> -8bit)
# Usage: scripts/bench/run_quant.sh [PROMPT_TOKENS] [GEN_TOKENS] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-128}; G=${2:-64}; N=${3:-3}
export RAYON_NUM_THREADS=2
for model in smollm2 llama-1b-random; do
  for bits in 4 8; do
    q=$([ $bits = 4 ] && echo Q4_0 || echo Q8_0)
    gguf=models/$model-$q.gguf
    echo "== $model ${bits}-bit: lmx ($(du -sh models/$model-${bits}bit | cut -f1))"
    target/release/lmx benchmark --model models/$model-${bits}bit -p $P -g $G -n $N 2>/dev/null | tail -1
    echo "== $model ${bits}-bit: llama.cpp $q ($(du -sh $gguf | cut -f1))"
    python3 scripts/bench/peer_llama_cpp.py $gguf $P $G $N 2 | tail -1
    if [ "${SKIP_MLX:-0}" != 1 ]; then
      echo "== $model ${bits}-bit: mlx_lm.benchmark"
      mlx_lm.benchmark --model models/$model-${bits}bit -p ${MLX_P:-$P} -g ${MLX_G:-$G} -n 1 2>/dev/null | tail -1
    fi
  done
done
