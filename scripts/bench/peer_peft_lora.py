"""PyTorch + PEFT LoRA training on the CPU, set up like `mlx_lm.lora` (and `lmx lora`) with their
defaults, for the training-speed comparison in docs/BENCHMARKS.md.

Mirrors MLX LM 0.32: {"text"} records tokenized with EOS appended; examples sorted by length and
cut into batches of --batch-size, the batch order shuffled with numpy seed 0; each batch
right-padded with 0 to 1 + 32 * ceil(max_len / 32) and run with a causal mask only; LoRA rank 8,
scale 20 (PEFT lora_alpha = 20 * 8 = 160), dropout 0, on q/k/v/o/gate/up/down of the last
--num-layers layers (PEFT layers_to_transform); torch.optim.Adam at lr 1e-5.
Loss = mean cross-entropy over the real target tokens (length - 1 per sequence, what lmx
trains). MLX LM's mask also counts the target after the last token (a 0 pad), one more per
sequence; RESULT gives both counts: tok_s (real targets) and mlx_tok_s (MLX LM's count).

Timing covers forward + backward + optimizer step and skips the first --warmup (2) iterations;
s_it_median is the median step time (the machine may be shared; with 2 threads, another busy
process can stretch single steps many times over). peak_gb is the process's peak RSS
(ru_maxrss), model loading included.

Usage: python scripts/bench/peer_peft_lora.py --model models/SmolLM2-135M-Instruct-f32
       [--data scripts/bench/data/lora] [--dtype float32|bfloat16] [--iters 12]
       [--batch-size 4] [--num-layers 16] [--threads 2] [--nf4]
Last line: RESULT peft[-nf4] dtype=.. threads=.. iters=.. it_s=.. s_it=.. s_it_median=.. tok_s=.. mlx_tok_s=.. peak_gb=..
"""
import argparse
import json
import os
import resource
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", default=os.path.join(here, "data", "lora"))
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
p.add_argument("--iters", type=int, default=12)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--num-layers", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa|eager)")
p.add_argument("--nf4", action="store_true",
               help="QLoRA-style: load the linear layers as bitsandbytes 4-bit NF4 (bitsandbytes >= 0.49 runs on the "
                    "CPU), computing in --dtype")
a = p.parse_args()
assert a.iters > a.warmup, "--iters must be larger than --warmup"
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]

tok = AutoTokenizer.from_pretrained(a.model)
quant = {}
if a.nf4:
    from transformers import BitsAndBytesConfig
    quant = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn, **quant)
n_layers = model.config.num_hidden_layers
cfg = LoraConfig(r=8, lora_alpha=8 * 20.0, lora_dropout=0.0, bias="none",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 layers_to_transform=list(range(n_layers - a.num_layers, n_layers)))
model = get_peft_model(model, cfg)
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
print(f"trainable parameters: {sum(p.numel() for p in trainable) / 1e6:.3f}M "
      f"({len(trainable)} tensors, {trainable[0].dtype}); torch {torch.__version__} threads {torch.get_num_threads()}",
      flush=True)

# MLX LM's TextDataset + iterate_batches.
data = []
for line in open(os.path.join(a.data, "train.jsonl")):
    ids = tok.encode(json.loads(line)["text"])
    if ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
    data.append(ids)
order = sorted(range(len(data)), key=lambda i: len(data[i]))
groups = [order[i:i + a.batch_size] for i in range(0, len(order) - a.batch_size + 1, a.batch_size)]
np.random.seed(0)


def batches():
    while True:
        for g in np.random.permutation(len(groups)):
            yield [data[i] for i in groups[g]]


opt = torch.optim.Adam(trainable, lr=1e-5)
times, real, mlx_count = [], [], []
for it, group in zip(range(a.iters), batches()):
    t0 = time.perf_counter()
    width = 1 + 32 * ((max(len(x) for x in group) + 31) // 32)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros((len(group), width - 1))
    for r, x in enumerate(group):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x) - 1] = 1  # targets ids[r, 1:len(x)]
    logits = model(input_ids=ids[:, :-1]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    loss = (ce * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    real.append(int(mask.sum()))
    mlx_count.append(sum(len(x) for x in group))
    print(f"iter {it + 1}: loss {loss.item():.3f}, {times[-1]:.2f} s, {real[-1]} tokens (width {width})", flush=True)

t = sum(times[a.warmup:])
n = len(times) - a.warmup
med = float(np.median(times[a.warmup:]))  # robust to another process taking a core for a while
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(f"RESULT peft{'-nf4' if a.nf4 else ''} dtype={a.dtype} threads={a.threads} iters={n} it_s={n / t:.3f} s_it={t / n:.3f} "
      f"s_it_median={med:.3f} tok_s={sum(real[a.warmup:]) / t:.1f} mlx_tok_s={sum(mlx_count[a.warmup:]) / t:.1f} peak_gb={peak:.2f}")
