#!/usr/bin/env bash
# One GPU round (issue 11): decode attention whose splits of a head form one thread block
# cluster and merge through the cluster's shared memory (the default since session 43; `LMX_CUDA_ATTENTION_CLUSTER=0` for the merge before; compute
# capability 9.0) instead of global memory, a fence and a counter. lmx-core's GPU tests of decode
# attention with it (f32 reference; codes the product's own), the llama fixture's greedy tokens
# (graphs against normal steps with it; with it against without: at most 8 splits a head rather
# than 9 may round differently), then recorded steps' device time (`step_ms`), random Llama-3-8B
# and Llama-3.2-1B shapes in MLX 4-bit, two rounds alternating, and 1,000-token steps.
# Usage there: scripts/cuda/attention_cluster.sh   (results in $OUT/attention-cluster.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup acluster attention-cluster.txt
log "# decode attention in clusters, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
for c in 1 0; do
  s=$SECONDS; r=$(LMX_CUDA_ATTENTION_CLUSTER=$c timeout 180 "$W/tests" --test-threads 1 decode_attention 2>&1); rc=$?
  log "[cluster $c] decode_attention: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
  [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right|differ|error" | tail -5 | tee -a "$RES"
done
gen() { $LMX generate --model "$1" --device cuda -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
for m in llama llama-4; do
  log "$m greedy with clusters: graphs vs normal steps $(same "$(LMX_CUDA_ATTENTION_CLUSTER=1 gen "$W/$m")" "$(LMX_CUDA_ATTENTION_CLUSTER=1 LMX_CUDA_GRAPH=0 gen "$W/$m")"); clusters vs not $(same "$(LMX_CUDA_ATTENTION_CLUSTER=1 gen "$W/$m")" "$(LMX_CUDA_ATTENTION_CLUSTER=0 gen "$W/$m")")"
done
SHAPE=8b BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
SHAPE=1b BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l1" 2>&1 | tail -1
for round in 1 2; do
  for m in l8-4bit l1-4bit; do
    LMX_CUDA_ATTENTION_CLUSTER=0 step_ms "$W/$m" "$m last-block merge"
    LMX_CUDA_ATTENTION_CLUSTER=1 step_ms "$W/$m" "$m clusters"
  done
done
N=1000 LMX_CUDA_ATTENTION_CLUSTER=0 step_ms "$W/l8-4bit" "l8-4bit 1000 tokens: last-block merge"
N=1000 LMX_CUDA_ATTENTION_CLUSTER=1 step_ms "$W/l8-4bit" "l8-4bit 1000 tokens: clusters"
for c in 0 1; do
  log "l8-4bit benchmark, clusters $c: $(LMX_CUDA_ATTENTION_CLUSTER=$c $LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -g 256 -n 2 2>&1 | grep -o 'generation_tps=[0-9.]*' | tail -1)"
done
log "(${SECONDS}s)"
