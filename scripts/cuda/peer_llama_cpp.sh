#!/usr/bin/env bash
# One GPU round (issue 11): llama.cpp's CUDA build beside lmx on the same card, Llama-3-8B
# shape with random weights. llama.cpp: llama-bench built here by
# `scripts/cuda/build_llama_cpp.sh` and carried (target/llama-cpp/llama-cuda.tar.xz); GGUFs in
# Q4_0, Q8_0 and BF16 written there by `scripts/cuda/make_random_gguf.py`, one at a time (each
# benchmarked, then deleted); `llama-bench -ngl 99 -fa 1 -p 4096 -n 256 -r 3` (a 4096-token
# prompt; 256 tokens generated from an empty context). lmx: its MLX 4-/8-bit and bf16 folders
# (`make_random_llama.py`), `lmx benchmark -p 128 -g 256` (decode) and `-p 4096 -g 1` (prefill).
# Usage there: scripts/cuda/peer_llama_cpp.sh   (results in $OUT/llama-cpp.txt; carry
# target/cuda/release/lmx.xz and target/llama-cpp/llama-cuda.tar.xz). PART=llama or PART=lmx runs
# one half, for a call that carries only that half's file (both with the checkout's .git can pass
# the 64 MiB a call carries).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup lcpp llama-cpp.txt
log "# llama.cpp (CUDA) beside lmx, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), lmx sha256 $(sha256sum "$LMX" | cut -c1-12)"
if [ "${PART:-both}" != lmx ]; then
mkdir -p "$W/lc" && tar xJf target/llama-cpp/llama-cuda.tar.xz -C "$W/lc"
LB="$W/lc/bin/llama-bench"
export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$W/lc/lib
ldd "$LB" | grep -E "not found|cuda|cublas" | tee -a "$RES"
for q in ${KINDS:-Q4_0 Q8_0 BF16}; do
  [ $SECONDS -lt 360 ] || break
  PYTHONPATH="$W/lc/gguf-py" python3 scripts/cuda/make_random_gguf.py "$W/l8-$q.gguf" "${q,,}" 2>&1 | tail -1
  log "(${SECONDS}s: $q written)"
  timeout 150 "$LB" -m "$W/l8-$q.gguf" -ngl 99 -fa 1 -p 4096 -n 256 -r 3 -o md 2>&1 | grep -E "^\||error|failed" | tee -a "$RES"
  rm -f "$W/l8-$q.gguf"
done
fi
log "(${SECONDS}s)"
[ "${PART:-both}" = llama ] && exit 0
BF16=${BF16:-1} BITS=${BITS:-"4 8"} python3 scripts/cuda/make_random_llama.py "$W/l8" 2>&1 | tail -1
bench() { $LMX benchmark --model "$W/l8-$1" --device cuda -n 2 "${@:2}" 2>&1 | tail -1 | grep -oE "(prompt|generation)_tps=[0-9.]*" | tr '\n' ' '; }
for m in ${LMX_KINDS:-4bit 8bit bf16}; do
  [ $SECONDS -lt 540 ] && log "lmx $m: decode [$(bench $m -p 128 -g 256)] prefill 4096 [$(bench $m -p 4096 -g 1)]"
done
log "(${SECONDS}s)"
