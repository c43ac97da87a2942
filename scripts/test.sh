#!/usr/bin/env bash
# Runs every test: fetches the default model if needed (tests check its output against
# transformers' tokens), then the whole workspace in release mode (one build serves the
# binary and the tests, and real-model tests need optimized code).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh
cargo test --release --workspace "$@"
