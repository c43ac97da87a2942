#!/usr/bin/env bash
# CUDA decode attention (split over the keys for long caches) on the GPU machine: greedy tokens
# of the llama fixture after a 700-token prompt on the CPU and the GPU (f32: they must be
# equal; bf16 and 4-bit printed), then decode speed of a random Llama-3-8B shape at a short and
# a long context, and the fused RMS norm's 4096-token prefill on each stream mode (it hit a
# device-side assert on candle's per-thread streams).
# Usage there: scripts/cuda/attention.sh   (results in $OUT/attention.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup attention attention.txt
log "# CUDA attention, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
fixture_folder llama
# A context past the split threshold (512 keys), and a word for every id so that the
# generated tokens show in the text.
sed -i 's/"max_position_embeddings": 256/"max_position_embeddings": 2048/' "$W/llama/config.json"
python3 - "$W/llama" <<'PY'
import json, sys
d = sys.argv[1]
n = json.load(open(f"{d}/config.json"))["vocab_size"]
t = json.load(open(f"{d}/tokenizer.json"))
t["model"]["vocab"] = {**{f"w{i}": i for i in range(4, n)}, **t["model"]["vocab"]}
json.dump(t, open(f"{d}/tokenizer.json", "w"))
PY
$LMX convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
long=$(python3 -c "import random; random.seed(1); print(' '.join(random.choice('abc') for _ in range(700)))")
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p "$long" -m 12 --temp 0 --ignore-chat-template 2>/dev/null | head -1; }
for m in llama llama-4bit; do
  for dt in float32 bfloat16; do
    c=$(gen "$W/$m" cpu $dt); g=$(gen "$W/$m" cuda $dt)
    log "greedy after 700 tokens, $m $dt: cpu [$c] cuda [$g] $([ "$c" = "$g" ] && echo equal || echo DIFFER)"
  done
done
python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
for m in 4bit bf16; do
  log "$m decode at 128 (-p 128 -g 256): $(bench $m '-p 128 -g 256 -n 3')"
  log "$m decode at 4096 (-p 4096 -g 64): $(bench $m '-p 4096 -g 64 -n 2')"
done
for i in 1 2 3; do
  log "fused norm bf16 prefill 4096, per-thread streams, run $i: $(LMX_CUDA_STREAM=per-thread LMX_CUDA_FUSED_NORM=1 bench bf16 '-p 4096 -g 1 -n 1')"
  log "fused norm bf16 prefill 4096, own stream, run $i: $(LMX_CUDA_FUSED_NORM=1 bench bf16 '-p 4096 -g 1 -n 1')"
done
log "fused norm 4bit decode: $(LMX_CUDA_FUSED_NORM=1 bench 4bit '-p 128 -g 256 -n 3')"
log "fused norm bf16 decode: $(LMX_CUDA_FUSED_NORM=1 bench bf16 '-p 128 -g 256 -n 3')"
