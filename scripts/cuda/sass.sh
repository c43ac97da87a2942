#!/usr/bin/env bash
# The SASS of one of lmx's quantized CUDA kernels, on this GPU-less machine: compiles the
# kernel source embedded in crates/lmx-core/src/quant/cuda.rs with the build's nvcc (see
# scripts/build-cuda.sh) for sm_90, prints ptxas's register and spill counts, and disassembles
# the kernel with cuobjdump/nvdisasm from PyPI wheels (13.2; kept in ~/.cache/lmx-sass).
# Usage: scripts/cuda/sass.sh lmx_qmv8_bf16_4_4_1_s16 > s16.sass
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=$1
NV=$(echo "${LMX_CUDA_VENV:-$HOME/.cache/lmx-cuda}"/lib/python3.*/site-packages/nvidia/cu13/bin)
TOOLS=$HOME/.cache/lmx-sass
if [ ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]; then
  mkdir -p "$TOOLS"
  python3 -m pip download -q --no-deps "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*" -d "$TOOLS"
  (cd "$TOOLS" && for w in *.whl; do python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('.')" "$w"; done)
  chmod +x "$TOOLS"/nvidia/cu13/bin/*
fi
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
python3 - "$W/q.cu" <<'PY'
import pathlib, re, sys
t = pathlib.Path("crates/lmx-core/src/quant/cuda.rs").read_text()
raw = lambda n: re.search(r'const ' + n + r': &str = r#"(.*?)"#;', t, re.S).group(1)
bounds = "#define QMV_BOUNDS_4\n#define QMV_BOUNDS_8 __launch_bounds__(128, 8)\n"
pathlib.Path(sys.argv[1]).write_text(bounds + raw("CODE_SRC") + raw("SRC"))
PY
"$NV/nvcc" --cubin -arch=sm_90 --std=c++17 -Xptxas -v "$W/q.cu" -o "$W/q.cubin" 2>&1 | grep -A3 "entry function '$NAME'" | grep -E "registers|spill" >&2
PATH="$TOOLS/nvidia/cu13/bin:$PATH" "$TOOLS/nvidia/cu13/bin/cuobjdump" -sass -fun "$NAME" "$W/q.cubin"
