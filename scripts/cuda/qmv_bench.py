"""The 4-bit decode products of one Llama-3-8B-shaped token, kernel by kernel, on the GPU
machine (CuPy, no lmx build): lmx's integer kernel as it is in
crates/lmx-core/src/quant/cuda.rs (its CUDA source read from there) beside the candidates in
scripts/cuda/qmv_candidates.cu, each a CUDA graph of the products of 32 layers (q/k/v as one
6144 x 4096 matrix, o 4096 x 4096, gate/up as one 28672 x 4096, down 4096 x 14336) and the
head (128256 x 4096), every matrix its own (4.5 GB, read once per replay as in decode).
Outputs of every candidate are checked against lmx's kernel (same integer sums; the float
sums' order differs). Also: a plain read of the same bytes (the bandwidth a product can
reach), and the fused add + RMS norm that codes its output (65 a token) beside candidates.

Usage there: python3 scripts/cuda/qmv_bench.py [--reps 20]
"""
import argparse
import pathlib
import re

import cupy as cp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]


def raw(path, name):
    text = (ROOT / path).read_text()
    m = re.search(r'const ' + name + r': &str = r#"(.*?)"#;', text, re.S)
    return m.group(1)


p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=20)
p.add_argument("--layers", type=int, default=32)
a = p.parse_args()

code_src = raw("crates/lmx-core/src/quant/cuda.rs", "CODE_SRC")
qsrc = raw("crates/lmx-core/src/quant/cuda.rs", "SRC")
common = raw("crates/lmx-core/src/cuda_fused.rs", "COMMON")
fsrc = raw("crates/lmx-core/src/cuda_fused.rs", "SRC")
cand = (ROOT / "scripts/cuda/qmv_candidates.cu").read_text()
opts = ("--std=c++17",)
bounds = "#define QMV_BOUNDS_4\n#define QMV_BOUNDS_8 __launch_bounds__(128, 8)\n"
lmx = cp.RawModule(code=bounds + code_src + qsrc, options=opts)
fused = cp.RawModule(code=code_src + common + fsrc, options=opts)
cmod = cp.RawModule(code=bounds + code_src + common + qsrc + cand, options=opts)

GS = 64
H, KV, FF, V = 4096, 1024, 14336, 128256
SHAPES = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate_up": (2 * FF, H), "down": (H, FF)}


def act_stride(cols):
    return cols // 2 + ((2 * (cols // GS) + 3) & ~3)


def bf16_round(x):
    u = x.astype(cp.float32).view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(cp.float32)


class Mat:
    def __init__(self, rows, cols, rng):
        self.rows, self.cols = rows, cols
        self.w = cp.asarray(rng.integers(0, 2**32, size=(rows, cols // 8), dtype=np.uint32))
        s = bf16_round(cp.asarray(rng.uniform(0.001, 0.02, size=(rows, cols // GS)).astype(np.float32)))
        b = bf16_round(cp.asarray(rng.uniform(-0.1, 0.0, size=(rows, cols // GS)).astype(np.float32)))
        self.sb = cp.stack([s, b], axis=-1).reshape(rows, 2 * (cols // GS))
        # bf16 pairs: scale in the low half, bias in the high half of a u32.
        self.sb16 = (s.view(cp.uint32) >> 16) | (b.view(cp.uint32) & 0xFFFF0000)
        self.bytes = self.w.nbytes + self.sb16.nbytes  # MLX's own bytes (bf16 scales)


def coded(x, cols):
    act = cp.empty(act_stride(cols), dtype=cp.int32)
    q8 = lmx.get_function("lmx_q8act_bf16")
    n = cols // 8
    q8(((n + 255) // 256,), (256,), (x, act, np.int32(1), np.int32(cols), np.int32(GS), np.int32(4)))
    return act


def as_float(y):
    return (y.astype(cp.uint32) << 16).view(cp.float32)


def run_lmx(m, act, y, rpb=4, sb16=False):
    f = lmx.get_function(f"lmx_qmv8_bf16_4_{rpb}_1_{'s16' if sb16 else 'f32'}")
    f(((m.rows + rpb - 1) // rpb,), (128,), (m.w, m.sb16 if sb16 else m.sb, act, y, np.int32(m.rows), np.int32(m.cols), np.int32(GS), np.int32(1)))


def candidate(name, rows_per_block, sb16):
    def run(m, act, y):
        f = cmod.get_function(name)
        f(((m.rows + rows_per_block - 1) // rows_per_block,), (128,), (m.w, m.sb16 if sb16 else m.sb, act, y, np.int32(m.rows), np.int32(m.cols), np.int32(GS)))
    return run


VARIANTS = {
    "lmx (R=4)": run_lmx,
    "lmx (R=2)": lambda m, act, y: run_lmx(m, act, y, 2),
    "lmx (R=4, bf16 pairs)": lambda m, act, y: run_lmx(m, act, y, 4, True),
    "lmx (R=2, bf16 pairs)": lambda m, act, y: run_lmx(m, act, y, 2, True),
}
for line in cand.splitlines():
    # // CANDIDATE name rows_per_block sb16
    if line.startswith("// CANDIDATE "):
        _, _, name, rpb, sb16 = line.split()
        VARIANTS[name] = candidate(name, int(rpb), sb16 == "1")

rng = np.random.default_rng(0)
print("building weights ...", flush=True)
layers = [{k: Mat(r, c, rng) for k, (r, c) in SHAPES.items()} for _ in range(a.layers)]
head = Mat(V, H, rng)
xs = {c: (bf16_round(cp.asarray(rng.standard_normal(c).astype(np.float32))).view(cp.uint32) >> 16).astype(cp.uint16) for c in (H, FF)}
acts = {c: coded(xs[c], c) for c in (H, FF)}
outs = {k: cp.empty(r, dtype=cp.uint16) for k, (r, c) in list(SHAPES.items()) + [("head", (V, H))]}
total_bytes = sum(m.bytes for l in layers for m in l.values()) + head.bytes
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, weights {total_bytes / 1e9:.2f} GB (bf16 scales)", flush=True)


def timed(launch, reps):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        launch()
        s.begin_capture()
        launch()
        g = s.end_capture()
        g.launch(s)
        s.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        for _ in range(reps):
            g.launch(s)
        e1.record(s)
        e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) / reps * 1e3  # us


# Correctness: each candidate against lmx's kernel on one matrix of every shape.
ref = {}
for k, (r, c) in SHAPES.items():
    m = layers[0][k]
    y = cp.empty(r, dtype=cp.uint16)
    run_lmx(m, acts[c], y)
    ref[k] = as_float(y)
for name, run in VARIANTS.items():
    worst = 0.0
    for k, (r, c) in SHAPES.items():
        y = cp.zeros(r, dtype=cp.uint16)
        run(layers[0][k], acts[c], y)
        d = float(cp.max(cp.abs(as_float(y) - ref[k])) / cp.max(cp.abs(ref[k])))
        worst = max(worst, d)
    print(f"check {name}: max |diff| / max |y| = {worst:.2e} {'ok' if worst < 1e-2 else 'WRONG'}", flush=True)

# A plain read of every matrix's bytes (uint4 loads, a sum kept so nothing is skipped).
read_mod = cp.RawModule(code=r'''
extern "C" __global__ void read_all(const uint4* p, long long n, unsigned int* out) {
    unsigned int acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) { uint4 v = __ldg(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    if (acc == 0x12345678u) out[0] = acc;
}''', options=opts)
sink = cp.zeros(1, dtype=cp.uint32)


def read_launch(mats):
    f = read_mod.get_function("read_all")
    def launch():
        for m in mats:
            n = m.w.nbytes // 16
            f((min((n + 255) // 256, 132 * 8),), (256,), (m.w, np.int64(n), sink))
    return launch


every = [m for l in layers for m in l.values()] + [head]
t = timed(read_launch(every), a.reps)
w_bytes = sum(m.w.nbytes for m in every)
print(f"plain read of the packed words, a launch per matrix: {t:.0f} us, {w_bytes / t / 1e3:.0f} GB/s", flush=True)

for name, run in VARIANTS.items():
    per = {}
    for k, (r, c) in SHAPES.items():
        def launch(k=k, c=c):
            for l in layers:
                run(l[k], acts[c], outs[k])
        per[k] = timed(launch, a.reps)
    per["head"] = timed(lambda: run(head, acts[H], outs["head"]), a.reps)
    total = sum(per.values())
    parts = "  ".join(f"{k} {v / (a.layers if k != 'head' else 1):.1f} us ({(sum(l[k].bytes for l in layers) if k != 'head' else head.bytes) / v / 1e3:.0f} GB/s)" for k, v in per.items())
    print(f"{name}: token {total:.0f} us ({total_bytes / total / 1e3:.0f} GB/s)  {parts}", flush=True)

# The pair formats again, matrix by matrix, alternating three times (is a difference noise?).
for k, (r, c) in SHAPES.items():
    times = {"f32 pairs": [], "bf16 pairs": []}
    for _ in range(3):
        for name, sb16 in (("f32 pairs", False), ("bf16 pairs", True)):
            def launch(k=k, c=c, sb16=sb16):
                for l in layers:
                    run_lmx(l[k], acts[c], outs[k], 4, sb16)
            times[name].append(timed(launch, a.reps) / a.layers)
    print(f"{k}: " + "  ".join(f"{n} {' '.join(f'{t:.1f}' for t in v)} us" for n, v in times.items()), flush=True)

# The fused add + RMS norm that codes its output for the next product (d = 4096, bf16).
d = H
xa = xs[H].copy(); xh = xs[H].copy(); wn = xs[H].copy()
codes = cp.empty(act_stride(d), dtype=cp.int32)
codes_ref = cp.empty(act_stride(d), dtype=cp.int32)
o = cp.empty(2 * d, dtype=cp.uint16)
o_ref = cp.empty(2 * d, dtype=cp.uint16)


def norm_lmx(o, codes):
    f = fused.get_function("lmx_add_rms_norm_bf16")
    f((1,), (1024,), (xa, xh, wn, o[:d], o[d:], np.int32(d), np.float32(1e-5), codes, np.int32(GS), np.int32(4), np.int32(1)))


norm_lmx(o_ref, codes_ref)
NORMS = {"lmx add_rms_norm + codes": norm_lmx}
for line in cand.splitlines():
    # // NORM name threads
    if line.startswith("// NORM "):
        _, _, name, threads = line.split()
        def run(o, codes, name=name, threads=int(threads)):
            f = cmod.get_function(name)
            f((1,), (threads,), (xa, xh, wn, o[:d], o[d:], np.int32(d), np.float32(1e-5), codes, np.int32(GS), np.int32(4)))
        NORMS[name] = run
for name, run in NORMS.items():
    o.fill(0); codes.fill(0)
    run(o, codes)
    same = bool(cp.all(o == o_ref)) and bool(cp.all(codes[: d // 2 + 2 * (d // GS)] == codes_ref[: d // 2 + 2 * (d // GS)]))
    t = timed(lambda: [run(o, codes) for _ in range(65)], a.reps) / 65
    print(f"{name}: {t:.2f} us a norm, output and codes {'equal' if same else 'DIFFER'}", flush=True)
