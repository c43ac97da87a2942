//! CUDA kernels of training: the cross-entropy loss and its gradient, the backwards of the
//! fused SiLU product and RMS norm (`taped`), and Adam's update. Each is one pass over its
//! tensors where candle's compositions took 5-15 launches and as many f32 temporaries (the
//! loss over a 128k vocabulary made four 1 GB f32 copies of a batch's logits). Compiled at
//! first use by NVRTC with `cuda_fused`'s loads, stores and reductions.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result};

use crate::cuda_fused::{name, out, typed};

const SRC: &str = r#"
#define NEG_INF (-__int_as_float(0x7f800000))

// A running max m and sum s of exp(v - m) taking in one more value (-inf adds nothing).
__device__ __forceinline__ void online(float v, float* m, float* s) {
    if (v > *m) { *s = *s * expf(*m - v) + 1.f; *m = v; } else if (v != NEG_INF) { *s += expf(v - *m); }
}

// Max and log-sum-exp of a row of n values (4 a thread when `vec`), one block per row: each
// thread keeps a running max and its sum of exponentials, merged over the block.
template <typename T>
__device__ void row_lse(const T* x, int n, int vec, float* red, float* mx, float* lse) {
    float m = NEG_INF, s = 0.f;
    if (vec) {
        for (int i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
            float v[4];
            ld4(x, i, v);
            for (int k = 0; k < 4; k++) {
                online(v[k], &m, &s);
            }
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            online(ld(x, i), &m, &s);
        }
    }
    float top = block_max(m, red);
    float total = block_sum(m == NEG_INF ? 0.f : s * expf(m - top), red);
    *mx = top;
    *lse = logf(total);
}

// loss[row] = (max + lse - x[target]) * weight, 0 where the weight is 0.
template <typename T>
__device__ void cross_entropy(const T* logits, const unsigned int* targets, const float* weights, float* loss, int vocab, int vec) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float w = weights[row];
    if (w == 0.f) { if (threadIdx.x == 0) loss[row] = 0.f; return; }
    const T* x = logits + row * vocab;
    float mx, lse;
    row_lse(x, vocab, vec, red, &mx, &lse);
    if (threadIdx.x == 0) loss[row] = (mx + lse - ld(x, targets[row])) * w;
}

// grad[row] = scale * (softmax(row) - onehot(target)), rounded to T once; zeros where the
// row's scale (its weight times the loss's gradient) is 0.
template <typename T>
__device__ void cross_entropy_bwd(const T* logits, const unsigned int* targets, const float* scales, T* grad, int vocab, int vec) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    float scale = scales[row];
    const T* x = logits + row * vocab;
    T* g = grad + row * vocab;
    if (scale == 0.f) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) st(g, i, 0.f);
        return;
    }
    float mx, lse;
    row_lse(x, vocab, vec, red, &mx, &lse);
    float shift = mx + lse;
    int t = (int)targets[row];
    if (vec) {
        for (int i = 4 * threadIdx.x; i < vocab; i += 4 * blockDim.x) {
            float v[4];
            ld4(x, i, v);
            for (int k = 0; k < 4; k++) v[k] = expf(v[k] - shift) * scale - (i + k == t ? scale : 0.f);
            st4(g, i, v);
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) st(g, i, expf(ld(x, i) - shift) * scale - (i == t ? scale : 0.f));
    }
}

// The backward of silu(g) * u, in f32 as `taped::silu_mul_bwd` (its order of products):
// with s = sigmoid(g), du = dy g s and dg = dy u s (g (1 - s) + 1).
template <typename T>
__device__ void silu_mul_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long long n, int vec) {
    long long stride = (long long)gridDim.x * blockDim.x;
    long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        for (long long i = 4 * first; i < n; i += 4 * stride) {
            float gv[4], uv[4], dv[4], a[4], b[4];
            ld4(g, i, gv); ld4(u, i, uv); ld4(dy, i, dv);
            for (int k = 0; k < 4; k++) {
                float s = 1.f / (1.f + expf(-gv[k]));
                a[k] = dv[k] * uv[k] * s * (gv[k] * (1.f - s) + 1.f);
                b[k] = dv[k] * gv[k] * s;
            }
            st4(dg, i, a); st4(du, i, b);
        }
        return;
    }
    for (long long i = first; i < n; i += stride) {
        float gv = ld(g, i), uv = ld(u, i), dv = ld(dy, i);
        float s = 1.f / (1.f + expf(-gv));
        st(dg, i, dv * uv * s * (gv * (1.f - s) + 1.f));
        st(du, i, dv * gv * s);
    }
}

// RMS norm's input gradient, one block per row, as `taped::rms_norm_bwd`: r = 1 / rms(x),
// gw = round(dy w), dx = r (gw - x r mean(gw x r)). One pass for sum(x^2) and sum(gw x),
// one for dx.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, int d, float eps) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    float ss = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float xv = ld(xr, i), gw = rnd(ld(gr, i) * ld(w, i), dx);
        ss += xv * xv;
        sgx += gw * xv;
    }
    ss = block_sum(ss, red);
    sgx = block_sum(sgx, red);
    float r = 1.f / sqrtf(ss / d + eps);
    float m = sgx * r / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float xv = ld(xr, i), gw = rnd(ld(gr, i) * ld(w, i), dx);
        st(dx + row * d, i, (gw - xv * r * m) * r);
    }
}

// Attention's backward over rows of raw scores S = q k^T (T; rows grouped (.., rep, q_len),
// so row r's mask row is r % q_len) of `cols` keys, as `taped::attention_bwd`'s composition:
// x = S scale, capped to c tanh(x / c) when cap > 0, plus the f32 additive mask; P = softmax(x).
template <typename T>
__device__ __forceinline__ float attn_x(const T* s, const float* mask, int j, float scale, float cap) {
    float x = ld(s, j) * scale;
    if (cap > 0.f) x = tanhf(x / cap) * cap;
    return x + mask[j];
}

// The row's max and sum of exp(x - max).
template <typename T>
__device__ void attn_stats(const T* s, const float* mask, int cols, float scale, float cap, float* red, float* mx, float* total) {
    float m = NEG_INF, t = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) online(attn_x(s, mask, j, scale, cap), &m, &t);
    float top = block_max(m, red);
    *total = block_sum(m == NEG_INF ? 0.f : t * expf(m - top), red);
    *mx = top;
}

// P rounded to T (for dV = P^T dO).
template <typename T>
__device__ void attn_probs(const T* s, const float* mask, T* p, int cols, int q_len, float scale, float cap) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    const T* sr = s + row * cols;
    const float* mr = mask + (size_t)(row % q_len) * cols;
    float mx, total;
    attn_stats(sr, mr, cols, scale, cap, red, &mx, &total);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) st(p + row * cols, j, expf(attn_x(sr, mr, j, scale, cap) - mx) / total);
}

// dS = P (dP - rowsum(dP P)) (1 - tanh^2 with a cap) scale, rounded to T, with P again in f32.
template <typename T>
__device__ void attn_dscores(const T* s, const T* dp, const float* mask, T* ds, int cols, int q_len, float scale, float cap) {
    __shared__ float red[32];
    size_t row = blockIdx.x;
    const T* sr = s + row * cols;
    const T* dr = dp + row * cols;
    const float* mr = mask + (size_t)(row % q_len) * cols;
    float mx, total;
    attn_stats(sr, mr, cols, scale, cap, red, &mx, &total);
    float acc = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) acc += ld(dr, j) * (expf(attn_x(sr, mr, j, scale, cap) - mx) / total);
    float rows = block_sum(acc, red);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float p = expf(attn_x(sr, mr, j, scale, cap) - mx) / total;
        float d = p * (ld(dr, j) - rows);
        if (cap > 0.f) { float t = tanhf(ld(sr, j) * scale / cap); d = d * (1.f - t * t); }
        st(ds + row * cols, j, d * scale);
    }
}

// LoRA's products with its small f32 factors (`fused_train::Skinny`), reading the wide
// operand X (T) as it is. M(i, j) = m[i * m0 + j * m1] is the (k, r) factor.
// Y (n, r) = scale X (n, k) M: a block per 8 rows of X and 8 columns of Y (blockIdx.y); each
// thread takes every 256th column of X, keeping the 8 x 8 sums, which the block then adds up.
template <typename T>
__device__ void skinny_in(const T* x, const float* m, float* y, int n, int k, int r, int m0, int m1, float scale) {
    __shared__ float red[8][64];
    int j0 = blockIdx.y * 8;
    long long row0 = (long long)blockIdx.x * 8;
    float acc[8][8];
#pragma unroll
    for (int a = 0; a < 8; a++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[a][j] = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        float mi[8];
#pragma unroll
        for (int j = 0; j < 8; j++) mi[j] = j0 + j < r ? m[(long long)i * m0 + (long long)(j0 + j) * m1] : 0.f;
#pragma unroll
        for (int a = 0; a < 8; a++) {
            float v = row0 + a < n ? ld(x, (row0 + a) * k + i) : 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[a][j] += v * mi[j];
        }
    }
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int a = 0; a < 8; a++)
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float v = acc[a][j];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) red[w][a * 8 + j] = v;
        }
    __syncthreads();
    if (threadIdx.x < 64) {
        int a = threadIdx.x / 8, j = threadIdx.x % 8;
        float v = 0.f;
        for (int q = 0; q < (int)(blockDim.x / 32); q++) v += red[q][threadIdx.x];
        if (row0 + a < n && j0 + j < r) y[(row0 + a) * r + j0 + j] = v * scale;
    }
}

// X^T Y over rows [blockIdx.y * chunk, + chunk) of X (n, k) and Y (n, r) f32: a thread per
// column of X, 8 columns of Y per blockIdx.z; partial sums part[blockIdx.y][i][j].
template <typename T>
__device__ void skinny_outer(const T* x, const float* y, float* part, int n, int k, int r, int chunk) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, j0 = blockIdx.z * 8;
    if (i >= k) return;
    long long r0 = (long long)blockIdx.y * chunk, r1 = min((long long)n, r0 + chunk);
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.f;
    for (long long row = r0; row < r1; row++) {
        float v = ld(x, row * k + i);
        const float* yr = y + row * r + j0;
#pragma unroll
        for (int j = 0; j < 8; j++) if (j0 + j < r) acc[j] += v * yr[j];
    }
    float* p = part + ((long long)blockIdx.y * k + i) * r + j0;
#pragma unroll
    for (int j = 0; j < 8; j++) if (j0 + j < r) p[j] = acc[j];
}

// O (n, k) = (Y (n, r) M^T) scale, rounded to T: a block per 256 columns and 16 rows
// (blockIdx.y), those rows of Y in shared memory (16 r floats), a thread per column.
// With `has_add`, o = add + that, rounded again.
template <typename T>
__device__ void skinny_out(const float* y, const float* m, const T* add, T* o, int n, int k, int r, int m0, int m1, float scale, int has_add) {
    extern __shared__ float ys[];
    long long row0 = (long long)blockIdx.y * 16;
    int rows = (int)min(16LL, n - row0);
    for (int e = threadIdx.x; e < rows * r; e += blockDim.x) ys[e] = y[row0 * r + e];
    __syncthreads();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= k) return;
    float acc[16];
#pragma unroll
    for (int a = 0; a < 16; a++) acc[a] = 0.f;
    for (int j0 = 0; j0 < r; j0 += 8) {
        float mi[8];
#pragma unroll
        for (int j = 0; j < 8; j++) mi[j] = j0 + j < r ? m[(long long)i * m0 + (long long)(j0 + j) * m1] : 0.f;
#pragma unroll
        for (int a = 0; a < 16; a++)
#pragma unroll
            for (int j = 0; j < 8; j++) if (j0 + j < r) acc[a] += ys[a * r + j0 + j] * mi[j];
    }
#pragma unroll
    for (int a = 0; a < 16; a++) {
        if (a >= rows) break;
        size_t e = (size_t)(row0 + a) * k + i;
        st(o, e, has_add ? ld(add, e) + rnd(acc[a] * scale, o) : acc[a] * scale);
    }
}

// z = scale times the sum over `chunks` partials of k * r values, as (k, r) or, with t, (r, k).
extern "C" __global__ void lmx_skinny_sum(const float* part, float* z, int chunks, int k, int r, int t, float scale) {
    long long kr = (long long)k * r;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < kr; e += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int c = 0; c < chunks; c++) s += part[c * kr + e];
        long long i = e / r, j = e - i * r;
        z[t ? j * k + i : e] = s * scale;
    }
}

#define TRAIN(T, name) \
extern "C" __global__ void lmx_cross_entropy_##name(const T* l, const unsigned int* t, const float* w, float* loss, int vocab, int vec) { cross_entropy(l, t, w, loss, vocab, vec); } \
extern "C" __global__ void lmx_cross_entropy_bwd_##name(const T* l, const unsigned int* t, const float* s, T* g, int vocab, int vec) { cross_entropy_bwd(l, t, s, g, vocab, vec); } \
extern "C" __global__ void lmx_silu_mul_bwd_##name(const T* g, const T* u, const T* dy, T* dg, T* du, long long n, int vec) { silu_mul_bwd(g, u, dy, dg, du, n, vec); } \
extern "C" __global__ void lmx_rms_norm_bwd_##name(const T* x, const T* w, const T* dy, T* dx, int d, float eps) { rms_norm_bwd(x, w, dy, dx, d, eps); } \
extern "C" __global__ void lmx_attn_probs_##name(const T* s, const float* m, T* p, int cols, int q_len, float scale, float cap) { attn_probs(s, m, p, cols, q_len, scale, cap); } \
extern "C" __global__ void lmx_attn_dscores_##name(const T* s, const T* dp, const float* m, T* ds, int cols, int q_len, float scale, float cap) { attn_dscores(s, dp, m, ds, cols, q_len, scale, cap); } \
extern "C" __global__ void lmx_skinny_in_##name(const T* x, const float* m, float* y, int n, int k, int r, int m0, int m1, float scale) { skinny_in(x, m, y, n, k, r, m0, m1, scale); } \
extern "C" __global__ void lmx_skinny_outer_##name(const T* x, const float* y, float* part, int n, int k, int r, int chunk) { skinny_outer(x, y, part, n, k, r, chunk); } \
extern "C" __global__ void lmx_skinny_out_##name(const float* y, const float* m, const T* add, T* o, int n, int k, int r, int m0, int m1, float scale, int has_add) { skinny_out(y, m, add, o, n, k, r, m0, m1, scale, has_add); }
TRAIN(float, f32)
TRAIN(unsigned short, bf16)

// Adam with MLX's semantics on f32 values, in `ops::adam_step`'s order of operations:
// p' = p keep - step m' / (sqrt(v') c2 + eps), m' = m b1 + g (1 - b1), v' = v b2 + g^2 (1 - b2).
// `mv` holds m then v; `out` p', then m', then v'.
extern "C" __global__ void lmx_adam_f32(const float* p, const float* g, const float* mv, float* out, long long n, float keep, float b1, float nb1, float b2, float nb2, float step, float c2, float eps) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float m = mv[i] * b1 + gi * nb1;
        float v = mv[n + i] * b2 + gi * gi * nb2;
        out[i] = p[i] * keep - (m * step) / (sqrtf(v) * c2 + eps);
        out[n + i] = m;
        out[2 * n + i] = v;
    }
}
"#;

fn train_ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    crate::cuda_fused::ptx(&PTX, SOURCE.get_or_init(|| format!("{}{SRC}", crate::cuda_fused::COMMON)))
}

/// A block of up to 1024 threads per row of `cols` values taken 4 at a time.
fn row_block(rows: usize, cols: usize) -> LaunchConfig {
    let threads = cols.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Blocks of 256 threads striding over `n` items (at most 16 blocks per SM's worth).
fn strided(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn contiguous(what: &str, layouts: &[&Layout]) -> Result<()> {
    if layouts.iter().any(|l| !l.is_contiguous()) {
        candle_core::bail!("{what}: the CUDA kernel needs contiguous inputs");
    }
    Ok(())
}

/// Cross-entropy of each row of `logits` (rows, vocab; f32 or bf16) against u32 `targets`,
/// times f32 `weights` (forward: (rows,) f32 losses), or with `weights` the per-row scales of
/// the backward, the gradient (rows, vocab) in the logits' dtype.
pub(crate) fn cross_entropy(ls: &CudaStorage, ll: &Layout, ts: &CudaStorage, tl: &Layout, ws: &CudaStorage, wl: &Layout, backward: bool) -> Result<CudaStorage> {
    contiguous("cross entropy", &[ll, tl, wl])?;
    let (rows, vocab) = ll.shape().dims2()?;
    let dev = ls.device().clone();
    let f = dev.get_or_load_custom_func(&name(if backward { "cross_entropy_bwd" } else { "cross_entropy" }, ls.dtype())?, "lmx_train", train_ptx()?)?;
    let t = ts.as_cuda_slice::<u32>()?.slice(tl.start_offset()..);
    let w = ws.as_cuda_slice::<f32>()?.slice(wl.start_offset()..);
    let (vi, vec) = (vocab as i32, (vocab % 4 == 0 && ll.start_offset() % 4 == 0) as i32);
    typed!(ls.dtype(), T => {
        let l = ls.as_cuda_slice::<T>()?.slice(ll.start_offset()..);
        let mut b = f.builder();
        b.arg(&l).arg(&t).arg(&w);
        if backward {
            let o = out::<T>(&dev, rows * vocab)?;
            b.arg(&o).arg(&vi).arg(&vec);
            // SAFETY: logits and o hold rows * vocab values, targets and scales rows.
            unsafe { b.launch(row_block(rows, vocab)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(o, dev))
        } else {
            let o = out::<f32>(&dev, rows)?;
            b.arg(&o).arg(&vi).arg(&vec);
            // SAFETY: logits hold rows * vocab values, targets, weights and o rows.
            unsafe { b.launch(row_block(rows, vocab)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(o, dev))
        }
    })
}

/// The gradients of `silu(g) * u` for the output's gradient `dy` (one dtype, contiguous):
/// one buffer of 2n, dg then du.
pub(crate) fn silu_mul_bwd(gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout, ds: &CudaStorage, dl: &Layout) -> Result<CudaStorage> {
    contiguous("silu_mul backward", &[gl, ul, dl])?;
    let n = gl.shape().elem_count();
    let dev = gs.device().clone();
    let f = dev.get_or_load_custom_func(&name("silu_mul_bwd", gs.dtype())?, "lmx_train", train_ptx()?)?;
    let vec = n % 4 == 0 && [gl, ul, dl].iter().all(|l| l.start_offset() % 4 == 0);
    typed!(gs.dtype(), T => {
        let g = gs.as_cuda_slice::<T>()?.slice(gl.start_offset()..);
        let u = us.as_cuda_slice::<T>()?.slice(ul.start_offset()..);
        let d = ds.as_cuda_slice::<T>()?.slice(dl.start_offset()..);
        let o = out::<T>(&dev, 2 * n)?;
        let (dg, du) = o.split_at(n);
        let (nn, v) = (n as i64, vec as i32);
        let mut b = f.builder();
        b.arg(&g).arg(&u).arg(&d).arg(&dg).arg(&du).arg(&nn).arg(&v);
        // SAFETY: g, u and dy hold n values, each half of o n.
        unsafe { b.launch(strided(if vec { n / 4 } else { n })) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// RMS norm's input gradient for rows `x` (contiguous), weight `w` and the output's gradient.
pub(crate) fn rms_norm_bwd(xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, ds: &CudaStorage, dl: &Layout, eps: f32) -> Result<CudaStorage> {
    contiguous("rms_norm backward", &[xl, wl, dl])?;
    let d = wl.shape().elem_count();
    let rows = xl.shape().elem_count() / d;
    let dev = xs.device().clone();
    let f = dev.get_or_load_custom_func(&name("rms_norm_bwd", xs.dtype())?, "lmx_train", train_ptx()?)?;
    typed!(xs.dtype(), T => {
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let dy = ds.as_cuda_slice::<T>()?.slice(dl.start_offset()..);
        let o = out::<T>(&dev, rows * d)?;
        let di = d as i32;
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&dy).arg(&o).arg(&di).arg(&eps);
        // SAFETY: x, dy and o hold rows * d values, w d.
        unsafe { b.launch(row_block(rows, d)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// Adam's update of f32 values `p` with gradient `g` and moments `mv` (m then v): one buffer
/// of 3n, the new values, m and v. `h`: (keep, b1, 1 - b1, b2, 1 - b2, step, c2, eps), see
/// `cpu_fused::Adam`.
pub(crate) fn adam(ps: &CudaStorage, pl: &Layout, gs: &CudaStorage, gl: &Layout, ms: &CudaStorage, ml: &Layout, h: [f32; 8]) -> Result<CudaStorage> {
    contiguous("adam", &[pl, gl, ml])?;
    let n = pl.shape().elem_count();
    let dev = ps.device().clone();
    let f = dev.get_or_load_custom_func("lmx_adam_f32", "lmx_train", train_ptx()?)?;
    let p = ps.as_cuda_slice::<f32>()?.slice(pl.start_offset()..);
    let g = gs.as_cuda_slice::<f32>()?.slice(gl.start_offset()..);
    let mv = ms.as_cuda_slice::<f32>()?.slice(ml.start_offset()..);
    let o = out::<f32>(&dev, 3 * n)?;
    let [keep, b1, nb1, b2, nb2, step, c2, eps] = h;
    let nn = n as i64;
    let mut b = f.builder();
    b.arg(&p).arg(&g).arg(&mv).arg(&o).arg(&nn).arg(&keep).arg(&b1).arg(&nb1).arg(&b2).arg(&nb2).arg(&step).arg(&c2).arg(&eps);
    // SAFETY: p and g hold n values, mv 2n, o 3n.
    unsafe { b.launch(strided(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(o, dev))
}

/// Attention's backward over raw scores `s` (rows, cols; T) with the f32 additive mask
/// (q_len, cols): the probabilities (T), or with `dp` (as s) the scores' gradient (T). See
/// `fused_train::AttentionScores`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_scores(ss: &CudaStorage, sl: &Layout, dp: Option<(&CudaStorage, &Layout)>, ms: &CudaStorage, ml: &Layout, q_len: usize, scale: f32, cap: f32) -> Result<CudaStorage> {
    contiguous("attention backward", &[sl, ml])?;
    if let Some((_, dl)) = dp {
        contiguous("attention backward", &[dl])?;
    }
    let cols = ml.dims().last().copied().unwrap_or(1);
    let rows = sl.shape().elem_count() / cols;
    let dev = ss.device().clone();
    let base = if dp.is_some() { "attn_dscores" } else { "attn_probs" };
    let f = dev.get_or_load_custom_func(&name(base, ss.dtype())?, "lmx_train", train_ptx()?)?;
    let threads = cols.next_multiple_of(32).clamp(32, 256) as u32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let m = ms.as_cuda_slice::<f32>()?.slice(ml.start_offset()..);
    let (ci, qi) = (cols as i32, q_len as i32);
    typed!(ss.dtype(), T => {
        let s = ss.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        let o = out::<T>(&dev, rows * cols)?;
        let d = match dp {
            Some((ds, dl)) => Some(ds.as_cuda_slice::<T>()?.slice(dl.start_offset()..)),
            None => None,
        };
        let mut b = f.builder();
        b.arg(&s);
        if let Some(d) = &d {
            b.arg(d);
        }
        b.arg(&m).arg(&o).arg(&ci).arg(&qi).arg(&scale).arg(&cap);
        // SAFETY: s, dp and o hold rows * cols values, the mask q_len * cols.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(o, dev))
    })
}

/// [`crate::fused_train::Skinny`]'s products (inputs contiguous, checked by the op).
/// `add`: [`Skinny::Out`]'s addend (n, k), if any.
pub(crate) fn skinny(op: &crate::fused_train::Skinny, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, add: Option<(&CudaStorage, &Layout)>) -> Result<CudaStorage> {
    use crate::fused_train::Skinny;
    contiguous("low-rank product", &[l1, l2])?;
    if let Some((_, l3)) = add {
        contiguous("low-rank product", &[l3])?;
    }
    let dev = s1.device().clone();
    let (n, w) = l1.shape().dims2()?;
    // (m0, m1): the strides of M (k, r) in factor m, which is (k, r) or, with m_t, (r, k).
    let strides = |k: usize, r: usize, m_t: bool| -> (i32, i32) {
        if m_t {
            (1, k as i32)
        } else {
            (r as i32, 1)
        }
    };
    match *op {
        Skinny::In { scale, m_t } => {
            let (k, r) = (w, l2.shape().elem_count() / w.max(1));
            let (m0, m1) = strides(k, r, m_t);
            let f = dev.get_or_load_custom_func(&name("skinny_in", s1.dtype())?, "lmx_train", train_ptx()?)?;
            let m = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
            let y = out::<f32>(&dev, n * r)?;
            let (ni, ki, ri) = (n as i32, k as i32, r as i32);
            let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, r.div_ceil(8) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            typed!(s1.dtype(), T => {
                let x = s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..);
                let mut b = f.builder();
                b.arg(&x).arg(&m).arg(&y).arg(&ni).arg(&ki).arg(&ri).arg(&m0).arg(&m1).arg(&scale);
                // SAFETY: x holds n * k values, m k * r, y n * r.
                unsafe { b.launch(cfg) }.w()?;
                Ok::<_, candle_core::Error>(())
            })?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        Skinny::Outer { scale, t } => {
            let (k, r) = (w, l2.dim(1)?);
            let (cols, tiles) = (k.div_ceil(256), r.div_ceil(8));
            // Row chunks enough for ~8 blocks an SM, at least 32 rows each.
            let chunks = (1056 / (cols * tiles)).clamp(1, n.div_ceil(32).max(1));
            let chunk = n.div_ceil(chunks).max(1);
            let chunks = n.div_ceil(chunk).max(1);
            let f = dev.get_or_load_custom_func(&name("skinny_outer", s1.dtype())?, "lmx_train", train_ptx()?)?;
            let y = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
            let part = out::<f32>(&dev, chunks * k * r)?;
            let (ni, ki, ri, ci) = (n as i32, k as i32, r as i32, chunk as i32);
            let cfg = LaunchConfig { grid_dim: (cols as u32, chunks as u32, tiles as u32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            typed!(s1.dtype(), T => {
                let x = s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..);
                let mut b = f.builder();
                b.arg(&x).arg(&y).arg(&part).arg(&ni).arg(&ki).arg(&ri).arg(&ci);
                // SAFETY: x holds n * k values, y n * r, part chunks * k * r (every one written:
                // a chunk of no rows writes zeros).
                unsafe { b.launch(cfg) }.w()?;
                Ok::<_, candle_core::Error>(())
            })?;
            let z = out::<f32>(&dev, k * r)?;
            let sum = dev.get_or_load_custom_func("lmx_skinny_sum", "lmx_train", train_ptx()?)?;
            let (chi, ti) = (chunks as i32, t as i32);
            let mut b = sum.builder();
            b.arg(&part).arg(&z).arg(&chi).arg(&ki).arg(&ri).arg(&ti).arg(&scale);
            // SAFETY: part holds chunks * k * r values, z k * r.
            unsafe { b.launch(strided(k * r)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(z, dev))
        }
        Skinny::Out { scale, m_t, dtype } => {
            let r = w;
            let k = l2.shape().elem_count() / r.max(1);
            let (m0, m1) = strides(k, r, m_t);
            let f = dev.get_or_load_custom_func(&name("skinny_out", dtype)?, "lmx_train", train_ptx()?)?;
            let y = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
            let m = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
            let (ni, ki, ri) = (n as i32, k as i32, r as i32);
            let cfg = LaunchConfig { grid_dim: (k.div_ceil(256) as u32, n.div_ceil(16) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: (16 * r * 4) as u32 };
            let has_add = add.is_some() as i32;
            typed!(dtype, T => {
                let o = out::<T>(&dev, n * k)?;
                let a = match add {
                    Some((s3, l3)) => Some(s3.as_cuda_slice::<T>()?.slice(l3.start_offset()..)),
                    None => None,
                };
                let mut b = f.builder();
                b.arg(&y).arg(&m);
                // Without an addend the kernel never reads that argument: o stands in.
                match &a {
                    Some(a) => b.arg(a),
                    None => b.arg(&o),
                };
                b.arg(&o).arg(&ni).arg(&ki).arg(&ri).arg(&m0).arg(&m1).arg(&scale).arg(&has_add);
                // SAFETY: y holds n * r values, m k * r, o and the addend n * k; the block's
                // shared memory 16 r floats.
                unsafe { b.launch(cfg) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(o, dev))
            })
        }
    }
}
