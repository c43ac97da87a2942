//! CUDA versions of the fused inference kernels of `cpu_fused` (RMS norm with Hugging Face's
//! roundings, SiLU-gated product, single-query attention over the cache), compiled at first
//! use by NVRTC. Each replaces a chain of candle kernels (8 launches for a bf16 norm, ~8 for
//! decode attention): at batch 1 a decode step is bound by launches, not by bandwidth.
//! f32 and bf16; other dtypes take the compositions in `ops`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result};

const SRC: &str = r#"
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

// One block per row: statistics in f32, x * r rounded to T, times the weight, rounded again.
template <typename T>
__device__ void rms_norm(const T* x, const T* w, T* out, int d, float eps) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = ld(x, row * d + i); ss += v * v; }
    float r = rsqrtf(block_sum(ss, red) / d + eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) st(out, row * d + i, rnd(ld(x, row * d + i) * r, out) * ld(w, i));
}

// x + h rounded to T into `sum`, then the RMS norm of the sum into `out` (rms_norm's
// arithmetic on the rounded sum): one block per row. With `codes`, the normalised row is then
// coded for the next integer product (`code8`, groups of `gs`, `bits`-bit weights' order), so
// that no coding launch sits between the norm and the product.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* h, const T* w, T* sum, T* out, int d, float eps, int* codes, int gs, int bits) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float ss = 0.f;
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

template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gv = ld(g, i);
    st(out, i, gv / (1.f + __expf(-gv)) * ld(u, i));
}

// Split-K decode attention (flash-decoding): block (sequence * head, split) takes keys
// [split * chunk, min(kv_len, split * chunk + chunk)); each warp one key at a time, each lane
// `e = ceil(d / 32)` consecutive dimensions (coalesced loads), an online softmax per warp,
// merged per block. One split writes the output; several write (max, sum, acc[d]) partials per
// split that `combine_splits` merges. k/v strides (sequence, head, position) in elements.
#define MAXE 8
template <typename T>
__device__ void decode_attention(const T* q, const T* k, const T* v, T* out, float* part,
                                 int n_heads, int n_kv, int kv_len, int d, float scale, int chunk, int splits,
                                 long long ks0, long long ks1, long long ks2,
                                 long long vs0, long long vs1, long long vs2, const unsigned int* upto, int window) {
    __shared__ float wm[32], wl[32];
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
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32, e = (d + 31) / 32;
    float qr[MAXE], acc[MAXE];
    for (int j = 0; j < MAXE; j++) {
        int i = lane * e + j;
        qr[j] = (j < e && i < d) ? ld(q, (size_t)bh * d + i) * scale : 0.f;
        acc[j] = 0.f;
    }
    const T* kb = k + bi * ks0 + kv * ks1;
    const T* vb = v + bi * vs0 + kv * vs1;
    float m = NEG, l = 0.f;
    int t1 = min(kv_len, split * chunk + chunk);
    for (int t = split * chunk + warp; t < t1; t += nw) {
        if (t < first) continue;
        float s = 0.f;
        for (int j = 0; j < e; j++) { int i = lane * e + j; if (i < d) s += qr[j] * ld(kb, t * ks2 + i); }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        float mn = fmaxf(m, s), c = __expf(m - mn), p = __expf(s - mn);
        l = l * c + p;
        for (int j = 0; j < e; j++) { int i = lane * e + j; acc[j] = acc[j] * c + (i < d ? p * ld(vb, t * vs2 + i) : 0.f); }
        m = mn;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
    for (int j = 0; j < e; j++) { int i = lane * e + j; if (i < d) wacc[warp * d + i] = acc[j]; }
    __syncthreads();
    float M = NEG, L = 0.f;
    for (int w = 0; w < nw; w++) M = fmaxf(M, wm[w]);
    for (int w = 0; w < nw; w++) L += wm[w] == NEG ? 0.f : wl[w] * __expf(wm[w] - M);
    float* pp = part + ((size_t)bh * splits + split) * (d + 2);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < nw; w++) a += wm[w] == NEG ? 0.f : wacc[w * d + i] * __expf(wm[w] - M);
        if (splits == 1) st(out, (size_t)bh * d + i, a / L); else pp[2 + i] = a;
    }
    if (splits > 1 && threadIdx.x == 0) { pp[0] = M; pp[1] = L; }
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
extern "C" __global__ void lmx_kv_write_2(unsigned short* buf, const unsigned short* src, const unsigned int* pos, int cap, int d, long long sh) { kv_write(buf, src, pos, cap, d, sh); }
extern "C" __global__ void lmx_kv_write_4(unsigned int* buf, const unsigned int* src, const unsigned int* pos, int cap, int d, long long sh) { kv_write(buf, src, pos, cap, d, sh); }

// A decode step's rotary embedding and cache write in one launch: block h < nq rotates query
// head h into `qo` (nq, d); the next nkv blocks rotate key heads into `kb` and the last nkv copy
// value heads into `vb` ((heads, cap, d) buffers) at position pos[0]. Rotation in the "rotate
// half" layout with candle's roundings (nvcc contracts `a * b - c * d` into one fused
// multiply-add in bf16 too: rounding both products first differed in the last bit). Heads of q, k and v are `qs`, `ks`, `vs` elements apart.
template <typename T>
__device__ void rope_kv(const T* q, long long qs, const T* k, long long ks, const T* v, long long vs, const T* cos, const T* sin,
                        T* qo, T* kb, T* vb, const unsigned int* pos, int nq, int nkv, int cap, int d) {
    int h = blockIdx.x, half = d / 2;
    unsigned int p = pos[0];
    if (h >= nq + nkv) {
        if (p >= (unsigned int)cap) return;
        int hv = h - nq - nkv;
        for (int i = threadIdx.x; i < d; i += blockDim.x) vb[((size_t)hv * cap + p) * d + i] = v[hv * vs + i];
        return;
    }
    const T* x;
    T* o;
    if (h < nq) { x = q + h * qs; o = qo + (size_t)h * d; }
    else {
        if (p >= (unsigned int)cap) return;
        x = k + (h - nq) * ks; o = kb + ((size_t)(h - nq) * cap + p) * d;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = ld(x, i), x2 = ld(x, i + half), c = ld(cos, i), s = ld(sin, i);
        // candle's kernel as nvcc compiles it, in f32 and in bf16 alike: the first product
        // contracted into the sum (a fused multiply-add), the second rounded to T first.
        st(o, i, __fmaf_rn(x1, c, -rnd(__fmul_rn(x2, s), o)));
        st(o, i + half, __fmaf_rn(x1, s, rnd(__fmul_rn(x2, c), o)));
    }
}

// Merges the splits of one (sequence, head) block: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
template <typename T>
__device__ void combine_splits(const float* part, T* out, int splits, int d) {
    const float* p = part + (size_t)blockIdx.x * splits * (d + 2);
    float M = -__int_as_float(0x7f800000), L = 0.f;
    for (int s = 0; s < splits; s++) M = fmaxf(M, p[s * (d + 2)]);
    for (int s = 0; s < splits; s++) L += p[s * (d + 2) + 1] * __expf(p[s * (d + 2)] - M);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) a += p[s * (d + 2) + 2 + i] * __expf(p[s * (d + 2)] - M);
        st(out, (size_t)blockIdx.x * d + i, a / L);
    }
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

#define INSTANTIATE(T, name) \
extern "C" __global__ void lmx_causal_softmax_##name(const T* s, T* out, int cols, int q_len, int offset, int window, float scale, float softcap) { causal_softmax(s, out, cols, q_len, offset, window, scale, softcap); } \
extern "C" __global__ void lmx_rms_norm_##name(const T* x, const T* w, T* out, int d, float eps) { rms_norm(x, w, out, d, eps); } \
extern "C" __global__ void lmx_add_rms_norm_##name(const T* x, const T* h, const T* w, T* sum, T* out, int d, float eps, int* codes, int gs, int bits) { add_rms_norm(x, h, w, sum, out, d, eps, codes, gs, bits); } \
extern "C" __global__ void lmx_silu_mul_coded_##name(const T* g, const T* u, T* out, int rows, int cols, int* codes, int gs, int bits) { silu_mul_coded(g, u, out, rows, cols, codes, gs, bits); } \
extern "C" __global__ void lmx_silu_mul_##name(const T* g, const T* u, T* out, long long n) { silu_mul(g, u, out, n); } \
extern "C" __global__ void lmx_decode_attention_##name(const T* q, const T* k, const T* v, T* out, float* part, int n_heads, int n_kv, int kv_len, int d, float scale, int chunk, int splits, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2, const unsigned int* upto, int window) { decode_attention(q, k, v, out, part, n_heads, n_kv, kv_len, d, scale, chunk, splits, ks0, ks1, ks2, vs0, vs1, vs2, upto, window); } \
extern "C" __global__ void lmx_combine_splits_##name(const float* part, T* out, int splits, int d) { combine_splits(part, out, splits, d); } \
extern "C" __global__ void lmx_rope_kv_##name(const T* q, long long qs, const T* k, long long ks, const T* v, long long vs, const T* cos, const T* sin, T* qo, T* kb, T* vb, const unsigned int* pos, int nq, int nkv, int cap, int d) { rope_kv(q, qs, k, ks, v, vs, cos, sin, qo, kb, vb, pos, nq, nkv, cap, d); }
INSTANTIATE(float, f32)
INSTANTIATE(unsigned short, bf16)
"#;

/// `src` compiled to PTX by NVRTC once per process (`cell` caches it, or the error).
pub(crate) fn ptx(cell: &'static std::sync::OnceLock<std::result::Result<String, String>>, src: &str) -> Result<&'static str> {
    cell.get_or_init(|| candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(src).map(|p| p.to_src()).map_err(|e| format!("{e:?}")))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling lmx's CUDA kernels with NVRTC failed (is libnvrtc on the library path?): {e}")))
}

fn fused_ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ptx(&PTX, SOURCE.get_or_init(|| format!("{}{SRC}", crate::quant::cuda::CODE_SRC)))
}

/// The name of kernel `base` for `dtype`: `lmx_{base}_{f32|bf16}`.
fn name(base: &str, dtype: DType) -> Result<String> {
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

fn out<T: DeviceRepr>(dev: &candle_core::CudaDevice, n: usize) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<T>(n) }
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
        let (di, e) = (d as i32, eps);
        let mut b = func.builder();
        b.arg(&x).arg(&w).arg(&o).arg(&di).arg(&e);
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
    let func = dev.get_or_load_custom_func(&name("add_rms_norm", xs.dtype())?, "lmx_fused", fused_ptx()?)?;
    let threads = d.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    typed!(xs.dtype(), T => {
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let h = hs.as_cuda_slice::<T>()?.slice(hl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let o = out::<T>(&dev, 2 * rows * d)?;
        let (sum, normed) = o.split_at(rows * d);
        let (di, e) = (d as i32, eps);
        let none = 0u64;
        let mut b = func.builder();
        b.arg(&x).arg(&h).arg(&w).arg(&sum).arg(&normed).arg(&di).arg(&e);
        match &codes {
            Some((c, bits, gs)) => b.arg(c).arg(gs).arg(bits),
            None => b.arg(&none).arg(&0i32).arg(&0i32),
        };
        // SAFETY: x and h hold rows * d values, w d, each half of o rows * d; the codes'
        // buffer (one row) act_stride(d) ints, or the pointer is null and not read.
        unsafe { b.launch(cfg) }.w()?;
        drop((sum, normed));
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
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
            let mut b = func.builder();
            b.arg(&g).arg(&u).arg(&o).arg(&rows).arg(&ci).arg(&codes).arg(&gsi).arg(&bi);
            // SAFETY: g, u and o hold one row of cols values, codes act_stride(cols) ints.
            unsafe { b.launch(cfg) }.w()?;
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
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    typed!(gs.dtype(), T => {
        let g = gs.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let u = us.as_cuda_slice::<T>()?.slice(ul.start_offset()..);
        let o = out::<T>(&dev, n)?;
        let nn = n as i64;
        let mut b = func.builder();
        b.arg(&g).arg(&u).arg(&o).arg(&nn);
        // SAFETY: g, u and o hold n values.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// Warps per block of [`decode_attention`].
const ATTENTION_WARPS: usize = 8;

/// How [`decode_attention`] splits `kv_len` keys for `heads` (sequence, head) pairs: (keys per
/// split, splits). Short caches take one split (one launch: decode is launch-bound); longer
/// ones enough splits of at least 64 keys to give every multiprocessor two blocks.
fn attention_splits(heads: usize, kv_len: usize) -> (usize, usize) {
    const BLOCKS: usize = 2 * 132;
    if kv_len <= 512 {
        return (kv_len.max(1), 1);
    }
    let splits = BLOCKS.div_ceil(heads).clamp(1, kv_len.div_ceil(64));
    let chunk = kv_len.div_ceil(splits);
    (chunk, kv_len.div_ceil(chunk))
}

/// One query per (sequence, head) over the cache: `q` (b, n_heads, 1, d) contiguous, `k`/`v`
/// (b, n_kv, kv_len, d) with a contiguous last dimension; `d` at most 256. Split over the keys
/// for long caches (flash-decoding), merged by a second kernel. With `upto` (a u32 position
/// on the device) only keys up to that position count: the cache's length is read by the
/// kernel, so a captured decode step replays at every length its buffer holds; with a
/// `window` too, keys that many or more positions behind it are skipped.
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
) -> Result<CudaStorage> {
    let (&[b, n_heads, _, d], &[_, n_kv, kv_len, _]) = (ql.dims(), kl.dims()) else {
        candle_core::bail!("decode attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        candle_core::bail!("decode attention: keys/values need a contiguous last dimension");
    }
    if d > 256 || n_kv == 0 || n_heads % n_kv != 0 {
        candle_core::bail!("decode attention: head size {d} (at most 256) or {n_heads} heads on {n_kv} key/value heads");
    }
    let dev = qs.device().clone();
    let func = dev.get_or_load_custom_func(&name("decode_attention", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
    let (chunk, splits) = attention_splits(b * n_heads, kv_len);
    // Partials only when split (a one-element placeholder otherwise).
    // SAFETY: every partial is written by its block before the combining kernel reads it.
    let part = unsafe { dev.alloc::<f32>(if splits > 1 { b * n_heads * splits * (d + 2) } else { 1 }) }?;
    let cfg = LaunchConfig { grid_dim: ((b * n_heads) as u32, splits as u32, 1), block_dim: ((32 * ATTENTION_WARPS) as u32, 1, 1), shared_mem_bytes: (ATTENTION_WARPS * d * 4) as u32 };
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
        let mut bld = func.builder();
        bld.arg(&q).arg(&k).arg(&v).arg(&o).arg(&part).arg(&nh).arg(&nk).arg(&kvl).arg(&dd).arg(&scale).arg(&ch).arg(&sp);
        bld.arg(&k0).arg(&k1).arg(&k2).arg(&v0).arg(&v1).arg(&v2);
        match &upto {
            Some(p) => bld.arg(p),
            None => bld.arg(&null),
        };
        let win = window.unwrap_or(0) as i32;
        bld.arg(&win);
        // SAFETY: the views' strides keep every read inside k and v; q and o are sized for
        // b * n_heads heads, `part` for their splits.
        unsafe { bld.launch(cfg) }.w()?;
        if splits > 1 {
            let combine = dev.get_or_load_custom_func(&name("combine_splits", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
            let cfg = LaunchConfig { grid_dim: ((b * n_heads) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut bld = combine.builder();
            bld.arg(&part).arg(&o).arg(&sp).arg(&dd);
            // SAFETY: part holds every (head, split)'s partial; o b * n_heads * d values.
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

/// A decode step's rotary embedding and cache write in one launch (see `rope_kv` above): `q`
/// (1, nq, 1, d), `k`/`v` (1, nkv, 1, d) with contiguous heads, `cos`/`sin` (1, d / 2)
/// contiguous, `kb`/`vb` (1, nkv, cap, d) contiguous buffers, `pos` a u32 position on the
/// device. Returns the rotated queries (1, nq, 1, d); keys (rotated) and values land in the
/// buffers. The buffers are written through the read access their tensors give: they are the
/// cache's own, which nothing reads or writes while a step's kernels are queued.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kv_write(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    (cs, cl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    (kbs, kbl): (&CudaStorage, &Layout),
    (vbs, vbl): (&CudaStorage, &Layout),
    (ps, pl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let (&[1, nq, 1, d], &[1, nkv, 1, dk], &[1, nv, 1, dv], &[1, nkb, cap, db]) = (ql.dims(), kl.dims(), vl.dims(), kbl.dims()) else {
        candle_core::bail!("rope + kv write: q {:?} / k {:?} / v {:?} / buffer {:?}: one sequence, one new position", ql.dims(), kl.dims(), vl.dims(), kbl.dims());
    };
    let contiguous_heads = [ql, kl, vl].iter().all(|l| l.stride()[3] == 1);
    if (dk, dv, db, nv, nkb) != (d, d, d, nkv, nkv)
        || vbl.dims() != kbl.dims()
        || !contiguous_heads
        || !cl.is_contiguous()
        || !sl.is_contiguous()
        || !kbl.is_contiguous()
        || !vbl.is_contiguous()
        || cl.shape().elem_count() != d / 2
        || d % 2 != 0
    {
        candle_core::bail!("rope + kv write: q {:?} / k {:?} / v {:?} / cos {:?} / buffers {:?}, {:?} do not fit", ql.dims(), kl.dims(), vl.dims(), cl.dims(), kbl.dims(), vbl.dims());
    }
    let dev = qs.device().clone();
    let func = dev.get_or_load_custom_func(&name("rope_kv", qs.dtype())?, "lmx_fused", fused_ptx()?)?;
    let cfg = LaunchConfig { grid_dim: ((nq + 2 * nkv) as u32, 1, 1), block_dim: ((d / 2).next_multiple_of(32).min(256) as u32, 1, 1), shared_mem_bytes: 0 };
    let (q_stride, k_stride, v_stride) = (ql.stride()[1] as i64, kl.stride()[1] as i64, vl.stride()[1] as i64);
    let (nqi, nkvi, capi, di) = (nq as i32, nkv as i32, cap as i32, d as i32);
    let pos = ps.as_cuda_slice::<u32>()?.slice(pl.start_offset()..);
    typed!(qs.dtype(), T => {
        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        let cos = cs.as_cuda_slice::<T>()?.slice(cl.start_offset()..);
        let sin = ss.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        let kb = kbs.as_cuda_slice::<T>()?.slice(kbl.start_offset()..);
        let vb = vbs.as_cuda_slice::<T>()?.slice(vbl.start_offset()..);
        let o = out::<T>(&dev, nq * d)?;
        let mut b = func.builder();
        b.arg(&q).arg(&q_stride).arg(&k).arg(&k_stride).arg(&v).arg(&v_stride).arg(&cos).arg(&sin);
        b.arg(&o).arg(&kb).arg(&vb).arg(&pos).arg(&nqi).arg(&nkvi).arg(&capi).arg(&di);
        // SAFETY: q/k/v hold their heads at their strides (d values each), cos/sin d / 2, the
        // buffers nkv * cap * d (a position past `cap` is skipped), o nq * d.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// [`rope_kv_write`] as an op of (q, k, v): the rotated queries; the angles, the cache's
/// buffers and the position ride along.
pub(crate) struct RopeKvWrite {
    pub cos: candle_core::Tensor,
    pub sin: candle_core::Tensor,
    pub kbuf: candle_core::Tensor,
    pub vbuf: candle_core::Tensor,
    pub pos: candle_core::Tensor,
}

impl candle_core::CustomOp3 for RopeKvWrite {
    fn name(&self) -> &'static str {
        "lmx-rope-kv-write"
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
        candle_core::bail!("lmx-rope-kv-write runs on CUDA only")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let guards = [&self.cos, &self.sin, &self.kbuf, &self.vbuf, &self.pos].map(|t| t.storage_and_layout());
        let mut parts = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            let candle_core::Storage::Cuda(c) = &**storage else {
                candle_core::bail!("lmx-rope-kv-write: the angles, the cache's buffers and the position must be on the GPU (one is on {:?})", storage.device().location())
            };
            parts.push((c, *layout));
        }
        let o = rope_kv_write((qs, ql), (ks, kl), (vs, vl), parts[0], parts[1], parts[2], parts[3], parts[4])?;
        Ok((o, ql.shape().clone()))
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
            let mut b = func.builder();
            b.arg(&x).arg(&o).arg(&c).arg(&q).arg(&off).arg(&win).arg(&scale).arg(&cap);
            // SAFETY: x and o hold rows * cols values.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(o, dev), xl.shape().clone()))
        })
    }
}
