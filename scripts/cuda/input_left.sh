#!/usr/bin/env bash
# One GPU round (issue 11): a recorded greedy step leaves its pick and the next position in its
# input buffer, so the next step uploads nothing (this tree's binary, target/cuda/release/lmx.xz)
# against the binary before (target/cuda/base/lmx.xz, carried too; clusters on for it, as they
# are by default now). Checks: the llama fixture's 300 greedy tokens (bf16, 4-bit) equal with
# graphs and normal steps, and with the pick off. Then the first run's time on a fresh machine
# (the driver compiles lmx's PTX and caches it) against the next, and `lmx benchmark` rates and
# recorded steps' host gaps of random Llama-3-8B and Llama-3.2-1B shapes in MLX 4-bit and bf16,
# both binaries alternating, two rounds.
# Usage there: scripts/cuda/input_left.sh   (results in $OUT/input-left.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup inleft input-left.txt
xz -dc target/cuda/base/lmx.xz > "$W/base" && chmod +x "$W/base"
BASE="env LMX_CUDA_ATTENTION_CLUSTER=1 $W/base"
log "# recorded steps leave their next input, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), new $(sha256sum "$LMX" | cut -c1-12), base $(sha256sum "$W/base" | cut -c1-12)"
fixture_folder llama; python3 -c "import json; p = '$W/llama/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"; word_vocab "$W/llama"
# The first run on this machine: the driver's cache of compiled PTX is empty (or emptied here).
rm -rf ~/.nv/ComputeCache
for i in 1 2 3; do
  s=$(date +%s.%N); $LMX generate --model "$W/llama" --device cuda -p 'a b c' -m 4 --temp 0 > /dev/null 2>&1; e=$(date +%s.%N)
  log "generate -m 4, run $i on this machine: $(python3 -c "print(f'{$e - $s:.2f}')") s"
done
$LMX convert --hf-path "$W/llama" --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --mlx-path "$W/llama-4" > /dev/null 2>&1
gen() { "$@" -p 'a b c a b' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
for m in llama llama-4; do
  for dt in float32 bfloat16; do
    g=$(gen $LMX generate --model "$W/$m" --device cuda --dtype $dt)
    log "$m $dt greedy: graphs vs normal steps $(same "$g" "$(LMX_CUDA_GRAPH=0 gen $LMX generate --model "$W/$m" --device cuda --dtype $dt)"); vs pick off $(same "$g" "$(LMX_CUDA_PICK=0 gen $LMX generate --model "$W/$m" --device cuda --dtype $dt)"); vs base $(same "$g" "$(gen $BASE generate --model "$W/$m" --device cuda --dtype $dt)")"
  done
done
SHAPE=8b BF16=1 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
SHAPE=1b BF16=1 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l1" 2>&1 | tail -1
gaps() { LMX_TRACE_STEPS=1 "$@" -p 'a b c' -m 300 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -200 | python3 -c "
import sys, re
rows = [dict(re.findall(r'(\w+_ms) ([0-9.]+)', l)) for l in sys.stdin]
print(' '.join(f'{k} {sum(float(r[k]) for r in rows) / len(rows):.3f}' for k in ('issue_ms', 'wait_ms', 'upload_ms', 'gap_ms')) if rows else 'no steps')"; }
for round in 1 2; do
  for m in l8-4bit l1-4bit l8-bf16 l1-bf16; do
    log "$m base: $(tps "$($BASE benchmark --model "$W/$m" --device cuda -p 128 -g 256 -n 2 2>&1)") tok/s; new: $(tps "$($LMX benchmark --model "$W/$m" --device cuda -p 128 -g 256 -n 2 2>&1)") tok/s"
  done
done
for m in l8-4bit l1-4bit; do
  log "$m step trace, base: $(gaps $BASE generate --model "$W/$m" --device cuda)"
  log "$m step trace, new:  $(gaps $LMX generate --model "$W/$m" --device cuda)"
done
log "(${SECONDS}s)"
