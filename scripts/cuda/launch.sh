#!/usr/bin/env bash
# On the 2-GPU machine (issue 14): `lmx launch` over the GPUs of one host, one rank per GPU,
# Open MPI carrying the collectives (CUDA tensors staged through host memory), or NCCL summing
# GPU tensors GPU to GPU (--backend nccl).
# Correctness first (greedy f32 tokens of tensor- and pipeline-parallel runs equal one GPU's),
# then speed beside one GPU. Results in $OUT/launch-results.txt.
# Usage there: scripts/cuda/launch.sh [--correctness]   (SHAPE=1b: Llama-3.2-1B instead of 3-8B)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup launch launch-results.txt
launch_setup
log "# lmx launch on GPUs, $(date -u +%F), $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(mpirun --version 2>&1 | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12); mpirun $MPIRUN, libmpi ${LMX_MPI_LIBRARY:-from the loader cache}, libnccl $NCCL_LIB"

# The fixture models' perplexity (f32) on one GPU, the CPU, and split over the 2 GPUs; and
# greedy tokens of a 4-bit fixture (its tokenizer has 4 words, so the text is short).
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
for a in llama qwen3 gemma2; do
  fixture_folder $a
  # $1: the command before `perplexity` (word-split on purpose), then its extra flags.
  ppl() { local pre=$1; shift; $pre perplexity --model "$W/$a" --data "$W/text.txt" --sequence-length 12 --dtype float32 "$@" 2>&1 | grep -E "Perplexity|rror" | head -1; }
  log "perplexity $a f32: 1 GPU [$(ppl "$LMX" --device cuda)] CPU [$(ppl "$LMX" --device cpu)] TP 2 GPUs [$(ppl "$LMX launch -n 2 --")] TP 2 GPUs NCCL [$(ppl "$LMX launch -n 2 --backend nccl --")] PP 2 GPUs [$(ppl "$LMX launch -n 2 --" --pipeline)]"
done
"$LMX" convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
gen() { local pre=$1; shift; $pre generate --model "$W/llama-4bit" -p 'a b c a b' -m 24 --ignore-eos "$@" 2>&1 | head -1; }
log "generate llama-4bit: 1 GPU [$(gen "$LMX" --device cuda)] TP 2 GPUs [$(gen "$LMX launch -n 2 --")] TP NCCL [$(gen "$LMX launch -n 2 --backend nccl --")] PP 2 GPUs [$(gen "$LMX launch -n 2 --" --pipeline)]"
# A rank that stops answering under NCCL (SIGSTOP) is named within the timeout (5 s here):
# NCCL sums run asynchronously, so the wait at the end of each step polls them.
"$LMX" launch -n 2 --backend nccl --timeout 5 -- benchmark --model "$W/llama" -p 64 -g 128 -n 1000000 > /dev/null 2> "$W/stop.txt" &
L=$!; sleep 6
P=$(for p in $(pgrep -f "lmx benchmark"); do tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -q "OMPI_COMM_WORLD_RANK=1" && echo $p; done | head -1)
kill -STOP "$P"; S=$(date +%s%N); wait $L; RC=$?
log "NCCL, rank 1 stopped: exit $RC after $(( ($(date +%s%N) - S) / 1000000 )) ms: $(grep -E '^error' "$W/stop.txt" | head -1)"
[ "${1:-}" = --correctness ] && exit 0

SHAPE=${SHAPE:-8b}
SHAPE=$SHAPE python3 scripts/cuda/make_random_llama.py "$W/llama-$SHAPE" 2>&1 | tail -1 | tee -a "$RES"
for m in 4bit bf16; do
  M="$W/llama-$SHAPE-$m"
  log "llama-$SHAPE-$m 1 GPU:     $("$LMX" benchmark --model "$M" -p 128 -g 128 -n 2 2>&1 | tail -1)"
  log "llama-$SHAPE-$m TP 2 GPUs: $("$LMX" launch -n 2 --env LMX_DIST_VERBOSE=1 -- benchmark --model "$M" -p 128 -g 128 -n 2 2>&1 | grep -E 'Averages|collectives|rror' | tr '\n' ' ')"
  log "llama-$SHAPE-$m TP 2 GPUs NCCL: $("$LMX" launch -n 2 --backend nccl --env LMX_DIST_VERBOSE=1 -- benchmark --model "$M" -p 128 -g 128 -n 2 2>&1 | grep -E 'Averages|collectives|rror|NCCL' | tr '\n' ' ')"
  log "llama-$SHAPE-$m PP 2 GPUs: $("$LMX" launch -n 2 --env LMX_DIST_VERBOSE=1 -- benchmark --pipeline --model "$M" -p 128 -g 128 -n 2 2>&1 | grep -E 'Averages|collectives|rror' | tr '\n' ' ')"
done
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$RES"
