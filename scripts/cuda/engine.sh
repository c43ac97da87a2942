#!/usr/bin/env bash
# The generation engine on the GPU machine (issue 12): batched decoding equal to one sequence
# at a time (the fixture Llama in f32), then batched throughput at 1, 4, 16 and 64 sequences,
# a quantized KV cache, and speculative decoding on random Llama-3-8B-shaped weights.
# Results go to $OUT/engine.txt. Needs target/cuda/release/lmx.xz (scripts/build-cuda.sh).
# Usage there: scripts/cuda/engine.sh [--quick]   (--quick: the 1B shape)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup engine engine.txt
log "# lmx CUDA engine check, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"

# 1. A batch equals each sequence alone (greedy, f32, prompts of different lengths).
fixture_folder llama
printf 'a b c\nb b a c a b\nc\na a a a a a a a b\n' > "$W/prompts.txt"
# (No quantized cache here: the fixture's head_dim of 16 is below the smallest group.)
for kv in "" "--max-kv-size 8"; do
  if ! "$LMX" generate --model "$W/llama" --device cuda --dtype float32 --prompts-file "$W/prompts.txt" -m 12 --ignore-eos --verbose false $kv > "$W/batch.jsonl" 2>"$W/err.txt"; then
    log "batch equals alone on cuda [${kv:-growing}]: the batch failed: $(head -c 300 "$W/err.txt")"
    continue
  fi
  same=0; n=0
  while IFS= read -r p; do
    n=$((n + 1))
    alone=$("$LMX" generate --model "$W/llama" --device cuda --dtype float32 -p "$p" -m 12 --ignore-eos --verbose false $kv 2>/dev/null)
    inbatch=$(sed -n "${n}p" "$W/batch.jsonl" | python3 -c "import json,sys; print(json.load(sys.stdin)['text'])")
    [ "$alone" = "$inbatch" ] && same=$((same + 1))
  done < "$W/prompts.txt"
  log "batch equals alone on cuda [${kv:-growing}]: $same of $n prompts $(head -c 300 "$W/err.txt")"
done

# 2. Throughput on random weights in a real shape.
SHAPE=8b; [ "${1:-}" = --quick ] && SHAPE=1b
SHAPE=$SHAPE python3 scripts/cuda/make_random_llama.py "$W/llama-$SHAPE" 2>&1 | tail -1 | tee -a "$RES"
for m in bf16 4bit; do
  for b in 1 4 16 64; do
    log "llama-$SHAPE-$m batch $b (-p 128 -g 64): $("$LMX" benchmark --model "$W/llama-$SHAPE-$m" --device cuda -p 128 -g 64 -n 1 -b $b 2>&1 | tail -1)"
  done
done
log "llama-$SHAPE-bf16 batch 16 --kv-bits 8: $("$LMX" benchmark --model "$W/llama-$SHAPE-bf16" --device cuda -p 128 -g 64 -n 1 -b 16 --kv-bits 8 --quantized-kv-start 0 2>&1 | tail -1)"
for k in 0 3; do
  args=(); [ "$k" != 0 ] && args=(--draft-model "$W/llama-$SHAPE-4bit" --num-draft-tokens $k)
  log "llama-$SHAPE-bf16 speculative draft=$k: $("$LMX" generate --model "$W/llama-$SHAPE-bf16" --device cuda -p 'a b c a b' -m 128 --ignore-eos "${args[@]}" 2>&1 >/dev/null | grep -E '^(Generation|Draft)' | tr '\n' ' ')"
done
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$RES"
