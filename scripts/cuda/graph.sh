#!/usr/bin/env bash
# Decode steps replayed as CUDA graphs on the GPU machine (issue 11): greedy tokens with
# graphs against normal steps (`LMX_CUDA_GRAPH=0`) and the CPU, on fixtures whose context is
# raised to cross the cache's 256-position growth; which architectures fall back (and why);
# then decode speed of the random Llama-3-8B shape in 4 bits, 8 bits and bf16 with and without
# graphs, at a short and a long context, the host/device split of a step, and prefill on the
# device's own stream against candle's per-thread stream.
# Usage there: scripts/cuda/graph.sh   (results in $OUT/graph.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup graph graph.txt
log "# CUDA graphs, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
gen() { $LMX generate --model "$1" --device "$2" --dtype "$3" -p 'a b c a b' -m "$4" --temp 0 --ignore-eos --ignore-chat-template 2>"$W/err.txt" | head -1; }
fallback() { local off; off=$(LMX_TRACE_STEPS=1 $LMX generate --model "$1" --device cuda --dtype "$2" -p 'a b c a b' -m 8 --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "graph steps off" | head -1); echo "${off:-graphs on}"; }
for a in llama qwen3 qwen3_moe gemma2 deepseek_v3; do
  fixture_folder $a
  python3 -c "import json; p = '$W/$a/config.json'; c = json.load(open(p)); c['max_position_embeddings'] = 2048; json.dump(c, open(p, 'w'))"
  word_vocab "$W/$a"
  for dt in float32 bfloat16; do
    m=600; [ "$dt" = bfloat16 ] && m=100
    g=$(gen "$W/$a" cuda $dt $m); e=$(LMX_CUDA_GRAPH=0 gen "$W/$a" cuda $dt $m); c=$(gen "$W/$a" cpu $dt $m)
    same() { python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None); print(f'equal ({len(a)} tokens)' if n is None and len(a) == len(b) else f'DIFFER at token {n} of {len(a)}/{len(b)}')" "$1" "$2"; }
    log "greedy $a $dt, $m tokens: graph vs normal steps $(same "$g" "$e"); graph vs cpu $(same "$g" "$c"); $(fallback "$W/$a" $dt)"
  done
done
$LMX convert --hf-path "$W/llama" -q --q-bits 4 --q-group-size 32 --mlx-path "$W/llama-4" > /dev/null 2>&1
g=$(gen "$W/llama-4" cuda float32 600); e=$(LMX_CUDA_GRAPH=0 gen "$W/llama-4" cuda float32 600)
log "greedy llama 4-bit float32, 600 tokens: graph vs normal steps $([ "$g" = "$e" ] && echo equal || echo DIFFER)"

BITS="4 8" python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/llama-8b-$1" --device cuda $2 2>&1 | tail -1; }
trace() { LMX_TRACE_STEPS=1 $LMX benchmark --model "$W/llama-8b-$1" --device cuda -p 128 -g 128 -n 1 2>&1 | awk '/lmx-step: tokens 1 /{n++; i+=$5; w+=$7} END {printf "%d steps, issue %.3f ms, wait %.3f ms per step", n, i/n, w/n}'; }
for m in 4bit 8bit bf16; do
  for round in 1 2; do
    log "round $round $m decode, graphs:       $(bench $m '-p 128 -g 256 -n 2')"
    log "round $round $m decode, normal steps: $(LMX_CUDA_GRAPH=0 bench $m '-p 128 -g 256 -n 2')"
  done
  log "$m decode at 4096 context, graphs:       $(bench $m '-p 4096 -g 128 -n 1')"
  log "$m decode at 4096 context, normal steps: $(LMX_CUDA_GRAPH=0 bench $m '-p 4096 -g 128 -n 1')"
  log "$m step times, graphs: $(trace $m)"
done
for round in 1 2; do
  log "round $round bf16 prefill 4096, own stream:        $(bench bf16 '-p 4096 -g 1 -n 2')"
  log "round $round bf16 prefill 4096, per-thread stream: $(LMX_CUDA_STREAM=per-thread bench bf16 '-p 4096 -g 1 -n 2')"
  log "round $round bf16 prefill 4096, pool released:     $(LMX_CUDA_POOL=release bench bf16 '-p 4096 -g 1 -n 2')"
done
for b in 4 8; do log "weights llama-8b-${b}bit: $(du -sb "$W/llama-8b-${b}bit/model.safetensors" | cut -f1) bytes"; done
