// Candidates for lmx's flash attention (crates/lmx-core/src/cuda_fused.rs, FLASH_SRC), timed
// beside it by scripts/cuda/flash_bench.py. Compiled after FLASH_SRC, whose helpers (pack2,
// ex2, mma16816, ldsm4, ldsm4t, cp16, NEG) they use.
//
// flash_r32: 32 query rows a warp (two m16 tiles), 128 queries a block of 4 warps, key/value
// tiles of 32 positions. Each key or value fragment read from shared memory (ldmatrix) feeds
// two mma instead of one, so a tile's shared-memory reads per mma halve (FlashAttention-2's
// layout for head size 128); the queries stay in registers.
template <int D>
__device__ void flash_r32(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out,
                          int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap,
                          long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2,
                          long long vs0, long long vs1, long long vs2) {
    const int BR = 128, BC = 32, LD = D + 8, MT = 2;
    const float LOG2E = 1.4426950408889634f;
    __shared__ __align__(16) unsigned short kt[BC * LD];
    __shared__ __align__(16) unsigned short vt[BC * LD];
    int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, kvh = h / (n_heads / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int q0 = qb * BR + warp * 32;
    const unsigned short* qp = q + b * qs0 + h * qs1;
    const unsigned short* kp = k + b * ks0 + kvh * ks1;
    const unsigned short* vp = v + b * vs0 + kvh * vs1;
    unsigned qa[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int s = 0; s < D / 16; s++) {
            int r0 = q0 + mt * 16 + g, r1 = r0 + 8, c = s * 16 + t * 2;
            qa[mt][s][0] = r0 < q_len ? *(const unsigned*)(qp + r0 * qs2 + c) : 0u;
            qa[mt][s][1] = r1 < q_len ? *(const unsigned*)(qp + r1 * qs2 + c) : 0u;
            qa[mt][s][2] = r0 < q_len ? *(const unsigned*)(qp + r0 * qs2 + c + 8) : 0u;
            qa[mt][s][3] = r1 < q_len ? *(const unsigned*)(qp + r1 * qs2 + c + 8) : 0u;
        }
    float acc[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < D / 8; n++) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = NEG, l[mt][0] = l[mt][1] = 0.f;
    int first = qb * BR, last = min(q_len, first + BR) - 1;
    int hi = min(kv_len, offset + last + 1);
    int lo = window > 0 ? max(0, offset + first + 1 - window) : 0;
    // This warp's own last key: tiles past it are skipped (they would be all masked).
    int warp_hi = min(hi, offset + min(q_len, q0 + 32));
    float sl2 = scale * LOG2E;
    auto stage = [&](unsigned short* dst, const unsigned short* src, long long stride, int k0) {
#pragma unroll
        for (int c = threadIdx.x; c < BC * D / 8; c += 128) {
            int r = c / (D / 8), col = (c % (D / 8)) * 8;
            bool in = k0 + r < kv_len;
            cp16(&dst[r * LD + col], src + (in ? k0 + r : 0) * stride + col, in ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    int k0 = (lo / BC) * BC;
    stage(kt, kp, ks2, k0);
    stage(vt, vp, vs2, k0);
    for (; k0 < hi; k0 += BC) {
        bool more = k0 + BC < hi;
        bool live = k0 < warp_hi;
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
        float s[MT][BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < BC / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
        if (live) {
#pragma unroll
            for (int ds = 0; ds < D / 16; ds++) {
#pragma unroll
                for (int n = 0; n < BC / 8; n += 2) {
                    unsigned f[4];
                    ldsm4(f, &kt[(n * 8 + (lane % 8) + (lane / 16) * 8) * LD + ds * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(s[mt][n], qa[mt][ds], f[0], f[1]);
                        mma16816(s[mt][n + 1], qa[mt][ds], f[2], f[3]);
                    }
                }
            }
        }
        __syncthreads();
        if (more) stage(kt, kp, ks2, k0 + BC);
        else asm volatile("cp.async.commit_group;\n" ::);
        if (live) {
            float mul = sl2;
            if (softcap > 0.f) {
                mul = 1.f;
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int n = 0; n < BC / 8; n++)
#pragma unroll
                        for (int e = 0; e < 4; e++) s[mt][n][e] = softcap * tanhf(s[mt][n][e] * scale / softcap) * LOG2E;
            }
            if (k0 + BC > offset + q0 + 1 || k0 + BC > kv_len || (window > 0 && k0 < offset + q0 + 32 - window)) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int n = 0; n < BC / 8; n++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int key = k0 + n * 8 + t * 2 + (e & 1), pos = offset + q0 + mt * 16 + g + 8 * (e >> 1);
                            if (key > pos || key >= kv_len || (window > 0 && key <= pos - window)) s[mt][n][e] = NEG;
                        }
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    float mx = NEG;
#pragma unroll
                    for (int n = 0; n < BC / 8; n++) mx = fmaxf(mx, fmaxf(s[mt][n][2 * i], s[mt][n][2 * i + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float mn = fmaxf(m[mt][i], mx * mul);
                    float base = mn == NEG ? 0.f : mn;
                    float alpha = ex2(m[mt][i] - base);
                    m[mt][i] = mn;
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            float p = ex2(fmaf(s[mt][n][2 * i + e], mul, -base));
                            s[mt][n][2 * i + e] = p;
                            sum += p;
                        }
                    }
                    l[mt][i] = l[mt][i] * alpha + sum;
#pragma unroll
                    for (int n = 0; n < D / 8; n++) { acc[mt][n][2 * i] *= alpha; acc[mt][n][2 * i + 1] *= alpha; }
                }
        }
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        __syncthreads();
        if (live) {
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
                unsigned pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int n = 0; n < D / 8; n += 2) {
                    unsigned f[4];
                    int mi = lane / 8;
                    ldsm4t(f, &vt[(kk * 16 + (lane % 8) + (mi % 2) * 8) * LD + n * 8 + (mi / 2) * 8]);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(acc[mt][n], pa[mt], f[0], f[1]);
                        mma16816(acc[mt][n + 1], pa[mt], f[2], f[3]);
                    }
                }
            }
        }
        __syncthreads();
        if (more) stage(vt, vp, vs2, k0 + BC);
        else asm volatile("cp.async.commit_group;\n" ::);
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float tot = l[mt][i];
            tot += __shfl_xor_sync(0xffffffffu, tot, 1);
            tot += __shfl_xor_sync(0xffffffffu, tot, 2);
            float inv = tot > 0.f ? 1.f / tot : 0.f;
            int r = q0 + mt * 16 + g + 8 * i;
            if (r >= q_len) continue;
            unsigned short* o = out + (((long long)b * q_len + r) * n_heads + h) * D;
#pragma unroll
            for (int n = 0; n < D / 8; n++) *(unsigned*)(o + n * 8 + t * 2) = pack2(acc[mt][n][2 * i] * inv, acc[mt][n][2 * i + 1] * inv);
        }
}

#define FLASH_R32(D) \
extern "C" __global__ void __launch_bounds__(128) cand_flash_r32_##D(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out, int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap, long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2) { flash_r32<D>(q, k, v, out, n_heads, n_kv, q_len, kv_len, offset, window, scale, softcap, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2); } \
extern "C" __global__ void __launch_bounds__(128, 2) cand_flash_r32_##D##_b2(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out, int n_heads, int n_kv, int q_len, int kv_len, int offset, int window, float scale, float softcap, long long qs0, long long qs1, long long qs2, long long ks0, long long ks1, long long ks2, long long vs0, long long vs1, long long vs2) { flash_r32<D>(q, k, v, out, n_heads, n_kv, q_len, kv_len, offset, window, scale, softcap, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2); }
FLASH_R32(64)
FLASH_R32(128)

