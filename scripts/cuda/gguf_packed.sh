#!/usr/bin/env bash
# One GPU round (issue 11): GGUF matrices stay packed on the GPU too (session 27: Q4_0 / Q8_0
# and the K-quants load as MLX affine groups of 32 with f16 or f32 scales). The gemma2 and
# gemma3_text fixtures rewritten in Q4_0 and Q8_0 here (`scripts/bench/make_gguf.py`, carried in
# gpucheck/): perplexity and 12 greedy tokens on the CPU and the GPU; then a random
# Llama-3-8B-shaped Q4_0 GGUF (`make_random_gguf.py`, gguf-py carried in target/gguf-py)
# decoded and prefilled by lmx in f32 (the GGUF default on the CPU) and bf16 (on a GPU),
# beside the MLX 4-bit folder of the same shape.
# SKIP_FIXTURES=1: the speeds only (session 29 ran the fixtures: docs/cuda/2026-12-05-s29-gguf-packed.txt).
# Usage there: scripts/cuda/gguf_packed.sh   (results in $OUT/gguf-packed.txt; carry
# target/cuda/release/lmx.xz, target/gguf-py and gpucheck). DEVICE=cpu: a dry run here.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup gguf gguf-packed.txt
[ -n "${LMX_BIN:-}" ] && LMX=$LMX_BIN
DEV=${DEVICE:-cuda}
log "# packed GGUF on $DEV, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(1); print(' '.join(random.choice(['the', 'a', 'cat', 'dog', 'sat', 'on', 'mat', 'and']) for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 24 --num-samples 8 --device "$2" "${@:3}" 2>&1 | grep -oiE "perplexity[^0-9]*[0-9.]+" | tail -1; }
gen() { $LMX generate --model "$1" --device "$2" -p "the cat sat" -m 12 --temp 0 --ignore-chat-template --ignore-eos "${@:3}" 2>/dev/null | tr "\n" " "; }
for f in $([ -z "${SKIP_FIXTURES:-}" ] && ls gpucheck/*.gguf); do
  for dt in "--dtype float32" "--dtype bfloat16"; do
    log "$(basename "$f") ${dt#--dtype }: perplexity cpu [$(ppl "$f" cpu $dt)] $DEV [$(ppl "$f" "$DEV" $dt)]; greedy $(same "$(gen "$f" cpu $dt)" "$(gen "$f" "$DEV" $dt)")"
  done
done
log "(${SECONDS}s)"
[ "$DEV" = cpu ] && [ -z "${BIG:-}" ] && exit 0
TOKENIZER=gpt2 PYTHONPATH=target/gguf-py python3 scripts/cuda/make_random_gguf.py "$W/l8-q4_0.gguf" q4_0 2>&1 | tail -1
log "(${SECONDS}s: Q4_0 written)"
bench() { $LMX benchmark --model "$1" --device "$DEV" -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "(prompt|generation)_tps=[0-9.]*|peak[a-z_]*=[0-9.]*[A-Za-z]*|[Ee]rror.*" | tr '\n' ' '; }
for dt in "--dtype float32" "--dtype bfloat16"; do
  [ $SECONDS -lt 400 ] && log "lmx Q4_0 GGUF ${dt#--dtype }: decode [$(bench "$W/l8-q4_0.gguf" -p 128 -g 256 $dt)] prefill 4096 [$(bench "$W/l8-q4_0.gguf" -p 4096 -g 1 $dt)]"
done
rm -f "$W/l8-q4_0.gguf"
BF16=0 BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
[ $SECONDS -lt 500 ] && log "lmx MLX 4-bit folder: decode [$(bench "$W/l8-4bit" -p 128 -g 256)] prefill 4096 [$(bench "$W/l8-4bit" -p 4096 -g 1)]"
log "(${SECONDS}s)"
