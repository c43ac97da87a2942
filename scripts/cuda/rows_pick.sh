#!/usr/bin/env bash
# One GPU round (issue 11): 2 rows a block for 4-bit products whose rows take more than one
# pass (the down product) and the greedy pick over many blocks, against `LMX_CUDA_QMV_ROWS=4`
# (the rows before) on the same binary: lmx-core's GPU tests, greedy tokens equal with the
# rows fixed at 4, `lmx serve` with a greedy and two sampled streams at once (a batch mixing
# picked and sampled rows: the greedy text must equal the same request alone), Llama-3-8B-
# shaped decode interleaved, a step's trace and its kernel times (ncu at the card's clocks).
# Usage there: scripts/cuda/rows_pick.sh   (results in $OUT/rows-pick.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup rows rows-pick.txt
log "# rows + pick, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
timeout 200 "$W/tests" --test-threads 1 pick_greedy bf16_pairs quant:: cuda gpu fused_ skinny 2>&1 | grep -E "FAILED|panicked|left|right|test result" | tee -a "$RES"

gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
log "llama-4 greedy, rows fixed at 4 vs default: $(same "$(LMX_CUDA_QMV_ROWS=4 gen "$W/llama-4")" "$(gen "$W/llama-4")"); pick off vs on: $(same "$(LMX_CUDA_PICK=0 gen "$W/llama-4")" "$(gen "$W/llama-4")")"

# A batch mixing a greedy (picked on the device) and sampled rows, through the server.
M="$W/llama-4"
"$LMX" serve --model "$M" --device cuda --port 8094 > "$W/serve.log" 2>&1 &
PID=$!
for _ in $(seq 120); do curl -s localhost:8094/v1/models > /dev/null && break; sleep 0.5; done
ask() { curl -s localhost:8094/v1/completions -H 'Content-Type: application/json' -d "{\"model\": \"$M\", \"prompt\": \"a b c a b\", \"max_tokens\": 200, \"temperature\": $1, \"seed\": 7}" | python3 -c "import json,sys; r = json.load(sys.stdin); print(r['choices'][0]['text'] if 'choices' in r else r)"; }
alone=$(ask 0)
for i in 1 2 3; do
  ask 1.0 > "$W/sampled-$i.txt" & S=$!
  ask 0 > "$W/greedy-$i.txt" & G=$!
  ask 0.7 > "$W/sampled2-$i.txt" & T=$!
  wait $S $G $T
  log "serve, greedy beside two sampled streams (round $i): $(same "$alone" "$(cat "$W/greedy-$i.txt")"); sampled words $(wc -w < "$W/sampled-$i.txt"), $(wc -w < "$W/sampled2-$i.txt")"
done
head -c 300 "$W/sampled-1.txt" | tee -a "$RES"; echo | tee -a "$RES"
kill $PID; wait $PID 2>/dev/null

BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { $LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -n 3 "$@" 2>&1 | tail -1 | grep -oE "generation_tps=[0-9.]*"; }
for round in 1 2; do
  log "round $round 4bit batch 1: default [$(bench -g 256)] ROWS=4 [$(LMX_CUDA_QMV_ROWS=4 bench -g 256)]"
done
log "4bit batch 8: default [$(bench -b 8 -g 128)] ROWS=4 [$(LMX_CUDA_QMV_ROWS=4 bench -b 8 -g 128)]"
LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -150 | awk '{i+=$5; w+=$7; u+=$10; g+=$12; n++} END {printf "4bit graph steps: issue %.3f ms, wait %.3f ms, upload %.3f ms, host between steps %.3f ms (n=%d)\n", i/n, w/n, u/n, g/n, n}' | tee -a "$RES"
log "(${SECONDS}s so far)"
# Kernel times of one 4-bit decode step at the card's own clocks (the rest of a token is gaps).
timeout $((560 - SECONDS)) ncu --clock-control none --metrics gpu__time_duration.sum --csv $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 3 --temp 0 --ignore-chat-template > "$W/ncu.csv" 2>/dev/null
python3 scripts/cuda/ncu_summary.py "$W/ncu.csv" 2>&1 | head -40 | tee -a "$RES"
