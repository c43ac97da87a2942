//! CUDA kernels for MLX's affine format, compiled at first use with NVRTC (the driver's
//! runtime compiler; nothing to build ahead): matrix-vector products straight on the packed
//! words for a few rows of activations (decode), and dequantization for cuBLAS (prefill, and
//! the backward of QLoRA, which candle then differentiates). The packed words and the scales
//! and biases (as f32 pairs) are copied to the device at the first product there.
//!
//! 4- and 8-bit products take the CPU's two-level int8 activations ([`super::kernels::Q8Act`]):
//! one kernel codes each activation row per quantization group (a scale, a code and a fine
//! code per element, the group's float sum), the next multiplies codes with `dp4a` (four
//! byte products in one instruction) and applies `scale * dx * (codes + fine / 254) + bias *
//! sum(x)` per group, the CPU's arithmetic: integer sums are exact, so the GPU's products
//! differ from the CPU's only in the order of the float sums. Converting each 4-bit weight
//! to float took more instructions than reading it; the integer form takes about one per
//! weight. Other widths, and matrices built for exact products (training), multiply floats.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{GroupParams, QuantizedMatrix};

/// The two-level int8 coding of activations the integer products read (the CPU's
/// `Q8Act::quantize_scalar`), shared by `q8act` here and by the kernels of `cuda_fused` that
/// code their outputs for the next product (a norm, the SiLU product).
pub(crate) const CODE_SRC: &str = r#"
// Programmatic dependent launch (`crate::cuda_fused::Launch`, LMX_PDL defined where it is on):
// a kernel launched before the one it depends on has finished waits here, at its very start,
// for that kernel's results, then lets the next kernel launch.
#ifdef LMX_PDL
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY()
#endif
// Ints per activation row of coded activations: codes (cols / 4), fine codes (cols / 4), then
// dx and sum(x) per group, padded to a multiple of 4 ints (16-byte loads).
__device__ __forceinline__ int act_stride(int cols, int groups) { return cols / 2 + ((2 * groups + 3) & ~3); }

__device__ __forceinline__ int pack4(int a, int b, int c, int d) {
    return (int)((unsigned int)(a & 0xff) | ((unsigned int)(b & 0xff) << 8) | ((unsigned int)(c & 0xff) << 16) | ((unsigned int)(d & 0xff) << 24));
}

// Codes the 8 values `v` of elements [e0, e0 + 8) of a row of `cols` into `row` (act_stride
// ints), products and differences rounded as written (no fused multiply-adds). Each int holds
// the codes of 4 elements in the order the weights' bytes hold them: for 4 bits a packed
// word's 8 elements go as [even elements][odd elements] (its bytes' low and high nibbles). A
// group's threads are neighbours in a warp and every lane must call it (shuffles): `live`
// false (v zeros) writes nothing.
__device__ __forceinline__ void code8(const float* v, int* row, int cols, int gs, int bits, int e0, bool live) {
    float amax = 0.f, sum = 0.f;
    for (int k = 0; k < 8; k++) amax = fmaxf(amax, fabsf(v[k]));
    for (int o = gs / 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float dx = amax / 127.f;
    float inv = dx > 0.f ? 1.f / dx : 0.f;
    float inv_fine = __fmul_rn(inv, 254.f);
    int c[8], f[8];
    for (int k = 0; k < 8; k++) {
        c[k] = __float2int_rn(__fmul_rn(v[k], inv));
        float rest = __fmul_rn(__fsub_rn(v[k], __fmul_rn((float)c[k], dx)), inv_fine);
        f[k] = __float2int_rn(fminf(fmaxf(rest, -127.f), 127.f));
        sum += v[k];
    }
    for (int o = gs / 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (!live) return;
    int groups = cols / gs;
    int at = e0 / 4;
    if (bits == 4) {
        row[at] = pack4(c[0], c[2], c[4], c[6]); row[at + 1] = pack4(c[1], c[3], c[5], c[7]);
        row[cols / 4 + at] = pack4(f[0], f[2], f[4], f[6]); row[cols / 4 + at + 1] = pack4(f[1], f[3], f[5], f[7]);
    } else {
        row[at] = pack4(c[0], c[1], c[2], c[3]); row[at + 1] = pack4(c[4], c[5], c[6], c[7]);
        row[cols / 4 + at] = pack4(f[0], f[1], f[2], f[3]); row[cols / 4 + at + 1] = pack4(f[4], f[5], f[6], f[7]);
    }
    if (e0 % gs == 0) {
        float* fl = (float*)(row + cols / 2);
        fl[e0 / gs] = dx;
        fl[groups + e0 / gs] = sum;
    }
}
"#;

/// Float products: one warp per output (row r of W, row i of x): lanes take consecutive
/// packed words (coalesced), each word's elements share a group, and a word's products are
/// summed as `scale * sum(q x) + bias * sum(x)`; widths that cross word boundaries read the
/// bitstream element by element. Scales and biases are (scale, bias) pairs per group.
///
/// Integer products (4 and 8 bits): `q8act` codes x, a thread per 8 elements (a group's
/// threads are neighbours in a warp); `qmv8` gives each block of 128 threads R rows, each
/// thread 16 bytes of each row per step (coalesced loads, all R in flight together), and the
/// activations' codes, read once per step, serve all R rows.
const SRC: &str = r#"
__device__ __forceinline__ unsigned int code_at(const unsigned int* row, int e, int bits) {
    unsigned int bit = (unsigned int)e * bits, wi = bit / 32, sh = bit % 32;
    unsigned long long two = row[wi];
    if (sh + bits > 32) two |= ((unsigned long long)row[wi + 1]) << 32;
    return (unsigned int)((two >> sh) & ((1u << bits) - 1));
}

// A group's (scale, bias), group i of the matrix (row * groups + group), from its u32 words:
// two f32 (sb16 = 0), or two bf16 in one word, the scale in the low half (sb16 = 1: MLX's own
// bytes, for checkpoints whose scales and biases are bf16; a 4-bit matrix reads 10% fewer
// bytes than with f32 pairs).
__device__ __forceinline__ float2 scale_bias(const unsigned int* __restrict__ sb, size_t i, int sb16) {
    if (sb16) {
        unsigned int u = __ldg(sb + i);
        return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
    }
    uint2 p = __ldg((const uint2*)sb + i);
    return make_float2(__uint_as_float(p.x), __uint_as_float(p.y));
}

// Activations as f32 or bf16 (the top half of an f32; stores round to nearest even).
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, size_t i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, size_t i, float v) {
    unsigned int u = __float_as_uint(v);
    p[i] = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
__device__ void qmv(const unsigned int* __restrict__ w, const unsigned int* __restrict__ sb, int sb16, const T* __restrict__ x,
                    T* __restrict__ y, int rows, int cols, int bits, int group_size, int m) {
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (warp >= (long long)rows * m) return;
    int r = (int)(warp % rows), i = (int)(warp / rows);
    int groups = cols / group_size;
    const unsigned int* row = w + (size_t)r * (cols / 32 * bits);
    const size_t s = (size_t)r * groups;
    size_t x0 = (size_t)i * cols;
    float acc = 0.f;
    if (bits == 4 || bits == 8 || bits == 2) {
        int per = 32 / bits, words = cols / per;
        unsigned int mask = (1u << bits) - 1;
        for (int t = lane; t < words; t += 32) {
            unsigned int word = __ldg(row + t);
            int e0 = t * per, g = e0 / group_size;
            float dot = 0.f, xs = 0.f;
            for (int k = 0; k < per; k++) {
                float xv = load(x, x0 + e0 + k);
                dot += (float)((word >> (k * bits)) & mask) * xv;
                xs += xv;
            }
            float2 p = scale_bias(sb, s + g, sb16);
            acc += p.x * dot + p.y * xs;
        }
    } else {
        for (int e = lane; e < cols; e += 32) {
            int g = e / group_size;
            float2 p = scale_bias(sb, s + g, sb16);
            acc += (p.x * (float)code_at(row, e, bits) + p.y) * load(x, x0 + e);
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) store(y, (size_t)i * rows + r, acc);
}

template <typename T>
__device__ void dequant(const unsigned int* __restrict__ w, const unsigned int* __restrict__ sb, int sb16, T* __restrict__ out,
                        int rows, int cols, int bits, int group_size) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * cols) return;
    int r = (int)(idx / cols), e = (int)(idx % cols);
    int groups = cols / group_size, g = e / group_size;
    float2 p = scale_bias(sb, (size_t)r * groups + g, sb16);
    store(out, (size_t)idx, p.x * (float)code_at(w + (size_t)r * (cols / 32 * bits), e, bits) + p.y);
}

// The same for widths that divide 32 (2, 4, 8 bits): a thread per packed word, its codes one
// group's, written as consecutive values (pairs of bf16 as one 4-byte store). A prefill
// dequantizes every matrix once per chunk; a thread per value re-read its word 8 times and
// ran at a tenth of the card's bandwidth.
__device__ __forceinline__ unsigned int bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
template <typename T>
__device__ void dequant_words(const unsigned int* __restrict__ w, const unsigned int* __restrict__ sb, int sb16, T* __restrict__ out,
                              int rows, int cols, int bits, int group_size) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int per = 32 / bits, words = cols / per;
    if (t >= (long long)rows * words) return;
    int r = (int)(t / words), e0 = (int)(t % words) * per, groups = cols / group_size, g = e0 / group_size;
    unsigned int word = w[t], mask = (1u << bits) - 1;
    float2 p = scale_bias(sb, (size_t)r * groups + g, sb16);
    float s = p.x, b = p.y;
    size_t o = (size_t)r * cols + e0;
    if (sizeof(T) == 2) {
        unsigned int* o32 = (unsigned int*)(out + o);
        for (int k = 0; k < per; k += 2) {
            float lo = s * (float)((word >> (k * bits)) & mask) + b, hi = s * (float)((word >> ((k + 1) * bits)) & mask) + b;
            o32[k / 2] = bf16_bits(lo) | (bf16_bits(hi) << 16);
        }
    } else {
        for (int k = 0; k < per; k++) store(out, o + k, s * (float)((word >> (k * bits)) & mask) + b);
    }
}

// x (m, cols) -> two-level int8 codes per group (`code8`), a thread per 8 elements.
template <typename T>
__device__ void q8act(const T* __restrict__ x, int* __restrict__ out, int m, int cols, int gs, int bits) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Threads past the end compute on zeros: every lane must reach the shuffles.
    bool live = t < (long long)m * (cols / 8);
    long long tt = live ? t : 0;
    int i = (int)(tt / (cols / 8)), e0 = (int)(tt % (cols / 8)) * 8;
    float v[8];
    for (int k = 0; k < 8; k++) v[k] = live ? load(x, (size_t)i * cols + e0 + k) : 0.f;
    code8(v, out + (size_t)i * act_stride(cols, cols / gs), cols, gs, bits, e0, live);
}

// Unsigned weight bytes times signed activation codes, four at a time, added to c.
__device__ __forceinline__ int dp4a(unsigned int a, int b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The codes and fine codes of one 16-byte step of weights against activation ints `c`, `f`
// (8 ints each for 4 bits, 4 for 8 bits).
template <int BITS>
__device__ __forceinline__ void step_sums(uint4 wv, const int* c, const int* f, int& ic, int& ifn) {
    unsigned int ws[4] = {wv.x, wv.y, wv.z, wv.w};
    if (BITS == 4) {
        for (int k = 0; k < 4; k++) {
            unsigned int lo = ws[k] & 0x0F0F0F0Fu, hi = (ws[k] >> 4) & 0x0F0F0F0Fu;
            ic = dp4a(lo, c[2 * k], ic); ic = dp4a(hi, c[2 * k + 1], ic);
            ifn = dp4a(lo, f[2 * k], ifn); ifn = dp4a(hi, f[2 * k + 1], ifn);
        }
    } else {
        for (int k = 0; k < 4; k++) {
            ic = dp4a(ws[k], c[k], ic);
            ifn = dp4a(ws[k], f[k], ifn);
        }
    }
}

// y (m, rows) = x @ W^T for m <= 8 rows of activations coded by q8act (M = 1: one row; M = 8:
// m rows); a block of 128 threads per R rows, its threads over the columns (16 bytes of each
// row per step), so that each thread's R loads are in flight together and a 4096-wide 4-bit
// row is one step.
// Block `block`'s R rows; results go to y[i * ystride + yoff + row] (several matrices' products
// side by side in one output, one launch: qmv8x).
// (A warp per R rows, its lanes over the columns and sums by shuffles alone, measured 2-10%
// slower on an H200: docs/cuda/2026-12-01-qmv-layout.txt.)
template <typename T, int BITS, int R, int M, int SB16>
__device__ void qmv8_block(const uint4* __restrict__ w, const unsigned int* __restrict__ sb, const int* __restrict__ act,
                           T* __restrict__ y, int rows, int cols, int gs, int m, int block, int ystride, int yoff) {
    __shared__ float red[4][R * M];
    const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    const int r0 = block * R;
    const int units = cols * BITS / 128, per = 128 / BITS, ints = per / 4;
    const int groups = cols / gs, stride = act_stride(cols, groups);
    const int mm = M == 1 ? 1 : m;
    const uint4* wr[R];
    size_t sr[R];
    for (int j = 0; j < R; j++) {
        int r = min(r0 + j, rows - 1);
        wr[j] = w + (size_t)r * units;
        sr[j] = (size_t)r * groups;
    }
    float acc[M][R];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < R; j++) acc[i][j] = 0.f;
#pragma unroll 2
    for (int u = tid; u < units; u += 128) {
        int e0 = u * per, g = e0 / gs;
        bool first = e0 % gs == 0;
        uint4 wv[R];
        float2 p[R];
        for (int j = 0; j < R; j++) { wv[j] = __ldg(wr[j] + u); p[j] = scale_bias(sb, sr[j] + g, SB16); }
#pragma unroll
        for (int i = 0; i < M; i++) {
            if (i < mm) {
                const int* a = act + (size_t)i * stride;
                int c[8], f[8];
                const int4* ca = (const int4*)(a + e0 / 4);
                const int4* fa = (const int4*)(a + cols / 4 + e0 / 4);
                for (int q = 0; q < ints / 4; q++) {
                    int4 cv = __ldg(ca + q), fv = __ldg(fa + q);
                    c[4 * q] = cv.x; c[4 * q + 1] = cv.y; c[4 * q + 2] = cv.z; c[4 * q + 3] = cv.w;
                    f[4 * q] = fv.x; f[4 * q + 1] = fv.y; f[4 * q + 2] = fv.z; f[4 * q + 3] = fv.w;
                }
                const float* fl = (const float*)(a + cols / 2);
                float dx = __ldg(fl + g), xs = first ? __ldg(fl + groups + g) : 0.f;
                for (int j = 0; j < R; j++) {
                    int ic = 0, ifn = 0;
                    step_sums<BITS>(wv[j], c, f, ic, ifn);
                    float isum = (float)ic + (float)ifn * (1.f / 254.f);
                    acc[i][j] += p[j].x * dx * isum + p[j].y * xs;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++) {
        if (i < mm) {
            for (int j = 0; j < R; j++) {
                float v = acc[i][j];
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0) red[wid][i * R + j] = v;
            }
        }
    }
    __syncthreads();
    if (tid < R * M) {
        int i = tid / R, j = tid % R;
        if (i < mm && r0 + j < rows) store(y, (size_t)i * ystride + yoff + r0 + j, red[0][tid] + red[1][tid] + red[2][tid] + red[3][tid]);
    }
}

template <typename T, int BITS, int R, int M, int SB16>
__device__ void qmv8(const uint4* __restrict__ w, const unsigned int* __restrict__ sb, const int* __restrict__ act,
                     T* __restrict__ y, int rows, int cols, int gs, int m) {
    qmv8_block<T, BITS, R, M, SB16>(w, sb, act, y, rows, cols, gs, m, blockIdx.x, rows, 0);
}

// Up to three matrices sharing the coded activations (q/k/v, gate/up) in one launch: the
// blocks of matrix 0, then 1, then 2; y (m, rows0 + rows1 + rows2) holds their outputs side by
// side. One launch instead of three, and the small k/v products fill the card with q's.
template <typename T, int BITS, int R, int M, int SB16>
__device__ void qmv8x(const uint4* w0, const unsigned int* s0, int rows0, const uint4* w1, const unsigned int* s1, int rows1,
                      const uint4* w2, const unsigned int* s2, int rows2, const int* act, T* y, int cols, int gs, int m) {
    int n0 = (rows0 + R - 1) / R, n1 = (rows1 + R - 1) / R, b = blockIdx.x, total = rows0 + rows1 + rows2;
    if (b < n0) qmv8_block<T, BITS, R, M, SB16>(w0, s0, act, y, rows0, cols, gs, m, b, total, 0);
    else if (b < n0 + n1) qmv8_block<T, BITS, R, M, SB16>(w1, s1, act, y, rows1, cols, gs, m, b - n0, total, rows0);
    else qmv8_block<T, BITS, R, M, SB16>(w2, s2, act, y, rows2, cols, gs, m, b - n0 - n1, total, rows0 + rows1);
}

extern "C" __global__ void lmx_qmv_f32(const unsigned int* w, const unsigned int* sb, int sb16, const float* x, float* y, int rows, int cols, int bits, int gs, int m) { PDL_ENTRY(); qmv(w, sb, sb16, x, y, rows, cols, bits, gs, m); }
extern "C" __global__ void lmx_qmv_bf16(const unsigned int* w, const unsigned int* sb, int sb16, const unsigned short* x, unsigned short* y, int rows, int cols, int bits, int gs, int m) { PDL_ENTRY(); qmv(w, sb, sb16, x, y, rows, cols, bits, gs, m); }
extern "C" __global__ void lmx_dequant_f32(const unsigned int* w, const unsigned int* sb, int sb16, float* out, int rows, int cols, int bits, int gs) { PDL_ENTRY(); dequant(w, sb, sb16, out, rows, cols, bits, gs); }
extern "C" __global__ void lmx_dequant_bf16(const unsigned int* w, const unsigned int* sb, int sb16, unsigned short* out, int rows, int cols, int bits, int gs) { PDL_ENTRY(); dequant(w, sb, sb16, out, rows, cols, bits, gs); }
extern "C" __global__ void lmx_dequant_words_f32(const unsigned int* w, const unsigned int* sb, int sb16, float* out, int rows, int cols, int bits, int gs) { PDL_ENTRY(); dequant_words(w, sb, sb16, out, rows, cols, bits, gs); }
extern "C" __global__ void lmx_dequant_words_bf16(const unsigned int* w, const unsigned int* sb, int sb16, unsigned short* out, int rows, int cols, int bits, int gs) { PDL_ENTRY(); dequant_words(w, sb, sb16, out, rows, cols, bits, gs); }
extern "C" __global__ void lmx_q8act_f32(const float* x, int* out, int m, int cols, int gs, int bits) { PDL_ENTRY(); q8act(x, out, m, cols, gs, bits); }
extern "C" __global__ void lmx_q8act_bf16(const unsigned short* x, int* out, int m, int cols, int gs, int bits) { PDL_ENTRY(); q8act(x, out, m, cols, gs, bits); }
// Kernel names: lmx_qmv8[x]_{f32|bf16}_{bits}_{rows a block}_{1|8 activation rows}_{f32|s16 scales}.
#define QMV8S(T, TN, B, R, M, S, SN) extern "C" __global__ void QMV_BOUNDS_##B lmx_qmv8_##TN##_##B##_##R##_##M##_##SN(const uint4* w, const unsigned int* sb, const int* act, T* y, int rows, int cols, int gs, int m) { PDL_ENTRY(); qmv8<T, B, R, M, S>(w, sb, act, y, rows, cols, gs, m); }
#define QMV8XS(T, TN, B, R, M, S, SN) extern "C" __global__ void QMV_BOUNDS_##B lmx_qmv8x_##TN##_##B##_##R##_##M##_##SN(const uint4* w0, const unsigned int* s0, int rows0, const uint4* w1, const unsigned int* s1, int rows1, const uint4* w2, const unsigned int* s2, int rows2, const int* act, T* y, int cols, int gs, int m) { PDL_ENTRY(); qmv8x<T, B, R, M, S>(w0, s0, rows0, w1, s1, rows1, w2, s2, rows2, act, y, cols, gs, m); }
#define QMV8(T, TN, B, R, M) QMV8S(T, TN, B, R, M, 0, f32) QMV8S(T, TN, B, R, M, 1, s16)
#define QMV8X(T, TN, B, R, M) QMV8XS(T, TN, B, R, M, 0, f32) QMV8XS(T, TN, B, R, M, 1, s16)
#define QMV8_ROWS(T, TN, B, M) QMV8(T, TN, B, 1, M) QMV8(T, TN, B, 2, M) QMV8(T, TN, B, 4, M) QMV8X(T, TN, B, 1, M) QMV8X(T, TN, B, 2, M) QMV8X(T, TN, B, 4, M)
QMV8_ROWS(float, f32, 4, 1) QMV8_ROWS(float, f32, 4, 8) QMV8_ROWS(float, f32, 8, 1) QMV8_ROWS(float, f32, 8, 8)
QMV8_ROWS(unsigned short, bf16, 4, 1) QMV8_ROWS(unsigned short, bf16, 4, 8) QMV8_ROWS(unsigned short, bf16, 8, 1) QMV8_ROWS(unsigned short, bf16, 8, 8)
"#;

/// Rows of x up to which products take the matrix-vector kernel (beyond: dequantize + cuBLAS).
pub(super) const MAX_QMV_ROWS: usize = 8;

/// The kernels' PTX, compiled once per process. The 8-bit integer products are compiled to
/// fit 8 blocks on a multiprocessor (64 registers a thread instead of 52-54 at 5-6 blocks:
/// Llama-3-8B-shaped 8-bit decode 210 vs 197 tok/s on an H200,
/// docs/cuda/2026-12-01-fusions.txt); the 4-bit ones are left free (96 registers for 4 rows: 8
/// blocks spill, 235 vs 243-249 tok/s). `LMX_CUDA_QMV_MIN_BLOCKS=N` sets N for both (0: free),
/// for such measurements.
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        let fixed: Option<u32> = std::env::var("LMX_CUDA_QMV_MIN_BLOCKS").ok().and_then(|v| v.parse().ok()).filter(|n| *n <= 16);
        let bounds = |n: u32| if n == 0 { String::new() } else { format!("__launch_bounds__(128, {n})") };
        format!("{}#define QMV_BOUNDS_4 {}\n#define QMV_BOUNDS_8 {}\n{CODE_SRC}{SRC}", crate::cuda_fused::pdl_build().0, bounds(fixed.unwrap_or(0)), bounds(fixed.unwrap_or(8)))
    });
    crate::cuda_fused::pdl_ptx(&PTX, source)
}

/// The matrix on one CUDA device: packed words (rows, words) u32 and a (scale, bias) pair per
/// group as u32 words: two bf16 in one word, the scale in the low half (rows, groups), where
/// the file holds bf16 scales and biases (MLX's own), else two f32 (rows, 2 * groups). bf16
/// pairs read half the bytes (8B 4-bit products 12% faster in a CuPy harness on an H200,
/// docs/cuda/2026-12-02-qmv-bench.txt); `LMX_CUDA_SB16=0` keeps f32 pairs, for comparisons.
#[derive(Debug, Clone)]
pub(super) struct DeviceCopy {
    packed: Tensor,
    sb: Tensor,
    sb16: bool,
}

/// `LMX_CUDA_SB16=0`: (scale, bias) pairs as f32 even where the file holds bf16.
fn sb16_allowed() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMX_CUDA_SB16").map_or(true, |v| v != "0"))
}

impl DeviceCopy {
    pub(super) fn new(q: &QuantizedMatrix, device: &candle_core::Device) -> Result<Self> {
        let groups = q.cols / q.group_size;
        let words = q.cols * q.bits / 32;
        let packed = Tensor::from_slice(&q.packed, (q.rows, words), device)?;
        if let (GroupParams::Bf16(s), GroupParams::Bf16(b)) = (&q.scales, &q.biases) {
            if sb16_allowed() {
                let sb: Vec<u32> = s.iter().zip(b).map(|(s, b)| u32::from(s.to_bits()) | (u32::from(b.to_bits()) << 16)).collect();
                return Ok(Self { packed, sb: Tensor::from_vec(sb, (q.rows, groups), device)?, sb16: true });
            }
        }
        let (mut s, mut b) = (vec![0f32; q.rows * groups], vec![0f32; q.rows * groups]);
        q.scales.fill(0, &mut s);
        q.biases.fill(0, &mut b);
        let sb: Vec<u32> = s.iter().zip(&b).flat_map(|(s, b)| [s.to_bits(), b.to_bits()]).collect();
        Ok(Self { packed, sb: Tensor::from_vec(sb, (q.rows, 2 * groups), device)?, sb16: false })
    }

    /// `g @ W` for g (.., rows) on the device (bf16 as it is, others through f32), in g's
    /// dtype: the weight dequantized for the product, not kept.
    pub(super) fn matmul_t(&self, q: &QuantizedMatrix, g: &Tensor) -> Result<Tensor> {
        let dtype = g.dtype();
        let work = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
        let mut dims = g.dims().to_vec();
        let gw = g.to_dtype(work)?.contiguous()?.reshape(((), q.rows))?;
        let dequant = Dequant { cols: q.cols, bits: q.bits, group_size: q.group_size, sb16: self.sb16, dtype: work };
        let dx = gw.matmul(&self.packed.apply_op2_no_bwd(&self.sb, &dequant)?)?;
        if let Some(last) = dims.last_mut() {
            *last = q.cols;
        }
        dx.reshape(dims)?.to_dtype(dtype)
    }

    /// Whether the pairs are two bf16 in a word (else two f32 words).
    #[cfg(test)]
    pub(super) fn pairs16(&self) -> bool {
        self.sb16
    }

    /// `x @ W^T` for x (.., cols) on the device: bf16 and f32 activations as they are, others
    /// through f32.
    pub(super) fn matmul(&self, q: &QuantizedMatrix, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / q.cols;
        let work = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
        let xw = x.to_dtype(work)?.contiguous()?.reshape((m, q.cols))?;
        let spec = Spec { rows: q.rows, cols: q.cols, bits: q.bits, group_size: q.group_size, sb16: self.sb16 };
        let y = if m <= MAX_QMV_ROWS && !x.track_op() {
            if integer_products(q) {
                self.times_codes(spec, &codes_of(q, x, &xw)?, work)?
            } else {
                xw.apply_op3_no_bwd(&self.packed, &self.sb, &Qmv(spec))?
            }
        } else {
            let dequant = Dequant { cols: q.cols, bits: q.bits, group_size: q.group_size, sb16: self.sb16, dtype: work };
            let w = self.packed.apply_op2_no_bwd(&self.sb, &dequant)?;
            if xw.track_op() {
                // QLoRA: one node whose backward is x's gradient alone (candle's matmul backward
                // would also multiply out the frozen weight's), the weight dequantized again
                // there rather than kept.
                let y = xw.detach().matmul(&w.t()?)?;
                let (packed, sb) = (self.packed.clone(), self.sb.clone());
                crate::taped::taped(&[&xw], &y, move |_, g| Ok(vec![Some(g.contiguous()?.matmul(&packed.apply_op2_no_bwd(&sb, &dequant)?)?)]))?
            } else {
                xw.matmul(&w.t()?)?
            }
        };
        if let Some(last) = dims.last_mut() {
            *last = q.rows;
        }
        y.reshape(dims)?.to_dtype(dtype)
    }

    /// Rows `ids` (u32 (n,), on this device) dequantized: (n, cols) in `dtype`.
    pub(super) fn rows(&self, q: &QuantizedMatrix, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let work = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
        let (packed, sb) = (self.packed.index_select(ids, 0)?, self.sb.index_select(ids, 0)?);
        packed.apply_op2_no_bwd(&sb, &Dequant { cols: q.cols, bits: q.bits, group_size: q.group_size, sb16: self.sb16, dtype: work })?.to_dtype(dtype)
    }

    /// The integer product of x's `codes` with this matrix, in `dtype` (f32 or bf16).
    fn times_codes(&self, spec: Spec, codes: &Tensor, dtype: DType) -> Result<Tensor> {
        codes.apply_op3_no_bwd(&self.packed, &self.sb, &Qmv8 { spec, dtype })
    }
}

/// `[x @ W_0^T, x @ W_1^T, ...]` on the device with x coded once, where every matrix takes the
/// integer kernels with the same columns, bits and group size and x is a few rows (decode);
/// None otherwise.
pub(super) fn matmul_many(qs: &[&QuantizedMatrix], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let q0 = qs[0];
    let m = x.elem_count() / q0.cols;
    let same = qs.iter().all(|q| integer_products(q) && (q.cols, q.bits, q.group_size) == (q0.cols, q0.bits, q0.group_size));
    if !same || m > MAX_QMV_ROWS || x.track_op() {
        return Ok(None);
    }
    let dtype = x.dtype();
    let work = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
    let codes = codes_of(q0, x, &x.to_dtype(work)?.contiguous()?.reshape((m, q0.cols))?)?;
    let mats = qs.iter().map(|q| q.device_copy(x.device()).cloned()).collect::<Result<Vec<_>>>()?;
    if (2..=3).contains(&qs.len()) && m == 1 && !separate_launches() && mats.iter().all(|c| c.sb16 == mats[0].sb16) {
        // One launch for all of them; each output a view of its columns (contiguous for one
        // row; several rows would each need a copy: measured 2-4% slower at batch 8).
        let rows: Vec<usize> = qs.iter().map(|q| q.rows).collect();
        let op = Qmv8Many { mats, rows: rows.clone(), cols: q0.cols, bits: q0.bits, group_size: q0.group_size, dtype: work };
        let y = codes.apply_op1_no_bwd(&op)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(qs.len());
        for r in rows {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = r;
            }
            out.push(y.narrow(1, at, r)?.reshape(dims)?.to_dtype(dtype)?);
            at += r;
        }
        return Ok(Some(out));
    }
    let mut out = Vec::with_capacity(qs.len());
    for (q, copy) in qs.iter().zip(&mats) {
        let spec = Spec { rows: q.rows, cols: q.cols, bits: q.bits, group_size: q.group_size, sb16: copy.sb16 };
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = q.rows;
        }
        out.push(copy.times_codes(spec, &codes, work)?.reshape(dims)?.to_dtype(dtype)?);
    }
    Ok(Some(out))
}

/// `LMX_CUDA_QMV_SEPARATE=1`: matrices sharing an input take one launch each (for comparisons).
fn separate_launches() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMX_CUDA_QMV_SEPARATE").is_ok_and(|v| v == "1"))
}

thread_local! {
    /// The last activations a producer coded on this thread (`offer_codes`): the tensor's id,
    /// the codes' (bits, group size), and the codes (one row).
    static OFFERED: std::cell::RefCell<Option<(candle_core::TensorId, usize, usize, Tensor)>> = const { std::cell::RefCell::new(None) };
}

/// Offers `codes` (bits, group size) of the one-row activations `x` to the product that takes
/// `x` next on this thread.
pub(crate) fn offer_codes(x: &Tensor, (bits, group_size): (usize, usize), codes: &Tensor) {
    OFFERED.with(|o| *o.borrow_mut() = Some((x.id(), bits, group_size, codes.clone())));
}

/// Moves the last offer from `from` to `to` (the same values seen through another shape).
pub(super) fn follow_codes(from: &Tensor, to: &Tensor) {
    OFFERED.with(|o| {
        if let Some(offer) = o.borrow_mut().as_mut().filter(|offer| offer.0 == from.id() && to.elem_count() == from.elem_count()) {
            offer.0 = to.id();
        }
    });
}

/// Forgets the last offer on this thread.
pub(super) fn clear_offered_codes() {
    OFFERED.with(|o| *o.borrow_mut() = None);
}

/// `x`'s codes for `q` as a producer offered them, else coded now from `xw` (x as f32/bf16 rows).
fn codes_of(q: &QuantizedMatrix, x: &Tensor, xw: &Tensor) -> Result<Tensor> {
    let offered = OFFERED.with(|o| o.borrow().as_ref().filter(|(id, b, g, _)| *id == x.id() && (*b, *g) == (q.bits, q.group_size)).map(|o| o.3.clone()));
    match offered {
        Some(c) if xw.dim(0)? == 1 && offered_codes() => c.reshape((1, act_stride(q.cols, q.group_size))),
        _ => codes(q, xw),
    }
}

/// Whether producers code their outputs and products take them (`LMX_CUDA_OFFERED_CODES=0`:
/// neither; each product codes x itself, for comparisons).
pub(crate) fn offered_codes() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_OFFERED_CODES").is_ok_and(|v| v == "0"))
}

/// x (m, cols) as the integer kernels' codes for `bits` and `group_size` (for tests of the
/// producers that code their outputs).
#[cfg(test)]
pub(crate) fn code_rows(x: &Tensor, bits: usize, group_size: usize) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Q8Code { cols: x.dims().last().copied().unwrap_or(0), bits, group_size })
}

/// x (m, cols) as the integer kernels' int8 codes for `q`'s bit width and group size.
fn codes(q: &QuantizedMatrix, x: &Tensor) -> Result<Tensor> {
    x.apply_op1_no_bwd(&Q8Code { cols: q.cols, bits: q.bits, group_size: q.group_size })
}

/// Whether `q`'s decode products take int8 activations (as on the CPU): 4 or 8 bits, not
/// built for exact products, and not switched off with `LMX_CUDA_QMV=float` (which keeps the
/// float kernel for comparisons).
pub(super) fn integer_products(q: &QuantizedMatrix) -> bool {
    static FLOAT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let float = *FLOAT.get_or_init(|| std::env::var("LMX_CUDA_QMV").is_ok_and(|v| v == "float"));
    matches!(q.bits, 4 | 8) && !q.exact && !float
}

/// Rows of W per block of the integer kernel. Kernel times on an H200 (Nsight Compute, one
/// Llama-3-8B-shaped decode step, `scripts/cuda/profile.sh`), 4-bit: 1 / 2 / 4 rows per block
/// took 5.11 / 4.00 / 3.93 ms, the 4096 x 4096 products 13.7 / 9.6 / 9.6 us each: a thread's
/// loads of several rows are in flight together. 8-bit rows are twice the bytes (and twice
/// the steps): 2 rows. 4-bit rows wider than a block's one pass (more than 128 units of 16
/// bytes: Llama-3-8B's down product, 14336 columns) take 2 rows too: with 4 rows and bf16 pairs
/// ptxas issues only 5 of a round's 8 wide loads ahead of the sums, and that product took 17.4
/// us against 12.0 with 2 rows (a CuPy harness on an H200, `scripts/cuda/qmv_bench.py`,
/// docs/cuda/2026-12-03-db-mixed.txt; double-buffering the 4-row loop instead gave 13.5, and 4
/// rows stay faster for one-pass shapes: gate/up 19.3 against 20.4 us, the head 77 against 84).
/// `LMX_CUDA_QMV_ROWS=1|2|4` fixes it.
fn rows_per_block(rows: usize, cols: usize, bits: usize) -> usize {
    static FIXED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let fixed = *FIXED.get_or_init(|| std::env::var("LMX_CUDA_QMV_ROWS").ok().and_then(|v| v.parse().ok()).filter(|r| matches!(r, 1 | 2 | 4)));
    let one_pass = cols * bits / 128 <= 128;
    fixed.unwrap_or(if bits == 4 && one_pass { 4 } else { 2 }).min(rows.next_power_of_two())
}

/// Ints per activation row of the integer kernels' coded activations (`act_stride` there).
pub(crate) fn act_stride(cols: usize, group_size: usize) -> usize {
    cols / 2 + (2 * cols / group_size).next_multiple_of(4)
}

fn launch_cfg(threads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (threads.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A product's matrix shape and format.
#[derive(Debug, Clone, Copy)]
struct Spec {
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    /// (scale, bias) pairs as two bf16 in a word (else two f32 words).
    sb16: bool,
}

/// `_s16` or `_f32`: the suffix of the integer kernels' names for pairs stored so.
fn pairs_suffix(sb16: bool) -> &'static str {
    if sb16 {
        "s16"
    } else {
        "f32"
    }
}

/// x (m, cols) @ W^T -> (m, rows), float arithmetic.
struct Qmv(Spec);

/// x (m, cols) f32/bf16 -> its two-level int8 codes for 4- or 8-bit matrices of `cols`
/// columns in groups of `group_size`: (m, act_stride) u32 (the ints' bits).
struct Q8Code {
    cols: usize,
    bits: usize,
    group_size: usize,
}

/// Codes of x from [`Q8Code`] @ W^T -> (m, rows) in `dtype` (x's: f32 or bf16).
struct Qmv8 {
    spec: Spec,
    dtype: DType,
}

impl CustomOp3 for Qmv {
    fn name(&self) -> &'static str {
        "lmx-cuda-qmv"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-qmv runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, ss: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let spec = &self.0;
        let m = xl.shape().elem_count() / spec.cols;
        if !xl.is_contiguous() || !wl.is_contiguous() || !sl.is_contiguous() || (!spec.sb16 && sl.start_offset() % 2 != 0) {
            candle_core::bail!("lmx-cuda-qmv needs contiguous, aligned inputs");
        }
        let dev = xs.device().clone();
        let w = ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..);
        let sb = ss.as_cuda_slice::<u32>()?.slice(sl.start_offset()..);
        let (rows, cols, bits, gs, mm, sb16) = (spec.rows as i32, spec.cols as i32, spec.bits as i32, spec.group_size as i32, m as i32, i32::from(spec.sb16));
        let cfg = launch_cfg(32 * spec.rows * m);
        let storage = match xs.dtype() {
            DType::BF16 => {
                let x = xs.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
                let func = dev.get_or_load_custom_func("lmx_qmv_bf16", "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<half::bf16>(m * spec.rows)? };
                let mut b = crate::cuda_fused::launch_args!(dev, func);
                b.arg(&w).arg(&sb).arg(&sb16).arg(&x).arg(&y).arg(&rows).arg(&cols).arg(&bits).arg(&gs).arg(&mm);
                // SAFETY: the buffers hold what the kernel reads (shapes checked by the caller).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
            DType::F32 => {
                let x = xs.as_cuda_slice::<f32>()?.slice(xl.start_offset()..);
                let func = dev.get_or_load_custom_func("lmx_qmv_f32", "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<f32>(m * spec.rows)? };
                let mut b = crate::cuda_fused::launch_args!(dev, func);
                b.arg(&w).arg(&sb).arg(&sb16).arg(&x).arg(&y).arg(&rows).arg(&cols).arg(&bits).arg(&gs).arg(&mm);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
            other => candle_core::bail!("lmx-cuda-qmv: activations of dtype {other:?}"),
        };
        Ok((storage, Shape::from((m, spec.rows))))
    }
}

impl CustomOp1 for Q8Code {
    fn name(&self) -> &'static str {
        "lmx-cuda-q8code"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-q8code runs on CUDA only")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        if !xl.is_contiguous() {
            candle_core::bail!("lmx-cuda-q8code needs contiguous activations");
        }
        let m = xl.shape().elem_count() / self.cols;
        let dev = xs.device().clone();
        let stride = act_stride(self.cols, self.group_size);
        let (mm, cols, gs, bits) = (m as i32, self.cols as i32, self.group_size as i32, self.bits as i32);
        // SAFETY: the kernel writes every int the products read (codes, fine codes, dx and
        // sums of each group; the padding is never read).
        let act = unsafe { dev.alloc::<u32>(m * stride)? };
        let cfg = launch_cfg(m * self.cols / 8);
        let name = match xs.dtype() {
            DType::BF16 => "lmx_q8act_bf16",
            DType::F32 => "lmx_q8act_f32",
            other => candle_core::bail!("lmx-cuda-q8code: activations of dtype {other:?}"),
        };
        let func = dev.get_or_load_custom_func(name, "lmx_quant", ptx()?)?;
        let mut b = crate::cuda_fused::launch_args!(dev, func);
        let x_bf16;
        let x_f32;
        if xs.dtype() == DType::BF16 {
            x_bf16 = xs.as_cuda_slice::<half::bf16>()?.slice(xl.start_offset()..);
            b.arg(&x_bf16);
        } else {
            x_f32 = xs.as_cuda_slice::<f32>()?.slice(xl.start_offset()..);
            b.arg(&x_f32);
        }
        b.arg(&act).arg(&mm).arg(&cols).arg(&gs).arg(&bits);
        // SAFETY: x holds m rows of cols elements; act is sized for them.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(act, dev), Shape::from((m, stride))))
    }
}

impl CustomOp3 for Qmv8 {
    fn name(&self) -> &'static str {
        "lmx-cuda-qmv8"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-qmv8 runs on CUDA only")
    }

    fn cuda_fwd(&self, acts: &CudaStorage, al: &Layout, ws: &CudaStorage, wl: &Layout, ss: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let spec = &self.spec;
        let m = al.dims()[0];
        if !al.is_contiguous() || al.start_offset() != 0 || !wl.is_contiguous() || !sl.is_contiguous() || wl.start_offset() % 4 != 0 || sl.start_offset() % 2 != 0 {
            candle_core::bail!("lmx-cuda-qmv8 needs contiguous, aligned inputs");
        }
        let dev = acts.device().clone();
        let act = acts.as_cuda_slice::<u32>()?;
        let w = ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..);
        let sb = ss.as_cuda_slice::<u32>()?.slice(sl.start_offset()..);
        let (rows, cols, gs, mm) = (spec.rows as i32, spec.cols as i32, spec.group_size as i32, m as i32);
        let per_block = rows_per_block(spec.rows, spec.cols, spec.bits);
        let cfg = LaunchConfig { grid_dim: (spec.rows.div_ceil(per_block) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let kernel = |t: &str| format!("lmx_qmv8_{t}_{}_{per_block}_{}_{}", spec.bits, if m == 1 { 1 } else { 8 }, pairs_suffix(spec.sb16));
        let storage = match self.dtype {
            DType::BF16 => {
                let func = dev.get_or_load_custom_func(&kernel("bf16"), "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<half::bf16>(m * spec.rows)? };
                let mut b = crate::cuda_fused::launch_args!(dev, func);
                b.arg(&w).arg(&sb).arg(act).arg(&y).arg(&rows).arg(&cols).arg(&gs).arg(&mm);
                // SAFETY: the buffers hold what the kernel reads (shapes checked by the caller).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
            _ => {
                let func = dev.get_or_load_custom_func(&kernel("f32"), "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<f32>(m * spec.rows)? };
                let mut b = crate::cuda_fused::launch_args!(dev, func);
                b.arg(&w).arg(&sb).arg(act).arg(&y).arg(&rows).arg(&cols).arg(&gs).arg(&mm);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }
        };
        Ok((storage, Shape::from((m, spec.rows))))
    }
}

/// Two or three matrices of the same columns, bits and group size times the same coded
/// activations (m, ..) in one launch: y (m, sum of rows), each matrix's outputs side by side.
struct Qmv8Many {
    mats: Vec<DeviceCopy>,
    rows: Vec<usize>,
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: DType,
}

impl CustomOp1 for Qmv8Many {
    fn name(&self) -> &'static str {
        "lmx-cuda-qmv8-many"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-qmv8-many runs on CUDA only")
    }

    fn cuda_fwd(&self, acts: &CudaStorage, al: &Layout) -> Result<(CudaStorage, Shape)> {
        let m = al.dims()[0];
        let sb16 = self.mats[0].sb16;
        if !al.is_contiguous() || al.start_offset() != 0 || !(2..=3).contains(&self.mats.len()) || self.mats.iter().any(|c| c.sb16 != sb16) {
            candle_core::bail!("lmx-cuda-qmv8-many needs contiguous codes and 2 or 3 matrices of one pair format");
        }
        let guards: Vec<_> = self.mats.iter().flat_map(|c| [c.packed.storage_and_layout(), c.sb.storage_and_layout()]).collect();
        let mut w = Vec::with_capacity(3);
        let mut sbs = Vec::with_capacity(3);
        // Without a third matrix: zero rows (no blocks) and the second's pointers.
        let mut rows: Vec<i32> = self.rows.iter().map(|&r| r as i32).collect();
        rows.resize(3, 0);
        for k in 0..3 {
            let pair = &guards[2 * k.min(self.mats.len() - 1)..];
            let (candle_core::Storage::Cuda(ws), wl) = (&*pair[0].0, pair[0].1) else { candle_core::bail!("lmx-cuda-qmv8-many: a matrix not on the GPU") };
            let (candle_core::Storage::Cuda(ss), sl) = (&*pair[1].0, pair[1].1) else { candle_core::bail!("lmx-cuda-qmv8-many: a matrix not on the GPU") };
            if !wl.is_contiguous() || !sl.is_contiguous() || wl.start_offset() % 4 != 0 || sl.start_offset() % 2 != 0 {
                candle_core::bail!("lmx-cuda-qmv8-many needs contiguous, aligned matrices");
            }
            w.push(ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..));
            sbs.push(ss.as_cuda_slice::<u32>()?.slice(sl.start_offset()..));
        }
        let total: usize = self.rows.iter().sum();
        let dev = acts.device().clone();
        let act = acts.as_cuda_slice::<u32>()?;
        let per_block = self.rows.iter().map(|&r| rows_per_block(r, self.cols, self.bits)).min().unwrap_or(1);
        let blocks: usize = self.rows.iter().map(|r| r.div_ceil(per_block)).sum();
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (cols, gs, mm) = (self.cols as i32, self.group_size as i32, m as i32);
        let kernel = |t: &str| format!("lmx_qmv8x_{t}_{}_{per_block}_{}_{}", self.bits, if m == 1 { 1 } else { 8 }, pairs_suffix(sb16));
        macro_rules! launch {
            ($t:ty, $name:expr) => {{
                let func = dev.get_or_load_custom_func(&kernel($name), "lmx_quant", ptx()?)?;
                // SAFETY: every element is written by the kernel.
                let y = unsafe { dev.alloc::<$t>(m * total)? };
                let mut b = crate::cuda_fused::launch_args!(dev, func);
                for k in 0..3 {
                    b.arg(&w[k]).arg(&sbs[k]).arg(&rows[k]);
                }
                b.arg(act).arg(&y).arg(&cols).arg(&gs).arg(&mm);
                // SAFETY: each matrix holds its rows of `cols` columns and (scale, bias) pairs,
                // the codes m rows of `cols`, y m rows of `total`.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let storage = match self.dtype {
            DType::BF16 => launch!(half::bf16, "bf16"),
            _ => launch!(f32, "f32"),
        };
        Ok((storage, Shape::from((m, total))))
    }
}

/// Packed (rows, words) u32 and (scale, bias) pairs -> W (rows, cols) in `dtype` (f32 or bf16).
struct Dequant {
    cols: usize,
    bits: usize,
    group_size: usize,
    /// Pairs as two bf16 in a word (else two f32 words).
    sb16: bool,
    dtype: DType,
}

impl CustomOp2 for Dequant {
    fn name(&self) -> &'static str {
        "lmx-cuda-dequant"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("lmx-cuda-dequant runs on CUDA only")
    }

    fn cuda_fwd(&self, ws: &CudaStorage, wl: &Layout, ss: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let rows = wl.dims()[0];
        if !self.sb16 && sl.start_offset() % 2 != 0 {
            candle_core::bail!("lmx-cuda-dequant: f32 pairs must start on a pair");
        }
        let dev = ws.device().clone();
        let w = ws.as_cuda_slice::<u32>()?.slice(wl.start_offset()..);
        let sb = ss.as_cuda_slice::<u32>()?.slice(sl.start_offset()..);
        let (r, c, bits, gs, sb16) = (rows as i32, self.cols as i32, self.bits as i32, self.group_size as i32, i32::from(self.sb16));
        // A thread per packed word where the codes do not straddle words (2, 4, 8 bits; 32 %
        // bits == 0 and the group holds whole words), else a thread per value.
        let words = 32 % self.bits == 0 && self.group_size % (32 / self.bits) == 0;
        let cfg = launch_cfg(if words { rows * self.cols * self.bits / 32 } else { rows * self.cols });
        let kernel = |base: &str| if words { base.replace("dequant", "dequant_words") } else { base.to_string() };
        let storage = if self.dtype == DType::BF16 {
            let func = dev.get_or_load_custom_func(&kernel("lmx_dequant_bf16"), "lmx_quant", ptx()?)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<half::bf16>(rows * self.cols)? };
            let mut b = crate::cuda_fused::launch_args!(dev, func);
            b.arg(&w).arg(&sb).arg(&sb16).arg(&out).arg(&r).arg(&c).arg(&bits).arg(&gs);
            // SAFETY: the buffers hold what the kernel reads.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        } else {
            let func = dev.get_or_load_custom_func(&kernel("lmx_dequant_f32"), "lmx_quant", ptx()?)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<f32>(rows * self.cols)? };
            let mut b = crate::cuda_fused::launch_args!(dev, func);
            b.arg(&w).arg(&sb).arg(&sb16).arg(&out).arg(&r).arg(&c).arg(&bits).arg(&gs);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        };
        Ok((storage, Shape::from((rows, self.cols))))
    }
}
