#!/usr/bin/env bash
# Cross-compiles lmx-core's tests for aarch64 and runs them under qemu-user: the NEON decode
# kernels (with and without the dot-product extension; qemu's default CPU has it) against the
# scalar reference, and every other CPU kernel's portable path.
# Needs (once): rustup target add aarch64-unknown-linux-gnu
#               apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu -p lmx-core "$@"
