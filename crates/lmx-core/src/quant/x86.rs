//! AVX2/FMA and AVX-512 versions of the CPU kernels (callers check the CPU features).

use std::arch::x86_64::*;

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

/// One output of a 4-bit row against int8 activations (`kernels::Q8Activations`),
/// bias term sum_g biases[g] * xsums[g] included: per 64 weights, the 32 code bytes split
/// into low and high nibbles, two unsigned-by-signed byte multiply-adds, one 16-to-32-bit
/// pair sum, and one float multiply-add by scale * dx.
///
/// # Safety
/// AVX2 and FMA must be available; `row` holds xq.len() codes; group_size is a multiple of
/// 64; `dx` has one scale per 64 activations; `scales`, `biases`, `xsums` one per group.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dot_4bit_q8<S: super::Scale>(row: &[u32], group_size: usize, scales: &[S], biases: &[S], xsums: &[f32], xq: &[i8], dx: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut bias_part = 0f32;
    let blocks_per_group = group_size / 64;
    for g in 0..scales.len() {
        let s = scales[g].f32();
        bias_part += biases[g].f32() * xsums[g];
        for blk in 0..blocks_per_group {
            let b = g * blocks_per_group + blk;
            // SAFETY: block b lies inside `row` and `xq` (caller's contract).
            let i = unsafe { block_i32(row, xq, b * 64) };
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s * dx[b]), acc);
        }
    }
    hsum(acc) + bias_part
}

/// The integer products of one 64-weight 4-bit block (starting at element `e`) with its
/// int8 activations, as 8 i32 partial sums.
///
/// # Safety
/// AVX2 must be available; words e/8 .. e/8 + 8 of `row` and codes e .. e + 64 of `xq`
/// must be in bounds.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_i32(row: &[u32], xq: &[i8], e: usize) -> __m256i {
    let mask = _mm256_set1_epi8(0x0F);
    // SAFETY: as documented above.
    unsafe {
        let v = _mm256_loadu_si256(row.as_ptr().add(e / 8) as *const __m256i);
        let lo = _mm256_and_si256(v, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        let xe = _mm256_loadu_si256(xq.as_ptr().add(e) as *const __m256i);
        let xo = _mm256_loadu_si256(xq.as_ptr().add(e + 32) as *const __m256i);
        // Each i16 lane is at most 2 * 2 * 15 * 127 = 7620: no saturation.
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

/// [`row_dot_4bit_q8`] with 512-bit registers: two 64-weight blocks (64 code bytes,
/// 128 int8 activations) per iteration.
///
/// # Safety
/// AVX-512F and AVX-512BW must be available; otherwise as [`row_dot_4bit_q8`].
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn row_dot_4bit_q8_avx512<S: super::Scale>(row: &[u32], group_size: usize, scales: &[S], biases: &[S], xsums: &[f32], xq: &[i8], dx: &[f32]) -> f32 {
    let mask = _mm512_set1_epi8(0x0F);
    let ones = _mm512_set1_epi16(1);
    let mut acc = _mm512_setzero_ps();
    let mut bias_part = 0f32;
    let blocks_per_group = group_size / 64;
    for (b, xs) in biases.iter().zip(xsums) {
        bias_part += b.f32() * xs;
    }
    // The multiplier of block b: its group's scale times its activation scale.
    let n_blocks = dx.len();
    let mult = |b: usize| scales[b / blocks_per_group].f32() * dx[b];
    let mut b = 0;
    while b + 2 <= n_blocks {
        let e = b * 64;
        // SAFETY: words e/8 .. e/8 + 16 and codes e .. e + 128 are in bounds (b + 2 <= n_blocks).
        unsafe {
            // 64 bytes = blocks b and b + 1, 32 bytes each; their activations are laid out
            // [even b][odd b][even b+1][odd b+1].
            let v = _mm512_loadu_si512(row.as_ptr().add(e / 8) as *const _);
            let lo = _mm512_and_si512(v, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            let x0 = _mm512_loadu_si512(xq.as_ptr().add(e) as *const _);
            let x1 = _mm512_loadu_si512(xq.as_ptr().add(e + 64) as *const _);
            // Even activations of both blocks in one register, odd ones in the other.
            let xe = _mm512_inserti64x4(x0, _mm512_castsi512_si256(x1), 1);
            let xo = _mm512_inserti64x4(x1, _mm512_extracti64x4_epi64(x0, 1), 0);
            let p = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xe), _mm512_maddubs_epi16(hi, xo));
            let i = _mm512_madd_epi16(p, ones);
            let m = _mm512_insertf32x8(_mm512_set1_ps(mult(b)), _mm256_set1_ps(mult(b + 1)), 1);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), m, acc);
        }
        b += 2;
    }
    let mut total = _mm512_reduce_add_ps(acc) + bias_part;
    if b < n_blocks {
        // An odd block count: the last block with the AVX2 kernel's arithmetic.
        let e = b * 64;
        // SAFETY: AVX2 is implied by AVX-512F; the block is in bounds.
        total += hsum(_mm256_cvtepi32_ps(unsafe { block_i32(row, xq, e) })) * mult(b);
    }
    total
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
