#!/usr/bin/env bash
# Kernel times of one decode step under Nsight Compute (ncu, in the GPU machine's CUDA 13
# toolkit): `lmx generate` of 3 tokens on a model folder, each kernel's duration, summed per
# kernel by scripts/cuda/ncu_summary.py. Extra environment (e.g. LMX_CUDA_QMV_ROWS=2) passes
# through. Usage there: scripts/cuda/profile.sh MODEL NAME   (writes $OUT/NAME.csv, NAME.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:${LD_LIBRARY_PATH:-}
LMX=${LMX:-/tmp/lmx-profile/lmx}
if [ ! -x "$LMX" ]; then mkdir -p "$(dirname "$LMX")"; xz -dc target/cuda/release/lmx.xz > "$LMX"; chmod +x "$LMX"; fi
ncu --metrics gpu__time_duration.sum --csv "$LMX" generate --model "$1" --device cuda -p 'a b c' -m 3 --temp 0 --ignore-chat-template > "${OUT:-.}/$2.csv" 2>/dev/null
python3 scripts/cuda/ncu_summary.py "${OUT:-.}/$2.csv" | tee "${OUT:-.}/$2.txt"
