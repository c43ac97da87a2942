"""A small DeepSeek-V3-shaped model with random f32 weights (transformers' own initialization;
speed does not depend on the values), for the latent-attention decode benchmark in
docs/BENCHMARKS.md: hidden 512, 4 layers (the first dense), 16 heads with a 256-wide cached
latent, 64 + 32 query/key and 64 value dimensions, 8 experts of 256 features (2 per token) and
a shared one, vocab 8192: 28.5M parameters. The tokenizer is a 2-word WordLevel one
(benchmarks draw token ids from the model's vocabulary).
Usage: python3 scripts/bench/make_random_deepseek.py OUT
"""
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
config = AutoConfig.for_model(
    "deepseek_v3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
    kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8,
    num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, moe_intermediate_size=256, first_k_dense_replace=1,
    vocab_size=8192, max_position_embeddings=8192, rope_scaling=None, torch_dtype="float32")
model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
model.save_pretrained(sys.argv[1], safe_serialization=True)
tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
             "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}
json.dump(tokenizer, open(f"{sys.argv[1]}/tokenizer.json", "w"))
print(f"wrote {sys.argv[1]}: {sum(p.numel() for p in model.parameters())} parameters")
