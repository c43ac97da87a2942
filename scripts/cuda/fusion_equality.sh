#!/usr/bin/env bash
# Bit-equality of the decode fusions on the GPU machine (issue 11): greedy bf16 tokens (100) of
# dense, 4-bit and 8-bit fixtures (llama, qwen3, phi3) with graph steps, again (determinism),
# then with each fusion off (`LMX_CUDA_ROPE_KV=0`, `LMX_CUDA_ADD_NORM=0`,
# `LMX_CUDA_OFFERED_CODES=0`), with normal steps (`LMX_CUDA_GRAPH=0`) and with all three off:
# a fused kernel must round exactly as the kernels it replaces, so every line reads "equal".
# Usage there: scripts/cuda/fusion_equality.sh   (results in $OUT/diag.txt)
cd "$(dirname "$0")/../.."
set -uo pipefail
source scripts/cuda/common.sh
cuda_setup diag diag.txt
gen() { $LMX generate --model "$1" --device cuda --dtype "$2" -p 'a b c a b' -m 100 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
same() { python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None); print(f'equal' if n is None and len(a) == len(b) else f'DIFFER at {n}')" "$1" "$2"; }
for a in llama phi3 qwen3; do
  fixture_folder $a; python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/$a"
  $LMX convert --hf-path "$W/$a" -q --q-bits 4 --q-group-size 64 --mlx-path "$W/$a-4" > /dev/null 2>&1
  $LMX convert --hf-path "$W/$a" -q --q-bits 8 --q-group-size 32 --mlx-path "$W/$a-8" > /dev/null 2>&1
done
for m in llama-4 llama-8 qwen3-4 qwen3-8 phi3 llama; do
  base=$(gen "$W/$m" bfloat16)
  log "$m bf16: again $(same "$base" "$(gen "$W/$m" bfloat16)"); ROPE_KV=0 $(same "$base" "$(LMX_CUDA_ROPE_KV=0 gen "$W/$m" bfloat16)"); ADD_NORM=0 $(same "$base" "$(LMX_CUDA_ADD_NORM=0 gen "$W/$m" bfloat16)"); OFFERED=0 $(same "$base" "$(LMX_CUDA_OFFERED_CODES=0 gen "$W/$m" bfloat16)"); GRAPH=0 $(same "$base" "$(LMX_CUDA_GRAPH=0 gen "$W/$m" bfloat16)"); all off $(same "$base" "$(LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 LMX_CUDA_OFFERED_CODES=0 gen "$W/$m" bfloat16)")"
done
