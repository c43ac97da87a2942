#!/usr/bin/env bash
# Builds llama.cpp's CUDA llama-bench here (no GPU needed), the peer of issue 11: the llama.cpp
# that llama-cpp-python 0.3.36 vendors (its sdist from PyPI), for compute capability 9.0
# (H100/H200), with the pinned CUDA 13.0 compiler wheels of shared/gpu/README.md plus cuBLAS
# 13.0's, cmake and ninja from PyPI in their own venv. cudart and cuBLAS stay shared libraries
# (the GPU machine's /usr/local/cuda-13.0/lib64 has them), libstdc++ is linked in; it needs
# GLIBC 2.36 where it runs (arc4random, from the static libstdc++) and OpenSSL 3 (cpp-httplib).
# One departure from llama.cpp's defaults: GGML_CUDA_NO_VMM (its memory pool without the
# driver's virtual memory calls), since the wheels carry no libcuda.so to link against.
# Packs llama-bench and llama.cpp's gguf-py (to write GGUFs there) into
# target/llama-cpp/llama-cuda.tar.xz, to carry; `scripts/cuda/peer_llama_cpp.sh` runs them
# there. The kernels are built for sm_90 alone, without PTX (CUDA_ARCH=90-real; with "90" the
# PTX doubled the kernels: 37 MB against 17.5), and the binary is stripped: 51 MB, 22 MB
# packed. Beside lmx.xz (13 MB) that fits a carry's 64 MiB only while the checkout's .git
# stays small (the device tool seems to count it: `git gc` took it from 19 to 14.7 MB).
# Usage: scripts/cuda/build_llama_cpp.sh   (about 40 minutes on 2 cores, cold)
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36
VENV=${LMX_LLAMA_VENV:-$HOME/.cache/lmx-llama-cuda}
if [ ! -x "$VENV/bin/cmake" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 cmake==3.31.6 ninja==1.13.0
fi
CU=$(echo "$VENV"/lib/python3.*/site-packages/nvidia/cu13)
# The wheels ship versioned libraries only; CMake's FindCUDAToolkit looks for the plain names.
# nvcc links from lib64.
for l in cudart cublas cublasLt; do [ -e "$CU/lib/lib$l.so" ] || ln -s "lib$l.so.13" "$CU/lib/lib$l.so"; done
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
OUT=target/llama-cpp
mkdir -p "$OUT"
if [ ! -f "$OUT/src/CMakeLists.txt" ]; then
  # The release's sdist, by PyPI's JSON (relative addresses resolved: mirrors give those).
  index=https://pypi.org/pypi/llama-cpp-python/json
  url=$(curl -sf "$index" | python3 -c "import json, sys, urllib.parse; r = json.load(sys.stdin)['releases']['$VERSION']; print(urllib.parse.urljoin('$index', [u['url'] for u in r if u['packagetype'] == 'sdist'][0]))")
  curl -sfL -o "$OUT/sdist.tar.gz" "$url"
  rm -rf "$OUT/src" "$OUT/x" && mkdir -p "$OUT/x"
  tar xzf "$OUT/sdist.tar.gz" -C "$OUT/x"
  mv "$OUT/x/llama_cpp_python-$VERSION/vendor/llama.cpp" "$OUT/src" && rm -rf "$OUT/x" "$OUT/sdist.tar.gz"
fi
export PATH="$VENV/bin:$CU/bin:$PATH"
cmake -S "$OUT/src" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90-real}" -DCMAKE_CUDA_COMPILER="$CU/bin/nvcc" -DCUDAToolkit_ROOT="$CU" \
  -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" > "$OUT/configure.log"
cmake --build "$OUT/build" --target llama-bench -j "${JOBS:-2}"
rm -rf "$OUT/pack" && mkdir -p "$OUT/pack/bin"
cp "$OUT/build/bin/llama-bench" "$OUT/pack/bin/" && strip "$OUT/pack/bin/llama-bench"
# OpenMP's runtime (ggml's CPU backend links it) travels along: the GPU machine may lack it.
mkdir -p "$OUT/pack/lib" && cp "$(gcc -print-file-name=libgomp.so.1)" "$OUT/pack/lib/"
cp -r "$OUT/src/gguf-py" "$OUT/pack/"
tar cJf "$OUT/llama-cuda.tar.xz" -C "$OUT/pack" .
ls -la "$OUT/llama-cuda.tar.xz"
ldd "$OUT/pack/bin/llama-bench" | sed 's/^/  /'
