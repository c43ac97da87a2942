"""The fixed LoRA benchmark dataset: {"text"} records of about 40 words (at most 64 SmolLM2
tokens) cut from the Apache-2.0 LICENSE text, 64 for train.jsonl and 8 for valid.jsonl.

Usage: python scripts/bench/lora_data.py OUT_DIR
"""
import json
import os
import sys

root = os.path.join(os.path.dirname(__file__), "..", "..")
words = open(os.path.join(root, "LICENSE")).read().split()
chunks = [" ".join(words[i:i + 40]) for i in range(0, len(words) - 40, 40)]
while len(chunks) < 72:
    chunks = chunks + chunks
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for name, part in [("train", chunks[:64]), ("valid", chunks[64:72])]:
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        for c in part:
            f.write(json.dumps({"text": c}) + "\n")
