#!/usr/bin/env bash
# Where greedy tokens of a recorded (graph) step and a normal step part, for one fixture
# (default phi3, 4-bit, bf16 scales): each decode fusion off in turn on both sides, and f32.
# Usage there: ARCH=phi3 scripts/cuda/graph_diff.sh   (results in $OUT/graph-diff.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup gdiff graph-diff.txt
A=${ARCH:-phi3}
fixture_folder $A; python3 -c "import json; p = '$W/$A/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/$A"
$LMX convert --hf-path "$W/$A" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/$A-4" > /dev/null 2>&1
gen() { $LMX generate --model "$1" --device cuda --dtype "$2" -p 'a b c a b' -m 120 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
for m in $A-4 $A; do
  for dt in bfloat16 float32; do
    for env in "" LMX_CUDA_PICK=0 LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 LMX_CUDA_OFFERED_CODES=0 LMX_CUDA_DECODE_KEYS=1 "LMX_CUDA_ROPE_KV=0 LMX_CUDA_ADD_NORM=0 LMX_CUDA_OFFERED_CODES=0"; do
      g=$(export $env DUMMY=1; gen "$W/$m" $dt); e=$(export $env LMX_CUDA_GRAPH=0; gen "$W/$m" $dt)
      log "$m $dt ${env:-default}: graph vs normal steps $(same "$g" "$e")"
    done
  done
done
