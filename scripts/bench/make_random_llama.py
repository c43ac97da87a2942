"""A ~1.1B-parameter Llama-shaped model with random weights, for speed benchmarks (speed does
not depend on weight values): Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV
heads, MLP 8192) with SmolLM2's 49152-token tokenizer and tied embeddings.

Writes OUT_DIR (a bf16 Hugging Face folder) and, for llama.cpp, OUT_DIR-Q4_0.gguf,
OUT_DIR-Q8_0.gguf and OUT_DIR-BF16.gguf holding the same weights (BF16: the same bits).
Usage: python scripts/bench/make_random_llama.py TOKENIZER_SOURCE_GGUF TOKENIZER_FOLDER OUT_DIR
"""
import json
import os
import shutil
import sys

import gguf
import numpy as np
from gguf.quants import quantize

src_gguf, tok_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
H, I, L, NH, NKV, V = 2048, 8192, 16, 32, 8, 49152
HD = H // NH
rng = np.random.default_rng(0)
shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (NH * HD, H), p + "self_attn.k_proj.weight": (NKV * HD, H),
        p + "self_attn.v_proj.weight": (NKV * HD, H), p + "self_attn.o_proj.weight": (H, NH * HD),
        p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
    })


def bf16(x):
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_bf16(tensors, path):
    """A safetensors file of bfloat16 tensors (uint16 bit patterns), without torch."""
    header, offset = {}, 0
    for k, t in tensors.items():
        header[k] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for t in tensors.values():
            f.write(t.tobytes())


tensors = {k: bf16(np.ones(s, np.float32) if len(s) == 1 else rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
os.makedirs(out, exist_ok=True)
save_bf16(tensors, os.path.join(out, "model.safetensors"))
config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": I,
          "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD,
          "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
          "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(os.path.join(tok_dir, f), os.path.join(out, f))
print("wrote", out, sum(t.size for t in tensors.values()) / 1e9, "B params")

reader = gguf.GGUFReader(src_gguf)
names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
hf2gguf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
for kind, qtype, ftype in [("Q8_0", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
                           ("Q4_0", gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
                           ("BF16", gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)]:
    w = gguf.GGUFWriter(f"{out}-{kind}.gguf", "llama")
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") and name != "tokenizer.chat_template":
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(name, field.contents(), vtype)
    w.add_block_count(L); w.add_context_length(8192); w.add_embedding_length(H); w.add_feed_forward_length(I)
    w.add_head_count(NH); w.add_head_count_kv(NKV); w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(V); w.add_rope_dimension_count(HD); w.add_file_type(ftype)
    for k, t in tensors.items():
        if k in names:
            g = names[k]
        else:
            parts = k.split(".")
            g = f"blk.{parts[2]}.{hf2gguf['.'.join(parts[3:-1])]}.weight"
        data = (t.astype(np.uint32) << 16).view(np.float32)
        if data.ndim == 1:
            w.add_tensor(g, data)
        else:
            w.add_tensor(g, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    print("wrote", f"{out}-{kind}.gguf")
