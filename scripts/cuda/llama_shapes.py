"""The Llama shapes of the GPU machine's random-weight models (`make_random_llama.py`,
`make_random_gguf.py`): SHAPE unset for Llama-3-8B, `1b` for Llama-3.2-1B, `70b` for
Llama-3-70B, `tiny` for a 2-layer toy; LAYERS=N keeps the first N layers.
Returns (hidden, MLP, layers, heads, KV heads, vocabulary, tied embeddings)."""
import os


def llama_shape():
    shape = {
        "1b": (2048, 8192, 16, 32, 8, 128256, True),
        "70b": (8192, 28672, 80, 64, 8, 128256, False),
        "tiny": (256, 512, 2, 4, 2, 1000, False),
    }.get(os.environ.get("SHAPE", ""), (4096, 14336, 32, 32, 8, 128256, False))
    h, i, layers, nh, nkv, v, tie = shape
    return h, i, int(os.environ.get("LAYERS", layers)), nh, nkv, v, tie
