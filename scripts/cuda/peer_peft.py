"""transformers + PEFT LoRA training on the same random-weight folder as lmx, on the GPU
machine (issue 11's peer): LoRA rank 8 (alpha 16) on every linear layer, bf16 base, AdamW
(lr 1e-5), batch 4 x 512 random tokens, 12 steps (the first 2 as warm-up), with and without
gradient checkpointing; trained tokens per second and peak GPU memory.
With --profile: one configuration (no checkpointing), its kernels of one step after
warm-up under torch.profiler, summed per name (where PEFT's GPU time goes, beside lmx's).
Usage: python3 peer_peft.py FOLDER [--profile]
"""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

folder = sys.argv[1]
profile = "--profile" in sys.argv
for ckpt in [False] if profile else [False, True]:
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    if ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(12):
        ids = torch.randint(0, vocab, (4, 512), generator=g).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        ids = torch.randint(0, vocab, (4, 512), generator=g).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        events = [e for e in p.events() if str(e.device_type).endswith("CUDA")]
        gpu = sum(e.device_time for e in events) / 1e3
        print(f"PEFT step under the profiler: {wall * 1e3:.1f} ms wall, {len(events)} kernels, {gpu:.1f} ms kernel time")
        print(p.key_averages().table(sort_by="device_time_total", row_limit=35, max_name_column_width=70))
    tps = 4 * 511 * 10 / sum(times[2:])
    print(f"PEFT LoRA r8 all linears, bf16, batch 4 x 512, checkpointing {ckpt}: {tps:.0f} trained tok/s, peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    del model, opt
    torch.cuda.empty_cache()
