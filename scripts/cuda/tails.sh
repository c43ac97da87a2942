#!/usr/bin/env bash
# One GPU round (issue 11): the add + norm folded into the output projection's last block
# (`LMX_CUDA_PRODUCT_NORM=0`: the product, then the add + norm's launch) and decode attention
# in one pass for short contexts (`LMX_CUDA_ATTENTION_ONE_PASS=N` keys in use, warps a block
# `LMX_CUDA_ATTENTION_WARPS`). Checks first (lmx-core's GPU tests of both; the llama fixture's
# greedy tokens, graphs against normal steps and fused against not), then the recorded steps'
# device time (`step_ms`), random Llama-3-8B shape, MLX 4-bit, two rounds.
# Usage there: scripts/cuda/tails.sh   (results in $OUT/tails.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup tails tails.txt
log "# product tails and one-pass attention, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
test_one() {
  s=$SECONDS; r=$(timeout 180 "$W/tests" --test-threads 1 "$1" 2>&1); rc=$?
  log "[${2:-default}] $1: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
  [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right|differ" | tail -5 | tee -a "$RES"
}
test_one product_add_norm_equals
test_one decode_attention
LMX_CUDA_ATTENTION_ONE_PASS=4096 test_one decode_attention "one pass up to 4096 keys"
LMX_CUDA_ATTENTION_ONE_PASS=4096 LMX_CUDA_ATTENTION_WARPS=32 test_one decode_attention "one pass, 32 warps"
gen() { $LMX generate --model "$1" --device cuda -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
for dt in bfloat16 float32; do
  $LMX convert --hf-path "$W/llama" --dtype $dt -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4-$dt" > /dev/null 2>&1
  m=$W/llama-4-$dt
  log "llama 4-bit $dt greedy: graphs vs normal steps $(same "$(gen $m)" "$(LMX_CUDA_GRAPH=0 gen $m)"); fused norm vs not $(same "$(gen $m)" "$(LMX_CUDA_PRODUCT_NORM=0 gen $m)"); one pass (32 warps) vs split $(same "$(LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=32 gen $m)" "$(gen $m)"); one pass graphs vs normal $(same "$(LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=32 gen $m)" "$(LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=32 LMX_CUDA_GRAPH=0 gen $m)")"
done
SHAPE=${SHAPE:-8b} BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l" 2>&1 | tail -1
for round in 1 2; do
  step_ms "$W/l-4bit" "default (norm in the o_proj tail)"
  LMX_CUDA_PRODUCT_NORM=0 step_ms "$W/l-4bit" "norm launched apart"
  LMX_CUDA_ATTENTION_ONE_PASS=512 step_ms "$W/l-4bit" "one pass <= 512, 8 warps"
  LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=16 step_ms "$W/l-4bit" "one pass <= 512, 16 warps"
  LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=32 step_ms "$W/l-4bit" "one pass <= 512, 32 warps"
  LMX_CUDA_ATTENTION_WARPS=16 step_ms "$W/l-4bit" "split, 16 warps"
  LMX_CUDA_ABLATE=attention step_ms "$W/l-4bit" "no attention"
done
N=1000 step_ms "$W/l-4bit" "1000 tokens: default"
N=1000 LMX_CUDA_ATTENTION_ONE_PASS=512 LMX_CUDA_ATTENTION_WARPS=32 step_ms "$W/l-4bit" "1000 tokens: one pass <= 512, 32 warps"
"$LMX" benchmark --model "$W/l-4bit" --device cuda -p 128 -g 256 -n 2 2>&1 | grep -E "generation_tps|tok/s" | tail -1 | sed 's/^/default benchmark: /' | tee -a "$RES"
LMX_CUDA_PRODUCT_NORM=0 "$LMX" benchmark --model "$W/l-4bit" --device cuda -p 128 -g 256 -n 2 2>&1 | grep -E "generation_tps|tok/s" | tail -1 | sed 's/^/norm apart benchmark: /' | tee -a "$RES"
log "(${SECONDS}s)"
