"""Random-weight Llama folders in a real shape, for GPU speed runs (speed does not depend on
the weight values): OUT-bf16 (Hugging Face bf16) and OUT-4bit (MLX 4-bit, group 64: random
packed words, scales and biases), written with torch on the GPU machine (no network there).
With BITS=8 (or "4 8"), OUT-8bit (MLX 8-bit, group 64) as well or instead of OUT-4bit.
Shape: Llama-3-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256)
or, with SHAPE=1b, Llama-3.2-1B, or with SHAPE=70b, Llama-3-70B (hidden 8192, 80 layers, 64
heads, 8 KV heads, MLP 28672); LAYERS=N keeps the first N layers. BF16=0 skips the bf16 folder (141 GB for the 70B shape). The tokenizer is a WordLevel one over the whole vocabulary
("<unk>", "a", "b", "c", then "w4", "w5", ..., as `word_vocab` in common.sh names them), so that every generated id decodes to a word
(greedy texts compare token for token; benchmarks draw token ids from the vocabulary).
Usage: python3 scripts/cuda/make_random_llama.py OUT
"""
import json
import os
import sys

import torch
from llama_shapes import llama_shape
from safetensors.torch import save_file

out = sys.argv[1]
H, I, L, NH, NKV, V, TIE = llama_shape()
HD = H // NH
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
    "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD,
    "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": TIE, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
             "model": {"type": "WordLevel", "vocab": dict({"<unk>": 0, "a": 1, "b": 2, "c": 3}, **{f"w{i}": i for i in range(4, V)}), "unk_token": "<unk>"}}
matrices = {"model.embed_tokens.weight": (V, H)}
if not TIE:
    matrices["lm_head.weight"] = (V, H)
vectors = {"model.norm.weight": H}
for i in range(L):
    p = f"model.layers.{i}."
    vectors.update({p + "input_layernorm.weight": H, p + "post_attention_layernorm.weight": H})
    matrices.update({
        p + "self_attn.q_proj.weight": (NH * HD, H), p + "self_attn.k_proj.weight": (NKV * HD, H),
        p + "self_attn.v_proj.weight": (NKV * HD, H), p + "self_attn.o_proj.weight": (H, NH * HD),
        p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
    })
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)


def write(folder, tensors, extra):
    os.makedirs(folder, exist_ok=True)
    cfg = dict(config, **extra)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"), indent=1)
    json.dump(tokenizer, open(os.path.join(folder, "tokenizer.json"), "w"))
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


ones = {k: torch.ones(n, dtype=torch.bfloat16) for k, n in vectors.items()}
if os.environ.get("BF16", "1") != "0":
    dense = {k: (torch.randn(s, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu() for k, s in matrices.items()}
    write(out + "-bf16", dict(dense, **ones), {})
    del dense
for bits in os.environ.get("BITS", "4").split():
    bits = int(bits)
    q = {}
    for k, (r, c) in matrices.items():
        m = k[: -len(".weight")]
        q[k] = torch.randint(-2**31, 2**31 - 1, (r, c * bits // 32), generator=g, device=dev, dtype=torch.int64).to(torch.int32).view(torch.uint32).cpu()
        q[m + ".scales"] = (torch.rand((r, c // 64), generator=g, device=dev) * 0.004 + 0.001).to(torch.bfloat16).cpu()
        q[m + ".biases"] = (-q[m + ".scales"].float() * (2 ** (bits - 1))).to(torch.bfloat16)
    quant = {"group_size": 64, "bits": bits}
    write(f"{out}-{bits}bit", dict(q, **ones), {"quantization": quant, "quantization_config": quant})
    del q
print(f"wrote {out}-{{{','.join((['bf16'] if os.environ.get('BF16', '1') != '0' else []) + [b + 'bit' for b in os.environ.get('BITS', '4').split()])}}}")
