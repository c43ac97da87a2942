#!/usr/bin/env bash
# `lmx serve` on the GPU machine with one request at a time (issue 11): its decode steps
# replayed as CUDA graphs against normal steps (LMX_CUDA_GRAPH=0): the completion text (greedy,
# equal) and the wall time of a 256-token completion on the random Llama-3.2-1B shape, 4-bit.
# Usage there: scripts/cuda/serve_graph.sh   (results in $OUT/serve_graph.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup serve-graph serve_graph.txt
log "# lmx serve with CUDA graphs, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SHAPE=1b BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-1b" 2>&1 | tail -1 | tee -a "$RES"
# A word per token id, so that completions are comparable text.
word_vocab "$W/llama-1b-4bit"
serve() {
  "$LMX" serve --model "$W/llama-1b-4bit" --device cuda --port 8093 > "$W/serve.log" 2>&1 &
  PID=$!
  for _ in $(seq 120); do curl -s localhost:8093/v1/models > /dev/null && break; sleep 0.5; done
}
ask() { curl -s -w ' time %{time_total}' localhost:8093/v1/completions -H 'Content-Type: application/json' -d "{\"model\": \"$W/llama-1b-4bit\", \"prompt\": \"a b c a b\", \"max_tokens\": 256, \"temperature\": 0}"; }
for mode in graphs normal; do
  [ $mode = normal ] && export LMX_CUDA_GRAPH=0
  serve
  ask > /dev/null  # warm-up
  for i in 1 2 3; do r=$(ask); echo "$r" > "$W/$mode-$i.json"; log "$mode request $i: $(echo "$r" | grep -o 'time [0-9.]*') s, $(echo "$r" | grep -o '"completion_tokens":[0-9]*')"; done
  kill $PID; wait $PID 2>/dev/null
done
a=$(sed 's/ time .*//' "$W/graphs-1.json" | python3 -c "import json,sys; print(json.load(sys.stdin)['choices'][0]['text'])")
b=$(sed 's/ time .*//' "$W/normal-1.json" | python3 -c "import json,sys; print(json.load(sys.stdin)['choices'][0]['text'])")
log "completion text, graphs vs normal steps: $([ "$a" = "$b" ] && echo equal || echo DIFFER) (${#a} characters)"
