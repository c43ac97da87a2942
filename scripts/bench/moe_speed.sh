#!/usr/bin/env bash
# Mixture-of-experts decode reads only the routed experts (issue 15): a random Qwen3-MoE shape
# (scripts/bench/make_random_moe.py: 441M parameters, 64 experts per layer), MLX 4-bit, run with
# 2, 8 and all 64 experts per token (num_experts_per_tok edited in config.json; the same
# weights): time per token should track the bytes of the active parameters, not the total.
# Usage: scripts/bench/moe_speed.sh [THREADS...]   (default: 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
LMX=target/release/lmx
[ -x $LMX ] || cargo build --release -p lmx-cli
[ -d models/moe-random ] || python3 scripts/bench/make_random_moe.py models/moe-random 2
[ -d models/moe-random-4bit ] || $LMX convert --hf-path models/moe-random -q --mlx-path models/moe-random-4bit
for k in 8 64; do
  d=models/moe-random-4bit-k$k
  if [ ! -d $d ]; then
    mkdir -p $d && ln -s ../moe-random-4bit/model.safetensors $d/model.safetensors && cp models/moe-random-4bit/tokenizer.json $d/
    python3 -c "import json; c = json.load(open('models/moe-random-4bit/config.json')); c['num_experts_per_tok'] = $k; json.dump(c, open('$d/config.json', 'w'))"
  fi
done
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; lmx $(git rev-parse --short HEAD)"
echo "| experts per token | threads | prompt / gen tok/s | ms per token |"
echo "|---|---|---|---|"
for t in ${@:-1 2}; do
  for k in 2 8 64; do
    m=models/moe-random-4bit; [ $k != 2 ] && m=$m-k$k
    line=$(RAYON_NUM_THREADS=$t $LMX benchmark --model $m -p 128 -g 64 -n 3 2>/dev/null | tail -1)
    p=$(echo "$line" | sed 's/.*prompt_tps=\([0-9.]*\).*/\1/'); g=$(echo "$line" | sed 's/.*generation_tps=\([0-9.]*\).*/\1/')
    echo "| $k of 64 | $t | $p / $g | $(python3 -c "print(f'{1000 / $g:.2f}')") |"
  done
done
