#!/usr/bin/env bash
# lmx serve beside mlx_lm.server on the same model: aggregate tok/s at 1 and 16 concurrent
# streams (the same 32 requests each time), then a load run with cancellations.
#   scripts/bench/serve_peer.sh [MODEL] [CLIENTS] [REQUESTS]
# MLX_PYTHON=/path/to/venv/bin/python adds mlx_lm.server (pip install "mlx[cpu]" mlx-lm).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-models/SmolLM2-135M-Instruct-f32}
clients=${2:-16}
requests=${3:-4}
bench=scripts/bench/serve_load.py
run() { # name url pid
    python3 $bench --url "$2" --max-tokens 64 throughput --concurrency 1 16 --total 32 | sed "s/^/$1 /"
    python3 $bench --url "$2" --max-tokens 64 load --clients "$clients" --requests "$requests" --pid "$3" | sed "s/^/$1 /"
}
wait_up() { for _ in $(seq 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; echo "server at $1 did not start" >&2; return 1; }

target/release/lmx serve --model "$model" --port 8186 2>/tmp/lmx-serve-bench.log &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8186
run lmx http://127.0.0.1:8186 $pid
kill $pid; wait $pid 2>/dev/null || true

if [ -n "${MLX_PYTHON:-}" ]; then
    "$MLX_PYTHON" -m mlx_lm server --model "$model" --port 8187 2>/tmp/mlx-serve-bench.log &
    pid=$!
    wait_up http://127.0.0.1:8187
    run mlx_lm.server http://127.0.0.1:8187 $pid
fi
