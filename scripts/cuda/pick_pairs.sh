#!/usr/bin/env bash
# The device-side greedy pick and bf16 (scale, bias) pairs on the GPU machine (issue 11), one
# round: the kernels' unit tests, greedy tokens (300, past the cache's first reallocation) of
# 4- and 8-bit fixtures with bf16 scales equal with the pick off (`LMX_CUDA_PICK=0`), f32 pairs
# (`LMX_CUDA_SB16=0`) and normal steps (`LMX_CUDA_GRAPH=0`), then Llama-3-8B-shaped decode
# with each on and off (interleaved), each graph step's host issue and device wait, and the
# CuPy kernel harness. Usage there: scripts/cuda/pick_pairs.sh   (results in $OUT/pick.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup pick pick.txt
log "# pick + bf16 pairs, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
"$W/tests" --test-threads 1 pick_greedy bf16_pairs quant:: 2>&1 | grep -E "^test |test result" | tee -a "$RES"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 ${2:-} --ignore-chat-template 2>&1 | head -1; }
for a in llama qwen3 phi3; do
  fixture_folder $a; python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/$a"
  $LMX convert --hf-path "$W/$a" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/$a-4" > /dev/null 2>&1
  $LMX convert --hf-path "$W/$a" --dtype bfloat16 -q --q-bits 8 --q-group-size 32 --mlx-path "$W/$a-8" > /dev/null 2>&1
done
for m in llama-4 llama-8 qwen3-4 qwen3-8 phi3-4 llama; do
  for eos in --ignore-eos ""; do
    base=$(gen "$W/$m" "$eos")
    log "$m ${eos:-(stops at EOS)}: PICK=0 $(same "$base" "$(LMX_CUDA_PICK=0 gen "$W/$m" "$eos")"); SB16=0 $(same "$base" "$(LMX_CUDA_SB16=0 gen "$W/$m" "$eos")"); GRAPH=0 $(same "$base" "$(LMX_CUDA_GRAPH=0 gen "$W/$m" "$eos")")"
  done
done

BF16=0 BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -p 128 -g 256 -n 3 2>&1 | tail -1; }
for round in 1 2; do
  for b in 4bit 8bit; do
    log "round $round $b: default [$(bench $b)] PICK=0 [$(LMX_CUDA_PICK=0 bench $b)] SB16=0 [$(LMX_CUDA_SB16=0 bench $b)] both off [$(LMX_CUDA_PICK=0 LMX_CUDA_SB16=0 bench $b)]"
  done
done
for env in "" LMX_CUDA_PICK=0; do
  env $env LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step" | tail -150 | awk -v e="${env:-default}" '{i+=$5; w+=$7; n++} END {printf "4bit graph steps (%s): issue %.3f ms wait %.3f ms (n=%d)\n", e, i/n, w/n, n}' | tee -a $RES
done
python3 scripts/cuda/qmv_bench.py --reps 20 2>&1 | tail -30 | tee -a "$RES"
