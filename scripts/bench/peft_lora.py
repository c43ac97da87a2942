"""PyTorch + PEFT LoRA training on the CPU, set up as mlx_lm.lora / lmx lora train by default,
for the speed comparison in docs/BENCHMARKS.md.

Same data and batching as MLX LM: text + EOS, examples sorted by length, batches of
--batch-size padded to 1 + 32 * ceil(max_len / 32), loss = mean cross-entropy over the real
target tokens. LoRA rank 8, MLX scale 20 (PEFT lora_alpha = 160), dropout 0, on q/k/v/o/gate/
up/down of the last --num-layers layers; Adam at lr 1e-5.

Usage: python scripts/bench/peft_lora.py --model DIR --data DIR [--dtype float32|bfloat16]
       [--iters 12] [--batch-size 4] [--num-layers 16] [--threads 2]
Prints `RESULT peft dtype=.. it_s=.. tok_s=.. peak_gb=..` (timing skips the first 2 steps).
"""
import argparse
import json
import os
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--dtype", default="float32")
p.add_argument("--iters", type=int, default=12)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--num-layers", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]

tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager")
n_layers = model.config.num_hidden_layers
cfg = LoraConfig(r=8, lora_alpha=160, lora_dropout=0.0, bias="none",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 layers_to_transform=list(range(n_layers - a.num_layers, n_layers)))
model = get_peft_model(model, cfg)
model.train()

data = []
for line in open(os.path.join(a.data, "train.jsonl")):
    ids = tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
    data.append(ids)
order = sorted(range(len(data)), key=lambda i: len(data[i]))
batches = [order[i:i + a.batch_size] for i in range(0, len(order) - a.batch_size + 1, a.batch_size)]
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

times, tokens = [], []
for it in range(a.iters):
    group = [data[i] for i in batches[it % len(batches)]]
    width = 1 + 32 * ((max(len(x) for x in group) + 31) // 32)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros((len(group), width - 1))
    for r, x in enumerate(group):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x) - 1] = 1
    t0 = time.perf_counter()
    logits = model(input_ids=ids[:, :-1]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    loss = (ce * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
    tokens.append(int(mask.sum()))
    print(f"iter {it + 1}: loss {loss.item():.3f} {times[-1]:.2f}s", flush=True)
t, n = sum(times[2:]), sum(tokens[2:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(f"RESULT peft dtype={a.dtype} it_s={(len(times) - 2) / t:.3f} tok_s={n / t:.1f} peak_gb={peak:.2f}")
