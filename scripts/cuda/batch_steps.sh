#!/usr/bin/env bash
# One GPU round (issue 11): a batch's greedy picks in one op (`ops::pick_greedy_rows`, the
# default since session 22) or one op a row (`LMX_CUDA_PICK_ROWS=0`). lmx-core's GPU tests of
# the pick and of the batch's decode step; the text of 4 prompts decoded together both ways
# (fixtures); the random Llama-3-8B shape in 4 bits at batch 8 and 32, alternating; then where
# a batch-8 step's time goes (`LMX_TRACE_STEPS=1`: the host's time to queue it, the device's
# time after).
# Usage there: scripts/cuda/batch_steps.sh   (results in $OUT/batch-steps.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup bsteps batch-steps.txt
log "# batch steps, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
for t in pick_greedy decode_rows_on_the_gpu; do
  s=$SECONDS; r=$(timeout 120 "$W/tests" --test-threads 1 $t 2>&1); rc=$?
  log "$t: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
  [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right" | tail -5 | tee -a "$RES"
done
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
printf 'a b c\nb c a b\nc a\na a b c b c a\n' > "$W/prompts.txt"
batch() { $LMX generate --model "$W/$1" --device cuda --dtype bfloat16 --prompts-file "$W/prompts.txt" -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | md5sum | cut -c1-12; }
for m in llama-4 llama; do
  a=$(batch $m); b=$(LMX_CUDA_PICK_ROWS=0 batch $m)
  log "$m, 4 prompts decoded together: picked in one op $a, one op a row $b: $([ "$a" = "$b" ] && echo equal || echo DIFFER)"
done
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
benchb() { tps "$(env $1 $LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -g 128 -n 2 -b $2 2>&1)"; }
for bs in 8 32; do
  [ $SECONDS -lt 400 ] && log "8B 4-bit batch $bs: rows picked together [$(benchb "" $bs)] apart [$(benchb LMX_CUDA_PICK_ROWS=0 $bs)] together [$(benchb "" $bs)] apart [$(benchb LMX_CUDA_PICK_ROWS=0 $bs)]"
done
word_vocab "$W/l8-4bit"
for i in 1 2 3 4 5 6 7 8; do echo "w5 w6 w$((i + 6))"; done > "$W/p8.txt"
LMX_TRACE_STEPS=1 $LMX generate --model "$W/l8-4bit" --device cuda --prompts-file "$W/p8.txt" -m 200 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step: tokens 8 " > "$W/trace.txt"
log "batch 8 decode steps ($(wc -l < "$W/trace.txt") traced), mean over the last 150: $(tail -150 "$W/trace.txt" | awk '{i += $5; w += $7; n++} END {printf "host issue %.3f ms, device after %.3f ms", i/n, w/n}')"
log "(${SECONDS}s)"
