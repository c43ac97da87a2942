#!/usr/bin/env bash
# Tensor parallelism over NCCL with decode steps replayed as CUDA graphs (issue 14), on the
# 2-GPU machine, one rank per GPU. `8b` (default): correctness first (greedy f32 tokens of the
# llama fixture on one GPU, TP with graphs and TP without are equal; rank 0's steps are
# replays; a stopped rank is named within the timeout), then the random Llama-3-8B shape in
# 4 bits and bf16: one GPU, TP with graphs, TP without. `70b`: the random Llama-3-70B shape in
# 4 bits (37 GB, fits one H200): one GPU against TP with graphs (and with NCCL's low-latency
# protocol only, NCCL_PROTO=LL).
# Usage there: scripts/cuda/tp_graphs.sh [8b|70b]   (results in $OUT/tp-graphs-SHAPE.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
SHAPE=${1:-8b}
cuda_setup tp-graphs "tp-graphs-$SHAPE.txt"
launch_setup
log "# TP over NCCL with CUDA graphs, $(date -u +%F), $(nvidia-smi -L | wc -l) x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12), libnccl $NCCL_LIB"
TP="$LMX launch -n 2 --backend nccl"
bench() { local pre=$1; shift; $pre benchmark "$@" 2>&1 | grep -E 'Averages|rror' | head -1 | sed 's/, peak_memory.*//'; }

if [ "$SHAPE" = 8b ]; then
  fixture_folder llama
  word_vocab "$W/llama"
  gen() { local pre=$1; shift; $pre generate --model "$W/llama" -p 'a b c a b' -m 40 --temp 0 --ignore-eos --ignore-chat-template --dtype float32 "$@" 2>/dev/null | head -1; }
  one=$(gen "$LMX" --device cuda); graphs=$(gen "$TP --"); plain=$(gen "$TP --env LMX_CUDA_GRAPH=0 --")
  same() { [ "$1" = "$2" ] && echo equal || echo "DIFFER ($1 | $2)"; }
  log "greedy llama f32, 40 tokens: TP graphs vs 1 GPU $(same "$graphs" "$one"); TP without graphs vs 1 GPU $(same "$plain" "$one")"
  replays=$($TP --env LMX_TRACE_STEPS=1 -- generate --model "$W/llama" -p 'a b c' -m 20 --temp 0 --ignore-eos --ignore-chat-template 2>&1 | grep -c 'graph$')
  log "steps replayed as graphs (both ranks, 20 tokens): $replays; $($TP --env LMX_TRACE_STEPS=1 -- generate --model "$W/llama" -p 'a b c' -m 4 --ignore-chat-template 2>&1 | grep -m1 'graph steps off')"
  "$LMX" convert --hf-path "$W/llama" -q --q-group-size 32 --mlx-path "$W/llama-4bit" > /dev/null 2>&1
  g4() { local pre=$1; shift; $pre generate --model "$W/llama-4bit" -p 'a b c a b' -m 40 --temp 0 --ignore-eos --ignore-chat-template "$@" 2>/dev/null | head -1; }
  log "greedy llama 4-bit: TP graphs vs TP without $(same "$(g4 "$TP --")" "$(g4 "$TP --env LMX_CUDA_GRAPH=0 --")")"
  # A rank that stops answering (SIGSTOP) is named within the timeout (5 s): replayed steps
  # settle (poll the step's end) before reading their logits.
  $TP --timeout 5 -- benchmark --model "$W/llama" -p 64 -g 128 -n 1000000 > /dev/null 2> "$W/stop.txt" &
  L=$!; sleep 6
  P=$(for p in $(pgrep -f "lmx benchmark"); do tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -q "OMPI_COMM_WORLD_RANK=1" && echo $p; done | head -1)
  kill -STOP "$P"; S=$(date +%s%N); wait $L; RC=$?
  log "rank 1 stopped under graphs: exit $RC after $(( ($(date +%s%N) - S) / 1000000 )) ms: $(grep -E '^error' "$W/stop.txt" | head -1)"
  pkill -CONT -f "lmx benchmark"; pkill -f "lmx benchmark"
  SHAPE=8b BITS=4 python3 scripts/cuda/make_random_llama.py "$W/l8b" 2>&1 | tail -1 | tee -a "$RES"
  for m in 4bit bf16; do
    for round in 1 2; do
      log "8b $m round $round: 1 GPU [$(bench "$LMX" --model "$W/l8b-$m" --device cuda -p 128 -g 256 -n 2)] TP graphs [$(bench "$TP --" --model "$W/l8b-$m" -p 128 -g 256 -n 2)] TP without [$(bench "$TP --env LMX_CUDA_GRAPH=0 --" --model "$W/l8b-$m" -p 128 -g 256 -n 2)]"
    done
  done
else
  SHAPE=70b BITS=4 BF16=0 python3 scripts/cuda/make_random_llama.py "$W/l70b" 2>&1 | tail -1 | tee -a "$RES"
  for round in 1 2; do
    log "70b 4bit round $round: 1 GPU [$(bench "$LMX" --model "$W/l70b-4bit" --device cuda -p 128 -g 128 -n 1)] TP graphs [$(bench "$TP --" --model "$W/l70b-4bit" -p 128 -g 128 -n 1)] TP graphs, NCCL_PROTO=LL [$(bench "$TP --env NCCL_PROTO=LL --" --model "$W/l70b-4bit" -p 128 -g 128 -n 1)]"
  done
fi
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader | tee -a "$RES"
