"""The fixed LoRA training-speed dataset (scripts/bench/data/lora/{train,valid}.jsonl):
{"text": ...} records cut from the Apache-2.0 LICENSE text, 64 for train and 8 for valid.

Each record is a run of whole words (about 48 on average, roughly 50) grown while its SmolLM2
tokenization stays within --max-tokens (63) tokens, so with the EOS that MLX LM appends every
example is 60-64 tokens and every batch pads to 1 + 32 * ceil(64 / 32) = 65 columns. One pass
over the text gives ~32 chunks; later passes start a fraction of a chunk further in (word
offsets 0, 24, 12, 36, ...), so the 72 records are distinct. Deterministic for a given
tokenizer; the committed .jsonl files are the benchmark input, this script only documents how
they were made.

Usage: python scripts/bench/make_lora_data.py [--tokenizer models/SmolLM2-135M-Instruct-f32]
       [--out scripts/bench/data/lora]
"""
import argparse
import json
import os

from transformers import AutoTokenizer

root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
p = argparse.ArgumentParser()
p.add_argument("--tokenizer", default=os.path.join(root, "models", "SmolLM2-135M-Instruct-f32"))
p.add_argument("--out", default=os.path.join(root, "scripts", "bench", "data", "lora"))
p.add_argument("--max-tokens", type=int, default=63)
p.add_argument("--min-tokens", type=int, default=59)
p.add_argument("--train", type=int, default=64)
p.add_argument("--valid", type=int, default=8)
a = p.parse_args()

tok = AutoTokenizer.from_pretrained(a.tokenizer)
words = open(os.path.join(root, "LICENSE")).read().split()
ntok = lambda s, e: len(tok(" ".join(words[s:e]))["input_ids"])

want = a.train + a.valid
records = []
for offset in [0, 24, 12, 36, 6, 30, 18, 42]:
    s = offset
    while s < len(words) and len(records) < want:
        e = s + 1
        while e < len(words) and ntok(s, e + 1) <= a.max_tokens:
            e += 1
        r = " ".join(words[s:e])
        if ntok(s, e) >= a.min_tokens and r not in records:  # no short tails, no repeats
            records.append(r)
        s = e
    if len(records) >= want:
        break
assert len(records) == want, len(records)

os.makedirs(a.out, exist_ok=True)
for name, part in [("train", records[:a.train]), ("valid", records[a.train:])]:
    with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
        for r in part:
            f.write(json.dumps({"text": r}) + "\n")
lens = [len(tok(r)["input_ids"]) + 1 for r in records]
nw = [len(r.split()) for r in records]
print(f"{len(records)} records; tokens with EOS {min(lens)}-{max(lens)} (mean {sum(lens) / len(lens):.1f}); "
      f"words {min(nw)}-{max(nw)} (mean {sum(nw) / len(nw):.1f}) -> {a.out}")
