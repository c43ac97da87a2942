"""A Qwen3-MoE-shaped model with random bf16 weights (speed does not depend on the values), in
Hugging Face's layout (experts apart), for the mixture-of-experts speed benchmark
(scripts/bench/moe_speed.sh). Shape: hidden 1024, 8 layers, 16 query / 4 key-value heads of
64, 64 experts of 256 features, TOP_K per token (default 2), vocab 8192: 441M parameters, of
which ~50M active per token at k = 2.
Usage: python3 scripts/bench/make_random_moe.py OUT [TOP_K]
"""
import json
import os
import sys

import numpy as np

out = sys.argv[1]
top_k = int(sys.argv[2]) if len(sys.argv) > 2 else 2
H, L, NH, NKV, HD, E, I, V = 1024, 8, 16, 4, 64, 64, 256, 8192
rng = np.random.default_rng(0)


def bf16(*shape, std=0.02):
    # bf16 bits: the top half of f32.
    x = (rng.standard_normal(shape, dtype=np.float32) * std).view(np.uint32)
    return (x >> 16).astype(np.uint16)


t = {"model.embed_tokens.weight": bf16(V, H), "model.norm.weight": bf16(H, std=1.0), "lm_head.weight": bf16(V, H)}
for l in range(L):
    p = f"model.layers.{l}"
    t[f"{p}.input_layernorm.weight"] = bf16(H, std=1.0)
    t[f"{p}.post_attention_layernorm.weight"] = bf16(H, std=1.0)
    t[f"{p}.self_attn.q_proj.weight"] = bf16(NH * HD, H)
    t[f"{p}.self_attn.k_proj.weight"] = bf16(NKV * HD, H)
    t[f"{p}.self_attn.v_proj.weight"] = bf16(NKV * HD, H)
    t[f"{p}.self_attn.o_proj.weight"] = bf16(H, NH * HD)
    t[f"{p}.self_attn.q_norm.weight"] = bf16(HD, std=1.0)
    t[f"{p}.self_attn.k_norm.weight"] = bf16(HD, std=1.0)
    t[f"{p}.mlp.gate.weight"] = bf16(E, H, std=0.5)
    for e in range(E):
        t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = bf16(I, H)
        t[f"{p}.mlp.experts.{e}.up_proj.weight"] = bf16(I, H)
        t[f"{p}.mlp.experts.{e}.down_proj.weight"] = bf16(H, I)
os.makedirs(out, exist_ok=True)
# safetensors.numpy has no bf16: the file written by hand (header, then the raw u16 bits).
path = os.path.join(out, "model.safetensors")
header, offset = {}, 0
for k, v in t.items():
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
    offset += v.nbytes
blob = json.dumps(header).encode()
blob += b" " * (-len(blob) % 8)
with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for v in t.values():
        f.write(np.ascontiguousarray(v).tobytes())
config = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H, "intermediate_size": 4 * H,
    "moe_intermediate_size": I, "num_experts": E, "num_experts_per_tok": top_k, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": L, "num_attention_heads": NH,
    "num_key_value_heads": NKV, "head_dim": HD, "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
       "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
       "model": {"type": "WordLevel", "vocab": {f"w{i}": i for i in range(V)}, "unk_token": "w0"}}
json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))
print(f"wrote {out}: {sum(v.size for v in t.values()) / 1e6:.0f}M parameters, top {top_k} of {E} experts")
