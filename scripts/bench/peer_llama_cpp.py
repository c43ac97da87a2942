"""llama.cpp peer benchmark (through llama-cpp-python): prompt and generation tokens/s on
random tokens, batch 1, the same shape as `lmx benchmark`.

Usage: python scripts/bench/peer_llama_cpp.py MODEL.gguf PROMPT_TOKENS GEN_TOKENS TRIALS THREADS
"""
import random
import sys
import time

from llama_cpp import Llama

path, p, g, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=p + g + 8, n_batch=max(p, 8), verbose=False)
rng = random.Random(0)
prompt = [rng.randrange(llm.n_vocab()) for _ in range(p)]


def trial():
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pt = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(g):
        llm.eval([42])
    gt = time.perf_counter() - t
    return p / pt, g / gt


trial()  # warm-up
res = [trial() for _ in range(n)]
for i, (pp, gg) in enumerate(res):
    print(f"Trial {i + 1}: prompt_tps={pp:.3f}, generation_tps={gg:.3f}")
print(f"Averages: prompt_tps={sum(r[0] for r in res) / n:.3f}, generation_tps={sum(r[1] for r in res) / n:.3f}")
