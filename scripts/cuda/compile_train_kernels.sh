#!/usr/bin/env bash
# Compiles the training kernels' NVRTC source (cuda_fused's COMMON + cuda_train's SRC) with
# the pinned nvcc of scripts/build-cuda.sh, here, without a GPU: a syntax and type check of
# kernels edited between GPU sessions (NVRTC compiles them only at first use there).
# Usage: scripts/cuda/compile_train_kernels.sh   (after scripts/build-cuda.sh has made the venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
CU=$(echo "${LMX_CUDA_VENV:-$HOME/.cache/lmx-cuda}"/lib/python3.*/site-packages/nvidia/cu13)
W=$(mktemp -d)
python3 - "$W/train.cu" <<'PY'
import sys
def raw(path, name):
    s = open(path).read()
    start = s.index(f'const {name}: &str = r#"') + len(f'const {name}: &str = r#"')
    return s[start:s.index('"#;', start)]
open(sys.argv[1], 'w').write(raw('crates/lmx-core/src/cuda_fused.rs', 'COMMON') + raw('crates/lmx-core/src/cuda_train.rs', 'SRC'))
PY
"$CU/bin/nvcc" --ptx -arch=sm_90 -I"$CU/include" "$W/train.cu" -o "$W/train.ptx"
echo "ok: $(grep -c '^.entry\|\.entry ' "$W/train.ptx") kernels"
rm -rf "$W"
