// Candidate kernels for scripts/cuda/qmv_bench.py (compiled after lmx's own quant and fused
// sources, so dp4a, step_sums, code8, ld4/st4 and block_sum are in scope). A line
// "// CANDIDATE name rows_per_block sb16" registers a 4-bit product
// (w, sb, act, y, rows, cols, gs), launched with 128 threads a block; "// NORM name threads"
// an add + RMS norm with codes (x, h, w, sum, out, d, eps, codes, gs, bits).

// Scale and bias of a group: f32 pairs (lmx today) or bf16 pairs in one u32 (MLX's bytes).
template <bool SB16>
__device__ __forceinline__ float2 scale_bias(const void* sb, size_t i) {
    if (SB16) {
        unsigned int u = __ldg((const unsigned int*)sb + i);
        return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
    }
    return __ldg((const float2*)sb + i);
}

// A 16-byte load of weights, read once: kept out of L1 (`ST`), else through the read-only path.
template <bool ST>
__device__ __forceinline__ uint4 ldw(const uint4* p) {
    if (ST) {
        uint4 v;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
        return v;
    }
    return __ldg(p);
}

// 4-bit, one row of activations: TPR threads per R rows (128 / TPR row groups a block), each
// thread loading U 16-byte units of each of its R rows before any arithmetic.
template <int R, int U, int TPR, bool SB16, bool ST = false>
__device__ void qmv4(const uint4* __restrict__ w, const void* __restrict__ sb, const int* __restrict__ act,
                     unsigned short* __restrict__ y, int rows, int cols, int gs) {
    __shared__ float red[4][4 * R];
    const int tid = threadIdx.x % TPR, grp = threadIdx.x / TPR;
    const int r0 = (blockIdx.x * (128 / TPR) + grp) * R;
    const int units = cols / 32, groups = cols / gs;
    const float* fl = (const float*)(act + cols / 2);
    const uint4* wr[R];
    size_t sr[R];
    for (int j = 0; j < R; j++) {
        int r = min(r0 + j, rows - 1);
        wr[j] = w + (size_t)r * units;
        sr[j] = (size_t)r * groups;
    }
    float acc[R];
    for (int j = 0; j < R; j++) acc[j] = 0.f;
    for (int base = tid; base < units; base += TPR * U) {
        uint4 wv[U][R];
        float2 p[U][R];
#pragma unroll
        for (int s = 0; s < U; s++) {
            int u = base + s * TPR;
            if (u < units) {
                for (int j = 0; j < R; j++) { wv[s][j] = ldw<ST>(wr[j] + u); p[s][j] = scale_bias<SB16>(sb, sr[j] + u * 32 / gs); }
            }
        }
#pragma unroll
        for (int s = 0; s < U; s++) {
            int u = base + s * TPR;
            if (u < units) {
                int e0 = u * 32, g = e0 / gs;
                int c[8], f[8];
                const int4* ca = (const int4*)(act + e0 / 4);
                const int4* fa = (const int4*)(act + cols / 4 + e0 / 4);
                for (int q = 0; q < 2; q++) {
                    int4 cv = __ldg(ca + q), fv = __ldg(fa + q);
                    c[4 * q] = cv.x; c[4 * q + 1] = cv.y; c[4 * q + 2] = cv.z; c[4 * q + 3] = cv.w;
                    f[4 * q] = fv.x; f[4 * q + 1] = fv.y; f[4 * q + 2] = fv.z; f[4 * q + 3] = fv.w;
                }
                float dx = __ldg(fl + g), xs = e0 % gs == 0 ? __ldg(fl + groups + g) : 0.f;
                for (int j = 0; j < R; j++) {
                    int ic = 0, ifn = 0;
                    step_sums<4>(wv[s][j], c, f, ic, ifn);
                    float isum = (float)ic + (float)ifn * (1.f / 254.f);
                    acc[j] += p[s][j].x * dx * isum + p[s][j].y * xs;
                }
            }
        }
    }
    const int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
    for (int j = 0; j < R; j++) {
        float v = acc[j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[j] = v;
    }
    if (TPR == 32) {
        if (lane < R && r0 + lane < rows) {
            float v = acc[0];
            for (int j = 1; j < R; j++) if (lane == j) v = acc[j];
            store(y, (size_t)r0 + lane, v);
        }
        return;
    }
    if (lane == 0) for (int j = 0; j < R; j++) red[wid][j] = acc[j];
    __syncthreads();
    const int wpg = TPR / 32;  // warps per row group
    if (threadIdx.x < (128 / TPR) * R) {
        int gi = threadIdx.x / R, j = threadIdx.x % R;
        float v = 0.f;
        for (int k = 0; k < wpg; k++) v += red[gi * wpg + k][j];
        int r = (blockIdx.x * (128 / TPR) + gi) * R + j;
        if (r < rows) store(y, (size_t)r, v);
    }
}

#define QMV4(name, R, U, TPR, SB16) extern "C" __global__ void name(const uint4* w, const void* sb, const int* act, unsigned short* y, int rows, int cols, int gs) { qmv4<R, U, TPR, SB16>(w, sb, act, y, rows, cols, gs); }
#define QMV4S(name, R, U, TPR, SB16) extern "C" __global__ void name(const uint4* w, const void* sb, const int* act, unsigned short* y, int rows, int cols, int gs) { qmv4<R, U, TPR, SB16, true>(w, sb, act, y, rows, cols, gs); }

// CANDIDATE blk_r4_u1 4 0
QMV4(blk_r4_u1, 4, 1, 128, false)
// CANDIDATE blk_r4_u1_sb16 4 1
QMV4(blk_r4_u1_sb16, 4, 1, 128, true)
// CANDIDATE blk_r4_u2_sb16 4 1
QMV4(blk_r4_u2_sb16, 4, 2, 128, true)
// CANDIDATE blk_r8_u1_sb16 8 1
QMV4(blk_r8_u1_sb16, 8, 1, 128, true)
// CANDIDATE half_r4_u2_sb16 8 1
QMV4(half_r4_u2_sb16, 4, 2, 64, true)
// CANDIDATE half_r2_u2_sb16 4 1
QMV4(half_r2_u2_sb16, 2, 2, 64, true)
// CANDIDATE warp_r2_u4_sb16 8 1
QMV4(warp_r2_u4_sb16, 2, 4, 32, true)
// CANDIDATE warp_r1_u4_sb16 4 1
QMV4(warp_r1_u4_sb16, 1, 4, 32, true)
// CANDIDATE warp_r4_u4_sb16 16 1
QMV4(warp_r4_u4_sb16, 4, 4, 32, true)
// CANDIDATE warp_r2_u8_sb16 8 1
QMV4(warp_r2_u8_sb16, 2, 8, 32, true)
// CANDIDATE blk_r4_u1_sb16_st 4 1
QMV4S(blk_r4_u1_sb16_st, 4, 1, 128, true)
// CANDIDATE warp_r2_u4_sb16_st 8 1
QMV4S(warp_r2_u4_sb16_st, 2, 4, 32, true)
// CANDIDATE half_r2_u2_sb16_st 4 1
QMV4S(half_r2_u2_sb16_st, 2, 2, 64, true)

// The add + norm with codes, its values kept in registers (4 a thread, d = 4 * blockDim.x)
// and the normalised row handed to the coding threads through shared memory; the same
// arithmetic and order as lmx's add_rms_norm (vec path), so outputs and codes are equal.
extern "C" __global__ void norm_regs(const unsigned short* x, const unsigned short* h, const unsigned short* w,
                                     unsigned short* sum, unsigned short* out, int d, float eps, int* codes, int gs, int bits) {
    __shared__ float red[32];
    __shared__ float row[4096];
    int i = 4 * threadIdx.x;
    float v[4], hv[4], wv[4];
    ld4(x, i, v);
    ld4(h, i, hv);
    ld4(w, i, wv);
    float ss = 0.f;
    for (int k = 0; k < 4; k++) { v[k] = rnd(v[k] + hv[k], out); ss += v[k] * v[k]; }
    st4(sum, i, v);
    float r = rsqrtf(block_sum(ss, red) / d + eps);
    for (int k = 0; k < 4; k++) v[k] = rnd(rnd(v[k] * r, out) * wv[k], out);
    st4(out, i, v);
    for (int k = 0; k < 4; k++) row[i + k] = v[k];
    __syncthreads();
    int chunks = d / 8;
    for (int base = 0; base < chunks; base += blockDim.x) {
        int c = base + threadIdx.x;
        bool live = c < chunks;
        float cv[8];
        for (int k = 0; k < 8; k++) cv[k] = live ? row[c * 8 + k] : 0.f;
        code8(cv, codes, d, gs, bits, live ? c * 8 : 0, live);
    }
}
// NORM norm_regs 1024

// lmx's integer kernel (4-bit, one row of activations, R rows a block of 128 threads) with its
// weight loads double-buffered: the next round's words and pairs are loaded before the current
// round's sums, so a looping shape (down: 14336 columns, 3.5 rounds) keeps every load in flight
// whatever ptxas schedules. With bf16 pairs ptxas gave lmx's loop 80 registers and issued only 5
// of a round's 8 wide loads before the sums (down 17.6 vs 12.8 us with f32 pairs).
template <int R, bool SB16>
__device__ void qmv4db(const uint4* __restrict__ w, const void* __restrict__ sb, const int* __restrict__ act,
                       unsigned short* __restrict__ y, int rows, int cols, int gs) {
    __shared__ float red[4][R];
    const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
    const int r0 = blockIdx.x * R;
    const int units = cols / 32, groups = cols / gs;
    const float* fl = (const float*)(act + cols / 2);
    const uint4* wr[R];
    size_t sr[R];
    for (int j = 0; j < R; j++) {
        int r = min(r0 + j, rows - 1);
        wr[j] = w + (size_t)r * units;
        sr[j] = (size_t)r * groups;
    }
    float acc[R];
    uint4 wv[R];
    float2 p[R];
    for (int j = 0; j < R; j++) acc[j] = 0.f;
    if (tid < units)
        for (int j = 0; j < R; j++) { wv[j] = __ldg(wr[j] + tid); p[j] = scale_bias<SB16>(sb, sr[j] + tid * 32 / gs); }
    for (int u = tid; u < units; u += 128) {
        uint4 cw[R];
        float2 cp[R];
        for (int j = 0; j < R; j++) { cw[j] = wv[j]; cp[j] = p[j]; }
        const int un = u + 128;
        if (un < units)
            for (int j = 0; j < R; j++) { wv[j] = __ldg(wr[j] + un); p[j] = scale_bias<SB16>(sb, sr[j] + un * 32 / gs); }
        const int e0 = u * 32, g = e0 / gs;
        int c[8], f[8];
        const int4* ca = (const int4*)(act + e0 / 4);
        const int4* fa = (const int4*)(act + cols / 4 + e0 / 4);
        for (int q = 0; q < 2; q++) {
            int4 cv = __ldg(ca + q), fv = __ldg(fa + q);
            c[4 * q] = cv.x; c[4 * q + 1] = cv.y; c[4 * q + 2] = cv.z; c[4 * q + 3] = cv.w;
            f[4 * q] = fv.x; f[4 * q + 1] = fv.y; f[4 * q + 2] = fv.z; f[4 * q + 3] = fv.w;
        }
        const float dx = __ldg(fl + g), xs = e0 % gs == 0 ? __ldg(fl + groups + g) : 0.f;
        for (int j = 0; j < R; j++) {
            int ic = 0, ifn = 0;
            step_sums<4>(cw[j], c, f, ic, ifn);
            float isum = (float)ic + (float)ifn * (1.f / 254.f);
            acc[j] += cp[j].x * dx * isum + cp[j].y * xs;
        }
    }
    for (int j = 0; j < R; j++) {
        float v = acc[j];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[wid][j] = v;
    }
    __syncthreads();
    if (tid < R && r0 + tid < rows) store(y, (size_t)r0 + tid, red[0][tid] + red[1][tid] + red[2][tid] + red[3][tid]);
}

#define QMV4DB(name, R, SB16) extern "C" __global__ void name(const uint4* w, const void* sb, const int* act, unsigned short* y, int rows, int cols, int gs) { qmv4db<R, SB16>(w, sb, act, y, rows, cols, gs); }

// CANDIDATE db_r4 4 0
QMV4DB(db_r4, 4, false)
// CANDIDATE db_r4_sb16 4 1
QMV4DB(db_r4_sb16, 4, true)
