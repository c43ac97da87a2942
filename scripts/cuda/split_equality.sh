#!/usr/bin/env bash
# A short GPU check (issue 11): decode attention splits past 128 positions, the splits
# following the cache buffer's positions, so that a recorded step and a normal step round
# alike. lmx-core's GPU test of decode attention (f32 reference; a device position and a view
# bit-equal), then greedy tokens of the llama fixtures (bf16, 4-bit and dense, 300 tokens past
# the buffer's growth at 256) and of the random Llama-3-8B shape in 4 bits (32 heads: 9 splits
# of a head at most): graphs against normal steps, whose buffers grow 1,024 and 256 positions
# at a time. Also a batch's decode step in one op (`ops::decode_rows`, lmx-core's GPU test of it
# against each row alone) against row by row (`LMX_CUDA_DECODE_ROWS=0`, and
# `LMX_CUDA_BATCH_ROPE=0`): the same text, and 8B 4-bit batch-8 and batch-32 decode both ways.
# Usage there: scripts/cuda/split_equality.sh   (results in $OUT/split-equality.txt; ONLY_8B=1:
# the 8B shape's parts alone, without lmx-core's tests)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup spliteq split-equality.txt
log "# split equality, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
if [ "${ONLY_8B:-0}" = 0 ]; then
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
# Each GPU test alone (its time shown), with the last block merging a head's splits (default) and
# with a second launch merging them.
for merge in 1 0; do
  for t in decode_attention_on_the_gpu bf16_matvec decode_rows_on_the_gpu decode_attention_codes; do
    s=$SECONDS; r=$(LMX_CUDA_ATTENTION_MERGE=$merge timeout 120 "$W/tests" --test-threads 1 $t 2>&1); rc=$?
    log "[merge in the last block: $merge] $t: rc $rc, $((SECONDS - s)) s: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
    [ $rc -ne 0 ] && echo "$r" | grep -E "panicked|left|right|max error" | tail -5 | tee -a "$RES"
  done
done
# Rows whose buffers straddle the split threshold (256 and 1,024 positions, threshold 300): each
# row still splits as it would alone.
r=$(LMX_CUDA_ATTENTION_SPLIT=300 timeout 120 "$W/tests" --test-threads 1 decode_rows_on_the_gpu 2>&1)
log "[LMX_CUDA_ATTENTION_SPLIT=300] decode_rows_on_the_gpu: $(echo "$r" | grep -E "test result|panicked" | head -2 | tr '\n' ' ')"
gen() { $LMX generate --model "$1" --device cuda --dtype bfloat16 -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | head -1; }
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
for m in llama-4 llama; do
  log "$m greedy, graphs vs normal steps: $(same "$(gen "$W/$m")" "$(LMX_CUDA_GRAPH=0 gen "$W/$m")"); split past 128 vs 512: $(same "$(gen "$W/$m")" "$(LMX_CUDA_ATTENTION_SPLIT=512 gen "$W/$m")")"
done
# A batch's decode step in one op (the default since session 22), its rows rotated in one op and
# attended row by row (LMX_CUDA_DECODE_ROWS=0), or rotated row by row too: the same text.
printf 'a b c\nb c a b\nc a\na a b c b c a\n' > "$W/prompts.txt"
batch() { $LMX generate --model "$W/$1" --device cuda --dtype bfloat16 --prompts-file "$W/prompts.txt" -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | md5sum | cut -c1-12; }
for m in llama-4 llama; do
  a=$(batch $m); b=$(LMX_CUDA_DECODE_ROWS=0 batch $m); c=$(LMX_CUDA_DECODE_ROWS=0 LMX_CUDA_BATCH_ROPE=0 batch $m)
  log "$m, 4 prompts decoded together, 300 tokens: one op a step $a, rows attended apart $b, rows rotated apart too $c: $([ "$a" = "$b" ] && [ "$b" = "$c" ] && echo equal || echo DIFFER)"
done
fi
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
benchb() { tps "$($LMX benchmark --model "$W/l8-4bit" --device cuda -p 128 -g 128 -n 2 -b $1 2>&1)"; }
for bs in 8 32; do
  log "8B 4-bit batch $bs: one op [$(benchb $bs)] rows apart [$(LMX_CUDA_DECODE_ROWS=0 benchb $bs)] one op [$(benchb $bs)] rows apart [$(LMX_CUDA_DECODE_ROWS=0 benchb $bs)]"
done
gen8() { $LMX generate --model "$W/l8-4bit" --device cuda -p 'a b c' -m 600 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | tr '\n' ' '; }
log "8B 4-bit greedy (600 tokens), graphs vs normal steps: $(same "$(gen8)" "$(LMX_CUDA_GRAPH=0 gen8)"); last-block merge vs a merging launch: $(same "$(gen8)" "$(LMX_CUDA_ATTENTION_MERGE=0 gen8)"); attention coding its outputs vs o_proj coding them: $(same "$(gen8)" "$(LMX_CUDA_ATTENTION_CODES=0 gen8)")"
log "(${SECONDS}s)"
