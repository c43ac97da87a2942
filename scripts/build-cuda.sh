#!/usr/bin/env bash
# Builds `lmx` with the CUDA backend on a machine without a GPU or a CUDA toolkit, for the
# NVIDIA GPU machine (shared/gpu/README.md is the recipe this follows):
# - nvcc and the CUDA runtime from pinned pip wheels (CUDA 13.0: driver 580 rejects newer PTX);
# - candle-core patched to load libcuda/cuBLAS/cuRAND/NVRTC at run time (cudarc
#   `dynamic-loading` instead of `dynamic-linking`), from a copy made in target/, and its
#   backward to store a gradient's first contribution (scripts/cuda/patch_candle_backprop.py);
# - cudart linked statically (the wheels ship no libcudart.so).
# Output: target/cuda/release/lmx (and lmx.xz to carry). Usage: scripts/build-cuda.sh [--tests]
# --tests also builds lmx-core's unit tests with the CUDA backend (the GPU kernels' checks against
# the CPU) into target/cuda/release/lmx-core-tests.xz, to run there with `--test-threads 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LMX_CUDA_VENV:-$HOME/.cache/lmx-cuda}
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
CU=$(echo "$VENV"/lib/python3.*/site-packages/nvidia/cu13)
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=2

# A. candle-core with cudarc's dynamic loading.
cargo fetch -q
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -1)
PATCH=target/cuda-patch/candle-core
if [ ! -f "$PATCH/Cargo.toml" ]; then
  mkdir -p target/cuda-patch && cp -r "$SRC" "$PATCH"
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$PATCH/Cargo.toml"
fi
# A'. candle's backward stores a gradient's first contribution instead of adding it to zeros.
python3 scripts/cuda/patch_candle_backprop.py "$PATCH"
# B. cudart statically.
mkdir -p target/cuda-link && ln -sf "$CU/lib/libcudart_static.a" target/cuda-link/libcudart.a

# The patch rewrites Cargo.lock's candle-core entry: keep the committed lock file.
cp Cargo.lock target/cuda-patch/Cargo.lock.orig
trap 'cp target/cuda-patch/Cargo.lock.orig Cargo.lock' EXIT
export CARGO_TARGET_DIR=target/cuda
RUSTFLAGS="-L native=$PWD/target/cuda-link" cargo build --release -p lmx-cli --features cuda \
  --config "patch.crates-io.candle-core.path=\"$PATCH\""
xz -T2 -kf target/cuda/release/lmx
if [ "${1:-}" = --tests ]; then
  bin=$(RUSTFLAGS="-L native=$PWD/target/cuda-link" cargo test --release -p lmx-core --features cuda --no-run \
    --config "patch.crates-io.candle-core.path=\"$PATCH\"" --message-format=json 2>/dev/null |
    python3 -c "
import json, sys
msgs = [json.loads(l) for l in sys.stdin if l.startswith('{')]
exe = [m['executable'] for m in msgs if m.get('executable') and m['target']['kind'] == ['lib']]
if not exe:
    sys.exit(''.join(m['message']['rendered'] for m in msgs if m.get('reason') == 'compiler-message' and m['message']['level'] == 'error') or 'the tests did not build')
print(exe[0])")
  xz -T2 -c "$bin" > target/cuda/release/lmx-core-tests.xz
  ls -la target/cuda/release/lmx-core-tests.xz
fi
ls -la target/cuda/release/lmx target/cuda/release/lmx.xz
