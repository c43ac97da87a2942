"""transformers (eager, bf16) on the same random-weight folder as lmx, on the GPU machine:
decode tok/s at batch 1 (128-token prompt, 256 new tokens, greedy) and prefill tok/s of a
4096-token prompt, medians of 3 after a warm-up. Usage: python3 peer_transformers.py FOLDER
"""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)


def timed(f):
    torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t


with torch.no_grad():
    prompt = torch.randint(0, vocab, (1, 128), generator=g).cuda()
    gen = lambda: model.generate(prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False)
    gen()
    decode = [256 / timed(gen) for _ in range(3)]
    long = torch.randint(0, vocab, (1, 4096), generator=g).cuda()
    fwd = lambda: model(long, logits_to_keep=1)
    fwd()
    prefill = [4096 / timed(fwd) for _ in range(3)]
print(f"transformers {torch.__version__} eager bf16: decode {statistics.median(decode):.1f} tok/s (incl. its 128-token prefill), prefill 4096: {statistics.median(prefill):.0f} tok/s")
