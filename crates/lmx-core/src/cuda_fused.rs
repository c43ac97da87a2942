//! CUDA versions of the fused inference kernels of `cpu_fused` (RMS norm with Hugging Face's
//! roundings, SiLU-gated product, single-query attention over the cache), compiled at first
//! use by NVRTC. Each replaces a chain of candle kernels (8 launches for a bf16 norm, ~8 for
//! decode attention): at batch 1 a decode step is bound by launches, not by bandwidth.
//! f32 and bf16; other dtypes take the compositions in `ops`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result};

/// Loads, stores with rounding and block reductions that every lmx kernel source shares.
pub(crate) const COMMON: &str = r#"
__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const unsigned short* p, size_t i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const unsigned short*) {
    unsigned int u = __float_as_uint(v);
    return __uint_as_float(((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16);
}
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(unsigned short* p, size_t i, float v) { p[i] = (unsigned short)(__float_as_uint(rnd(v, p)) >> 16); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x / 32, l = threadIdx.x % 32, n = blockDim.x / 32;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < n ? red[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int w = threadIdx.x / 32, l = threadIdx.x % 32, n = blockDim.x / 32;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    v = l < n ? red[l] : -__int_as_float(0x7f800000);
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 4 consecutive values at p[i..i + 4) (16- or 8-byte aligned) to f32, and back (rounded to T).
__device__ __forceinline__ void ld4(const float* p, size_t i, float* v) { float4 w = *(const float4*)(p + i); v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w; }
__device__ __forceinline__ void ld4(const unsigned short* p, size_t i, float* v) {
    uint2 w = *(const uint2*)(p + i);
    v[0] = __uint_as_float(w.x << 16); v[1] = __uint_as_float(w.x & 0xFFFF0000u);
    v[2] = __uint_as_float(w.y << 16); v[3] = __uint_as_float(w.y & 0xFFFF0000u);
}
__device__ __forceinline__ void st4(float* p, size_t i, const float* v) { *(float4*)(p + i) = make_float4(v[0], v[1], v[2], v[3]); }
__device__ __forceinline__ void st4(unsigned short* p, size_t i, const float* v) {
    unsigned short h[4];
    for (int k = 0; k < 4; k++) st(h, k, v[k]);
    *(uint2*)(p + i) = make_uint2(h[0] | ((unsigned)h[1] << 16), h[2] | ((unsigned)h[3] << 16));
}
"#;

const ATTN_SRC: &str = r#"
// Thread block clusters (compute capability 9.0; the cluster module alone defines LMX_CLUSTER):
// a barrier over the cluster's threads (release/acquire: shared-memory writes before it are
// seen after it across the cluster), a float at `p` in the shared memory of block `rank` of
// the cluster (p an address in this block's, the same layout in each).
#ifdef LMX_CLUSTER
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ float ld_cluster(const float* p, int rank) {
    unsigned int a = (unsigned int)__cvta_generic_to_shared(p), r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
#endif

// Codes head bh's d outputs, as `out` holds them, for the next integer product (`code8`):
// elements [bh * d, bh * d + d) of one row of `cols` (one sequence's heads side by side); d a
// multiple of the group size `gs`, at most 256. The whole block calls it after writing them.
template <typename T>
__device__ void code_head(const T* out, int bh, int d, int cols, int* codes, int gs, int bits) {
    __syncthreads();
    if (threadIdx.x >= 32) return;
    bool live = (int)threadIdx.x < d / 8;
    float v[8];
    for (int k = 0; k < 8; k++) v[k] = live ? ld(out, (size_t)bh * d + threadIdx.x * 8 + k) : 0.f;
    code8(v, codes, cols, gs, bits, live ? bh * d + threadIdx.x * 8 : 0, live);
}

// code_head of the outputs as the block kept them in shared memory (`keep`, as T rounds them):
// no read back of what it just wrote.
__device__ void code_kept(const float* keep, int bh, int d, int cols, int* codes, int gs, int bits) {
    __syncthreads();
    if (threadIdx.x >= 32) return;
    bool live = (int)threadIdx.x < d / 8;
    float v[8];
    for (int k = 0; k < 8; k++) v[k] = live ? keep[threadIdx.x * 8 + k] : 0.f;
    code8(v, codes, cols, gs, bits, live ? bh * d + threadIdx.x * 8 : 0, live);
}

// Output i of a head from its splits' maxima `ms`, their maximum M, the sum L of their sums
// rescaled to it, and the column's sums `av` (at most S splits): merge_splits's arithmetic, in
// its order. Written to out[i] and keep[i] (as T rounds it).
template <int S, typename T>
__device__ __forceinline__ void merge_column(const float* ms, float M, float L, const float* av, int splits, int i, T* out, float* keep) {
    float a = 0.f;
#pragma unroll
    for (int s = 0; s < S; s++) if (s < splits) a += av[s] * __expf(ms[s] - M);
    float o = rnd(a / L, out);
    st(out, i, o);
    keep[i] = o;
}

// Merges the splits' partials `p` of one (sequence, head) into its d outputs:
// out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M). Reads past L1 (`__ldcg`): other blocks
// wrote them. With `keep` (shared memory for d values, or null), the outputs go there too, as
// T rounds them, and where a thread takes one output and there are at most 16 splits every
// load is issued before any is used (one round trip instead of three; the same sums).
template <typename T>
__device__ void merge_splits(const float* p, T* out, int splits, int d, float* keep) {
    float M = -__int_as_float(0x7f800000), L = 0.f;
    if (keep && splits <= 16 && d <= (int)blockDim.x) {
        // Each split's (m, l) through shared memory (loaded by a thread each), the thread's
        // column of each split's sums in registers.
        __shared__ float ms[16], ls[16];
        int i = threadIdx.x;
        bool has = i < d;
        float av[16];
        if (i < splits) {
            ms[i] = __ldcg(p + i * (d + 2));
            ls[i] = __ldcg(p + i * (d + 2) + 1);
        }
#pragma unroll
        for (int s = 0; s < 16; s++) if (s < splits) av[s] = has ? __ldcg(p + s * (d + 2) + 2 + i) : 0.f;
        __syncthreads();
        for (int s = 0; s < splits; s++) M = fmaxf(M, ms[s]);
        for (int s = 0; s < splits; s++) L += ls[s] * __expf(ms[s] - M);
        if (has) merge_column<16>(ms, M, L, av, splits, i, out, keep);
        return;
    }
    for (int s = 0; s < splits; s++) M = fmaxf(M, __ldcg(p + s * (d + 2)));
    for (int s = 0; s < splits; s++) L += __ldcg(p + s * (d + 2) + 1) * __expf(__ldcg(p + s * (d + 2)) - M);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) a += __ldcg(p + s * (d + 2) + 2 + i) * __expf(__ldcg(p + s * (d + 2)) - M);
        float o = rnd(a / L, out);
        st(out, i, o);
        if (keep) keep[i] = o;
    }
}

// Split-K decode attention (flash-decoding): with one split a block per (sequence * head)
// takes every key; with several (`splits` blocks a head, `most` of them used at most) the keys
// in use split into min(most, ceil(kv_len / 64)) parts of `per` keys and block (sequence *
// head, split) takes [split * per, min(kv_len, split * per + per)), later blocks none. The parts
// depend only on the keys in use, not on the buffer or the grid, so every step over the same
// keys rounds alike (a recorded step over a whole buffer, a normal one over a view of it, a
// sequence alone or in a batch). Each warp U keys at a time (their key and
// value loads all issued before any is used: one key at a time left a warp waiting a memory
// latency per key), each lane E consecutive dimensions (coalesced loads), an online softmax per
// warp, merged per block. One split writes the output; several write (max, sum, acc[d]) partials
// per split: with `count` (a zeroed counter per (sequence, head)) the last of a head's blocks to
// finish merges them and zeroes its counter again, else `combine_splits` merges them in a
// second launch. k/v strides (sequence, head, position) in elements.
template <typename T, int E, int U, bool CL>
__device__ void decode_attention(const T* q, const T* k, const T* v, T* out, float* part,
                                 int n_heads, int n_kv, int kv_len, int d, float scale, int chunk, int splits,
                                 long long ks0, long long ks1, long long ks2,
                                 long long vs0, long long vs1, long long vs2, const unsigned int* upto, int window, unsigned int* count,
                                 int* codes, int gs, int bits, int keep) {
    __shared__ float wm[32], wl[32];
    __shared__ bool last;
    // A cache whose length lives on the device (a captured decode step): keys after position
    // upto[0] are not yet written, and with a window those `window` or more behind it unseen.
    int first = 0;
    if (upto) {
        kv_len = min(kv_len, (int)upto[0] + 1);
        if (window > 0) first = max(0, (int)upto[0] + 1 - window);
    }
    extern __shared__ float wacc[];
    const float NEG = -__int_as_float(0x7f800000);
    int bh = blockIdx.x, split = blockIdx.y, bi = bh / n_heads, h = bh % n_heads, kv = h / (n_heads / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    float qr[E], acc[E];
#pragma unroll
    for (int j = 0; j < E; j++) {
        int i = lane * E + j;
        qr[j] = i < d ? ld(q, (size_t)bh * d + i) * scale : 0.f;
        acc[j] = 0.f;
    }
    const T* kb = k + bi * ks0 + kv * ks1;
    const T* vb = v + bi * vs0 + kv * vs1;
    float m = NEG, l = 0.f;
    // `chunk`: the keys of the one split, or with several the most splits used.
    int per = kv_len;
    if (splits > 1) {
        int parts = max(1, min(chunk, (kv_len + 63) / 64));
        per = (kv_len + parts - 1) / parts;
    }
    int t0 = max(split * per, first), t1 = min(kv_len, split * per + per);
    for (int base = t0 + warp * U; base < t1; base += nw * U) {
        float kx[U][E], vx[U][E], s[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            bool in = base + u < t1;
            long long kt = (long long)(in ? base + u : base) * ks2, vt = (long long)(in ? base + u : base) * vs2;
#pragma unroll
            for (int j = 0; j < E; j++) {
                int i = lane * E + j;
                kx[u][j] = i < d ? ld(kb, kt + i) : 0.f;
                vx[u][j] = i < d ? ld(vb, vt + i) : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            s[u] = 0.f;
#pragma unroll
            for (int j = 0; j < E; j++) s[u] += qr[j] * kx[u][j];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < U; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float mx = NEG;
#pragma unroll
        for (int u = 0; u < U; u++) if (base + u < t1) mx = fmaxf(mx, s[u]);
        float mn = fmaxf(m, mx), c = __expf(m - mn);
        l *= c;
#pragma unroll
        for (int j = 0; j < E; j++) acc[j] *= c;
#pragma unroll
        for (int u = 0; u < U; u++) {
            float p = base + u < t1 ? __expf(s[u] - mn) : 0.f;
            l += p;
#pragma unroll
            for (int j = 0; j < E; j++) acc[j] += p * vx[u][j];
        }
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int j = 0; j < E; j++) { int i = lane * E + j; if (i < d) wacc[warp * d + i] = acc[j]; }
    __syncthreads();
    float M = NEG, L = 0.f;
    for (int w = 0; w < nw; w++) M = fmaxf(M, wm[w]);
    for (int w = 0; w < nw; w++) L += wm[w] == NEG ? 0.f : wl[w] * __expf(wm[w] - M);
    // The block's partial: in global memory for the last block's merge, or with a cluster of
    // the head's splits (CL) in shared memory after the warps' sums, for the cluster's first.
    float* pp = CL ? wacc + nw * d : part + ((size_t)bh * splits + split) * (d + 2);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < nw; w++) a += wm[w] == NEG ? 0.f : wacc[w * d + i] * __expf(wm[w] - M);
        if (splits == 1) {
            float o = rnd(a / L, out);
            st(out, (size_t)bh * d + i, o);
            // Each thread's own column of wacc (read above by this thread alone).
            if (keep) wacc[i] = o;
        } else {
            pp[2 + i] = a;
        }
    }
    if (splits > 1 && threadIdx.x == 0) { pp[0] = M; pp[1] = L; }
    if (splits == 1 && codes) {
        if (keep) code_kept(wacc, bh, d, n_heads * d, codes, gs, bits); else code_head(out, bh, d, n_heads * d, codes, gs, bits);
    }
#ifdef LMX_CLUSTER
    if (CL && splits > 1) {
        // The head's splits are one cluster (block y = its rank): the first block merges the
        // others' partials from their shared memory, as merge_splits would from global memory
        // (the same sums in the same order), while they wait to keep them alive.
        cluster_sync();
        if (split == 0) {
            float ms[8], ls[8], av[8], M = NEG, L = 0.f;
            int i = threadIdx.x;
            bool has = i < d;
#pragma unroll
            for (int s = 0; s < 8; s++) {
                if (s < splits) {
                    ms[s] = ld_cluster(pp, s);
                    ls[s] = ld_cluster(pp + 1, s);
                    av[s] = has ? ld_cluster(pp + 2 + i, s) : 0.f;
                }
            }
#pragma unroll
            for (int s = 0; s < 8; s++) if (s < splits) M = fmaxf(M, ms[s]);
#pragma unroll
            for (int s = 0; s < 8; s++) if (s < splits) L += ls[s] * __expf(ms[s] - M);
            if (has) merge_column<8>(ms, M, L, av, splits, i, out + (size_t)bh * d, wacc);
        }
        cluster_sync();
        if (split == 0 && codes) code_kept(wacc, bh, d, n_heads * d, codes, gs, bits);
        return;
    }
#endif
    if (splits == 1 || !count) return;
    // Every partial of this block written and visible to the GPU before its count.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(count + bh, 1u) == (unsigned int)splits - 1;
        // Stream order puts the next launch after this one: zeroed for it.
        if (last) count[bh] = 0;
    }
    __syncthreads();
    if (!last) return;
    // Acquire: the other blocks' partials, released before their counts, are seen after ours.
    __threadfence();
    merge_splits(part + (size_t)bh * splits * (d + 2), out + (size_t)bh * d, splits, d, keep ? wacc : (float*)nullptr);
    if (codes) {
        if (keep) code_kept(wacc, bh, d, n_heads * d, codes, gs, bits); else code_head(out, bh, d, n_heads * d, codes, gs, bits);
    }
}

"#;

const SRC: &str = r#"
// One block per row: statistics in f32, x * r rounded to T, times the weight, rounded again.
// A thread takes 4 consecutive values at a time (one vector load a tensor; rows of a multiple
// of 4 values, 4-value aligned: `vec`), else one. rms_norm and add_rms_norm share the order of
// the sum of squares, so that the fused add + norm equals the add, then the norm, bit for bit.
template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* out, int d, float eps, int vec) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float ss = 0.f;
    if (vec) {
        for (int i = 4 * threadIdx.x; i < d; i += 4 * blockDim.x) {
            float v[4];
            ld4(x, row * d + i, v);
            for (int k = 0; k < 4; k++) ss += v[k] * v[k];
        }
        float r = rsqrtf(block_sum(ss, red) / d + eps);
        for (int i = 4 * threadIdx.x; i < d; i += 4 * blockDim.x) {
            float v[4], wv[4];
            ld4(x, row * d + i, v);
            ld4(w, i, wv);
            for (int k = 0; k < 4; k++) v[k] = rnd(v[k] * r, out) * wv[k];
            st4(out, row * d + i, v);
        }
        return;
    }
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = ld(x, row * d + i); ss += v * v; }
    float r = rsqrtf(block_sum(ss, red) / d + eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) st(out, row * d + i, rnd(ld(x, row * d + i) * r, out) * ld(w, i));
}

// x + h rounded to T into `sum`, then the RMS norm of the sum into `out` (rms_norm's
// arithmetic and order on the rounded sum): one block per row. With `codes`, the normalised
// row is then coded for the next integer product (`code8`, groups of `gs`, `bits`-bit weights'
// order), so that no coding launch sits between the norm and the product.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* h, const T* w, T* sum, T* out, int d, float eps, int* codes, int gs, int bits, int vec) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float ss = 0.f;
    if (vec) {
        for (int i = 4 * threadIdx.x; i < d; i += 4 * blockDim.x) {
            float v[4], hv[4];
            ld4(x, row * d + i, v);
            ld4(h, row * d + i, hv);
            for (int k = 0; k < 4; k++) { v[k] = rnd(v[k] + hv[k], out); ss += v[k] * v[k]; }
            st4(sum, row * d + i, v);
        }
        float r = rsqrtf(block_sum(ss, red) / d + eps);
        // Each thread reads back the sums it wrote.
        for (int i = 4 * threadIdx.x; i < d; i += 4 * blockDim.x) {
            float v[4], wv[4];
            ld4(sum, row * d + i, v);
            ld4(w, i, wv);
            for (int k = 0; k < 4; k++) v[k] = rnd(v[k] * r, out) * wv[k];
            st4(out, row * d + i, v);
        }
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float v = rnd(ld(x, row * d + i) + ld(h, row * d + i), out);
            st(sum, row * d + i, v);
            ss += v * v;
        }
        float r = rsqrtf(block_sum(ss, red) / d + eps);
#pragma unroll 4
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            float v = rnd(ld(x, row * d + i) + ld(h, row * d + i), out);
            st(out, row * d + i, rnd(v * r, out) * ld(w, i));
        }
    }
    if (codes == nullptr) return;
    // The block's writes of `out` are visible to all its threads after the barrier.
    __syncthreads();
    int chunks = d / 8;
    for (int base = 0; base < chunks; base += blockDim.x) {
        int c = base + threadIdx.x;
        bool live = c < chunks;
        float v[8];
        for (int k = 0; k < 8; k++) v[k] = live ? ld(out, row * d + c * 8 + k) : 0.f;
        code8(v, codes + row * act_stride(d, d / gs), d, gs, bits, live ? c * 8 : 0, live);
    }
}

// add_rms_norm for rows of d = 8 * blockDim.x values (d a multiple of 256, at most 4096), a
// thread per 8 values held in registers from the first load to the codes: one round of loads
// (the sums and the normalised row are not read back). The same bits as add_rms_norm: its
// threads take 4 values each, so thread t here is its threads 2t and 2t + 1, their sums of
// squares kept apart and reduced in the same pairs (`block_sum`'s butterfly over its warps of
// 32 is here over half-warps, offsets halved; its last step adds a thread's own two).
template <typename T>
__device__ void add_rms_norm8(const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ w, T* __restrict__ sum, T* __restrict__ out, int d, float eps, int* codes, int gs, int bits) {
    __shared__ float red[32];
    size_t row = blockIdx.x, at = row * d + 8 * threadIdx.x;
    float v[8], hv[8], wv[8];
    ld4(x, at, v); ld4(x, at + 4, v + 4);
    ld4(h, at, hv); ld4(h, at + 4, hv + 4);
    ld4(w, 8 * threadIdx.x, wv); ld4(w, 8 * threadIdx.x + 4, wv + 4);
    float s0 = 0.f, s1 = 0.f;
    for (int k = 0; k < 4; k++) { v[k] = rnd(v[k] + hv[k], out); s0 += v[k] * v[k]; }
    for (int k = 4; k < 8; k++) { v[k] = rnd(v[k] + hv[k], out); s1 += v[k] * v[k]; }
    st4(sum, at, v); st4(sum, at + 4, v + 4);
    for (int o = 8; o > 0; o >>= 1) { s0 += __shfl_xor_sync(0xffffffffu, s0, o); s1 += __shfl_xor_sync(0xffffffffu, s1, o); }
    float ss = s0 + s1;
    int l = threadIdx.x % 32, n = blockDim.x / 16;
    if (threadIdx.x % 16 == 0) red[threadIdx.x / 16] = ss;
    __syncthreads();
    ss = l < n ? red[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = rsqrtf(ss / d + eps);
    for (int k = 0; k < 8; k++) v[k] = rnd(rnd(v[k] * r, out) * wv[k], out);
    st4(out, at, v); st4(out, at + 4, v + 4);
    if (codes) code8(v, codes + row * act_stride(d, d / gs), d, gs, bits, 8 * threadIdx.x, true);
}

// silu(g) * u as silu_mul, a thread per 8 values of rows of `cols`, each row's values coded
// for the next integer product as they are written (`code8`).
template <typename T>
__device__ void silu_mul_coded(const T* g, const T* u, T* out, int rows, int cols, int* codes, int gs, int bits) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    bool live = t < (long long)rows * (cols / 8);
    long long tt = live ? t : 0;
    int i = (int)(tt / (cols / 8)), e0 = (int)(tt % (cols / 8)) * 8;
    float v[8];
    for (int k = 0; k < 8; k++) {
        v[k] = 0.f;
        if (live) {
            size_t at = (size_t)i * cols + e0 + k;
            float gv = ld(g, at);
            v[k] = rnd(gv / (1.f + __expf(-gv)) * ld(u, at), out);
            st(out, at, v[k]);
        }
    }
    code8(v, codes + (size_t)i * act_stride(cols, cols / gs), cols, gs, bits, e0, live);
}

// silu(g) * u, a thread per 16 bytes (n a multiple of 16 / sizeof(T), 16-byte aligned) or, with
// `vec` 0, per value.
template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, long long n, int vec) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (!vec) {
        if (i >= n) return;
        float gv = ld(g, i);
        st(out, i, gv / (1.f + __expf(-gv)) * ld(u, i));
        return;
    }
    const int V = 16 / sizeof(T);
    if (i >= n / V) return;
    uint4 gw = ((const uint4*)g)[i], uw = ((const uint4*)u)[i], ow;
    const T* gp = (const T*)&gw;
    const T* up = (const T*)&uw;
    T* op = (T*)&ow;
#pragma unroll
    for (int k = 0; k < V; k++) {
        float gv = ld(gp, k);
        st(op, k, gv / (1.f + __expf(-gv)) * ld(up, k));
    }
    ((uint4*)out)[i] = ow;
}

// A batched decode step (one new position in each of up to KV_ROWS sequences, each with its own
// cache): row r's key and value buffers ((heads, cap[r], d), contiguous) and the position its
// new key and value go to, offset[r] (the keys it held before). Passed by value as a kernel
// argument: no table to upload, so the launch is all a step pays.
#define KV_ROWS 32
struct KvRows { unsigned long long k[KV_ROWS], v[KV_ROWS]; int offset[KV_ROWS], cap[KV_ROWS]; };
// Row r's entries, read at constant offsets of the parameter (a dynamic index would copy the
// struct to local memory first).
__device__ __forceinline__ void kv_row(const KvRows& rows, int r, unsigned long long& k, unsigned long long& v, int& offset, int& cap) {
#pragma unroll
    for (int i = 0; i < KV_ROWS; i++)
        if (i == r) { k = rows.k[i]; v = rows.v[i]; offset = rows.offset[i]; cap = rows.cap[i]; }
}
// decode_attention for a batched step: block (r * n_heads + h, split) attends row r's query
// head h (q and out (rows, n_heads, d) contiguous) over the offset[r] + 1 keys of the row's own
// buffers, its keys split as a step over that buffer alone splits them: a buffer of at most
// `split_above` positions in one part.
template <typename T, int E, int U>
__device__ void decode_attention_rows(const T* q, const KvRows& rows, T* out, float* part, int n_heads, int n_kv, int d, float scale, int chunk, int splits, int split_above, unsigned int* count) {
    unsigned long long kb = 0, vb = 0;
    int offset = 0, cap = 0;
    kv_row(rows, blockIdx.x / n_heads, kb, vb, offset, cap);
    if (cap <= split_above) chunk = 1;
    long long hs = (long long)cap * d;
    // Strides: no sequence stride (the row's own buffer), heads `cap` positions apart.
    decode_attention<T, E, U, false>(q, (const T*)kb, (const T*)vb, out, part, n_heads, n_kv, offset + 1, d, scale, chunk, splits, 0, hs, d, 0, hs, d, nullptr, 0, count, nullptr, 0, 0, 0);
}

// Writes one position of keys or values, (heads, d) with head stride `sh`, into a (heads,
// cap, d) buffer at position pos[0] (read on the device, so a captured step can replay).
// Elements are copied as raw 2- or 4-byte words.
template <typename W>
__device__ void kv_write(W* buf, const W* src, const unsigned int* pos, int cap, int d, long long sh) {
    unsigned int p = pos[0];
    if (p >= (unsigned int)cap) return;
    int h = blockIdx.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) buf[((size_t)h * cap + p) * d + i] = src[(size_t)h * sh + i];
}
extern "C" __global__ void lmx_kv_write_2(unsigned short* buf, const unsigned short* src, const unsigned int* pos, int cap, int d, long long sh) { PDL_ENTRY(); kv_write(buf, src, pos, cap, d, sh); }
extern "C" __global__ void lmx_kv_write_4(unsigned int* buf, const unsigned int* src, const unsigned int* pos, int cap, int d, long long sh) { PDL_ENTRY(); kv_write(buf, src, pos, cap, d, sh); }

// Rotary embedding and cache write in one launch, block (h, i) for head h of position i of l
// (one sequence): h < nq rotates query head h into `qo` (l, nq, d); the next nkv blocks rotate key
// heads into `kb` and the last nkv copy value heads into `vb` ((heads, cap, d) buffers) at
// position pos[0] (a decode step's device position, l = 1) or, without `pos`, offset + i (a
// prompt chunk). Rotation in the "rotate half" layout with candle's roundings (nvcc contracts
// `a * b - c * d` into one fused multiply-add in bf16 too: rounding both products first
// differed in the last bit). Heads of q, k and v are `qs`, `ks`, `vs` elements apart, their
// positions `qr`, `kr`, `vr`; cos and sin hold a row of d / 2 a position.
template <typename T>
__device__ void rope_kv_at(const T* q, long long qs, long long qr, const T* k, long long ks, long long kr, const T* v, long long vs, long long vr,
                           const T* cos, const T* sin, long long cr, T* qo, T* kb, T* vb, int i, unsigned int p, int nq, int nkv, int cap, int d) {
    int h = blockIdx.x, half = d / 2;
    q += i * qr; k += i * kr; v += i * vr;
    cos += i * cr; sin += i * cr;
    if (h >= nq + nkv) {
        if (p >= (unsigned int)cap) return;
        int hv = h - nq - nkv;
        for (int j = threadIdx.x; j < d; j += blockDim.x) vb[((size_t)hv * cap + p) * d + j] = v[hv * vs + j];
        return;
    }
    const T* x;
    T* o;
    if (h < nq) { x = q + h * qs; o = qo + ((size_t)i * nq + h) * d; }
    else {
        if (p >= (unsigned int)cap) return;
        x = k + (h - nq) * ks; o = kb + ((size_t)(h - nq) * cap + p) * d;
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float x1 = ld(x, j), x2 = ld(x, j + half), c = ld(cos, j), s = ld(sin, j);
        // candle's kernel as nvcc compiles it, in f32 and in bf16 alike: the first product
        // contracted into the sum (a fused multiply-add), the second rounded to T first.
        st(o, j, __fmaf_rn(x1, c, -rnd(__fmul_rn(x2, s), o)));
        st(o, j + half, __fmaf_rn(x1, s, rnd(__fmul_rn(x2, c), o)));
    }
}
template <typename T>
__device__ void rope_kv(const T* q, long long qs, long long qr, const T* k, long long ks, long long kr, const T* v, long long vs, long long vr,
                        const T* cos, const T* sin, T* qo, T* kb, T* vb, const unsigned int* pos, int offset, int nq, int nkv, int cap, int d) {
    int i = blockIdx.y;
    rope_kv_at(q, qs, qr, k, ks, kr, v, vs, vr, cos, sin, d / 2, qo, kb, vb, i, pos ? pos[0] : (unsigned int)(offset + i), nq, nkv, cap, d);
}

// rope_kv for such a batch: block (h, r) rotates query head h of row r into qo (rows, nq, d), or
// writes key / value head h - nq (- nkv) of row r at offset[r] into the row's buffers; q, k and v's
// rows are qr, kr and vr elements apart, cos and sin's rows of d / 2 values cr apart (0: rows at
// one position share them).
template <typename T>
__device__ void rope_kv_rows(const T* q, long long qs, long long qr, const T* k, long long ks, long long kr, const T* v, long long vs, long long vr,
                             const T* cos, const T* sin, long long cr, T* qo, const KvRows& rows, int nq, int nkv, int d) {
    unsigned long long kb = 0, vb = 0;
    int offset = 0, cap = 0, r = blockIdx.y;
    kv_row(rows, r, kb, vb, offset, cap);
    rope_kv_at(q, qs, qr, k, ks, kr, v, vs, vr, cos, sin, cr, qo, (T*)kb, (T*)vb, r, (unsigned int)offset, nq, nkv, cap, d);
}

// Merges the splits of one (sequence, head) block: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
template <typename T>
__device__ void combine_splits(const float* part, T* out, int splits, int d, int* codes, int cols, int gs, int bits) {
    merge_splits(part + (size_t)blockIdx.x * splits * (d + 2), out + (size_t)blockIdx.x * d, splits, d, (float*)nullptr);
    if (codes) code_head(out, blockIdx.x, d, cols, codes, gs, bits);
}

// Causal softmax of attention scores, one block per row: `s` (rows, cols) with rows = (.., r)
// where query i = r % q_len sits at position offset + i and sees keys [lo, pos] (lo = pos + 1 -
// window with a window); each score scaled, soft-capped (softcap > 0: c * tanh(v / c)), then
// softmax in f32 over the seen keys, 0 elsewhere. Replaces the cast, scale, mask add, softmax
// and cast back of the composed attention (most of a prefill's GPU time).
template <typename T>
__device__ void causal_softmax(const T* s, T* out, int cols, int q_len, int offset, int window, float scale, float softcap) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    int pos = offset + (int)(row % q_len);
    int hi = min(cols, pos + 1), lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const T* x = s + row * cols;
    T* o = out + row * cols;
    float m = -__int_as_float(0x7f800000);
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float v = ld(x, j) * scale;
        if (softcap > 0.f) v = softcap * tanhf(v / softcap);
        m = fmaxf(m, v);
    }
    m = block_max(m, red);
    float sum = 0.f;
    for (int j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        float v = ld(x, j) * scale;
        if (softcap > 0.f) v = softcap * tanhf(v / softcap);
        sum += expf(v - m);
    }
    sum = block_sum(sum, red);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float p = 0.f;
        if (j >= lo && j < hi) {
            float v = ld(x, j) * scale;
            if (softcap > 0.f) v = softcap * tanhf(v / softcap);
            p = expf(v - m) / sum;
        }
        st(o, j, p);
    }
}

// The greedy pick of one row of f32 logits: the first index of the largest logit and its log
// probability (the logit minus the row's log-sum-exp), as the host's `argmax` and `logprobs`.
// Ids m0..m7 (0xFFFFFFFF: none) count as -inf (EOS when it is ignored). Two kernels: blocks of
// 256 threads each reduce PICK_CHUNK logits (8 a thread, loaded together) to a partial (best,
// its index, max, sum of exp), then one block merges the partials: out[0] the token, out[1]
// the log probability's bits. (One block over a 128,256-wide row took 60 us on an H200, a
// chain of dependent loads a thread; docs/cuda/2026-12-03-db-mixed.txt.)
#define PICK_CHUNK 2048
__device__ __forceinline__ void pick_merge(float& best, int& bi, float& m, float& s, float ob, int oi, float om, float os) {
    if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
    float nm = fmaxf(m, om);
    if (nm != -__int_as_float(0x7f800000)) s = (m == nm ? s : s * __expf(m - nm)) + (om == nm ? os : os * __expf(om - nm));
    m = nm;
}
// Merges every thread's partial into thread 0's (blocks of at most 1024 threads, whole warps).
__device__ __forceinline__ void pick_block_merge(float& best, int& bi, float& m, float& s) {
    __shared__ float sb[32], sm[32], ss[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1)
        pick_merge(best, bi, m, s, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bi, o), __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    if (l == 0) { sb[w] = best; si[w] = bi; sm[w] = m; ss[w] = s; }
    __syncthreads();
    if (w == 0) {
        int nw = blockDim.x / 32;
        best = l < nw ? sb[l] : -__int_as_float(0x7f800000); bi = l < nw ? si[l] : 0x7fffffff;
        m = l < nw ? sm[l] : -__int_as_float(0x7f800000); s = l < nw ? ss[l] : 0.f;
        for (int o = 16; o > 0; o >>= 1)
            pick_merge(best, bi, m, s, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bi, o), __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    }
}
// A block's partial of the pick over PICK_CHUNK logits from block `blk` of a row of n, ids mk[]
// counting as -inf: (best, its index, max, sum of exp) into *part.
__device__ __forceinline__ void pick_partial(const float* logits, int n, const unsigned int* mk, int blk, float4* part) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int start = blk * PICK_CHUNK;
    float v[PICK_CHUNK / 256];
#pragma unroll
    for (int k = 0; k < PICK_CHUNK / 256; k++) {
        int i = start + k * 256 + threadIdx.x;
        v[k] = i < n ? __ldg(logits + i) : NEG_INF;
    }
    float best = NEG_INF, m = NEG_INF, s = 0.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int k = 0; k < PICK_CHUNK / 256; k++) {
        int i = start + k * 256 + threadIdx.x;
        float x = v[k];
        for (int q = 0; q < 8; q++) if (mk[q] == (unsigned int)i) x = NEG_INF;
        if (x > best) { best = x; bi = i; }
        if (x == NEG_INF) continue;
        if (x > m) { s = s * __expf(m - x) + 1.f; m = x; } else { s += __expf(x - m); }
    }
    pick_block_merge(best, bi, m, s);
    if (threadIdx.x == 0) *part = make_float4(best, __int_as_float(bi), m, s);
}
// Merges a row's `blocks` partials into out[0] (the token) and out[1] (its log probability's bits).
__device__ __forceinline__ void pick_final(const float4* part, int blocks, unsigned int* out) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    float best = NEG_INF, m = NEG_INF, s = 0.f;
    int bi = 0x7fffffff;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
        float4 p = part[b];
        pick_merge(best, bi, m, s, p.x, __float_as_int(p.y), p.z, p.w);
    }
    pick_block_merge(best, bi, m, s);
    if (threadIdx.x == 0) {
        // Every logit -inf: token 0, as the host's argmax.
        int token = bi == 0x7fffffff ? 0 : bi;
        float lse = m == NEG_INF ? NEG_INF : m + logf(s);
        out[0] = (unsigned int)token;
        out[1] = __float_as_uint(best - lse);
    }
}
extern "C" __global__ void __launch_bounds__(256) lmx_pick_partial(const float* logits, int n, unsigned int m0, unsigned int m1, unsigned int m2, unsigned int m3,
                                            unsigned int m4, unsigned int m5, unsigned int m6, unsigned int m7, float4* part) {
    PDL_ENTRY();
    const unsigned int mk[8] = {m0, m1, m2, m3, m4, m5, m6, m7};
    pick_partial(logits, n, mk, blockIdx.x, part + blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(1024) lmx_pick_final(const float4* part, int blocks, unsigned int* out) {
    PDL_ENTRY();
    pick_final(part, blocks, out);
}
// The pick of every row of (rows, n) logits: block (x, r) takes chunk x of row r, with row r's 8
// masked ids at masks[8 r]; then a block per row merges its partials into out[2 r], out[2 r + 1].
extern "C" __global__ void __launch_bounds__(256) lmx_pick_partial_rows(const float* logits, int n, const unsigned int* masks, float4* part) {
    PDL_ENTRY();
    unsigned int mk[8];
    for (int q = 0; q < 8; q++) mk[q] = masks[blockIdx.y * 8 + q];
    pick_partial(logits + (size_t)blockIdx.y * n, n, mk, blockIdx.x, part + (size_t)blockIdx.y * gridDim.x + blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(1024) lmx_pick_final_rows(const float4* part, int blocks, unsigned int* out) {
    PDL_ENTRY();
    pick_final(part + (size_t)blockIdx.x * blocks, blocks, out + 2 * blockIdx.x);
}

// y (m rows of n) = x (m rows of k) times w (n rows of k) transposed, all bf16, for the few
// activation rows of a decode step: a block takes R weight rows, each thread 16 bytes (8
// weights) of every one of them at a time along k, with each activation row. Sums in f32, in
// an order that depends only on k and the block size (not on m or R): a sequence's outputs in
// a batch equal its outputs alone. k % 8 == 0, rows 16-byte aligned, blockDim.x <= 256.
__device__ __forceinline__ void bf16x8(uint4 v, float* f) {
    const unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) { f[2 * j] = __uint_as_float(u[j] << 16); f[2 * j + 1] = __uint_as_float(u[j] & 0xFFFF0000u); }
}
template <int M, int R>
__device__ void matvec_bf16(const uint4* w, const uint4* x, unsigned short* y, int n, int k8) {
    __shared__ float red[8][M * R];
    const int row0 = blockIdx.x * R;
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < M; b++) acc[r][b] = 0.f;
    for (int i = threadIdx.x; i < k8; i += blockDim.x) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; r++) wv[r] = row0 + r < n ? __ldg(w + (size_t)(row0 + r) * k8 + i) : make_uint4(0u, 0u, 0u, 0u);
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) bf16x8(wv[r], wf[r]);
#pragma unroll
        for (int b = 0; b < M; b++) {
            float xf[8];
            bf16x8(__ldg(x + (size_t)b * k8 + i), xf);
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[r][b] = fmaf(wf[r][j], xf[j], acc[r][b]);
        }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < M; b++) {
            float v = acc[r][b];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) red[warp][r * M + b] = v;
        }
    __syncthreads();
    for (int t = threadIdx.x; t < R * M; t += blockDim.x) {
        float s = 0.f;
        for (int q = 0; q < warps; q++) s += red[q][t];
        const int r = t / M, b = t % M;
        if (row0 + r < n) st(y, (size_t)b * n + row0 + r, s);
    }
}
#define MATVEC(M, R) extern "C" __global__ void __launch_bounds__(256) lmx_matvec_bf16_m##M##_r##R(const uint4* w, const uint4* x, unsigned short* y, int n, int k8) { PDL_ENTRY(); matvec_bf16<M, R>(w, x, y, n, k8); }
#define MATVEC_R(M) MATVEC(M, 1) MATVEC(M, 2) MATVEC(M, 4)
MATVEC_R(1) MATVEC_R(2) MATVEC_R(3) MATVEC_R(4) MATVEC_R(5) MATVEC_R(6) MATVEC_R(7) MATVEC_R(8)

#define DECODE_ATTENTION(T, name, E, U, suffix) \
extern "C" __global__ void lmx_decode_attention_rows_##name##_e##E##suffix(const T* q, const KvRows rows, T* out, float* part, int n_heads, int n_kv, int d, float scale, int chunk, int splits, int split_above, unsigned int* count) { PDL_ENTRY(); decode_attention_rows<T, E, U>(q, rows, out, part, n_heads, n_kv, d, scale, chunk, splits, split_above, count); } \
extern "C" __global__ void lmx_decode_attention_##name##_e##E##suffix(const T* q, const T* k, const T* v, T* out, float* part, int n_heads, int n_kv, int kv_len, int d, float scale, int chunk, int splits, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2, const unsigned int* upto, int window, unsigned int* count, int* codes, int gs, int bits, int keep) { PDL_ENTRY(); decode_attention<T, E, U, false>(q, k, v, out, part, n_heads, n_kv, kv_len, d, scale, chunk, splits, ks0, ks1, ks2, vs0, vs1, vs2, upto, window, count, codes, gs, bits, keep); }
#define INSTANTIATE(T, name) \
extern "C" __global__ void lmx_causal_softmax_##name(const T* s, T* out, int cols, int q_len, int offset, int window, float scale, float softcap) { PDL_ENTRY(); causal_softmax(s, out, cols, q_len, offset, window, scale, softcap); } \
extern "C" __global__ void lmx_rms_norm_##name(const T* x, const T* w, T* out, int d, float eps, int vec) { PDL_ENTRY(); rms_norm(x, w, out, d, eps, vec); } \
extern "C" __global__ void lmx_add_rms_norm_##name(const T* x, const T* h, const T* w, T* sum, T* out, int d, float eps, int* codes, int gs, int bits, int vec) { PDL_ENTRY(); add_rms_norm(x, h, w, sum, out, d, eps, codes, gs, bits, vec); } \
extern "C" __global__ void lmx_add_rms_norm8_##name(const T* x, const T* h, const T* w, T* sum, T* out, int d, float eps, int* codes, int gs, int bits) { PDL_ENTRY(); add_rms_norm8(x, h, w, sum, out, d, eps, codes, gs, bits); } \
extern "C" __global__ void lmx_silu_mul_coded_##name(const T* g, const T* u, T* out, int rows, int cols, int* codes, int gs, int bits) { PDL_ENTRY(); silu_mul_coded(g, u, out, rows, cols, codes, gs, bits); } \
extern "C" __global__ void lmx_silu_mul_##name(const T* g, const T* u, T* out, long long n, int vec) { PDL_ENTRY(); silu_mul(g, u, out, n, vec); } \
DECODE_ATTENTION(T, name, 1, 8, ) DECODE_ATTENTION(T, name, 2, 8, ) DECODE_ATTENTION(T, name, 4, 8, ) DECODE_ATTENTION(T, name, 8, 4, ) \
DECODE_ATTENTION(T, name, 1, 1, _u1) DECODE_ATTENTION(T, name, 2, 1, _u1) DECODE_ATTENTION(T, name, 4, 1, _u1) DECODE_ATTENTION(T, name, 8, 1, _u1) \
extern "C" __global__ void lmx_combine_splits_##name(const float* part, T* out, int splits, int d, int* codes, int cols, int gs, int bits) { PDL_ENTRY(); combine_splits(part, out, splits, d, codes, cols, gs, bits); } \
extern "C" __global__ void lmx_rope_kv_##name(const T* q, long long qs, long long qr, const T* k, long long ks, long long kr, const T* v, long long vs, long long vr, const T* cos, const T* sin, T* qo, T* kb, T* vb, const unsigned int* pos, int offset, int nq, int nkv, int cap, int d) { PDL_ENTRY(); rope_kv(q, qs, qr, k, ks, kr, v, vs, vr, cos, sin, qo, kb, vb, pos, offset, nq, nkv, cap, d); }
#define ROPE_KV_ROWS(T, name) \
extern "C" __global__ void lmx_rope_kv_rows_##name(const T* q, long long qs, long long qr, const T* k, long long ks, long long kr, const T* v, long long vs, long long vr, const T* cos, const T* sin, long long cr, T* qo, const KvRows rows, int nq, int nkv, int d) { PDL_ENTRY(); rope_kv_rows(q, qs, qr, k, ks, kr, v, vs, vr, cos, sin, cr, qo, rows, nq, nkv, d); }
ROPE_KV_ROWS(float, f32)
ROPE_KV_ROWS(unsigned short, bf16)
INSTANTIATE(float, f32)
INSTANTIATE(unsigned short, bf16)
"#;

/// `src` compiled to PTX by NVRTC once per process (`cell` caches it, or the error).
pub(crate) fn ptx(cell: &'static std::sync::OnceLock<std::result::Result<String, String>>, src: &str) -> Result<&'static str> {
    ptx_for(cell, src, None)
}

/// [`ptx`] for a virtual architecture (`compute_90`), or NVRTC's default.
fn ptx_for(cell: &'static std::sync::OnceLock<std::result::Result<String, String>>, src: &str, arch: Option<&'static str>) -> Result<&'static str> {
    use candle_core::cuda_backend::cudarc::nvrtc;
    cell.get_or_init(|| nvrtc::compile_ptx_with_opts(src, nvrtc::CompileOptions { arch, ..Default::default() }).map(|p| p.to_src()).map_err(|e| format!("{e:?}")))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling lmx's CUDA kernels with NVRTC failed (is libnvrtc on the library path?): {e}")))
}

/// Programmatic dependent launch (`LMX_CUDA_PDL=1`, GPUs of compute capability 9.0 or newer):
/// the kernels of lmx's modules that start with `PDL_ENTRY()` (the quantized products, the
/// fused norms, attention, rope, the pick) are launched by [`Launch`] with
/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, so that a kernel's launch and
/// block scheduling overlap the end of the one before; each waits (`griddepcontrol.wait`) for
/// it at its start. The answer is the same for the whole process: the modules' PTX is
/// compiled once, with the waits or without.
pub(crate) fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMX_CUDA_PDL").is_ok_and(|v| v == "1") && all_compute_9())
}

/// `LMX_CUDA_ABLATE=norm,silu,attention,rope` skips those fused kernels' launches, for timing
/// only (every output after them is wrong): a decode step's time without them is what they
/// cost inside a recorded step, launch gaps included, which Nsight Compute's serialized,
/// cold-cache kernel times do not show.
fn ablated(what: &str) -> bool {
    static SET: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SET.get_or_init(|| std::env::var("LMX_CUDA_ABLATE").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default()).iter().any(|s| s == what)
}

/// The source prefix and architecture of lmx's modules with `PDL_ENTRY()` kernels.
pub(crate) fn pdl_build() -> (&'static str, Option<&'static str>) {
    if pdl_enabled() {
        ("#define LMX_PDL\n", Some("compute_90"))
    } else {
        ("", None)
    }
}

/// PTX of the quantized kernels' and fused kernels' sources (with `PDL_ENTRY()` kernels).
pub(crate) fn pdl_ptx(cell: &'static std::sync::OnceLock<std::result::Result<String, String>>, src: &str) -> Result<&'static str> {
    ptx_for(cell, src, pdl_build().1)
}

fn fused_ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    pdl_ptx(&PTX, SOURCE.get_or_init(|| format!("{}{}{COMMON}{ATTN_SRC}{SRC}", pdl_build().0, crate::quant::cuda::CODE_SRC)))
}

/// The decode attention kernels whose splits of a head form one thread block cluster
/// (`lmx_decode_attention_cluster_{f32|bf16}_e{1,2,4,8}`), in a module of their own compiled
/// for compute capability 9.0.
const CLUSTER_INST: &str = r#"
#define DECODE_ATTENTION_CLUSTER(T, name, E, U) \
extern "C" __global__ void lmx_decode_attention_cluster_##name##_e##E(const T* q, const T* k, const T* v, T* out, float* part, int n_heads, int n_kv, int kv_len, int d, float scale, int chunk, int splits, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2, const unsigned int* upto, int window, unsigned int* count, int* codes, int gs, int bits, int keep) { PDL_ENTRY(); decode_attention<T, E, U, true>(q, k, v, out, part, n_heads, n_kv, kv_len, d, scale, chunk, splits, ks0, ks1, ks2, vs0, vs1, vs2, upto, window, count, codes, gs, bits, keep); }
DECODE_ATTENTION_CLUSTER(float, f32, 1, 8) DECODE_ATTENTION_CLUSTER(float, f32, 2, 8) DECODE_ATTENTION_CLUSTER(float, f32, 4, 8) DECODE_ATTENTION_CLUSTER(float, f32, 8, 4)
DECODE_ATTENTION_CLUSTER(unsigned short, bf16, 1, 8) DECODE_ATTENTION_CLUSTER(unsigned short, bf16, 2, 8) DECODE_ATTENTION_CLUSTER(unsigned short, bf16, 4, 8) DECODE_ATTENTION_CLUSTER(unsigned short, bf16, 8, 4)
"#;

fn cluster_ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ptx_for(&PTX, SOURCE.get_or_init(|| format!("{}#define LMX_CLUSTER\n{}{COMMON}{ATTN_SRC}{CLUSTER_INST}", pdl_build().0, crate::quant::cuda::CODE_SRC)), Some("compute_90"))
}

/// Whether decode attention's splits of a head merge through a thread block cluster's shared
/// memory (every GPU of compute capability 9.0 or newer, unless `LMX_CUDA_ATTENTION_CLUSTER=0`)
/// rather than through global memory, a fence and a counter (the last block's merge). On an
/// H100 it took 1.1-1.5% off a 4-bit decode step (8B: 2.325 -> 2.300 ms; 1B: 0.733 -> 0.722),
/// with the same greedy tokens (docs/BENCHMARKS.md, session 43).
fn attention_cluster() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_ATTENTION_CLUSTER").is_ok_and(|v| v == "0") && all_compute_9())
}

/// Whether every GPU the driver sees has compute capability 9.0 or newer.
fn all_compute_9() -> bool {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let major = |i| {
        // SAFETY: a device ordinal below the driver's count.
        result::device::get(i).and_then(|d| unsafe { result::device::get_attribute(d, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) })
    };
    result::init().is_ok() && result::device::get_count().is_ok_and(|n| n > 0 && (0..n).all(|i| major(i).is_ok_and(|m| m >= 9)))
}

/// A value passed to a kernel by [`Launch`]: a device pointer, or a scalar in the low bytes
/// of a word (little-endian, as the kernel reads it).
pub(crate) trait KernelArg {
    fn word(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64;
}

impl<T> KernelArg for candle_core::cuda_backend::cudarc::driver::CudaSlice<T> {
    fn word(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for candle_core::cuda_backend::cudarc::driver::CudaView<'_, T> {
    fn word(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        self.device_ptr(stream).0
    }
}

macro_rules! scalar_arg {
    ($($t:ty => $w:expr),*) => {
        $(impl KernelArg for $t {
            fn word(&self, _: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
                let f: fn($t) -> u64 = $w;
                f(*self)
            }
        })*
    };
}
scalar_arg!(i32 => |v| v as u32 as u64, u32 => |v| v as u64, f32 => |v| v.to_bits() as u64, i64 => |v| v as u64, u64 => |v| v);

/// A launch of one of lmx's `PDL_ENTRY()` kernels, made by [`launch_args!`] (then `arg`s and
/// `launch`, as cudarc's `LaunchArgs`): cudarc's own launch, or, where [`pdl_enabled`],
/// `cuLaunchKernelEx` with programmatic stream serialization. Kernels without `PDL_ENTRY()`
/// (candle's, flash attention, the training kernels) must keep cudarc's launches.
pub(crate) struct Launch<'a> {
    func: &'a candle_core::cuda_backend::cudarc::driver::CudaFunction,
    how: How<'a>,
    /// Blocks a cluster along y (`cuLaunchKernelEx`'s cluster dimension), if any.
    cluster_y: Option<u32>,
}

/// How a [`Launch`] goes: cudarc's launch (PDL off: nothing more per launch than before), or
/// `cuLaunchKernelEx` with one word per argument.
enum How<'a> {
    Cudarc(candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>),
    Pdl { stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>, words: Vec<u64> },
}

/// `launch_args!(dev, func)`: a [`Launch`] of `func` (a kernel of lmx's modules) on `dev`.
macro_rules! launch_args {
    ($dev:expr, $func:expr) => {
        $crate::cuda_fused::Launch::new(&$dev, &$func, (!$crate::cuda_fused::pdl_enabled()).then(|| $func.builder()))
    };
}
pub(crate) use launch_args;

impl<'a> Launch<'a> {
    /// With `args` (cudarc's, made where PDL is off) the launch is cudarc's.
    pub(crate) fn new(
        dev: &candle_core::CudaDevice,
        func: &'a candle_core::cuda_backend::cudarc::driver::CudaFunction,
        args: Option<candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>>,
    ) -> Self {
        let how = match args {
            Some(b) => How::Cudarc(b),
            None => How::Pdl { stream: dev.cuda_stream(), words: Vec::with_capacity(32) },
        };
        Launch { func, how, cluster_y: None }
    }

    /// A launch whose blocks go `y` at a time along y into thread block clusters (made with
    /// `args` None: through `cuLaunchKernelEx`).
    pub(crate) fn cluster(dev: &candle_core::CudaDevice, func: &'a candle_core::cuda_backend::cudarc::driver::CudaFunction, y: u32) -> Self {
        Launch { cluster_y: Some(y), ..Self::new(dev, func, None) }
    }

    pub(crate) fn arg<A: KernelArg>(&mut self, a: &'a A) -> &mut Self
    where
        candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>: PushKernelArg<&'a A>,
    {
        match &mut self.how {
            How::Cudarc(b) => {
                b.arg(a);
            }
            How::Pdl { stream, words } => words.push(a.word(stream)),
        }
        self
    }

    /// # Safety
    /// The arguments must be the kernel's, in order, and its buffers hold what it reads and
    /// writes (as for cudarc's `LaunchArgs::launch`).
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> std::result::Result<(), candle_core::cuda_backend::cudarc::driver::DriverError> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let (stream, words) = match &mut self.how {
            // SAFETY: the caller's.
            How::Cudarc(b) => return unsafe { b.launch(cfg) }.map(|_| ()),
            How::Pdl { stream, words } => (stream, words),
        };
        stream.context().bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = words.iter_mut().map(|w| w as *mut u64 as *mut std::ffi::c_void).collect();
        let mut attrs = Vec::with_capacity(2);
        if pdl_enabled() {
            // SAFETY: a plain C struct; zero is a valid value of each field.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(attr);
        }
        if let Some(y) = self.cluster_y {
            // SAFETY: as above.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim.x = 1;
            attr.value.clusterDim.y = y;
            attr.value.clusterDim.z = 1;
            attrs.push(attr);
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: params point at one word per argument, alive until the call returns (the
        // driver copies them); the caller vouches for the arguments.
        unsafe { sys::cuLaunchKernelEx(&config, self.func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()
    }
}

/// The name of kernel `base` for `dtype`: `lmx_{base}_{f32|bf16}`.
pub(crate) fn name(base: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => candle_core::bail!("lmx's CUDA {base} kernel: dtype {other:?}"),
    };
    Ok(format!("lmx_{base}_{suffix}"))
}

/// True when the fused CUDA kernels take this dtype.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// Runs `launch` with typed slices of f32 or bf16 storage; returns the output storage.
macro_rules! typed {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("lmx's CUDA kernels: dtype {other:?}"),
        }
    };
}
pub(crate) use typed;

pub(crate) fn out<T: DeviceRepr>(dev: &candle_core::CudaDevice, n: usize) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<T>(n) }
}

/// Whether the norms take 4 values a thread (1) or one (0): rows of a multiple of 4 values
/// starting at 4-value aligned offsets (output buffers are fresh, hence aligned).
fn vec4(d: usize, layouts: &[&Layout]) -> i32 {
    (d % 4 == 0 && layouts.iter().all(|l| l.start_offset() % 4 == 0)) as i32
}

/// RMS norm of contiguous rows `x` with weight `w` (both `dtype`).
pub(crate) fn rms_norm(xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, eps: f32) -> Result<CudaStorage> {
    let d = wl.shape().elem_count();
    let rows = xl.shape().elem_count() / d;
    let dev = xs.device().clone();
    let func = dev.get_or_load_custom_func(&name("rms_norm", xs.dtype())?, "lmx_fused", fused_ptx()?)?;
    // A thread per 4 values (a 4096-wide row's loads are then all in flight at once: 256
    // threads looping over 16 loads each took 16 us a norm on an H200, the loop's loads one
    // after another).
    let threads = d.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    typed!(xs.dtype(), T => {
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let o = out::<T>(&dev, rows * d)?;
        let (di, e, v) = (d as i32, eps, vec4(d, &[xl, wl]));
        let mut b = launch_args!(dev, func);
        b.arg(&x).arg(&w).arg(&o).arg(&di).arg(&e).arg(&v);
        // SAFETY: x holds rows * d values, w d, o rows * d.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// `x + h` and its RMS norm with weight `w` (contiguous rows, one dtype): the sums, then the
/// normalised sums, in one buffer of 2 * rows * d.
/// With `codes` (a u32 buffer of `act_stride` ints for one row, (bits, group size)), the
/// normalised row is coded into it as well.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm(
    xs: &CudaStorage,
    xl: &Layout,
    hs: &CudaStorage,
    hl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    eps: f32,
    codes: Option<(&CudaStorage, &Layout, (usize, usize))>,
) -> Result<CudaStorage> {
    let d = wl.shape().elem_count();
    let rows = xl.shape().elem_count() / d;
    let codes = match codes {
        Some((cs, cl, (bits, gs))) if rows == 1 && cl.shape().elem_count() == crate::quant::cuda::act_stride(d, gs) && cl.is_contiguous() => {
            Some((cs.as_cuda_slice::<u32>()?.slice(cl.start_offset()..), bits as i32, gs as i32))
        }
        Some((_, cl, (_, gs))) => {
            candle_core::bail!("add_rms_norm: codes need one row of {d} and a contiguous buffer of {} ints (given {rows} rows, a buffer of {:?})", crate::quant::cuda::act_stride(d, gs), cl.dims())
        }
        None => None,
    };
    let dev = xs.device().clone();
    let vec = vec4(d, &[xl, hl, wl]);
    // Rows of a multiple of 256 values up to 4096 (a thread per 4 values, every thread's
    // values one load): a thread per 8, held in registers (the same bits, one round of loads).
    let eight = vec == 1 && d % 256 == 0 && d <= 4096 && norm8();
    let func = dev.get_or_load_custom_func(&name(if eight { "add_rms_norm8" } else { "add_rms_norm" }, xs.dtype())?, "lmx_fused", fused_ptx()?)?;
    let threads = if eight { d as u32 / 8 } else { d.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32 };
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    typed!(xs.dtype(), T => {
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let h = hs.as_cuda_slice::<T>()?.slice(hl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let o = out::<T>(&dev, 2 * rows * d)?;
        let (sum, normed) = o.split_at(rows * d);
        let (di, e) = (d as i32, eps);
        let none = 0u64;
        let mut b = launch_args!(dev, func);
        b.arg(&x).arg(&h).arg(&w).arg(&sum).arg(&normed).arg(&di).arg(&e);
        match &codes {
            Some((c, bits, gs)) => b.arg(c).arg(gs).arg(bits),
            None => b.arg(&none).arg(&0i32).arg(&0i32),
        };
        if !eight {
            b.arg(&vec);
        }
        // SAFETY: x and h hold rows * d values, w d, each half of o rows * d; the codes'
        // buffer (one row) act_stride(d) ints, or the pointer is null and not read.
        if !ablated("norm") {
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// Whether [`add_rms_norm`] takes its register-resident kernel where it fits
/// (`LMX_CUDA_NORM8=0`: the kernel before it, for comparisons).
fn norm8() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_NORM8").is_ok_and(|v| v == "0"))
}

/// [`pick_greedy`] of every row of contiguous f32 logits, row r with its own masked ids
/// (`masked[r]`, at most 8): two launches for all the rows; (rows * 2) u32 out.
pub(crate) fn pick_greedy_rows(ls: &CudaStorage, ll: &Layout, masked: &[Vec<u32>]) -> Result<CudaStorage> {
    let rows = masked.len();
    let total = ll.shape().elem_count();
    let n = total / rows.max(1);
    if ls.dtype() != DType::F32 || !ll.is_contiguous() || rows == 0 || n * rows != total || masked.iter().any(|m| m.len() > 8) || n > i32::MAX as usize || rows > 65535 {
        candle_core::bail!("lmx pick_greedy_rows: contiguous f32 rows and at most 8 masked ids a row (given {:?}, {:?} for {rows} rows)", ls.dtype(), ll.dims());
    }
    let dev = ls.device().clone();
    const CHUNK: usize = 2048; // PICK_CHUNK
    let blocks = n.div_ceil(CHUNK).max(1);
    let l = ls.as_cuda_slice::<f32>()?.slice(ll.start_offset()..);
    let ids: Vec<u32> = masked.iter().flat_map(|m| m.iter().copied().chain(std::iter::repeat(u32::MAX)).take(8)).collect();
    let ids = dev.cuda_stream().clone_htod(&ids).w()?;
    let part = out::<f32>(&dev, 4 * blocks * rows)?;
    let o = out::<u32>(&dev, 2 * rows)?;
    let (ni, nb) = (n as i32, blocks as i32);
    let func = dev.get_or_load_custom_func("lmx_pick_partial_rows", "lmx_fused", fused_ptx()?)?;
    let mut b = launch_args!(dev, func);
    b.arg(&l).arg(&ni).arg(&ids).arg(&part);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: l holds rows * n floats, ids 8 a row, part 4 a block and row.
    unsafe { b.launch(cfg) }.w()?;
    let func = dev.get_or_load_custom_func("lmx_pick_final_rows", "lmx_fused", fused_ptx()?)?;
    let mut b = launch_args!(dev, func);
    b.arg(&part).arg(&nb).arg(&o);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: part holds `blocks` partials a row, o 2 u32 a row.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(o, dev))
}

/// The greedy pick of one row of f32 logits on the device (`crate::ops::pick_greedy`): u32 (2,),
/// the token and its log probability's bits.
pub(crate) fn pick_greedy(ls: &CudaStorage, ll: &Layout, masked: &[u32]) -> Result<CudaStorage> {
    let n = ll.shape().elem_count();
    if ls.dtype() != DType::F32 || !ll.is_contiguous() || masked.len() > 8 || n > i32::MAX as usize {
        candle_core::bail!("lmx pick_greedy: one contiguous f32 row and at most 8 masked ids (given {:?}, {:?}, {} ids)", ls.dtype(), ll.dims(), masked.len());
    }
    let dev = ls.device().clone();
    const CHUNK: usize = 2048; // PICK_CHUNK
    let blocks = n.div_ceil(CHUNK).max(1);
    let l = ls.as_cuda_slice::<f32>()?.slice(ll.start_offset()..);
    let part = out::<f32>(&dev, 4 * blocks)?;
    let o = out::<u32>(&dev, 2)?;
    let mut ids = [u32::MAX; 8];
    ids[..masked.len()].copy_from_slice(masked);
    let (ni, nb) = (n as i32, blocks as i32);
    let func = dev.get_or_load_custom_func("lmx_pick_partial", "lmx_fused", fused_ptx()?)?;
    let mut b = launch_args!(dev, func);
    b.arg(&l).arg(&ni);
    for id in &ids {
        b.arg(id);
    }
    b.arg(&part);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: l holds n floats, part 4 a block.
    unsafe { b.launch(cfg) }.w()?;
    let func = dev.get_or_load_custom_func("lmx_pick_final", "lmx_fused", fused_ptx()?)?;
    let mut b = launch_args!(dev, func);
    b.arg(&part).arg(&nb).arg(&o);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: part holds the partials of `blocks` blocks, o 2 u32.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(o, dev))
}

/// [`silu_mul`] of one row whose output is also coded for the next integer product into
/// `codes` (a u32 buffer of `act_stride` ints, (bits, group size)); see `quant::CodeTarget`.
pub(crate) struct SiluMulCoded {
    pub codes: candle_core::Tensor,
    pub spec: (usize, usize),
}

impl candle_core::CustomOp2 for SiluMulCoded {
    fn name(&self) -> &'static str {
        "lmx-silu-mul-coded"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("lmx-silu-mul-coded runs on CUDA only")
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let cols = gl.dims().last().copied().unwrap_or(0);
        let (bits, group) = self.spec;
        let (cstore, cl) = self.codes.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*cstore else { candle_core::bail!("lmx-silu-mul-coded: the codes' buffer is not on the GPU") };
        if gl.dims() != ul.dims()
            || gl.shape().elem_count() != cols
            || !gl.is_contiguous()
            || !ul.is_contiguous()
            || cl.shape().elem_count() != crate::quant::cuda::act_stride(cols, group)
            || cols % 8 != 0
        {
            candle_core::bail!(
                "lmx-silu-mul-coded: gate {:?} / up {:?} / codes {:?}: one contiguous row of a multiple of 8 values, codes of {} ints",
                gl.dims(),
                ul.dims(),
                cl.dims(),
                crate::quant::cuda::act_stride(cols, group)
            );
        }
        let dev = gs.device().clone();
        let func = dev.get_or_load_custom_func(&name("silu_mul_coded", gs.dtype())?, "lmx_fused", fused_ptx()?)?;
        let cfg = LaunchConfig { grid_dim: ((cols / 8).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let codes = cs.as_cuda_slice::<u32>()?.slice(cl.start_offset()..);
        let (rows, ci, gsi, bi) = (1i32, cols as i32, group as i32, bits as i32);
        let storage = typed!(gs.dtype(), T => {
            let g = gs.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
            let u = us.as_cuda_slice::<T>()?.slice(ul.start_offset()..);
            let o = out::<T>(&dev, cols)?;
            let mut b = launch_args!(dev, func);
            b.arg(&g).arg(&u).arg(&o).arg(&rows).arg(&ci).arg(&codes).arg(&gsi).arg(&bi);
            // SAFETY: g, u and o hold one row of cols values, codes act_stride(cols) ints.
            if !ablated("silu") {
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(o, dev)
        });
        Ok((storage, gl.shape().clone()))
    }
}

/// `silu(g) * u` elementwise, contiguous inputs of one dtype.
pub(crate) fn silu_mul(gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<CudaStorage> {
    let n = gl.shape().elem_count();
    let dev = gs.device().clone();
    let func = dev.get_or_load_custom_func(&name("silu_mul", gs.dtype())?, "lmx_fused", fused_ptx()?)?;
    // 16 bytes a thread where the values allow (a prompt's 14336-wide rows at ~1.3 TB/s a
    // value a thread).
    let per = 16 / gs.dtype().size_in_bytes();
    let vec = n % per == 0 && gl.start_offset() % per == 0 && ul.start_offset() % per == 0;
    let cfg = LaunchConfig { grid_dim: ((if vec { n / per } else { n }).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    typed!(gs.dtype(), T => {
        let g = gs.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let u = us.as_cuda_slice::<T>()?.slice(ul.start_offset()..);
        let o = out::<T>(&dev, n)?;
        let (nn, v) = (n as i64, vec as i32);
        let mut b = launch_args!(dev, func);
        b.arg(&g).arg(&u).arg(&o).arg(&nn).arg(&v);
        // SAFETY: g, u and o hold n values.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// Most activation rows [`matvec_bf16`] takes (a batch's decode step); more go to cuBLAS.
pub(crate) const MATVEC_MAX_ROWS: usize = 8;

/// Whether `x @ weight^T` can take [`matvec_bf16`]: bf16 operands on a GPU, 1 to
/// [`MATVEC_MAX_ROWS`] rows of a multiple of 8 values, both contiguous from 16-byte aligned
/// offsets (`LMX_CUDA_MATVEC=0`: cuBLAS for every product, as before).
pub(crate) fn matvec_fits(x: &candle_core::Tensor, weight: &candle_core::Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device().is_cuda() && *ON.get_or_init(|| !std::env::var("LMX_CUDA_MATVEC").is_ok_and(|v| v == "0")) && matvec_takes((x.layout(), x.dtype()), (weight.layout(), weight.dtype()))
}

/// [`matvec_bf16`]'s terms (x's contiguity aside: the caller makes x contiguous, which keeps or
/// zeroes its offset): bf16 operands, a contiguous (n, k) weight, 1 to [`MATVEC_MAX_ROWS`]
/// rows of k values, k a multiple of 8, both starting 16-byte aligned.
fn matvec_takes((xl, xd): (&Layout, DType), (wl, wd): (&Layout, DType)) -> bool {
    let k = wl.dims().last().copied().unwrap_or(0);
    let rows = xl.shape().elem_count() / k.max(1);
    xd == DType::BF16
        && wd == DType::BF16
        && wl.dims().len() == 2
        && xl.dims().last() == Some(&k)
        && k % 8 == 0
        && (1..=MATVEC_MAX_ROWS).contains(&rows)
        && wl.is_contiguous()
        && wl.start_offset() % 8 == 0
        && xl.start_offset() % 8 == 0
}

/// Weight rows a block of [`matvec_bf16`] takes: 2 (`LMX_CUDA_MATVEC_ROWS=1|2|4` fixes it, for
/// measurements).
fn matvec_rows_per_block() -> usize {
    static FIXED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FIXED.get_or_init(|| std::env::var("LMX_CUDA_MATVEC_ROWS").ok().and_then(|v| v.parse().ok()).filter(|r| matches!(r, 1 | 2 | 4)).unwrap_or(2))
}

/// `x @ w^T` for the few bf16 rows of `x` (.., k) and a bf16 weight (n, k), contiguous (see
/// [`matvec_fits`]): the weight is read once for all rows, 16 bytes a thread at a time.
pub(crate) fn matvec_bf16(xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
    if !xl.is_contiguous() || !matvec_takes((xl, xs.dtype()), (wl, ws.dtype())) {
        candle_core::bail!("lmx-matvec on CUDA: x {:?} {:?} and weight {:?} {:?}: 1 to {MATVEC_MAX_ROWS} contiguous bf16 rows of a multiple of 8 values", xl.dims(), xs.dtype(), wl.dims(), ws.dtype());
    }
    let (n, k) = wl.shape().dims2()?;
    let m = xl.shape().elem_count() / k;
    let dev = xs.device().clone();
    let r = matvec_rows_per_block();
    let func = dev.get_or_load_custom_func(&format!("lmx_matvec_bf16_m{m}_r{r}"), "lmx_fused", fused_ptx()?)?;
    // A thread per 16 bytes of a row at a time: a 4096-wide row is two rounds of 256 threads.
    let threads = (k / 8).next_multiple_of(32).clamp(32, 256) as u32;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(r) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let x = xs.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
    let w = ws.as_cuda_slice::<half::bf16>()?.slice(wl.start_offset()..);
    let o = out::<half::bf16>(&dev, m * n)?;
    let (ni, k8) = (n as i32, (k / 8) as i32);
    let mut b = launch_args!(dev, func);
    b.arg(&w).arg(&x).arg(&o).arg(&ni).arg(&k8);
    // SAFETY: w holds n rows of k values, x m rows of k, o m rows of n; all 16-byte aligned.
    unsafe { b.launch(cfg) }.w()?;
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((CudaStorage::wrap_cuda_slice(o, dev), candle_core::Shape::from(dims)))
}

/// Warps per block of [`decode_attention`]: 8 (`LMX_CUDA_ATTENTION_WARPS=4|16` for
/// measurements).
fn attention_warps() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::env::var("LMX_CUDA_ATTENTION_WARPS").ok().and_then(|v| v.parse().ok()).filter(|n| matches!(n, 4 | 8 | 16)).unwrap_or(8))
}

/// Whether [`decode_attention`]'s block writing a head's outputs keeps them in shared memory
/// for their codes (no read back) and merges the splits with every load issued at once (the
/// same bits; `LMX_CUDA_ATTENTION_KEEP=0`: reads back and merges split by split, as before).
fn attention_keep() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_ATTENTION_KEEP").is_ok_and(|v| v == "0"))
}

/// Positions beyond which [`decode_attention`] splits: 128 (`LMX_CUDA_ATTENTION_SPLIT=N` for
/// measurements). With one split up to 512, Llama-3-8B's 32 blocks a layer walked their keys
/// 64 at a time and a 4-bit token took ~0.1 ms longer every 100 positions; splitting past 128
/// made its decode 4-5% faster at 256 and 1,024 generated tokens on an H200
/// (docs/cuda/2026-12-03-attention-splits.txt).
fn attention_split_above() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::env::var("LMX_CUDA_ATTENTION_SPLIT").ok().and_then(|v| v.parse().ok()).unwrap_or(128))
}

/// How [`decode_attention`] splits a buffer of `span` positions for `heads` (sequence, head)
/// pairs: (the most splits a head uses, blocks a head). Short buffers take one split (one
/// launch: decode is launch-bound); longer ones up to enough splits of at least 64 keys to give
/// every multiprocessor two blocks. The kernel splits the keys in use into that many parts at
/// most (fewer for fewer keys), whatever the buffer's size; a head's blocks past them do nothing.
fn attention_splits(heads: usize, span: usize) -> (usize, usize) {
    const BLOCKS: usize = 2 * 132;
    if span <= attention_split_above() {
        return (span.max(1), 1);
    }
    let most = BLOCKS.div_ceil(heads).max(1);
    (most, most.min(span.div_ceil(64)))
}

/// Counters of decode attention's last-block merge, one per (sequence, head) of a launch
/// (zeroed, and zeroed again by each launch's last blocks).
const SPLIT_COUNTERS: usize = 1 << 16;

/// The address of `dev`'s split counters for `heads` (sequence, head) pairs, allocated once
/// and kept for the process (recorded steps hold the address; 256 KiB a device, never freed);
/// None where the last-block merge is off (`LMX_CUDA_ATTENTION_MERGE=0`: a second launch
/// merges, as before session 22), the launch has more heads than counters, the device tracks
/// several streams, or a step is being recorded before any counters exist.
fn split_counters(dev: &candle_core::CudaDevice, heads: usize) -> Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static COUNTERS: std::sync::Mutex<Vec<(candle_core::cuda_backend::DeviceId, CudaSlice<u32>)>> = std::sync::Mutex::new(Vec::new());
    // Counters serve launches on one stream, one after another: not a device whose threads
    // each have a stream of their own (event tracking on, `LMX_CUDA_STREAM=per-thread`).
    if heads > SPLIT_COUNTERS || dev.is_event_tracking() || !*ON.get_or_init(|| !std::env::var("LMX_CUDA_ATTENTION_MERGE").is_ok_and(|v| v == "0")) {
        return Ok(None);
    }
    let mut all = COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|(id, _)| *id == dev.id()) {
        // Not while a step is recorded: the allocation would belong to the graph.
        if crate::graph::capturing(&candle_core::Device::Cuda(dev.clone())) {
            return Ok(None);
        }
        all.push((dev.id(), dev.alloc_zeros::<u32>(SPLIT_COUNTERS)?));
    }
    let stream = dev.cuda_stream();
    Ok(all.iter().find(|(id, _)| *id == dev.id()).map(|(_, c)| c.device_ptr(&stream).0))
}

/// One query per (sequence, head) over the cache: `q` (b, n_heads, 1, d) contiguous, `k`/`v`
/// (b, n_kv, kv_len, d) with a contiguous last dimension; `d` at most 256. Split over the keys
/// for long caches (flash-decoding), merged by the last block of each head (or a second kernel,
/// see [`split_counters`]). With `upto` (a u32 position
/// on the device) only keys up to that position count: the cache's length is read by the
/// kernel, so a captured decode step replays at every length its buffer holds; with a
/// `window` too, keys that many or more positions behind it are skipped. With `codes` (one
/// sequence; a buffer and its (bits, group size)) the outputs are also written coded for the
/// next integer product, by whichever block writes a head's outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    vs: &CudaStorage,
    vl: &Layout,
    scale: f32,
    upto: Option<(&CudaStorage, &Layout)>,
    window: Option<usize>,
    codes: Option<(&CudaStorage, &Layout, (usize, usize))>,
) -> Result<CudaStorage> {
    let (&[b, n_heads, _, d], &[_, n_kv, kv_len, _]) = (ql.dims(), kl.dims()) else {
        candle_core::bail!("decode attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
    };
    if let Some((_, cl, (bits, gs))) = codes {
        let fits = b == 1 && matches!(bits, 4 | 8) && gs % 8 == 0 && gs <= 256 && d % gs == 0 && cl.shape().elem_count() >= crate::quant::cuda::act_stride(n_heads * d, gs);
        if !fits {
            candle_core::bail!("decode attention: outputs of {b} x {n_heads} heads of {d} cannot be coded in groups of {gs} ({bits} bits) into {} ints", cl.shape().elem_count());
        }
    }
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        candle_core::bail!("decode attention: keys/values need a contiguous last dimension");
    }
    if d > 256 || n_kv == 0 || n_heads % n_kv != 0 {
        candle_core::bail!("decode attention: head size {d} (at most 256) or {n_heads} heads on {n_kv} key/value heads");
    }
    let dev = qs.device().clone();
    // Each lane holds e = 1, 2, 4 or 8 consecutive values of a head.
    let e = d.div_ceil(32).next_power_of_two();
    // LMX_CUDA_DECODE_KEYS=1: a key at a time per warp (the kernel before 8 at a time).
    let one = if std::env::var("LMX_CUDA_DECODE_KEYS").is_ok_and(|v| v == "1") { "_u1" } else { "" };
    let func = dev.get_or_load_custom_func(&format!("{}_e{e}{one}", name("decode_attention", qs.dtype())?), "lmx_fused", fused_ptx()?)?;
    // Whether to split, and the blocks a head, follow the cache buffer's positions (a step at a
    // device position sees the whole buffer; a normal step a view of its written keys): the
    // kernel then splits the keys in use alike in both.
    let span = if kst[2] == d && kst[1] % d == 0 { kv_len.max(kst[1] / d) } else { kv_len };
    let (chunk, splits) = attention_splits(b * n_heads, span);
    // With clusters, a head's splits are one cluster of at most 8 blocks, merged through their
    // shared memory (no partials in global memory, no counter).
    // (The first block merges a column a thread: heads of at most a block's threads.)
    let cluster = splits > 1 && one.is_empty() && d <= 32 * attention_warps() && attention_cluster();
    let (chunk, splits) = if cluster { (chunk.min(8), splits.min(8)) } else { (chunk, splits) };
    let func = if cluster { dev.get_or_load_custom_func(&format!("{}_e{e}", name("decode_attention_cluster", qs.dtype())?), "lmx_cluster", cluster_ptx()?)? } else { func };
    // Partials only when split (a one-element placeholder otherwise).
    // SAFETY: every partial is written by its block before the combining kernel reads it.
    let part = unsafe { dev.alloc::<f32>(if splits > 1 && !cluster { b * n_heads * splits * (d + 2) } else { 1 }) }?;
    let smem = attention_warps() * d * 4 + if cluster { (d + 2) * 4 } else { 0 };
    let cfg = LaunchConfig { grid_dim: ((b * n_heads) as u32, splits as u32, 1), block_dim: ((32 * attention_warps()) as u32, 1, 1), shared_mem_bytes: smem as u32 };
    typed!(qs.dtype(), T => {
        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        let o = out::<T>(&dev, b * n_heads * d)?;
        let (nh, nk, kvl, dd, ch, sp) = (n_heads as i32, n_kv as i32, kv_len as i32, d as i32, chunk as i32, splits as i32);
        let (k0, k1, k2, v0, v1, v2) = (kst[0] as i64, kst[1] as i64, kst[2] as i64, vst[0] as i64, vst[1] as i64, vst[2] as i64);
        let upto = match upto {
            Some((ps, pl)) => Some(ps.as_cuda_slice::<u32>()?.slice(pl.start_offset()..)),
            None => None,
        };
        // A null pointer when the whole view counts.
        let null = 0u64;
        let mut bld = if cluster { Launch::cluster(&dev, &func, splits as u32) } else { launch_args!(dev, func) };
        bld.arg(&q).arg(&k).arg(&v).arg(&o).arg(&part).arg(&nh).arg(&nk).arg(&kvl).arg(&dd).arg(&scale).arg(&ch).arg(&sp);
        bld.arg(&k0).arg(&k1).arg(&k2).arg(&v0).arg(&v1).arg(&v2);
        match &upto {
            Some(p) => bld.arg(p),
            None => bld.arg(&null),
        };
        let win = window.unwrap_or(0) as i32;
        bld.arg(&win);
        let count = if splits > 1 && !cluster { split_counters(&dev, b * n_heads)? } else { None };
        let count_arg = count.unwrap_or(0);
        bld.arg(&count_arg);
        let codes_at = match codes {
            Some((cs, cl, _)) => {
                use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                view::<u32>(cs, cl)?.device_ptr(&dev.cuda_stream()).0
            }
            None => 0,
        };
        let (cols, gs, bits) = (nh * dd, codes.map_or(0, |c| c.2 .1 as i32), codes.map_or(0, |c| c.2 .0 as i32));
        bld.arg(&codes_at).arg(&gs).arg(&bits);
        let keep = attention_keep() as i32;
        bld.arg(&keep);
        if ablated("attention") {
            return Ok(CudaStorage::wrap_cuda_slice(o, dev));
        }
        // SAFETY: the views' strides keep every read inside k and v; q and o are sized for
        // b * n_heads heads, `part` for their splits, the counters (if any) for the heads.
        unsafe { bld.launch(cfg) }.w()?;
        if splits > 1 && count.is_none() && !cluster {
            let combine = dev.get_or_load_custom_func(&name("combine_splits", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
            let cfg = LaunchConfig { grid_dim: ((b * n_heads) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut bld = launch_args!(dev, combine);
            bld.arg(&part).arg(&o).arg(&sp).arg(&dd).arg(&codes_at).arg(&cols).arg(&gs).arg(&bits);
            // SAFETY: part holds every (head, split)'s partial; o b * n_heads * d values; the
            // codes (if any) one row of n_heads * d.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// Writes `src` (1, heads, 1, d), last dimension contiguous, into `buf` (1, heads, cap, d)
/// contiguous at the position `pos` (u32, on the device) holds. Copies 2- or 4-byte elements.
pub(crate) fn kv_write(buf: &mut CudaStorage, bl: &Layout, src: &CudaStorage, sl: &Layout, ps: &CudaStorage, pl: &Layout) -> Result<()> {
    let (&[1, heads, cap, d], &[1, sh, 1, sd]) = (bl.dims(), sl.dims()) else {
        candle_core::bail!("kv write: buffer {:?} / keys {:?}: one sequence, one new position", bl.dims(), sl.dims());
    };
    if sh != heads || sd != d || !bl.is_contiguous() || sl.stride()[3] != 1 || buf.dtype() != src.dtype() {
        candle_core::bail!("kv write: buffer {:?} {:?} / keys {:?} {:?} (strides {:?})", bl.dims(), buf.dtype(), sl.dims(), src.dtype(), sl.stride());
    }
    let dev = src.device().clone();
    let sh_elems = sl.stride()[1];
    let head_stride = sh_elems as i64;
    let cfg = LaunchConfig { grid_dim: (heads as u32, 1, 1), block_dim: (d.next_multiple_of(32).min(256) as u32, 1, 1), shared_mem_bytes: 0 };
    let (ci, di) = (cap as i32, d as i32);
    let pos = ps.as_cuda_slice::<u32>()?.slice(pl.start_offset()..);
    macro_rules! launch {
        ($w:ty, $t:ty, $name:expr) => {{
            let func = dev.get_or_load_custom_func($name, "lmx_fused", fused_ptx()?)?;
            let s = src.as_cuda_slice::<$t>()?.slice(sl.start_offset()..);
            let start = bl.start_offset();
            let b = buf.as_cuda_slice_mut::<$t>()?;
            let mut b = b.slice_mut(start..);
            // SAFETY: the kernel copies the elements as same-sized words.
            let (bw, sw) = unsafe { (b.transmute_mut::<$w>(heads * cap * d), s.transmute::<$w>((heads - 1) * sh_elems + d)) };
            let (Some(mut bw), Some(sw)) = (bw, sw) else { candle_core::bail!("kv write: buffer or keys smaller than their shape") };
            let mut bld = func.builder();
            bld.arg(&mut bw).arg(&sw).arg(&pos).arg(&ci).arg(&di).arg(&head_stride);
            // SAFETY: the buffer holds heads * cap * d elements, the kernel skips a position
            // past `cap`, and reads heads * d elements of `src` at its strides.
            unsafe { bld.launch(cfg) }.w()?;
        }};
    }
    match buf.dtype() {
        DType::BF16 => launch!(u16, half::bf16, "lmx_kv_write_2"),
        DType::F16 => launch!(u16, half::f16, "lmx_kv_write_2"),
        DType::F32 => launch!(u32, f32, "lmx_kv_write_4"),
        other => candle_core::bail!("kv write: dtype {other:?}"),
    }
    Ok(())
}

/// Rotary embedding and cache write in one launch (see `rope_kv` above): `q` (1, nq, l, d),
/// `k`/`v` (1, nkv, l, d) with contiguous heads, `cos`/`sin` (l, d / 2) contiguous, `kb`/`vb`
/// (1, nkv, cap, d) contiguous buffers; the positions are `pos`, a u32 on the device (a decode
/// step, l = 1), or else `offset` on. Returns the rotated queries (1, l, nq, d); keys (rotated)
/// and values land in the buffers. The buffers are written through the read access their
/// tensors give: they are the cache's own, which nothing reads or writes while a step's kernels
/// are queued.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kv_write(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    (cs, cl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    (kbs, kbl): (&CudaStorage, &Layout),
    (vbs, vbl): (&CudaStorage, &Layout),
    pos: Option<(&CudaStorage, &Layout)>,
    offset: usize,
) -> Result<CudaStorage> {
    let (&[1, nq, l, d], &[1, nkv, lk, dk], &[1, nv, lv, dv], &[1, nkb, cap, db]) = (ql.dims(), kl.dims(), vl.dims(), kbl.dims()) else {
        candle_core::bail!("rope + kv write: q {:?} / k {:?} / v {:?} / buffer {:?}: one sequence", ql.dims(), kl.dims(), vl.dims(), kbl.dims());
    };
    let contiguous_heads = [ql, kl, vl].iter().all(|l| l.stride()[3] == 1);
    if (dk, dv, db, nv, nkb, lk, lv) != (d, d, d, nkv, nkv, l, l)
        || vbl.dims() != kbl.dims()
        || !contiguous_heads
        || !cl.is_contiguous()
        || !sl.is_contiguous()
        || !kbl.is_contiguous()
        || !vbl.is_contiguous()
        || cl.shape().elem_count() != l * d / 2
        || d % 2 != 0
        || (pos.is_some() && l != 1)
        || (pos.is_none() && offset + l > cap)
    {
        candle_core::bail!("rope + kv write: q {:?} / k {:?} / v {:?} / cos {:?} / buffers {:?}, {:?} at {offset} do not fit", ql.dims(), kl.dims(), vl.dims(), cl.dims(), kbl.dims(), vbl.dims());
    }
    let dev = qs.device().clone();
    let func = dev.get_or_load_custom_func(&name("rope_kv", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
    let cfg = LaunchConfig { grid_dim: ((nq + 2 * nkv) as u32, l as u32, 1), block_dim: ((d / 2).next_multiple_of(32).min(256) as u32, 1, 1), shared_mem_bytes: 0 };
    let [q_stride, q_row, k_stride, k_row, v_stride, v_row] = [ql.stride()[1], ql.stride()[2], kl.stride()[1], kl.stride()[2], vl.stride()[1], vl.stride()[2]].map(|s| s as i64);
    let (nqi, nkvi, capi, di, off) = (nq as i32, nkv as i32, cap as i32, d as i32, offset.min(i32::MAX as usize) as i32);
    let pos = match pos {
        Some((ps, pl)) => Some(ps.as_cuda_slice::<u32>()?.slice(pl.start_offset()..)),
        None => None,
    };
    typed!(qs.dtype(), T => {
        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        let cos = cs.as_cuda_slice::<T>()?.slice(cl.start_offset()..);
        let sin = ss.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        let kb = kbs.as_cuda_slice::<T>()?.slice(kbl.start_offset()..);
        let vb = vbs.as_cuda_slice::<T>()?.slice(vbl.start_offset()..);
        let o = out::<T>(&dev, l * nq * d)?;
        let null = 0u64;
        let mut b = launch_args!(dev, func);
        b.arg(&q).arg(&q_stride).arg(&q_row).arg(&k).arg(&k_stride).arg(&k_row).arg(&v).arg(&v_stride).arg(&v_row).arg(&cos).arg(&sin);
        b.arg(&o).arg(&kb).arg(&vb);
        match &pos {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        b.arg(&off).arg(&nqi).arg(&nkvi).arg(&capi).arg(&di);
        // SAFETY: q/k/v hold their heads and positions at their strides (d values each),
        // cos/sin l * d / 2, the buffers nkv * cap * d (a device position past `cap` is skipped;
        // host positions were checked to fit), o l * nq * d.
        if !ablated("rope") {
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// A `CustomOp3`'s `name` and a `cpu_fwd` that refuses: the op runs on CUDA only.
macro_rules! cuda_only_op3 {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(concat!($name, " runs on CUDA only"))
        }
    };
}

/// [`rope_kv_write`] as an op of (q, k, v): the rotated queries (1, l, nq, d); the angles, the
/// cache's buffers and the position (device `pos`, else `offset`) ride along.
pub(crate) struct RopeKvWrite {
    pub cos: candle_core::Tensor,
    pub sin: candle_core::Tensor,
    pub kbuf: candle_core::Tensor,
    pub vbuf: candle_core::Tensor,
    pub pos: Option<candle_core::Tensor>,
    pub offset: usize,
}

impl candle_core::CustomOp3 for RopeKvWrite {
    cuda_only_op3!("lmx-rope-kv-write");

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let mut tensors = vec![&self.cos, &self.sin, &self.kbuf, &self.vbuf];
        tensors.extend(&self.pos);
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut parts = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(c) = &**storage else {
                candle_core::bail!("lmx-rope-kv-write: the angles, the cache's buffers and the position must be on the GPU (one is on {:?})", storage.device().location())
            };
            parts.push((c, *layout));
        }
        let o = rope_kv_write((qs, ql), (ks, kl), (vs, vl), parts[0], parts[1], parts[2], parts[3], parts.get(4).copied(), self.offset)?;
        // Checked 4-D by rope_kv_write.
        let (nq, l, d) = (ql.dims()[1], ql.dims()[2], ql.dims()[3]);
        Ok((o, candle_core::Shape::from((1, l, nq, d))))
    }
}

/// `s`'s values from `l`'s start.
fn view<'a, T: candle_core::cuda_backend::CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Rows one launch of the batched decode kernels takes (`KV_ROWS` in their source).
const KV_ROWS: usize = 32;

/// The kernels' `KvRows`: each row's key and value buffers, the position its new key goes to,
/// and the buffers' positions.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvRows {
    k: [u64; KV_ROWS],
    v: [u64; KV_ROWS],
    offset: [i32; KV_ROWS],
    cap: [i32; KV_ROWS],
}

// SAFETY: a plain C struct of integers, laid out as the kernels' `KvRows`.
unsafe impl DeviceRepr for KvRows {}

/// A decode step of a batch of sequences, each over its own cache, as one op of (q, k, v):
/// `q` (b, nq, 1, d) and `k`/`v` (b, nkv, 1, d) before rotation, with contiguous heads; row r's
/// query and key rotate by row r of `cos`/`sin` (b, 1, d / 2; or one row (1, d / 2) for rows at one position), its key and value land in
/// `kbufs[r]`/`vbufs[r]` ((1, nkv, cap_r, d), contiguous) at position `offsets[r]`, and its query
/// attends to the `offsets[r] + 1` keys there. Returns (b, nq, 1, d). Two launches for up to
/// 32 rows (rotation and writes, then attention; a third merges the splits where the last
/// block does not) where the row-by-row step launched five a row, each an op of its own from
/// the host: a batch's decode was bound by the host. Each row's values are those of the same
/// step alone (the same kernels' arithmetic, the keys split as the row's own buffer splits
/// them).
pub(crate) struct DecodeRows {
    /// The rows' rotary angles, (b, 1, d / 2) or one row shared.
    pub cos: candle_core::Tensor,
    pub sin: candle_core::Tensor,
    /// Each row's key and value buffers, (1, nkv, cap_r, d).
    pub kbufs: Vec<candle_core::Tensor>,
    pub vbufs: Vec<candle_core::Tensor>,
    /// Row r's keys held before this step: where its new key and value go.
    pub offsets: Vec<usize>,
    /// Multiplies the scores (1 / sqrt(d) unless the model says otherwise).
    pub scale: f32,
}

impl candle_core::CustomOp3 for DecodeRows {
    cuda_only_op3!("lmx-decode-rows");

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let (&[b, nq, 1, d], &[bk, nkv, 1, dk]) = (ql.dims(), kl.dims()) else {
            candle_core::bail!("decode rows: q {:?} / k {:?}: one new position a row", ql.dims(), kl.dims());
        };
        let half = d / 2;
        if (bk, dk) != (b, d)
            || vl.dims() != kl.dims()
            || [ql, kl, vl].iter().any(|l| l.stride()[3] != 1)
            || d % 2 != 0
            || d > 256
            || nkv == 0
            || nq % nkv != 0
            || self.kbufs.len() != b
            || self.vbufs.len() != b
            || self.offsets.len() != b
            || [&self.cos, &self.sin].iter().any(|t| !t.is_contiguous() || (t.elem_count() != b * half && t.elem_count() != half))
        {
            candle_core::bail!("decode rows: q {:?} / k {:?} / v {:?} / cos {:?} for {} rows of buffers do not fit", ql.dims(), kl.dims(), vl.dims(), self.cos.dims(), self.kbufs.len());
        }
        let tensors: Vec<&candle_core::Tensor> = [&self.cos, &self.sin].into_iter().chain(&self.kbufs).chain(&self.vbufs).collect();
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut parts = Vec::with_capacity(guards.len());
        for (t, (storage, layout)) in tensors.iter().zip(&guards) {
            let candle_core::Storage::Cuda(c) = &**storage else {
                candle_core::bail!("decode rows: the angles and the cache's buffers must be on the GPU (one is on {:?})", storage.device().location())
            };
            if c.dtype() != qs.dtype() {
                candle_core::bail!("decode rows: a buffer or the angles in {:?}, the queries in {:?}", c.dtype(), qs.dtype());
            }
            parts.push((c, *layout, t.dims()));
        }
        let (angles, bufs) = parts.split_at(2);
        let (kbufs, vbufs) = bufs.split_at(b);
        let mut caps = Vec::with_capacity(b);
        for (r, ((_, kbl, kd), (_, vbl, vd))) in kbufs.iter().zip(vbufs).enumerate() {
            let (&[1, h, cap, bd], true, true) = (*kd, kbl.is_contiguous(), vbl.is_contiguous()) else {
                candle_core::bail!("decode rows: row {r}'s key buffer {kd:?} must be one contiguous sequence");
            };
            if (h, bd) != (nkv, d) || vd != kd || self.offsets[r] >= cap || cap > i32::MAX as usize {
                candle_core::bail!("decode rows: row {r}'s buffers {kd:?} / {vd:?} with {} keys held do not take a position of {nkv} heads of {d}", self.offsets[r]);
            }
            caps.push(cap);
        }
        let dev = qs.device().clone();
        let rope = dev.get_or_load_custom_func(&name("rope_kv_rows", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
        let e = d.div_ceil(32).next_power_of_two();
        let attend = dev.get_or_load_custom_func(&format!("{}_e{e}", name("decode_attention_rows", qs.dtype())?), "lmx_fused", fused_ptx()?)?;
        let combine = dev.get_or_load_custom_func(&name("combine_splits", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
        // Split as a row alone is split (its buffer's positions, its own heads): the same
        // parts of its keys, so the same sums (the kernel keeps short buffers whole).
        let (chunk, splits) = attention_splits(nq, caps.iter().copied().max().unwrap_or(0));
        let [q_head, q_row, k_head, k_row, v_head, v_row] = [ql.stride()[1], ql.stride()[0], kl.stride()[1], kl.stride()[0], vl.stride()[1], vl.stride()[0]].map(|s| s as i64);
        let (nqi, nkvi, di, ch, sp, scale) = (nq as i32, nkv as i32, d as i32, chunk as i32, splits as i32, self.scale);
        // A row whose buffer is short enough to take one split alone takes one here too.
        let split_above = attention_split_above().min(i32::MAX as usize) as i32;
        // Rows at one position share one row of angles.
        let cos_row = if self.cos.elem_count() == half && b > 1 { 0i64 } else { half as i64 };
        typed!(qs.dtype(), T => {
            let qo = out::<T>(&dev, b * nq * d)?;
            let o = out::<T>(&dev, b * nq * d)?;
            let rows_max = KV_ROWS.min(b);
            // SAFETY: every partial is written by its block before the merge reads it.
            let part = unsafe { dev.alloc::<f32>(if splits > 1 { rows_max * nq * splits * (d + 2) } else { 1 }) }?;
            let (q, k, v) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
            let (cos, sin) = (view::<T>(angles[0].0, angles[0].1)?, view::<T>(angles[1].0, angles[1].1)?);
            let stream = dev.cuda_stream();
            for r0 in (0..b).step_by(KV_ROWS) {
                let n = KV_ROWS.min(b - r0);
                let mut rows = KvRows { k: [0; KV_ROWS], v: [0; KV_ROWS], offset: [0; KV_ROWS], cap: [0; KV_ROWS] };
                for i in 0..n {
                    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                    let r = r0 + i;
                    rows.k[i] = view::<T>(kbufs[r].0, kbufs[r].1)?.device_ptr(&stream).0;
                    rows.v[i] = view::<T>(vbufs[r].0, vbufs[r].1)?.device_ptr(&stream).0;
                    rows.offset[i] = self.offsets[r] as i32;
                    rows.cap[i] = caps[r] as i32;
                }
                let (q, k, v) = (q.slice(r0 * q_row as usize..), k.slice(r0 * k_row as usize..), v.slice(r0 * v_row as usize..));
                let (cos, sin) = (cos.slice(r0 * cos_row as usize..), sin.slice(r0 * cos_row as usize..));
                let (qo, o) = (qo.slice(r0 * nq * d..), o.slice(r0 * nq * d..));
                let cfg = LaunchConfig { grid_dim: ((nq + 2 * nkv) as u32, n as u32, 1), block_dim: (half.next_multiple_of(32).min(256) as u32, 1, 1), shared_mem_bytes: 0 };
                let mut bld = rope.builder();
                bld.arg(&q).arg(&q_head).arg(&q_row).arg(&k).arg(&k_head).arg(&k_row).arg(&v).arg(&v_head).arg(&v_row).arg(&cos).arg(&sin).arg(&cos_row);
                bld.arg(&qo).arg(&rows).arg(&nqi).arg(&nkvi).arg(&di);
                // SAFETY: q/k/v hold n rows at their strides, cos/sin n * d / 2 values, qo n * nq
                // * d; each row's buffers hold nkv * cap * d values and offset < cap (checked).
                unsafe { bld.launch(cfg) }.w()?;
                let cfg = LaunchConfig { grid_dim: ((n * nq) as u32, splits as u32, 1), block_dim: ((32 * attention_warps()) as u32, 1, 1), shared_mem_bytes: (attention_warps() * d * 4) as u32 };
                let count = if splits > 1 { split_counters(&dev, n * nq)? } else { None };
                let count_arg = count.unwrap_or(0);
                let mut bld = attend.builder();
                bld.arg(&qo).arg(&rows).arg(&o).arg(&part).arg(&nqi).arg(&nkvi).arg(&di).arg(&scale).arg(&ch).arg(&sp).arg(&split_above).arg(&count_arg);
                // SAFETY: qo and o hold n * nq heads of d, `part` their splits' partials, the
                // counters (if any) the heads; each row's buffers its offset + 1 keys.
                unsafe { bld.launch(cfg) }.w()?;
                if splits > 1 && count.is_none() {
                    let cfg = LaunchConfig { grid_dim: ((n * nq) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                    let mut bld = combine.builder();
                    let (null, zero) = (0u64, 0i32);
                    bld.arg(&part).arg(&o).arg(&sp).arg(&di).arg(&null).arg(&zero).arg(&zero).arg(&zero);
                    // SAFETY: part holds every (head, split)'s partial; o n * nq * d values.
                    unsafe { bld.launch(cfg) }.w()?;
                }
            }
            Ok((CudaStorage::wrap_cuda_slice(o, dev), candle_core::Shape::from((b, nq, 1, d))))
        })
    }
}

/// Causal softmax of attention scores (GPU): rows of `cols` keys, query `r % q_len` of each row
/// block at position `offset + r % q_len`, seeing the keys up to it (and, with `window`, not
/// those `window` or more behind it; keys past `offset + q_len` are padding and never seen);
/// scores scaled and optionally soft-capped first. Output in the scores' dtype (f32 or
/// bf16), 0 for unseen keys.
#[derive(Debug, Clone, Copy)]
pub struct CausalSoftmax {
    pub q_len: usize,
    pub offset: usize,
    pub window: Option<usize>,
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "lmx-causal-softmax"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("lmx-causal-softmax runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let cols = xl.dims().last().copied().unwrap_or(0);
        if !xl.is_contiguous() || cols < self.offset + self.q_len || self.q_len == 0 {
            candle_core::bail!("causal softmax: scores {:?} (contiguous) for {} queries", xl.dims(), self.q_len);
        }
        let rows = xl.shape().elem_count() / cols;
        let dev = xs.device().clone();
        let func = dev.get_or_load_custom_func(&name("causal_softmax", xs.dtype())?, "lmx_fused", fused_ptx()?)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (c, q, off, win) = (cols as i32, self.q_len as i32, self.offset as i32, self.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32);
        let (scale, cap) = (self.scale, self.softcap.unwrap_or(0.0));
        typed!(xs.dtype(), T => {
            let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
            let o = out::<T>(&dev, rows * cols)?;
            let mut b = launch_args!(dev, func);
            b.arg(&x).arg(&o).arg(&c).arg(&q).arg(&off).arg(&win).arg(&scale).arg(&cap);
            // SAFETY: x and o hold rows * cols values.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(o, dev), xl.shape().clone()))
        })
    }
}

// Flash attention for causal bf16 prompts (FlashAttention-2's forward): block (query tile of 64,
// head, sequence), 4 warps of 16 queries each; key/value tiles of 64 positions staged in shared
// memory (cp.async, rows padded by 8 values so that ldmatrix reads hit 32 distinct banks);
// scores and the probabilities' product on the tensor cores (mma m16n8k16, f32 accumulators);
// an online softmax in f32 (base 2) per query row. Never materializes the scores, so one
// kernel replaces two products, the softmax and their copies. Needs sm_80 (compiled apart).
const FLASH_SRC: &str = r#"
#define NEG (-__int_as_float(0x7f800000))
// Two floats rounded to bf16 (to nearest even), `lo` in the low half: one instruction.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// 2^x in one instruction (relative error ~2^-22; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(unsigned* r, const unsigned short* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldsm4t(unsigned* r, const unsigned short* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
// 16 bytes global -> shared, zeros when `n` is 0.
__device__ __forceinline__ void cp16(unsigned short* dst, const unsigned short* src, int n) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(s), "l"(src), "r"(n));
}

// q (b, n_heads, q_len, D) and k, v (b, n_kv, kv_len, D) with element strides (sequence, head,
// row), rows contiguous; out (b, q_len, n_heads, D) contiguous. Query i sits at position
// offset + i and sees keys [lo, pos] (lo = pos + 1 - window with a window). Scores scaled, soft-
// capped (softcap > 0) and taken to base 2 before the softmax.
template <int D>
__device__ void flash_attention(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out,
                                int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap,
                                long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2,
                                long long vs0, long long vs1, long long vs2) {
    const int BR = 64, BC = 64, LD = D + 8;
    const float LOG2E = 1.4426950408889634f;
    __shared__ __align__(16) unsigned short kt[BC * LD];
    __shared__ __align__(16) unsigned short vt[BC * LD];
    // The longest (last) query tiles first.
    int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, kvh = h / (n_heads / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int q0 = qb * BR + warp * 16;
    const unsigned short* qp = q + b * qs0 + h * qs1;
    const unsigned short* kp = k + b * ks0 + kvh * ks1;
    const unsigned short* vp = v + b * vs0 + kvh * vs1;
    unsigned qa[D / 16][4];
#pragma unroll
    for (int s = 0; s < D / 16; s++) {
        int r0 = q0 + g, r1 = r0 + 8, c = s * 16 + t * 2;
        qa[s][0] = r0 < q_len ? *(const unsigned*)(qp + r0 * qs2 + c) : 0u;
        qa[s][1] = r1 < q_len ? *(const unsigned*)(qp + r1 * qs2 + c) : 0u;
        qa[s][2] = r0 < q_len ? *(const unsigned*)(qp + r0 * qs2 + c + 8) : 0u;
        qa[s][3] = r1 < q_len ? *(const unsigned*)(qp + r1 * qs2 + c + 8) : 0u;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {NEG, NEG}, l[2] = {0.f, 0.f};
    int first = qb * BR, last = min(q_len, first + BR) - 1;
    int hi = min(kv_len, offset + last + 1);
    int lo = window > 0 ? max(0, offset + first + 1 - window) : 0;
    float sl2 = scale * LOG2E;
    // One tile's keys (or values) into shared memory, zeros past the keys' end.
    // (A constant thread count, so that the loop unrolls and its addresses fold.)
    auto stage = [&](unsigned short* dst, const unsigned short* src, long long stride, int k0) {
#pragma unroll
        for (int c = threadIdx.x; c < BC * D / 8; c += 128) {
            int r = c / (D / 8), col = (c % (D / 8)) * 8;
            bool in = k0 + r < kv_len;
            cp16(&dst[r * LD + col], src + (in ? k0 + r : 0) * stride + col, in ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // Keys and values load one step ahead of their use: the next tile's keys while this
    // tile's softmax and values' product run, its values while its scores do.
    int k0 = (lo / BC) * BC;
    stage(kt, kp, ks2, k0);
    stage(vt, vp, vs2, k0);
    for (; k0 < hi; k0 += BC) {
        bool more = k0 + BC < hi;
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int ds = 0; ds < D / 16; ds++) {
#pragma unroll
            for (int n = 0; n < BC / 8; n += 2) {
                unsigned f[4];
                ldsm4(f, &kt[(n * 8 + (lane % 8) + (lane / 16) * 8) * LD + ds * 16 + ((lane / 8) % 2) * 8]);
                mma16816(s[n], qa[ds], f[0], f[1]);
                mma16816(s[n + 1], qa[ds], f[2], f[3]);
            }
        }
        __syncthreads();
        if (more) stage(kt, kp, ks2, k0 + BC);
        else asm volatile("cp.async.commit_group;\n" ::);
        // Scores become base-2 logits as x * mul (soft-capped ones are already); masks only
        // where a tile crosses the diagonal, the window's edge or the keys' end.
        float mul = sl2;
        if (softcap > 0.f) {
            mul = 1.f;
#pragma unroll
            for (int n = 0; n < BC / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = softcap * tanhf(s[n][e] * scale / softcap) * LOG2E;
        }
        if (k0 + BC > offset + q0 + 1 || k0 + BC > kv_len || (window > 0 && k0 < offset + q0 + 16 - window)) {
#pragma unroll
            for (int n = 0; n < BC / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = k0 + n * 8 + t * 2 + (e & 1), pos = offset + q0 + g + 8 * (e >> 1);
                    if (key > pos || key >= kv_len || (window > 0 && key <= pos - window)) s[n][e] = NEG;
                }
        }
        float al[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float mx = NEG;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float mn = fmaxf(m[i], mx * mul);
            // A row that has seen nothing yet keeps its zeros.
            float base = mn == NEG ? 0.f : mn;
            float alpha = ex2(m[i] - base);
            m[i] = mn;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = ex2(fmaf(s[n][2 * i + e], mul, -base));
                    s[n][2 * i + e] = p;
                    sum += p;
                }
            }
            l[i] = l[i] * alpha + sum;
            al[i] = alpha;
        }
        // The running sums are rescaled only where a row of the warp saw its maximum rise (a
        // factor of exactly 1 changes nothing): after the first tiles, most tiles of a trained
        // model, whose first key sets each row's maximum early. Fewer instructions a score.
        if (__any_sync(0xffffffffu, al[0] != 1.f || al[1] != 1.f)) {
#pragma unroll
            for (int n = 0; n < D / 8; n++) { acc[n][0] *= al[0]; acc[n][1] *= al[0]; acc[n][2] *= al[1]; acc[n][3] *= al[1]; }
        }
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
            unsigned pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                              pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                unsigned f[4];
                int mi = lane / 8;
                ldsm4t(f, &vt[(kk * 16 + (lane % 8) + (mi % 2) * 8) * LD + n * 8 + (mi / 2) * 8]);
                mma16816(acc[n], pa, f[0], f[1]);
                mma16816(acc[n + 1], pa, f[2], f[3]);
            }
        }
        __syncthreads();
        if (more) stage(vt, vp, vs2, k0 + BC);
        else asm volatile("cp.async.commit_group;\n" ::);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float tot = l[i];
        tot += __shfl_xor_sync(0xffffffffu, tot, 1);
        tot += __shfl_xor_sync(0xffffffffu, tot, 2);
        float inv = tot > 0.f ? 1.f / tot : 0.f;
        int r = q0 + g + 8 * i;
        if (r >= q_len) continue;
        unsigned short* o = out + (((long long)b * q_len + r) * n_heads + h) * D;
#pragma unroll
        for (int n = 0; n < D / 8; n++) *(unsigned*)(o + n * 8 + t * 2) = pack2(acc[n][2 * i] * inv, acc[n][2 * i + 1] * inv);
    }
}

#define FLASH(D) \
extern "C" __global__ void __launch_bounds__(128) lmx_flash_attention_bf16_##D(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out, int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap, long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2) { flash_attention<D>(q, k, v, out, n_heads, n_kv, q_len, kv_len, offset, window, scale, softcap, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2); } \
extern "C" __global__ void __launch_bounds__(128, 3) lmx_flash_attention_bf16_##D##_b3(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out, int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap, long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2) { flash_attention<D>(q, k, v, out, n_heads, n_kv, q_len, kv_len, offset, window, scale, softcap, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2); }
FLASH(16)
FLASH(32)
FLASH(64)
FLASH(96)
FLASH(128)
"#;

/// PTX of [`FLASH_SRC`] (tensor-core instructions: compiled for compute capability 8.0).
fn flash_ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(FLASH_SRC, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling lmx's CUDA flash attention with NVRTC failed: {e}")))
}

/// Head sizes [`FlashAttention`] is compiled for.
const FLASH_HEAD_DIMS: [usize; 5] = [16, 32, 64, 96, 128];

/// True when [`FlashAttention`] takes these bf16 queries (b, heads, q_len, d), keys and values
/// (b, kv_heads, kv_len, d) as laid out: a GPU of compute capability 8.0 or newer (tensor-core
/// bf16), a compiled head size, rows of contiguous values, keys and values 16-byte aligned.
pub fn flash_fits(q: &candle_core::Tensor, k: &candle_core::Tensor, v: &candle_core::Tensor) -> bool {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let shapes = qd.len() == 4 && kd.len() == 4 && kd == vd && qd[0] == kd[0] && qd[3] == kd[3] && kd[1] > 0 && qd[1] % kd[1] == 0 && FLASH_HEAD_DIMS.contains(&qd[3]);
    let dtypes = [q, k, v].iter().all(|t| t.dtype() == DType::BF16);
    let aligned = |t: &candle_core::Tensor, elems: usize| {
        let l = t.layout();
        l.stride()[3] == 1 && l.start_offset() % elems == 0 && l.stride()[..3].iter().all(|s| s % elems == 0)
    };
    shapes && dtypes && aligned(q, 2) && aligned(k, 8) && aligned(v, 8) && tensor_cores(q.device())
}

/// Whether the device has bf16 tensor cores (compute capability 8.0 or newer).
fn tensor_cores(dev: &candle_core::Device) -> bool {
    let candle_core::Device::Cuda(dev) = dev else { return false };
    dev.cuda_stream().context().compute_capability().is_ok_and(|(major, _)| major >= 8)
}

/// Causal attention of bf16 queries over keys and values in one kernel ([`FLASH_SRC`]):
/// q (b, heads, q_len, d), k and v (b, kv_heads, kv_len, d) -> (b, q_len, heads, d), query i
/// at position `offset + i`; see [`flash_fits`] for what it takes.
pub struct FlashAttention {
    pub offset: usize,
    pub window: Option<usize>,
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl candle_core::CustomOp3 for FlashAttention {
    cuda_only_op3!("lmx-flash-attention");

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let (&[b, n_heads, q_len, d], &[_, n_kv, kv_len, _]) = (ql.dims(), kl.dims()) else {
            candle_core::bail!("flash attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
        };
        if !FLASH_HEAD_DIMS.contains(&d) || kl.dims() != vl.dims() || n_kv == 0 || n_heads % n_kv != 0 || kv_len < self.offset + q_len || q_len == 0 {
            candle_core::bail!("flash attention: q {:?}, k {:?}, v {:?} at offset {}", ql.dims(), kl.dims(), vl.dims(), self.offset);
        }
        let dev = qs.device().clone();
        // Heads of 128 take the kernel compiled for 3 blocks a multiprocessor (at most 168
        // registers): 9% faster on an H100 at the 8B shape's 4096-token prompt, with the lazy
        // rescaling (docs/BENCHMARKS.md, session 39); smaller heads gained nothing.
        // LMX_CUDA_FLASH_BLOCKS=1 or 3 chooses for every size.
        let b3 = match std::env::var("LMX_CUDA_FLASH_BLOCKS").as_deref() {
            Ok("3") => true,
            Ok("1") => false,
            _ => d == 128,
        };
        let variant = if b3 { "_b3" } else { "" };
        let func = dev.get_or_load_custom_func(&format!("lmx_flash_attention_bf16_{d}{variant}"), "lmx_flash", flash_ptx()?)?;
        let cfg = LaunchConfig { grid_dim: (q_len.div_ceil(64) as u32, n_heads as u32, b as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let q = qs.as_cuda_slice::<half::bf16>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<half::bf16>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<half::bf16>()?.slice(vl.start_offset()..);
        let o = out::<half::bf16>(&dev, b * q_len * n_heads * d)?;
        let ints = [n_heads, n_kv, q_len, kv_len, self.offset, self.window.unwrap_or(0)].map(|x| x.min(i32::MAX as usize) as i32);
        let (scale, cap) = (self.scale, self.softcap.unwrap_or(0.0));
        let strides = [ql.stride(), kl.stride(), vl.stride()].map(|s| [s[0] as i64, s[1] as i64, s[2] as i64]);
        let mut bld = func.builder();
        bld.arg(&q).arg(&k).arg(&v).arg(&o);
        for x in &ints {
            bld.arg(x);
        }
        bld.arg(&scale).arg(&cap);
        for s in strides.iter().flatten() {
            bld.arg(s);
        }
        // SAFETY: the strides keep every read inside q, k and v (rows beyond q_len or kv_len
        // are not read); o holds b * q_len * heads * d values, each written once.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(o, dev), candle_core::Shape::from((b, q_len, n_heads, d))))
    }
}
