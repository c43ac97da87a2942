#!/usr/bin/env bash
# Runs every test: fetches the default model if needed (tests check its output against
# transformers' tokens), then the whole workspace in release mode (one build serves the
# binary and the tests, and real-model tests need optimized code).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh
# The real API clients the server tests drive (openai, anthropic), when missing.
python3 -c "import openai, anthropic" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
# Open MPI, whose mpirun starts the ranks of `lmx launch` (its tests run 2 and 3 ranks here),
# and an ssh server for the test that reaches two "hosts" (network namespaces) over ssh.
if ! command -v mpirun >/dev/null || ! [ -x /usr/sbin/sshd ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends openmpi-bin openssh-server openssh-client >/dev/null
fi
cargo test --release --workspace "$@"
