"""A random-weight Llama-3-8B-shaped GGUF in BF16, Q8_0 or Q4_0, for llama.cpp's speed on the GPU machine (the
peer of issue 11; speed does not depend on the weight values): the shape of
`make_random_llama.py` (`llama_shapes.py`: SHAPE=1b, 70b or tiny, LAYERS=N), weights N(0, 0.02) drawn with torch, norms 1, no tokenizer
(`tokenizer.ggml.model` "none": llama-bench draws token ids from the vocabulary size).
Q8_0 and Q4_0 quantize every matrix, the embeddings and the output too (as `llama-quantize
--pure`; lmx's MLX 4-bit folders quantize those too). Needs llama.cpp's gguf-py on PYTHONPATH
(and numpy; torch, on the GPU where there is one, draws faster). SHAPE=tiny: a 2-layer toy, to
check the script anywhere.
TOKENIZER=gpt2: a byte-level BPE tokenizer over the vocabulary instead of none (lmx loads a GGUF
only with a tokenizer).
Usage: python3 scripts/cuda/make_random_gguf.py OUT.gguf [bf16|q8_0|q4_0]
"""
import os
import sys

import gguf
import gguf.quants
import numpy as np
from llama_shapes import llama_shape

try:
    import torch
except ImportError:
    torch = None

out = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else "bf16"
QTYPE = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
FTYPE = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
H, I, L, NH, NKV, V, TIE = llama_shape()
HD = H // NH
rng = np.random.default_rng(0)
if torch is not None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)


def matrix(*shape):
    """N(0, 0.02) values in the file's type: bf16 bits (uint16, rounded to nearest even) or
    gguf-py's quantized blocks."""
    if torch is not None:
        t = torch.randn(*shape, generator=gen, device=dev) * 0.02
        if kind == "bf16":
            return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
        f = t.cpu().numpy()
    else:
        f = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if kind == "bf16":
            u = f.view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return gguf.quants.quantize(f, QTYPE)


w = gguf.GGUFWriter(out, "llama")
w.add_context_length(8192)
w.add_embedding_length(H)
w.add_block_count(L)
w.add_feed_forward_length(I)
w.add_head_count(NH)
w.add_head_count_kv(NKV)
w.add_rope_dimension_count(HD)
w.add_rope_freq_base(500000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(V)
w.add_file_type(FTYPE)
if os.environ.get("TOKENIZER") == "gpt2":
    # lmx needs a tokenizer to load a GGUF: a byte-level BPE one over the vocabulary, its 256
    # byte symbols, one merge, then filler tokens (the text it makes means nothing).
    byte_syms = [chr(b) for b in range(33, 127)] + [chr(b) for b in range(161, 173)] + [chr(b) for b in range(174, 256)]
    byte_syms += [chr(256 + n) for n in range(256 - len(byte_syms))]
    tokens = byte_syms + ["\u0120t"] + [f"<t{i}>" for i in range(V - len(byte_syms) - 1)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * V)
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)
else:
    w.add_tokenizer_model("none")
ones = lambda n: np.ones(n, dtype=np.float32)
w.add_tensor("token_embd.weight", matrix(V, H), raw_dtype=QTYPE)
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", ones(H))
    w.add_tensor(p + "attn_q.weight", matrix(NH * HD, H), raw_dtype=QTYPE)
    w.add_tensor(p + "attn_k.weight", matrix(NKV * HD, H), raw_dtype=QTYPE)
    w.add_tensor(p + "attn_v.weight", matrix(NKV * HD, H), raw_dtype=QTYPE)
    w.add_tensor(p + "attn_output.weight", matrix(H, NH * HD), raw_dtype=QTYPE)
    w.add_tensor(p + "ffn_norm.weight", ones(H))
    w.add_tensor(p + "ffn_gate.weight", matrix(I, H), raw_dtype=QTYPE)
    w.add_tensor(p + "ffn_up.weight", matrix(I, H), raw_dtype=QTYPE)
    w.add_tensor(p + "ffn_down.weight", matrix(H, I), raw_dtype=QTYPE)
w.add_tensor("output_norm.weight", ones(H))
if not TIE:
    w.add_tensor("output.weight", matrix(V, H), raw_dtype=QTYPE)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {out}")
