"""lmx's flash attention for prompts beside candidate kernels, on the GPU machine (CuPy, no lmx
build): the kernel as it is in crates/lmx-core/src/cuda_fused.rs (FLASH_SRC, read from there)
and the candidates in scripts/cuda/flash_candidates.cu, compiled together by NVRTC.

First each kernel's output is checked against f32 attention computed here (causal, grouped
heads, an offset into a longer cache, a sliding window, soft-capping; bound 0.02 on bf16
outputs, as lmx-core's GPU test), then each is timed on a Llama-3-8B-shaped prompt (32 query
heads over 8 key/value heads of 128) and a Llama-3.2-1B-shaped one (heads of 64), the kernels
alternating (also with an attention sink at key 0), with the causal FLOPs per second (4 * heads * d * q_len * (q_len + 1) / 2).

Usage there: python3 scripts/cuda/flash_bench.py [--len 4096] [--reps 20]
"""
import argparse
import pathlib
import re

import cupy as cp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
p = argparse.ArgumentParser()
p.add_argument("--len", type=int, default=4096)
p.add_argument("--reps", type=int, default=20)
a = p.parse_args()

text = (ROOT / "crates/lmx-core/src/cuda_fused.rs").read_text()
flash = re.search(r'const FLASH_SRC: &str = r#"(.*?)"#;', text, re.S).group(1)
cand = (ROOT / "scripts/cuda/flash_candidates.cu").read_text()


mod = cp.RawModule(code=flash + "\n" + cand, options=("--std=c++17",))
# name -> (kernel, queries a block)
KERNELS = {
    "lmx": ("lmx_flash_attention_bf16_{d}", 64),
    "r32": ("cand_flash_r32_{d}", 128),
    "r32_b2": ("cand_flash_r32_{d}_b2", 128),
    "lmx_b3": ("lmx_flash_attention_bf16_{d}_b3", 64),
}


def bf16(x):
    """f32 array -> bf16 bits (round to nearest even) as uint16."""
    u = x.astype(cp.float32).view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)


def f32(bits):
    return (bits.astype(cp.uint32) << 16).view(cp.float32)


def run(name, d, q, k, v, heads, n_kv, q_len, kv_len, offset=0, window=0, softcap=0.0):
    fn, br = KERNELS[name]
    kern = mod.get_function(fn.format(d=d))
    out = cp.zeros((1, q_len, heads, d), dtype=cp.uint16)
    scale = np.float32(1.0 / np.sqrt(d))
    args = (q, k, v, out, np.int32(heads), np.int32(n_kv), np.int32(q_len), np.int32(kv_len), np.int32(offset), np.int32(window), scale, np.float32(softcap),
            np.int64(heads * q_len * d), np.int64(q_len * d), np.int64(d), np.int64(n_kv * kv_len * d), np.int64(kv_len * d), np.int64(d),
            np.int64(n_kv * kv_len * d), np.int64(kv_len * d), np.int64(d))
    kern(((q_len + br - 1) // br, heads, 1), (128,), args)
    return out


def reference(q, k, v, heads, n_kv, q_len, kv_len, d, offset, window, softcap):
    qf, kf, vf = f32(q)[0], f32(k)[0], f32(v)[0]
    rep = heads // n_kv
    kf, vf = cp.repeat(kf, rep, axis=0), cp.repeat(vf, rep, axis=0)
    s = cp.einsum("hqd,hkd->hqk", qf, kf) / np.sqrt(d)
    if softcap > 0:
        s = softcap * cp.tanh(s / softcap)
    pos = offset + cp.arange(q_len)[:, None]
    key = cp.arange(kv_len)[None, :]
    mask = key > pos
    if window > 0:
        mask |= key <= pos - window
    s = cp.where(mask[None], -cp.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    e = cp.exp(s)
    o = cp.einsum("hqk,hkd->hqd", e / e.sum(axis=-1, keepdims=True), vf)
    return o.transpose(1, 0, 2)  # (q_len, heads, d)


rng = cp.random.default_rng(0)
print("correctness (max |kernel - f32 attention| on bf16 outputs):")
ok = True
for d in (64, 128):
    for heads, n_kv, q_len, kv_len, window, softcap in [(8, 2, 300, 300, 0, 0.0), (8, 2, 200, 700, 0, 0.0), (4, 4, 333, 333, 37, 0.0), (8, 2, 257, 257, 0, 30.0), (4, 1, 1, 130, 0, 0.0)]:
        q = bf16(rng.standard_normal((1, heads, q_len, d), dtype=cp.float32))
        k = bf16(rng.standard_normal((1, n_kv, kv_len, d), dtype=cp.float32))
        v = bf16(rng.standard_normal((1, n_kv, kv_len, d), dtype=cp.float32))
        offset = kv_len - q_len
        want = reference(q, k, v, heads, n_kv, q_len, kv_len, d, offset, window, softcap)
        line = []
        for name in KERNELS:
            got = f32(run(name, d, q, k, v, heads, n_kv, q_len, kv_len, offset, window, softcap))[0]
            err = float(cp.abs(got - want).max())
            ok &= err < 0.02
            line.append(f"{name} {err:.4f}")
        print(f"  d {d}, heads {heads}/{n_kv}, q {q_len} over {kv_len}, window {window}, softcap {softcap}: " + ", ".join(line))
print("all within 0.02" if ok else "SOME KERNEL IS OFF")

print(f"\ntimings, causal prompt of {a.len} tokens, ms a call (TFLOP/s):")
# "sink": key 0 of every head scores high with every query, as trained models' first token
# does (an attention sink), so each row's maximum is set in the first tile.
for shape, heads, n_kv, d, sink in [("8B", 32, 8, 128, False), ("8B", 32, 8, 128, True), ("1B", 32, 8, 64, False)]:
    L = a.len
    qf = rng.standard_normal((1, heads, L, d), dtype=cp.float32)
    kf = rng.standard_normal((1, n_kv, L, d), dtype=cp.float32)
    if sink:
        qf += 1.0
        kf[:, :, 0, :] = 3.0
    q, k = bf16(qf), bf16(kf)
    v = bf16(rng.standard_normal((1, n_kv, L, d), dtype=cp.float32))
    shape += ", sink" if sink else ""
    flops = 4.0 * heads * d * L * (L + 1) / 2
    times = {name: [] for name in KERNELS}
    for name in KERNELS:
        for _ in range(3):
            run(name, d, q, k, v, heads, n_kv, L, L)
    for rnd in range(3):
        for name in KERNELS:
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(a.reps):
                run(name, d, q, k, v, heads, n_kv, L, L)
            stop.record()
            stop.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, stop) / a.reps)
    base = run("lmx", d, q, k, v, heads, n_kv, L, L)
    for name in KERNELS:
        diff = float(cp.abs(f32(run(name, d, q, k, v, heads, n_kv, L, L)) - f32(base)).max())
        ms = sorted(times[name])
        print(f"  {shape} (d {d}) {name:8s} " + " ".join(f"{t:.3f}" for t in times[name]) + f"  ({flops / ms[1] / 1e9:.0f} TFLOP/s; max diff to lmx {diff:.4f})")
