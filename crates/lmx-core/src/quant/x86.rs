//! AVX2/FMA and AVX-512 versions of the CPU kernels (callers check the CPU features).

use std::arch::x86_64::*;

use super::kernels::GEMM_MR;

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// 8 codes of a 4- or 8-bit row starting at element `e` (a multiple of 8), as f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes(row: &[u32], e: usize, bits: usize) -> __m256 {
    if bits == 4 {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(row[e / 8] as i32), shifts), _mm256_set1_epi32(0xF));
        _mm256_cvtepi32_ps(q)
    } else {
        let bytes = row[e / 4..e / 4 + 2].as_ptr() as *const u8;
        // SAFETY: the two words just bounds-checked hold the 8 bytes read.
        let raw = unsafe { _mm_loadl_epi64(bytes as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(raw))
    }
}

/// Dequantizes a 4- or 8-bit group: out = scale * q + bias.
///
/// # Safety
/// AVX2 and FMA must be available; `start` and `out.len()` are multiples of 8 and the
/// group lies inside `row`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequantize_group(row: &[u32], start: usize, bits: usize, scale: f32, bias: f32, out: &mut [f32]) {
    let (s, b) = (_mm256_set1_ps(scale), _mm256_set1_ps(bias));
    for (c, o) in out.chunks_exact_mut(8).enumerate() {
        // SAFETY: features checked by the caller; `o` holds 8 floats.
        unsafe {
            let q = codes(row, start + 8 * c, bits);
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_fmadd_ps(q, s, b));
        }
    }
}

/// How a run of packed codes meets its two levels of int8 activations ([`Q8Act`]'s codes
/// and fine codes): i32 partial sums in 8 lanes per level, lane `u` holding elements
/// 8u..8u + 8 of the run (so a 64-element 4-bit run keeps its first 32 elements in lanes
/// 0-3). The codes are unpacked once for both levels.
///
/// [`Q8Act`]: super::kernels::Q8Act
pub(super) trait Dot {
    /// Whether [`Dot::dot8`] multiplies codes minus 128 (the caller adds 128 * sum of the
    /// activation codes back).
    const OFFSET8: bool;
    /// `acc` plus the products of 64 4-bit codes (32 bytes `w`: low nibbles the even
    /// elements, high nibbles the odd) with each level's activations `xe` (even) and `xo`
    /// (odd).
    unsafe fn dot4(acc: [__m256i; 2], w: __m256i, xe: [__m256i; 2], xo: [__m256i; 2]) -> [__m256i; 2];
    /// `acc` plus the products of 32 8-bit codes with each level's 32 activations.
    unsafe fn dot8(acc: [__m256i; 2], w: __m256i, x: [__m256i; 2]) -> [__m256i; 2];
}

/// AVX2: unsigned-by-signed byte multiply-adds to i16 pairs, then to i32.
pub(super) struct Avx2;

impl Dot for Avx2 {
    const OFFSET8: bool = true;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot4(acc: [__m256i; 2], w: __m256i, xe: [__m256i; 2], xo: [__m256i; 2]) -> [__m256i; 2] {
        let mask = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(w, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
        std::array::from_fn(|l| {
            // Each i16 lane is at most 2 * 2 * 15 * 127 = 7620: no saturation.
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[l]), _mm256_maddubs_epi16(hi, xo[l]));
            _mm256_add_epi32(acc[l], _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        })
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot8(acc: [__m256i; 2], w: __m256i, x: [__m256i; 2]) -> [__m256i; 2] {
        // Codes 0..=255 times int8 would saturate the i16 pairs; codes - 128 fit in an i8,
        // and |c| * sign(x, c) keeps each pair within 2 * 128 * 127 = 32512.
        let c = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let a = _mm256_abs_epi8(c);
        std::array::from_fn(|l| {
            let p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(x[l], c));
            _mm256_add_epi32(acc[l], _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        })
    }
}

/// AVX-512 VNNI on 256-bit registers: `vpdpbusd` multiplies unsigned by signed bytes and
/// accumulates in i32 directly (Zen 4+, Ice Lake+).
pub(super) struct Vnni;

impl Dot for Vnni {
    const OFFSET8: bool = false;

    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot4(acc: [__m256i; 2], w: __m256i, xe: [__m256i; 2], xo: [__m256i; 2]) -> [__m256i; 2] {
        let mask = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(w, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
        [_mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[0], lo, xe[0]), hi, xo[0]), _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[1], lo, xe[1]), hi, xo[1])]
    }

    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot8(acc: [__m256i; 2], w: __m256i, x: [__m256i; 2]) -> [__m256i; 2] {
        [_mm256_dpbusd_epi32(acc[0], w, x[0]), _mm256_dpbusd_epi32(acc[1], w, x[1])]
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// 8 f32 values.
///
/// # Safety
/// AVX2 must be available; 8 values readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load8_f32(p: *const f32) -> __m256 {
    // SAFETY: forwarded from the caller.
    unsafe { _mm256_loadu_ps(p) }
}

/// 8 bf16 values widened to f32 (a bf16 is the top half of an f32).
///
/// # Safety
/// AVX2 must be available; 8 values readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load8_bf16(p: *const u16) -> __m256 {
    // SAFETY: forwarded from the caller.
    let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
}

/// 8 f16 values widened to f32.
///
/// # Safety
/// AVX2 and F16C must be available; 8 values readable at `p`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn load8_f16(p: *const u16) -> __m256 {
    // SAFETY: forwarded from the caller.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// The f32 values of `p`'s first 16 kept by `keep` (the others zero, not read).
///
/// # Safety
/// AVX-512F must be available; the kept values are readable.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn load16_f32(p: *const f32, keep: __mmask16) -> __m512 {
    // SAFETY: forwarded from the caller.
    unsafe { _mm512_maskz_loadu_ps(keep, p) }
}

/// [`load16_f32`] for bf16 values, widened.
///
/// # Safety
/// AVX-512F/BW/VL must be available; the kept values are readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn load16_bf16(p: *const u16, keep: __mmask16) -> __m512 {
    // SAFETY: forwarded from the caller.
    let raw = unsafe { _mm256_maskz_loadu_epi16(keep, p as *const i16) };
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
}

/// [`load16_f32`] for f16 values, widened.
///
/// # Safety
/// AVX-512F/BW/VL must be available; the kept values are readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn load16_f16(p: *const u16, keep: __mmask16) -> __m512 {
    // SAFETY: forwarded from the caller.
    _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(keep, p as *const i16) })
}

/// The integer sums of 8 groups, one group per vector (all 8 lanes), as one vector with
/// group j in lane j.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_lanes(h: [__m256i; 4]) -> __m256i {
    // hadd(hadd(a0, a1), hadd(a2, a3)) = [a0..a3 low-half sums | a0..a3 high-half sums].
    let t0 = _mm256_hadd_epi32(h[0], h[1]);
    let t1 = _mm256_hadd_epi32(h[2], h[3]);
    _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31))
}

/// `acc` plus the 64-element 4-bit run starting at element `e` of packed codes `w` and both
/// levels of activation codes `x`.
///
/// # Safety
/// As [`Dot::dot4`]; the run lies inside all three.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn run4<D: Dot>(acc: [__m256i; 2], w: *const u8, x: [*const u8; 2], e: usize) -> [__m256i; 2] {
    // SAFETY: forwarded from the caller.
    unsafe { D::dot4(acc, load(w.add(e / 2)), [load(x[0].add(e)), load(x[1].add(e))], [load(x[0].add(e + 32)), load(x[1].add(e + 32))]) }
}

/// The integer sums of group `g` (in 8 lanes) for both levels, for 4- or 8-bit codes.
///
/// # Safety
/// As [`Dot`]; the group lies inside `w` and both `x`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn group<D: Dot, const BITS: usize, const GS: usize>(w: *const u8, x: [*const u8; 2], g: usize) -> [__m256i; 2] {
    let mut a = [_mm256_setzero_si256(); 2];
    let start = g * GS;
    // SAFETY: forwarded from the caller.
    unsafe {
        if BITS == 4 {
            for k in 0..GS / 64 {
                a = run4::<D>(a, w, x, start + 64 * k);
            }
        } else {
            for k in 0..GS / 32 {
                let e = start + 32 * k;
                a = D::dot8(a, load(w.add(e)), [load(x[0].add(e)), load(x[1].add(e))]);
            }
        }
    }
    a
}

/// The integer sums of groups g0..g0 + n (n <= 8) of one row's codes `w` against both
/// levels of activation codes `x` (whose group sums are `sums`), group j in lane j.
///
/// # Safety
/// As [`rows_q8`] (whose features it takes by being inlined there: compiled on its own it
/// would call `D`'s kernels instead of inlining them): the groups lie inside `w` and `x`;
/// `sums` are padded to 8 groups.
#[inline(always)]
unsafe fn sums8<D: Dot, const BITS: usize, const GS: usize>(w: *const u8, x: [*const u8; 2], sums: [&[i32]; 2], g0: usize, n: usize) -> [__m256i; 2] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let zero = _mm256_setzero_si256();
        let isum: [__m256i; 2] = if BITS == 4 && GS == 32 {
            // A 64-element run holds groups 2k (lanes 0-3) and 2k + 1 (lanes 4-7).
            let mut v = [[zero; 2]; 4];
            for (k, vk) in v.iter_mut().enumerate().take(n / 2) {
                *vk = run4::<D>([zero; 2], w, x, (g0 + 2 * k) * 32);
            }
            std::array::from_fn(|l| {
                let t = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0][l], v[1][l]), _mm256_hadd_epi32(v[2][l], v[3][l]));
                // Lanes hold groups [0, 2, 4, 6 | 1, 3, 5, 7].
                _mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
            })
        } else {
            let mut h = [[zero; 2]; 4];
            for (p, hp) in h.iter_mut().enumerate().take(n.div_ceil(2)) {
                let j = g0 + 2 * p;
                let second = if 2 * p + 1 < n { group::<D, BITS, GS>(w, x, j + 1) } else { [zero; 2] };
                let first = group::<D, BITS, GS>(w, x, j);
                *hp = [_mm256_hadd_epi32(first[0], second[0]), _mm256_hadd_epi32(first[1], second[1])];
            }
            std::array::from_fn(|l| sum_lanes([h[0][l], h[1][l], h[2][l], h[3][l]]))
        };
        if BITS == 8 && D::OFFSET8 {
            std::array::from_fn(|l| _mm256_add_epi32(isum[l], _mm256_slli_epi32(load(sums[l].as_ptr().add(g0) as *const u8), 7)))
        } else {
            isum
        }
    }
}

/// An 8-group step of a row from group `g0` of `groups`: how many groups it holds, a mask of
/// their lanes, and the activations' per-group scales and sums.
///
/// # Safety
/// AVX2 must be available; `act`'s per-group arrays are padded to a multiple of 8 groups.
#[inline(always)]
unsafe fn step(act: &super::kernels::Q8Act, groups: usize, g0: usize) -> (usize, __m256, __m256, __m256) {
    let n = (groups - g0).min(8);
    // SAFETY: AVX2 is available (the caller's contract); g0 + 8 is within the padded arrays.
    unsafe {
        let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        (n, keep, _mm256_loadu_ps(act.dx.as_ptr().add(g0)), _mm256_loadu_ps(act.xsums.as_ptr().add(g0)))
    }
}

/// The scales and biases of groups `at..at + n` (n <= 8) as f32 lanes, lanes from n on zero:
/// 8 loaded at once where the arrays hold them (lanes past the row's groups hold the next
/// row's values, dropped by `keep`), the matrix's last groups copied.
///
/// # Safety
/// AVX2 and F16C must be available; groups `at..at + n` lie inside `s` and `b`.
#[inline(always)]
unsafe fn step_params<S: super::Scale>(s: &[S], b: &[S], at: usize, n: usize, keep: __m256) -> (__m256, __m256) {
    // SAFETY: forwarded from the caller; the 8-wide loads are taken only where 8 values exist.
    unsafe {
        if s.len() >= at + 8 && b.len() >= at + 8 {
            (_mm256_and_ps(S::load8(s.as_ptr().add(at)), keep), _mm256_and_ps(S::load8(b.as_ptr().add(at)), keep))
        } else {
            let (mut sc, mut bc) = ([0f32; 8], [0f32; 8]);
            for j in 0..n {
                sc[j] = s[at + j].f32();
                bc[j] = b[at + j].f32();
            }
            (_mm256_loadu_ps(sc.as_ptr()), _mm256_loadu_ps(bc.as_ptr()))
        }
    }
}

/// Outputs of `R` consecutive 4- or 8-bit rows against int8 activations: per row, sum over
/// groups of scale * dx * (codes . activation codes) + bias * sum(x), 8 groups per step with
/// the groups' integer sums gathered into one vector. Several rows per call share the
/// activation scales and sums, the lane mask and the final reduction.
///
/// # Safety
/// AVX2, FMA and F16C (and what `D` needs) must be available; `rows` holds `R` rows of
/// `act.codes.len()` codes each; `s` and `b` start at the first row's first group and may run
/// on to the end of the matrix's scales and biases (8 are read at a time where they are
/// there, and lanes past a row's groups are dropped); for 4 bits the row length is a
/// multiple of 64.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8<S: super::Scale, D: Dot, const BITS: usize, const GS: usize, const R: usize>(rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    let cols = act.codes.len();
    let x = [act.codes.as_ptr() as *const u8, act.fine.as_ptr() as *const u8];
    let groups = cols / GS;
    let row_bytes = cols * BITS / 8;
    let mut acc = [_mm256_setzero_ps(); R];
    // SAFETY (whole body): every run read lies inside its row and the activation codes
    // (group g covers elements g * GS.. of both); the per-group arrays of `act` are padded
    // to a multiple of 8 groups; the caller guarantees `rows` holds R rows.
    unsafe {
        for g0 in (0..groups).step_by(8) {
            let (n, keep, dx, xsums) = step(act, groups, g0);
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = (rows.as_ptr() as *const u8).add(r * row_bytes);
                let [coarse, fine] = sums8::<D, BITS, GS>(w, x, [&act.code_sums, &act.fine_sums], g0, n);
                let isum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fine), _mm256_set1_ps(1.0 / super::kernels::FINE), _mm256_cvtepi32_ps(coarse));
                let (sc, bc) = step_params(s, b, r * groups + g0, n, keep);
                let f = _mm256_mul_ps(isum, dx);
                *acc = _mm256_fmadd_ps(bc, xsums, _mm256_fmadd_ps(f, sc, *acc));
            }
        }
    }
    if R == 4 {
        // hadd(hadd(a0, a1), hadd(a2, a3)) = [a0..a3 low-half sums | a0..a3 high-half sums].
        let t = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        let sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        // SAFETY: out holds R = 4 floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    } else {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
    }
}

/// [`rows_q8`] for AVX2 without VNNI, one row at a time: each group's two integer sums (8
/// lanes each, or for 4-bit groups of 32 one group a 128-bit half) go to float and into the
/// row's f32 lanes at once, scaled by the group's `scale * dx`, instead of being gathered 8
/// groups to a vector by horizontal adds. Without VNNI a group's integer work is twice the
/// multiply-adds, and the gathering's chain of dependent `vphaddd`s, conversions and FMAs
/// per 8 groups measured slower on a Zen 3 core (no AVX-512): 1536 x 576 4-bit g64 from L2
/// ran at 11.1 GB/s that way, about 80 cycles per 512 weights where its ~130 instructions
/// issue in ~35 (two multiply pipes). This way `kernel_speed`'s shapes average ~15% more
/// (noisy: 6-16 GB/s either way) and SmolLM2 4-bit decodes ~19% faster on one thread
/// (docs/BENCHMARKS.md, session 43); `LMX_AVX2_FLAT=0` runs the gathered kernel. The same
/// sums and terms as [`rows_q8`], added in another order.
///
/// # Safety
/// As [`rows_q8`], with AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_flat<S: super::Scale, const BITS: usize, const GS: usize>(rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    let cols = act.codes.len();
    let x = [act.codes.as_ptr() as *const u8, act.fine.as_ptr() as *const u8];
    let groups = cols / GS;
    let row_bytes = cols * BITS / 8;
    let inv_fine = _mm256_set1_ps(1.0 / super::kernels::FINE);
    // SAFETY (whole body): every run read lies inside its row and the activation codes (group
    // g covers elements g * GS.. of both); the per-group arrays of `act` are padded to a
    // multiple of 8 groups; the caller guarantees `rows` holds out.len() rows.
    unsafe {
        for (r, o) in out.iter_mut().enumerate() {
            let w = (rows.as_ptr() as *const u8).add(r * row_bytes);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut terms = _mm256_setzero_ps();
            for g0 in (0..groups).step_by(8) {
                let (n, keep, dx, xsums) = step(act, groups, g0);
                let (sc, bc) = step_params(s, b, r * groups + g0, n, keep);
                let sd = _mm256_mul_ps(sc, dx);
                // bias * sum(x); for 8 bits also the 128 * sum(codes) the kernel left out (it
                // multiplies codes minus 128).
                terms = _mm256_fmadd_ps(bc, xsums, terms);
                if BITS == 8 {
                    let sums = |v: &[i32]| _mm256_cvtepi32_ps(load(v.as_ptr().add(g0) as *const u8));
                    let codes = _mm256_fmadd_ps(sums(&act.fine_sums), inv_fine, sums(&act.code_sums));
                    terms = _mm256_fmadd_ps(_mm256_mul_ps(sd, _mm256_set1_ps(128.0)), codes, terms);
                }
                // A group's scale in all 8 lanes (4-bit g32: a pair's, one in each half), by
                // an index vector that steps along the groups.
                if BITS == 4 && GS == 32 {
                    let mut at = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
                    for k in 0..n / 2 {
                        let [c, f] = run4::<Avx2>([_mm256_setzero_si256(); 2], w, x, (g0 + 2 * k) * 32);
                        let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(f), inv_fine, _mm256_cvtepi32_ps(c));
                        acc[k & 1] = _mm256_fmadd_ps(v, _mm256_permutevar8x32_ps(sd, at), acc[k & 1]);
                        at = _mm256_add_epi32(at, _mm256_set1_epi32(2));
                    }
                } else {
                    let mut at = _mm256_setzero_si256();
                    for j in 0..n {
                        let [c, f] = group::<Avx2, BITS, GS>(w, x, g0 + j);
                        let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(f), inv_fine, _mm256_cvtepi32_ps(c));
                        acc[j & 1] = _mm256_fmadd_ps(v, _mm256_permutevar8x32_ps(sd, at), acc[j & 1]);
                        at = _mm256_add_epi32(at, _mm256_set1_epi32(1));
                    }
                }
            }
            *o = hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(terms);
        }
    }
}

/// Rows of at most this many bytes go 4 at a time through [`rows_q8`]: 4 short rows are
/// one short contiguous run, while 4 long rows are 4 streams a row apart, which measured
/// half the bandwidth of one (16384 x 8192 4-bit: 13 vs 27 GB/s from memory, Zen 5).
const SHORT_ROW_BYTES: usize = 512;

/// [`rows_q8`] compiled for each bit width and group size (loops of known length unroll),
/// short rows 4 at a time.
macro_rules! specialized {
    ($d:ty, $rows:expr, $bits:expr, $gs:expr, $s:expr, $b:expr, $act:expr, $out:expr) => {{
        let words = $act.codes.len() * $bits / 32;
        let groups = $act.codes.len() / $gs;
        let step = if words * 4 <= SHORT_ROW_BYTES { 4 } else { 1 };
        let mut r = 0;
        while r < $out.len() {
            let n = if $out.len() - r >= step { step } else { 1 };
            let (rows, s, b, out) = (&$rows[r * words..], &$s[r * groups..], &$b[r * groups..], &mut $out[r..r + n]);
            match ($bits, $gs, n) {
                (4, 32, 4) => rows_q8::<S, $d, 4, 32, 4>(rows, s, b, $act, out),
                (4, 64, 4) => rows_q8::<S, $d, 4, 64, 4>(rows, s, b, $act, out),
                (4, 128, 4) => rows_q8::<S, $d, 4, 128, 4>(rows, s, b, $act, out),
                (8, 32, 4) => rows_q8::<S, $d, 8, 32, 4>(rows, s, b, $act, out),
                (8, 64, 4) => rows_q8::<S, $d, 8, 64, 4>(rows, s, b, $act, out),
                (8, 128, 4) => rows_q8::<S, $d, 8, 128, 4>(rows, s, b, $act, out),
                (4, 32, _) => rows_q8::<S, $d, 4, 32, 1>(rows, s, b, $act, out),
                (4, 64, _) => rows_q8::<S, $d, 4, 64, 1>(rows, s, b, $act, out),
                (4, 128, _) => rows_q8::<S, $d, 4, 128, 1>(rows, s, b, $act, out),
                (8, 32, _) => rows_q8::<S, $d, 8, 32, 1>(rows, s, b, $act, out),
                (8, 64, _) => rows_q8::<S, $d, 8, 64, 1>(rows, s, b, $act, out),
                (8, 128, _) => rows_q8::<S, $d, 8, 128, 1>(rows, s, b, $act, out),
                _ => unreachable!("Q8Act::new admits 4 and 8 bits, groups of 32, 64 and 128"),
            }
            r += n;
        }
    }};
}

/// `LMX_AVX2_FLAT=0`: the AVX2 decode kernel gathers 8 groups' sums per step ([`rows_q8`])
/// rather than adding each group's ([`rows_q8_flat`]), to compare them.
fn avx2_gathered() -> bool {
    static GATHERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GATHERED.get_or_init(|| std::env::var("LMX_AVX2_FLAT").is_ok_and(|v| v == "0"))
}

/// `out.len()` consecutive outputs with AVX2 byte multiply-adds ([`rows_q8_flat`]).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` holds `out.len()` rows; otherwise as
/// [`rows_q8`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_q8_avx2<S: super::Scale>(rows: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    if avx2_gathered() {
        // SAFETY: forwarded from the caller.
        unsafe { specialized!(Avx2, rows, bits, group_size, s, b, act, out) };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match (bits, group_size) {
            (4, 32) => rows_q8_flat::<S, 4, 32>(rows, s, b, act, out),
            (4, 64) => rows_q8_flat::<S, 4, 64>(rows, s, b, act, out),
            (4, 128) => rows_q8_flat::<S, 4, 128>(rows, s, b, act, out),
            (8, 32) => rows_q8_flat::<S, 8, 32>(rows, s, b, act, out),
            (8, 64) => rows_q8_flat::<S, 8, 64>(rows, s, b, act, out),
            (8, 128) => rows_q8_flat::<S, 8, 128>(rows, s, b, act, out),
            _ => unreachable!("Q8Act::new admits 4 and 8 bits, groups of 32, 64 and 128"),
        }
    }
}

/// `out.len()` consecutive outputs with AVX-512 VNNI (`vpdpbusd` on 256-bit registers).
///
/// # Safety
/// AVX2, FMA, F16C, AVX-512F, AVX-512VL and AVX-512 VNNI must be available; `rows` holds
/// `out.len()` rows; otherwise as [`rows_q8`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn rows_q8_vnni<S: super::Scale>(rows: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { specialized!(Vnni, rows, bits, group_size, s, b, act, out) }
}

/// For each step `k` of an 8-group step of codes (4 bits: 128 elements, at most 8 of them, a
/// 64-byte load holding runs A (bytes 0-31, lanes 0-7) and B (lanes 8-15), lane u covering
/// elements 8(u % 8).. of its run; 8 bits: 64 elements, at most 16, lane u covering 4u..4u +
/// 4), the step-relative group of each lane of its product.
const fn lane_groups<const BITS: usize, const GS: usize>() -> [[i32; 16]; 16] {
    let mut t = [[0i32; 16]; 16];
    let mut k = 0;
    while k < 16 {
        let mut u = 0;
        while u < 16 {
            let e = if BITS == 4 { 128 * k + 64 * (u / 8) + 8 * (u % 8) } else { 64 * k + 4 * u };
            t[k][u] = (e / GS) as i32;
            u += 1;
        }
        k += 1;
    }
    t
}

/// 64 bytes of 8-bit codes at element `e` of a row (`half`: 32, the rest zero).
///
/// # Safety
/// AVX-512F must be available; the bytes lie inside the row.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn run_bytes(w: *const u8, e: usize, half: bool) -> __m512i {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            _mm512_zextsi256_si512(_mm256_loadu_si256(w.add(e) as *const __m256i))
        } else {
            _mm512_loadu_si512(w.add(e) as *const _)
        }
    }
}

/// 64 activation codes at element `e` (`half`: 32, the rest zero).
///
/// # Safety
/// AVX-512F must be available; the codes lie inside the activations.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn act_bytes(x: *const u8, e: usize, half: bool) -> __m512i {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            _mm512_zextsi256_si512(_mm256_loadu_si256(x.add(e) as *const __m256i))
        } else {
            _mm512_loadu_si512(x.add(e) as *const _)
        }
    }
}

/// For [`narrow_bytes`] of `BITS`-bit codes: the byte of the load each byte of the result
/// takes (qword j gets bytes BITS * j.., which hold elements 8j..8j + 8), and the bit within
/// its qword where each element starts.
const fn narrow_tables<const BITS: usize>() -> [[u8; 64]; 2] {
    let mut t = [[0u8; 64]; 2];
    let mut k = 0;
    while k < 64 {
        let (j, p) = (k / 8, k % 8);
        let from = BITS * j + p;
        t[0][k] = if from < 64 { from as u8 } else { 63 };
        t[1][k] = (p * BITS) as u8;
        k += 1;
    }
    t
}

/// 64 codes of `BITS` bits (fewer than 8) at element `e` (a multiple of 32) of a row's
/// bitstream `w`, one a byte (`half`: 32, the rest zero): a masked load of the 8 * BITS bytes
/// (never past them), `vpermb` spreading each 8 elements' BITS bytes to a qword, and
/// `vpmultishiftqb` taking each element's bits to its byte.
///
/// # Safety
/// AVX-512F/BW and VBMI must be available; the codes lie inside the row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn narrow_bytes<const BITS: usize>(w: *const u8, e: usize, half: bool) -> __m512i {
    let [from, shifts] = const { narrow_tables::<BITS>() };
    let n = if half { 4 * BITS } else { 8 * BITS };
    // SAFETY: the mask keeps the load to the n bytes of these codes, inside the row.
    unsafe {
        let raw = _mm512_maskz_loadu_epi8((1u64 << n) - 1, w.add(e * BITS / 8) as *const i8);
        let spread = _mm512_permutexvar_epi8(_mm512_loadu_si512(from.as_ptr() as *const _), raw);
        let fields = _mm512_multishift_epi64_epi8(_mm512_loadu_si512(shifts.as_ptr() as *const _), spread);
        _mm512_and_si512(fields, _mm512_set1_epi8(((1u32 << BITS) - 1) as i8))
    }
}

/// `n` codes (a multiple of 32) of a `bits`-bit row bitstream (5 or 6 bits), one a byte
/// into `out` ([`narrow_bytes`]; the prefill products read them as 8-bit rows).
///
/// # Safety
/// AVX-512F/BW and VBMI must be available; `w` holds the n codes' n * bits / 8 bytes and
/// `out` at least n bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(super) unsafe fn unpack_narrow(bits: usize, w: *const u8, n: usize, out: &mut [u8]) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn run<const BITS: usize>(w: *const u8, n: usize, out: &mut [u8]) {
        // SAFETY: as the caller's; each store writes at most the 64 bytes of its run, inside
        // out (a last run of 32 with a 32-byte store).
        unsafe {
            for e in (0..n).step_by(64) {
                let half = n - e < 64;
                let v = narrow_bytes::<BITS>(w, e, half);
                if half {
                    _mm256_storeu_si256(out.as_mut_ptr().add(e) as *mut __m256i, _mm512_castsi512_si256(v));
                } else {
                    _mm512_storeu_si512(out.as_mut_ptr().add(e) as *mut _, v);
                }
            }
        }
    }
    assert!(out.len() >= n && n % 32 == 0, "unpack_narrow: {n} codes into {} bytes", out.len());
    // SAFETY: forwarded from the caller.
    unsafe {
        match bits {
            5 => run::<5>(w, n, out),
            6 => run::<6>(w, n, out),
            _ => unreachable!("unpack_narrow: {bits}-bit codes"),
        }
    }
}

/// How far ahead of its reads [`rows_q8_512`] asks for a row's bytes, at least: the distance is
/// a whole number of its blocks of rows (`ahead`), so that each row's prefetches land in a
/// later block, never in a row being read beside it. (A fixed 16 KiB ahead of rows of 8 KiB,
/// 4 at a time, fell on the block's own third and fourth rows for the first two: 8-bit
/// 16384 x 8192 from memory, 1 thread, Zen 4: 14.5-18.9 GB/s, now 21.4-23.6.)
const PREFETCH: usize = 16384;

/// The prefetch distance of [`rows_q8_512`] for blocks of `block` bytes (R rows).
const fn ahead(block: usize) -> usize {
    PREFETCH.div_ceil(block) * block
}

/// [`rows_q8`] on 512-bit registers, 64 elements per `vpdpbusd` and no horizontal sums per
/// group: each lane of a product belongs to one group, so the two levels are joined in the
/// lane (`fine + 254 * coarse`), widened to f32 and multiplied by the lane's `scale * dx`,
/// and one horizontal sum ends the row. 4-bit rows go 128 elements (one 64-byte load) per
/// step against the activations' paired codes; 8-bit rows 64. The groups' scales, biases and
/// activation sums are read 16 groups at a time (one 16-lane vector: half the per-group work
/// of 8; GGUF's Q4_0 SmolLM2 decode, 1 thread, Zen 4: 140-143 -> 166-178 tok/s; 8 only for
/// 8-bit groups of 128); masked loads take a row's last groups. Rows of `R` share the
/// activation loads, and their sums are reduced together at the end ([`sum4`]). Prefetches go to L2 (`T1`): into L1 they took the line-fill buffers
/// that a single thread's stream needs (16384 x 8192 from memory, Zen 4: 12-13 -> 18-19
/// GB/s).
///
/// # Safety
/// As [`rows_q8`], with AVX-512F/BW/VL and VNNI available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_q8_512<S: super::Scale, const BITS: usize, const GS: usize, const R: usize>(rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    // SAFETY: forwarded from the caller; the features of the body's 4- and 8-bit paths.
    unsafe { rows_q8_512_body::<S, BITS, GS, R>(rows, s, b, act, out) }
}

/// [`rows_q8_512`] for 5- and 6-bit codes, read as stored and spread to bytes as they
/// load ([`narrow_bytes`]: AVX-512 VBMI).
///
/// # Safety
/// As [`rows_q8_512`], with AVX-512 VBMI available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn rows_q8_512_narrow<S: super::Scale, const BITS: usize, const GS: usize, const R: usize>(rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe { rows_q8_512_body::<S, BITS, GS, R>(rows, s, b, act, out) }
}

/// The body of [`rows_q8_512`] and [`rows_q8_512_narrow`], which take its features by
/// inlining it (compiled alone it would call the intrinsics instead of inlining them).
///
/// # Safety
/// As [`rows_q8_512`] (and [`rows_q8_512_narrow`] for widths other than 4 and 8).
#[inline(always)]
unsafe fn rows_q8_512_body<S: super::Scale, const BITS: usize, const GS: usize, const R: usize>(rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    let cols = act.codes.len();
    let (xc, xf) = (act.codes.as_ptr() as *const u8, act.fine.as_ptr() as *const u8);
    let groups = cols / GS;
    let row_bytes = cols * BITS / 8;
    let ahead = ahead(R * row_bytes);
    // The scales and biases of the rows `ahead` bytes on are fetched as their codes are, where
    // a row's fill a cache line or more: two more streams per row, which the hardware's
    // prefetcher left behind for groups of 32 (4-bit 16384 x 8192 from memory, 1 thread, Zen
    // 4: 16.1-16.8 -> 21.8-22.7 GB/s). Shorter ones share lines with the next rows' (SmolLM2's
    // 576 columns: 18-36 bytes a row), where a prefetch per row cost more than it saved.
    let fetch_params = groups * std::mem::size_of::<S>() >= 64;
    // SAFETY: the caller's features (AVX-512F among them) are this body's.
    let (fine, finef) = unsafe { (_mm512_set1_epi32(super::kernels::FINE as i32), _mm512_set1_ps(super::kernels::FINE)) };
    // SAFETY: as above.
    let mut acc = [unsafe { _mm512_setzero_ps() }; R];
    let mut bacc = acc;
    assert!(BITS != 4 || (act.pair_codes.len() == cols && act.pair_fine.len() == cols), "4-bit decode activations come paired (Q8Act::new)");
    // Groups per step: a step's scales and biases fill one 16-lane vector (`lane_groups`
    // covers 16 runs: 16 groups of any size for 4 bits, of 32 or 64 for 8 bits), half of one
    // for 8-bit groups of 128. A row of SmolLM2 (576 elements, 9 groups of 64) is one step.
    let per_step = if BITS != 4 && GS == 128 { 8 } else { 16 };
    // SAFETY (whole body): every run read lies inside its row and the activation codes
    // (runs stop at `cols`, a last 8-bit run of 32 elements is read as a half); the
    // per-group loads are masked to the step's groups; the caller guarantees `rows` holds R
    // rows.
    unsafe {
        for g0 in (0..groups).step_by(per_step) {
            let n = (groups - g0).min(per_step);
            let keep: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            let (dx, xsums) = (<f32 as super::Scale>::load16_masked(act.dx.as_ptr().add(g0), keep), <f32 as super::Scale>::load16_masked(act.xsums.as_ptr().add(g0), keep));
            let mut sx = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let at = r * groups + g0;
                if fetch_params {
                    let later = at + ahead / row_bytes * groups;
                    _mm_prefetch::<_MM_HINT_T1>(s.as_ptr().wrapping_add(later) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(b.as_ptr().wrapping_add(later) as *const i8);
                }
                let (sc, bc) = (S::load16_masked(s.as_ptr().add(at), keep), S::load16_masked(b.as_ptr().add(at), keep));
                bacc[r] = _mm512_fmadd_ps(bc, xsums, bacc[r]);
                sx[r] = _mm512_mul_ps(sc, dx);
            }
            let (first, end) = (g0 * GS, (g0 + n) * GS);
            if BITS == 4 {
                // 128 elements per step: one 64-byte load of codes splits into the even
                // elements of two runs (low nibbles) and their odd ones (high nibbles), met by
                // the activations in `paired` order. A row's last run of 64 is a half span.
                let spans = const { lane_groups::<BITS, GS>() };
                let (pc, pf) = (act.pair_codes.as_ptr() as *const u8, act.pair_fine.as_ptr() as *const u8);
                let mask = _mm512_set1_epi8(0x0F);
                for (k, lanes) in spans.iter().enumerate().take((end - first).div_ceil(128)) {
                    let e = first + 128 * k;
                    let half = end - e < 128;
                    let load_act = |p: *const u8| {
                        if half {
                            [_mm512_zextsi256_si512(_mm256_loadu_si256(p.add(e) as *const __m256i)), _mm512_zextsi256_si512(_mm256_loadu_si256(p.add(e + 32) as *const __m256i))]
                        } else {
                            [_mm512_loadu_si512(p.add(e) as *const _), _mm512_loadu_si512(p.add(e + 64) as *const _)]
                        }
                    };
                    let ([c_lo, c_hi], [f_lo, f_hi]) = (load_act(pc), load_act(pf));
                    let lanes = _mm512_loadu_si512(lanes.as_ptr() as *const _);
                    for r in 0..R {
                        let w = (rows.as_ptr() as *const u8).add(r * row_bytes + e / 2);
                        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(ahead) as *const i8);
                        let v = if half { _mm512_zextsi256_si512(_mm256_loadu_si256(w as *const __m256i)) } else { _mm512_loadu_si512(w as *const _) };
                        let (lo, hi) = (_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
                        let ci = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, c_lo), hi, c_hi);
                        let fi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, f_lo), hi, f_hi);
                        // A lane's coarse sum (8 codes <= 15 times int8) fits an i16, so
                        // `vpdpwssd` adds 254 times it (the high half, its sign, times 0).
                        let joined = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(fi, ci, fine));
                        acc[r] = _mm512_fmadd_ps(joined, _mm512_permutexvar_ps(lanes, sx[r]), acc[r]);
                    }
                }
                continue;
            }
            // 8 bits: 64 elements per step, the bytes as they are; 5 and 6 bits: the
            // same, their 8 * BITS bytes spread to one a code as they load.
            let runs = const { lane_groups::<BITS, GS>() };
            for (k, lanes) in runs.iter().enumerate().take((end - first).div_ceil(64)) {
                let e = first + 64 * k;
                let half = end - e < 64;
                let (c, f) = (act_bytes(xc, e, half), act_bytes(xf, e, half));
                let lanes = _mm512_loadu_si512(lanes.as_ptr() as *const _);
                for r in 0..R {
                    let w = (rows.as_ptr() as *const u8).add(r * row_bytes);
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(e * BITS / 8 + ahead) as *const i8);
                    let v = if BITS == 8 { run_bytes(w, e, half) } else { narrow_bytes::<BITS>(w, e, half) };
                    let (ci, fi) = (_mm512_dpbusd_epi32(_mm512_setzero_si512(), v, c), _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, f));
                    let joined = if BITS <= 6 {
                        // A lane's coarse sum (4 codes <= 63 times int8) fits an i16: as for
                        // 4 bits, `vpdpwssd` adds 254 times it.
                        _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(fi, ci, fine))
                    } else {
                        // An 8-bit lane's coarse sum may not fit an i16: join the levels in
                        // f32 (exact below 2^24, within 2^-24 relative above).
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci), finef, _mm512_cvtepi32_ps(fi))
                    };
                    acc[r] = _mm512_fmadd_ps(joined, _mm512_permutexvar_ps(lanes, sx[r]), acc[r]);
                }
            }
        }
    }
    // SAFETY: AVX-512F is available (this function's features).
    let sums = unsafe {
        let inv_fine = _mm512_set1_ps(1.0 / super::kernels::FINE);
        let row = |r: usize| _mm512_fmadd_ps(acc[r.min(R - 1)], inv_fine, bacc[r.min(R - 1)]);
        sum4(row(0), row(1), row(2), row(3))
    };
    // A copy of the constant length R, which inlines (one of `out.len()` is a call to memmove).
    out[..R].copy_from_slice(&sums[..R]);
}

/// The horizontal sums of four 16-lane vectors, together (a 4 x 16 transpose-and-add in 11
/// shuffles and adds, where four `_mm512_reduce_add_ps` take ~32): the quarters of each
/// vector are added pairwise across the four, then the lanes of each quarter.
///
/// # Safety
/// AVX-512F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum4(a0: __m512, a1: __m512, a2: __m512, a3: __m512) -> [f32; 4] {
    // [a0 q0+q2, a0 q1+q3, a1 q0+q2, a1 q1+q3] (q: 128-bit quarters), and for a2, a3.
    let b0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a0, a1), _mm512_shuffle_f32x4::<0xEE>(a0, a1));
    let b1 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a2, a3), _mm512_shuffle_f32x4::<0xEE>(a2, a3));
    // Quarter r: the sum of a_r's four quarters.
    let c = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(b0, b1), _mm512_shuffle_f32x4::<0xDD>(b0, b1));
    let d = _mm512_add_ps(c, _mm512_shuffle_ps::<0b10_11_00_01>(c, c));
    let e = _mm512_add_ps(d, _mm512_shuffle_ps::<0b01_00_11_10>(d, d));
    let mut lanes = [0f32; 16];
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), e) };
    [lanes[0], lanes[4], lanes[8], lanes[12]]
}

/// Rows of at most this many bytes go 4 at a time through [`rows_q8_512`]: its prefetches
/// into L2 keep 4 streams a row apart at full speed (Zen 4, `kernel_speed`, 4-bit 8192 x 2048
/// 24.6 -> 31.4 GB/s, 2048 x 8192 26.0 -> 32.9, 16384 x 8192 from memory 21.7 -> 23.9; 8-bit
/// 8192 x 2048 32 -> 38.7), where the 256-bit kernels, which do not prefetch, lose half.
const SHORT_ROW_BYTES_512: usize = 8192;

/// `out.len()` consecutive outputs with AVX-512 VNNI on 512-bit registers ([`rows_q8_512`]),
/// rows of up to [`SHORT_ROW_BYTES_512`] 4 at a time.
///
/// # Safety
/// AVX2, FMA, F16C, AVX-512F/BW/VL and AVX-512 VNNI must be available, and AVX-512 VBMI for
/// 5- and 6-bit codes; `rows` holds `out.len()` rows; otherwise as [`rows_q8`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn rows_q8_vnni512<S: super::Scale>(rows: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    let words = act.codes.len() * bits / 32;
    let groups = act.codes.len() / group_size;
    let step = if words * 4 <= SHORT_ROW_BYTES_512 { 4 } else { 1 };
    let mut r = 0;
    while r < out.len() {
        let n = if out.len() - r >= step { step } else { 1 };
        let (rows, s, b, out) = (&rows[r * words..], &s[r * groups..], &b[r * groups..], &mut out[r..r + n]);
        // SAFETY: forwarded from the caller.
        unsafe {
            match (bits, group_size, n) {
                (4, 32, 4) => rows_q8_512::<S, 4, 32, 4>(rows, s, b, act, out),
                (4, 64, 4) => rows_q8_512::<S, 4, 64, 4>(rows, s, b, act, out),
                (4, 128, 4) => rows_q8_512::<S, 4, 128, 4>(rows, s, b, act, out),
                (8, 32, 4) => rows_q8_512::<S, 8, 32, 4>(rows, s, b, act, out),
                (8, 64, 4) => rows_q8_512::<S, 8, 64, 4>(rows, s, b, act, out),
                (8, 128, 4) => rows_q8_512::<S, 8, 128, 4>(rows, s, b, act, out),
                (4, 32, _) => rows_q8_512::<S, 4, 32, 1>(rows, s, b, act, out),
                (4, 64, _) => rows_q8_512::<S, 4, 64, 1>(rows, s, b, act, out),
                (4, 128, _) => rows_q8_512::<S, 4, 128, 1>(rows, s, b, act, out),
                (8, 32, _) => rows_q8_512::<S, 8, 32, 1>(rows, s, b, act, out),
                (8, 64, _) => rows_q8_512::<S, 8, 64, 1>(rows, s, b, act, out),
                (8, 128, _) => rows_q8_512::<S, 8, 128, 1>(rows, s, b, act, out),
                (5, ..) => narrow_512::<S, 5>(group_size, n, rows, s, b, act, out),
                (6, ..) => narrow_512::<S, 6>(group_size, n, rows, s, b, act, out),
                _ => unreachable!("Q8Act::new admits 4, 5, 6 and 8 bits, groups of 32, 64 and 128"),
            }
        }
        r += n;
    }
}

/// [`rows_q8_512_narrow`] for `n` rows (4 or 1) of `BITS`-bit codes in groups of
/// `group_size`.
///
/// # Safety
/// As [`rows_q8_512_narrow`]; `out` holds n outputs.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn narrow_512<S: super::Scale, const BITS: usize>(group_size: usize, n: usize, rows: &[u32], s: &[S], b: &[S], act: &super::kernels::Q8Act, out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (group_size, n) {
            (32, 4) => rows_q8_512_narrow::<S, BITS, 32, 4>(rows, s, b, act, out),
            (64, 4) => rows_q8_512_narrow::<S, BITS, 64, 4>(rows, s, b, act, out),
            (128, 4) => rows_q8_512_narrow::<S, BITS, 128, 4>(rows, s, b, act, out),
            (32, _) => rows_q8_512_narrow::<S, BITS, 32, 1>(rows, s, b, act, out),
            (64, _) => rows_q8_512_narrow::<S, BITS, 64, 1>(rows, s, b, act, out),
            (128, _) => rows_q8_512_narrow::<S, BITS, 128, 1>(rows, s, b, act, out),
            _ => unreachable!("Q8Act::new admits groups of 32, 64 and 128"),
        }
    }
}

/// sum over groups of scales[g] * (x_g . q_g) for one 4- or 8-bit row, with one horizontal
/// sum at the end.
///
/// # Safety
/// AVX2 and FMA must be available; `row` holds x.len() codes; group_size is a multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dot(row: &[u32], bits: usize, group_size: usize, scales: &[f32], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (g, s) in scales.iter().enumerate() {
        let (mut d0, mut d1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let base = g * group_size;
        for c in (0..group_size).step_by(16) {
            let e = base + c;
            // SAFETY: e + 16 <= x.len(); codes() bounds-checks its words.
            unsafe {
                d0 = _mm256_fmadd_ps(codes(row, e, bits), _mm256_loadu_ps(x.as_ptr().add(e)), d0);
                d1 = _mm256_fmadd_ps(codes(row, e + 8, bits), _mm256_loadu_ps(x.as_ptr().add(e + 8)), d1);
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(*s), _mm256_add_ps(d0, d1), acc);
    }
    hsum(acc)
}

/// (x . q, sum x) for a 4- or 8-bit group; `start` and the group length are multiples of 8.
/// The reference the whole-row kernel is tested against.
///
/// # Safety
/// AVX2 and FMA must be available; elements start..start + x.len() must lie inside `row`.
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn group_dot(row: &[u32], start: usize, bits: usize, x: &[f32]) -> (f32, f32) {
    let (mut dot, mut xs) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let n = x.len() / 8 * 8;
    if bits == 4 {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(0xF);
        for c in (0..n).step_by(8) {
            // One u32 holds 8 nibbles: broadcast it and shift each lane to its nibble.
            let word = row[(start + c) / 8];
            let q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts), mask);
            // SAFETY: c + 8 <= x.len().
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(c)) };
            dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, dot);
            xs = _mm256_add_ps(xs, xv);
        }
    } else {
        let bytes = row.as_ptr() as *const u8;
        for c in (0..n).step_by(8) {
            // SAFETY: bytes start + c .. start + c + 8 lie inside `row` (8-bit elements).
            let raw = unsafe { _mm_loadl_epi64(bytes.add(start + c) as *const __m128i) };
            let q = _mm256_cvtepu8_epi32(raw);
            // SAFETY: c + 8 <= x.len().
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(c)) };
            dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, dot);
            xs = _mm256_add_ps(xs, xv);
        }
    }
    (hsum(dot), hsum(xs))
}

/// A block of the int8 product of several activation rows (prefill) with 16 rows of a 4- or
/// 8-bit matrix interleaved word by word (`w[t * 16 + j]` = packed word t of matrix row j,
/// `s[g * 16 + j]` / `b[g * 16 + j]` its scale and bias of group g as f32):
/// `out[r][j] = sum_g s dx_r[g] (codes_j . xcodes_r)_g + b xsum_r[g]`. Each packed word
/// meets the 4 activation codes of its elements in one `vpdpbusd` lane (4-bit words split
/// into low and high nibbles, which [`Q8Act`](super::kernels::Q8Act) orders as even and odd
/// elements), so the 16 lanes of a register are 16 matrix rows and no horizontal sums are
/// needed. `acts` holds 1..=8 rows; missing rows repeat the last (computed, not stored).
///
/// # Safety
/// AVX-512F and AVX-512 VNNI must be available; `w`, `s`, `b` hold the whole block (`groups`
/// groups of `GS` elements); every act has `groups * GS` codes.
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn gemm_q8_vnni<const BITS: usize, const GS: usize>(w: &[u32], s: &[f32], b: &[f32], groups: usize, acts: &[&super::kernels::Q8Act], out: &mut [[f32; 16]; GEMM_MR]) {
    let wpg = GS * BITS / 32;
    debug_assert!(w.len() >= groups * wpg * 16 && s.len() >= groups * 16 && !acts.is_empty());
    let act = |r: usize| acts[r.min(acts.len() - 1)];
    let codes: [*const u8; GEMM_MR] = std::array::from_fn(|r| act(r).codes.as_ptr() as *const u8);
    let fine: [*const u8; GEMM_MR] = std::array::from_fn(|r| act(r).fine.as_ptr() as *const u8);
    let inv_fine = _mm512_set1_ps(1.0 / super::kernels::FINE);
    let mask = _mm512_set1_epi8(0x0F);
    let mut facc = [_mm512_setzero_ps(); GEMM_MR];
    // SAFETY (whole body): word t of the block is inside `w` (t < groups * wpg), its
    // activation codes (4 bytes at the offsets below) inside each act's codes.
    unsafe {
        for g in 0..groups {
            let (mut acc, mut accf) = ([_mm512_setzero_si512(); GEMM_MR], [_mm512_setzero_si512(); GEMM_MR]);
            for t in g * wpg..(g + 1) * wpg {
                let wv = _mm512_loadu_si512(w.as_ptr().add(t * 16) as *const _);
                if BITS == 4 {
                    let lo = _mm512_and_si512(wv, mask);
                    let hi = _mm512_and_si512(_mm512_srli_epi32(wv, 4), mask);
                    // Word t holds elements 8t..8t+8: in the activations' [even][odd] order
                    // of its 64-element run, 4 even codes at 4(t % 8), 4 odd ones 32 later.
                    let off = t / 8 * 64 + t % 8 * 4;
                    for r in 0..GEMM_MR {
                        let xe = _mm512_set1_epi32((codes[r].add(off) as *const i32).read_unaligned());
                        let xo = _mm512_set1_epi32((codes[r].add(off + 32) as *const i32).read_unaligned());
                        acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r], lo, xe), hi, xo);
                        let fe = _mm512_set1_epi32((fine[r].add(off) as *const i32).read_unaligned());
                        let fo = _mm512_set1_epi32((fine[r].add(off + 32) as *const i32).read_unaligned());
                        accf[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(accf[r], lo, fe), hi, fo);
                    }
                } else {
                    for r in 0..GEMM_MR {
                        let x = _mm512_set1_epi32((codes[r].add(4 * t) as *const i32).read_unaligned());
                        acc[r] = _mm512_dpbusd_epi32(acc[r], wv, x);
                        let f = _mm512_set1_epi32((fine[r].add(4 * t) as *const i32).read_unaligned());
                        accf[r] = _mm512_dpbusd_epi32(accf[r], wv, f);
                    }
                }
            }
            let sv = _mm512_loadu_ps(s.as_ptr().add(g * 16));
            let bv = _mm512_loadu_ps(b.as_ptr().add(g * 16));
            for r in 0..GEMM_MR {
                let a = act(r);
                let f = _mm512_mul_ps(sv, _mm512_set1_ps(*a.dx.get_unchecked(g)));
                let isum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(accf[r]), inv_fine, _mm512_cvtepi32_ps(acc[r]));
                facc[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(*a.xsums.get_unchecked(g)), _mm512_fmadd_ps(isum, f, facc[r]));
            }
        }
        for r in 0..GEMM_MR {
            _mm512_storeu_ps(out[r].as_mut_ptr(), facc[r]);
        }
    }
}

/// One block of the int8 product on AMX tiles: 32 matrix rows (A: unsigned bytes, one per
/// element, `a_stride` apart, in the activations' element order) against 16 activation rows
/// (their two levels of codes as tiles, `AmxActs` in kernels.rs). Per group, `tdpbusd` gives
/// both levels' integer sums for all 512 pairs ([`crate::amx::int8_group`]), which are then
/// scaled as the VNNI kernel scales its sums: `out[j][r] = sum_g s_j dx_r (codes + fine /
/// FINE) + b_j xsum_r` (j a matrix row, r an activation row). `s` and `b` are [32][groups]
/// f32 (row j's groups together); `dx` and `xsums` [groups][16] (a group's 16 rows together).
///
/// # Safety
/// AVX-512F must be available and [`crate::amx::configure`] must have run on this thread;
/// `a` holds 32 rows of `groups * gs` bytes at `a_stride`; `codes` and `fine` hold
/// `groups * gs / 64` tiles of 1,024 bytes; gs is 64 or 128.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn amx_block_q8(a: *const u8, a_stride: usize, codes: *const u8, fine: *const u8, gs: usize, s: &[f32], b: &[f32], dx: &[f32], xsums: &[f32], out: &mut [[f32; 16]; 32]) {
    /// Groups in flight: a group's sums are read `LAG` groups after its tiles were stored, so
    /// the tile unit works on the next groups while the vector units scale this one (a
    /// vector load cannot take its bytes from a pending tile store).
    const LAG: usize = 2;
    #[repr(C, align(64))]
    struct Sums([[i32; 1024]; LAG + 1]);
    let groups = dx.len() / 16;
    debug_assert!(s.len() >= 32 * groups && b.len() >= 32 * groups && xsums.len() >= 16 * groups && gs % 64 == 0);
    let steps = gs / 64;
    let inv_fine = _mm512_set1_ps(1.0 / super::kernels::FINE);
    // Every slot is written by its group's tile stores before it is read.
    let mut c = std::mem::MaybeUninit::<Sums>::uninit();
    let c = c.as_mut_ptr() as *mut [i32; 1024];
    let mut acc = [_mm512_setzero_ps(); 32];
    // SAFETY (whole body): the caller's guarantees; group g's tiles start at byte 64 * steps * g
    // of each A row and at tile steps * g of the activations; s/b/dx/xsums hold `groups`.
    unsafe {
        for g in 0..groups + LAG {
            if g < groups {
                crate::amx::int8_group(a.add(g * gs), a_stride, codes.add(g * steps * 1024), fine.add(g * steps * 1024), steps, c.add(g % (LAG + 1)).cast::<i32>());
            }
            let Some(g) = g.checked_sub(LAG) else { continue };
            let sums = &*c.add(g % (LAG + 1));
            let dxv = _mm512_loadu_ps(dx.as_ptr().add(g * 16));
            let xsv = _mm512_loadu_ps(xsums.as_ptr().add(g * 16));
            for (j, acc) in acc.iter_mut().enumerate() {
                // Rows 0-15 are tiles 0 (codes) and 1 (fine); rows 16-31 tiles 2 and 3.
                let at = (j / 16) * 512 + (j % 16) * 16;
                let c0 = _mm512_cvtepi32_ps(_mm512_load_si512(sums.as_ptr().add(at) as *const _));
                let c1 = _mm512_cvtepi32_ps(_mm512_load_si512(sums.as_ptr().add(at + 256) as *const _));
                let isum = _mm512_fmadd_ps(c1, inv_fine, c0);
                let scaled = _mm512_mul_ps(isum, dxv);
                *acc = _mm512_fmadd_ps(scaled, _mm512_set1_ps(*s.get_unchecked(j * groups + g)), *acc);
                *acc = _mm512_fmadd_ps(xsv, _mm512_set1_ps(*b.get_unchecked(j * groups + g)), *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), acc);
        }
    }
}

/// Packed 4-bit rows as one byte per element for [`amx_block_q8`], in
/// [`Q8Act`](super::kernels::Q8Act)'s order: each 64-element run's 32 packed bytes give their
/// low nibbles (the even elements) then their high nibbles (the odd ones).
///
/// # Safety
/// AVX2 must be available; `packed` holds whole runs of 32 bytes; `out` twice as many bytes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_nibbles(packed: &[u8], out: &mut [u8]) {
    debug_assert!(packed.len() % 32 == 0 && out.len() >= 2 * packed.len());
    let mask = _mm256_set1_epi8(0x0F);
    for (i, run) in packed.chunks_exact(32).enumerate() {
        // SAFETY: 32 bytes read from the run; 64 written at 64 * i, inside out.
        unsafe {
            let v = _mm256_loadu_si256(run.as_ptr() as *const __m256i);
            let dst = out.as_mut_ptr().add(64 * i);
            _mm256_storeu_si256(dst as *mut __m256i, _mm256_and_si256(v, mask));
            _mm256_storeu_si256(dst.add(32) as *mut __m256i, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
        }
    }
}

/// Stores the codes `cb` and fine codes `fb` of elements `e..e + 16` where [`Q8Act::position`]
/// puts them: for 4 bits, evens to their 64-element run's first half and odds to its second.
///
/// # Safety
/// SSSE3 must be available; elements `e..e + 16` lie inside `a`'s codes.
///
/// [`Q8Act::position`]: super::kernels::Q8Act::position
#[inline]
#[target_feature(enable = "ssse3")]
unsafe fn store_codes(a: &mut super::kernels::Q8Act, e: usize, bits: usize, cb: __m128i, fb: __m128i) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if bits == 4 {
            let evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            let (run, j) = (e / 64 * 64, e % 64);
            let (cb, fb) = (_mm_shuffle_epi8(cb, evens_odds), _mm_shuffle_epi8(fb, evens_odds));
            for (codes, v) in [(a.codes.as_mut_ptr(), cb), (a.fine.as_mut_ptr(), fb)] {
                _mm_storel_epi64(codes.add(run + j / 2) as *mut __m128i, v);
                _mm_storel_epi64(codes.add(run + 32 + j / 2) as *mut __m128i, _mm_unpackhi_epi64(v, v));
            }
        } else {
            _mm_storeu_si128(a.codes.as_mut_ptr().add(e) as *mut __m128i, cb);
            _mm_storeu_si128(a.fine.as_mut_ptr().add(e) as *mut __m128i, fb);
        }
    }
}

/// [`quantize_act`] for CPUs with AVX2 but not AVX-512: the same codes and integer sums, 16
/// elements per step in two 8-lane halves (the float sums in 8 lanes).
///
/// # Safety
/// AVX2 must be available; `x` holds whole groups of `gs` (a multiple of 32) elements; `a`'s
/// arrays are sized for them.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_act256(x: &[f32], gs: usize, bits: usize, a: &mut super::kernels::Q8Act) {
    let fine_scale = super::kernels::FINE;
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let sign = _mm256_set1_ps(-0.0);
    let hsum_i32 = |v: __m256i| -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
    };
    // SAFETY (whole body): chunks of 16 inside x (groups are multiples of 32); code stores
    // inside a.codes / a.fine (x.len() bytes each), per-group values inside their arrays.
    unsafe {
        for (g, xg) in x.chunks_exact(gs).enumerate() {
            let mut m = _mm256_setzero_ps();
            for c in xg.chunks_exact(8) {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr())));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let dx = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1))) / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let (vinv, vdx, vfine) = (_mm256_set1_ps(inv), _mm256_set1_ps(dx), _mm256_set1_ps(inv * fine_scale));
            let (mut sum, mut csum, mut fsum) = (_mm256_setzero_ps(), _mm256_setzero_si256(), _mm256_setzero_si256());
            for (k, c) in xg.chunks_exact(16).enumerate() {
                let mut ci = [_mm256_setzero_si256(); 2];
                let mut fi = [_mm256_setzero_si256(); 2];
                for h in 0..2 {
                    let v = _mm256_loadu_ps(c.as_ptr().add(8 * h));
                    ci[h] = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv));
                    let r = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(ci[h]), vdx));
                    fi[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(r, vfine), lo), hi));
                    sum = _mm256_add_ps(sum, v);
                    csum = _mm256_add_epi32(csum, ci[h]);
                    fsum = _mm256_add_epi32(fsum, fi[h]);
                }
                // 16 i32 within +-127 to 16 bytes in order: packs interleave the 128-bit halves.
                let bytes = |v: [__m256i; 2]| {
                    let w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0b11_01_10_00);
                    _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1))
                };
                let (cb, fb) = (bytes(ci), bytes(fi));
                store_codes(a, g * gs + 16 * k, bits, cb, fb);
            }
            a.dx[g] = dx;
            a.xsums[g] = hsum(sum);
            a.code_sums[g] = hsum_i32(csum);
            a.fine_sums[g] = hsum_i32(fsum);
        }
    }
}

/// [`Q8Act::new`](super::kernels::Q8Act::new)'s two levels of int8 codes for one row of
/// activations, 16 elements per step (rounding half to even, as the scalar version).
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; `x` holds whole groups of `gs` (a multiple of
/// 32) elements; `a`'s arrays are sized for them.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_act(x: &[f32], gs: usize, bits: usize, a: &mut super::kernels::Q8Act) {
    let fine_scale = super::kernels::FINE;
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    // SAFETY (whole body): chunks of 16 inside x (groups are multiples of 32); code stores
    // inside a.codes / a.fine (x.len() bytes each), per-group values inside their arrays.
    unsafe {
        for (g, xg) in x.chunks_exact(gs).enumerate() {
            let mut m = _mm512_setzero_ps();
            for c in xg.chunks_exact(16) {
                m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
            }
            let dx = _mm512_reduce_max_ps(m) / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let (vinv, vdx, vfine) = (_mm512_set1_ps(inv), _mm512_set1_ps(dx), _mm512_set1_ps(inv * fine_scale));
            let (mut sum, mut csum, mut fsum) = (_mm512_setzero_ps(), _mm512_setzero_si512(), _mm512_setzero_si512());
            for (k, c) in xg.chunks_exact(16).enumerate() {
                let v = _mm512_loadu_ps(c.as_ptr());
                let ci = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));
                let r = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(ci), vdx));
                let fi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(r, vfine), lo), hi));
                sum = _mm512_add_ps(sum, v);
                csum = _mm512_add_epi32(csum, ci);
                fsum = _mm512_add_epi32(fsum, fi);
                let (cb, fb) = (_mm512_cvtepi32_epi8(ci), _mm512_cvtepi32_epi8(fi));
                store_codes(a, g * gs + 16 * k, bits, cb, fb);
            }
            a.dx[g] = dx;
            a.xsums[g] = _mm512_reduce_add_ps(sum);
            a.code_sums[g] = _mm512_reduce_add_epi32(csum);
            a.fine_sums[g] = _mm512_reduce_add_epi32(fsum);
        }
    }
}
