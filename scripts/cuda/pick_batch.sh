#!/usr/bin/env bash
# The greedy pick on the device in steps that are not recorded (batches, `LMX_CUDA_GRAPH=0`),
# on the GPU machine (issue 11): the GPU unit tests, greedy tokens with and without the pick on
# normal steps, then Llama-3-8B-shaped 4-bit decode at batch 1 (normal steps), 8 and 32 with
# the pick on and off, interleaved. Usage there: scripts/cuda/pick_batch.sh   ($OUT/pick-batch.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup pickb pick-batch.txt
log "# pick in batches, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
"$W/tests" --test-threads 1 pick_greedy bf16_pairs quant:: cuda gpu fused_ skinny 2>&1 | grep -E "FAILED|panicked|left|right|test result" | tee -a "$RES"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 ${2:-} --ignore-chat-template 2>&1 | head -1; }
for a in llama qwen3; do
  fixture_folder $a; python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/$a"
  $LMX convert --hf-path "$W/$a" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/$a-4" > /dev/null 2>&1
done
for m in llama-4 qwen3-4 llama; do
  for eos in --ignore-eos ""; do
    log "$m ${eos:-(stops at EOS)}, normal steps: pick vs PICK=0 $(same "$(LMX_CUDA_GRAPH=0 gen "$W/$m" "$eos")" "$(LMX_CUDA_GRAPH=0 LMX_CUDA_PICK=0 gen "$W/$m" "$eos")")"
  done
done

BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { $LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -g 128 -n 2 "$@" 2>&1 | tail -1 | grep -o "generation_tps=[0-9.]*"; }
for round in 1 2; do
  log "round $round, batch 1 normal steps: pick [$(LMX_CUDA_GRAPH=0 bench)] PICK=0 [$(LMX_CUDA_GRAPH=0 LMX_CUDA_PICK=0 bench)]"
  for b in 8 32; do
    log "round $round, batch $b: pick [$(bench -b $b)] PICK=0 [$(LMX_CUDA_PICK=0 bench -b $b)]"
  done
done
LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk '{i+=$5; w+=$7; u+=$10; g+=$12; n++} END {printf "4bit graph steps: issue %.3f ms, wait %.3f ms, upload %.3f ms, host between steps %.3f ms (n=%d)\n", i/n, w/n, u/n, g/n, n}' | tee -a "$RES"
timeout 200 python3 scripts/cuda/qmv_bench.py --reps 20 2>&1 | grep -E "pairs|^lmx|plain" | tee -a "$RES"
