//! `y = x @ w^T` with bf16 operands and f32 results, on CPUs with AVX512-BF16 (`vdpbf16ps`:
//! 32 bf16 products summed into 16 f32 lanes per instruction, twice the multiply rate of f32
//! FMA). Both operands are contiguous along the shared dimension k, so each output is a dot
//! product; a 4 x 4 tile of outputs keeps 16 accumulators in registers.
//!
//! Fine-tuning on a bf16 base uses it for the frozen weights: the forward `x W^T`, and the
//! input gradient `g W = g (W^T)^T` with a transposed copy of W.

use crate::cpu::SendPtr;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

/// True when this CPU runs the bf16 kernel.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 values rounded to bf16 bits (round to nearest even, as the hardware converts).
pub fn to_bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| crate::cpu_fused::bf16_of(v).to_bits()).collect()
}

/// A bf16 matrix packed for [`matmul`]: the right operand B (k, n) of `x @ B`, stored as
/// pairs along k (`vdpbf16ps` multiplies adjacent pairs): word `[t][j]` holds
/// (B[2t][j], B[2t + 1][j]), columns padded with zeros to a multiple of 32 and pair rows to a
/// multiple of 16, panel by panel: the pair rows of columns 32p..32p + 32 are contiguous
/// (32 words each), so both kernels read a panel front to back.
#[derive(Debug, Clone)]
pub struct Packed {
    /// 64-byte aligned for the tile loads: panel p's pair rows of 32 words from word
    /// p * p16 * 32 (p16: the pair rows rounded up to 16).
    words: crate::amx::Aligned,
    k: usize,
    n: usize,
    n_pad: usize,
}

impl Packed {
    /// Packs B = w^T for a row-major w (n, k): `x @ Packed` is then `x @ w^T` (a forward pass).
    pub fn from_rows_transposed(w: &[u16], n: usize, k: usize) -> Self {
        Self::pack(k, n, |kk, j| w[j * k + kk])
    }

    /// Packs B = w for a row-major w (k, n): `x @ Packed` is then `x @ w` (an input gradient).
    pub fn from_rows(w: &[u16], k: usize, n: usize) -> Self {
        Self::pack(k, n, |kk, j| w[kk * n + j])
    }

    /// Element B[kk][j] as bf16 bits.
    pub fn get(&self, kk: usize, j: usize) -> u16 {
        let p16 = self.k.div_ceil(2).next_multiple_of(16);
        let word = self.words.words()[(j / 32 * p16 + kk / 2) * 32 + j % 32];
        if kk % 2 == 0 {
            word as u16
        } else {
            (word >> 16) as u16
        }
    }

    /// Packs B (k, n) given element by element (as bf16 bits), through [`Packed::from_row_fn`]
    /// (bf16 widened to f32 and rounded back is the same value).
    pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        Self::from_row_fn(k, n, |kk, out| out.iter_mut().enumerate().for_each(|(j, o)| *o = half::bf16::from_bits(at(kk, j)).to_f32()))
    }

    /// Packs B = W for a W (k, n) handed over row by row: `row(kk, out)` writes row kk as
    /// f32 (rounded to bf16 here). Pair rows split over the decode pool, each row computed
    /// once and written straight into its panels (pair rows padded with zeros to a multiple
    /// of 16, columns to a multiple of 32: whole AMX tiles). In the backward of a quantized
    /// layer (rows dequantized), a bf16 copy of the whole matrix then an element-by-element
    /// packing had taken a third of a QLoRA step.
    pub fn from_row_fn(k: usize, n: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        assert!(supported(), "bf16 packing needs AVX512-BF16");
        let (n_pad, pairs) = (n.div_ceil(32) * 32, k.div_ceil(2));
        let p16 = pairs.next_multiple_of(16);
        let mut words = crate::amx::Aligned::zeroed_on_pool(p16 * n_pad);
        let out = SendPtr(words.words_mut().as_mut_ptr());
        crate::cpu::parallel_ranges(pairs, 4, |ts| {
            let (mut lo, mut hi) = (vec![0f32; n], vec![0f32; n]);
            for t in ts {
                row(2 * t, &mut lo);
                if 2 * t + 1 < k {
                    row(2 * t + 1, &mut hi);
                } else {
                    hi.fill(0.0);
                }
                for (p, (lo, hi)) in lo.chunks(32).zip(hi.chunks(32)).enumerate() {
                    // SAFETY: pair row t of panel p (32 words at (p * p16 + t) * 32) belongs
                    // to this range alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add((p * p16 + t) * 32), lo.len()) };
                    // SAFETY: the callers checked supported(); lo, hi and dst have one length.
                    unsafe { pack_pairs(lo, hi, dst) };
                }
            }
        });
        Self { words, k, n, n_pad }
    }

    /// (k, n) of B.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// x (m, k) as bf16 pairs: row i, pair t = (x[i][2t], x[i][2t + 1]), k padded to even.
fn pack_x(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut xp = vec![0u32; m * pairs];
    let out = SendPtr(xp.as_mut_ptr());
    // A prompt's activations convert in microseconds: threads only for training-sized ones.
    let min_rows = if m * k < 1 << 20 { m.max(1) } else { 1 };
    crate::cpu::parallel_ranges(m, min_rows, |rows| {
        for i in rows {
            // SAFETY: row i's `pairs` words belong to this range alone; the callers checked
            // supported(), and the row holds ceil(k / 2) words for k values.
            unsafe { pack_row(&x[i * k..(i + 1) * k], std::slice::from_raw_parts_mut(out.get().add(i * pairs), pairs)) };
        }
    });
    xp
}

/// Rows of W packed together by [`matmul_rows`] (one 32-column panel: small blocks balance
/// the threads on short matrices, e.g. 6 blocks for a 192-row key projection).
const NB: usize = 32;

/// y (m, n) = x (m, k) @ W^T for a W (n, k) handed over row by row: `row(r, out)` writes row
/// r as f32 (rounded to bf16 here). Blocks of 64 rows are packed as they are needed and the whole packed W
/// never exists, so one routine serves dense bf16 weights (a copy per row) and quantized ones
/// (dequantized per row) in prefill. x is rounded to bf16, products are summed in f32. Panics
/// if the CPU lacks AVX512-BF16 (check [`supported`]) or x is shorter than (m, k).
pub fn matmul_rows(x: &[f32], m: usize, n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    assert!(supported(), "bf16 matmul needs AVX512-BF16");
    assert!(x.len() >= m * k, "bf16 matmul: x is shorter than ({m}, {k})");
    matmul_words(&pack_x(x, m, k), m, n, k, |r, values, words| {
        row(r, values);
        // SAFETY: the caller of matmul_words checked supported(); `words` holds ceil(k / 2)
        // words for the k values.
        unsafe { pack_row(values, words) };
    })
}

/// [`matmul_rows`] for x and a W (n, k) both stored as bf16 (bits): their rows are the packed
/// pairs as they are (no round trip through f32; a fifth of a bf16 prompt's time went to W's,
/// ~4% to x's), for an even k.
pub fn matmul_bf16_rows(x: &[u16], m: usize, n: usize, k: usize, w: &[u16]) -> Vec<f32> {
    assert!(supported(), "bf16 matmul needs AVX512-BF16");
    assert!(w.len() >= n * k && x.len() >= m * k && k % 2 == 0, "bf16 matmul: x or W is shorter than ({m} or {n}, {k}), or {k} is odd");
    // x's bytes are its pairs (low half first, as pack_row writes them): read in place where
    // they are 4-byte aligned, else copied once.
    // SAFETY: every bit pattern is a valid u32.
    let (head, words, _) = unsafe { x[..m * k].align_to::<u32>() };
    let copied;
    let xp = if head.is_empty() && words.len() == m * k / 2 {
        words
    } else {
        let mut v: Vec<u32> = Vec::with_capacity(m * k / 2);
        // SAFETY: v has room for m * k / 2 words, the bytes of x's first m * k values; then
        // every word is written.
        unsafe {
            std::ptr::copy_nonoverlapping(x.as_ptr() as *const u8, v.as_mut_ptr() as *mut u8, 2 * m * k);
            v.set_len(m * k / 2);
        }
        copied = v;
        &copied[..]
    };
    matmul_words(xp, m, n, k, |r, _, words| {
        let row = &w[r * k..(r + 1) * k];
        let whole = k / 2;
        // SAFETY: the row's first 2 * whole values are whole words' bytes (little-endian pairs,
        // low half first: element 2t); `words` holds ceil(k / 2) >= whole words.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr() as *const u8, words.as_mut_ptr() as *mut u8, 4 * whole) };
        if k % 2 == 1 {
            words[whole] = u32::from(row[k - 1]);
        }
    })
}

/// The kernel behind [`matmul_rows`]: x packed as pairs (`pack_x`), `row_words(r, scratch,
/// words)` writes row r of W as bf16 pairs (`scratch` holds k f32 for conversions). The callers
/// checked [`supported`].
fn matmul_words(xp: &[u32], m: usize, n: usize, k: usize, row_words: impl Fn(usize, &mut [f32], &mut [u32]) + Sync) -> Vec<f32> {
    let pairs = k.div_ceil(2);
    assert!(xp.len() >= m * pairs, "bf16 matmul: x is shorter than ({m}, {k})");
    if crate::amx::usable() {
        return matmul_words_amx(xp, m, n, k, row_words);
    }
    matmul_words_avx512(xp, m, n, k, row_words)
}

/// [`matmul_words`] on AVX512-BF16 (`vdpbf16ps`): 8 x 32 output blocks.
fn matmul_words_avx512(xp: &[u32], m: usize, n: usize, k: usize, row_words: impl Fn(usize, &mut [f32], &mut [u32]) + Sync) -> Vec<f32> {
    let pairs = k.div_ceil(2);
    if pairs == 0 {
        return vec![0f32; m * n];
    }
    // Not zeroed (a serial memset while the pool waits): the first pass over k writes every
    // element, later passes add to it.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // On the decode pool (its workers spin between steps and would otherwise compete with
    // rayon's for the cores): one contiguous run of blocks per thread.
    crate::cpu::parallel_ranges(n.div_ceil(NB), 1, |blocks| {
        let mut words = vec![0u32; pairs * NB];
        let (mut values, mut rows_buf) = (vec![0f32; k], vec![0u32; pairs * NB]);
        let mut out = [[0f32; 32]; MR];
        for blk in blocks {
            let (r0, nr) = pack_block(blk, n, pairs, &row_words, &mut values, &mut rows_buf, &mut words);
            for c in (0..nr).step_by(32) {
                let cols = (nr - c).min(32);
                for t0 in (0..pairs).step_by(KC) {
                    let t1 = (t0 + KC).min(pairs);
                    for i in (0..m).step_by(MR) {
                        let rows = (m - i).min(MR);
                        // SAFETY: supported() was checked; rows i..i+rows of xp hold `pairs`
                        // words each; the block holds NB >= c + 32 columns per pair row.
                        unsafe { panel(xp, pairs, t0..t1, i, rows, &words, NB, c, &mut out) };
                        for (r, o) in out.iter().enumerate().take(rows) {
                            // SAFETY: row i + r, columns r0 + c .. r0 + c + cols are inside y's
                            // capacity; this thread alone writes columns r0 .. r0 + nr, first
                            // (t0 == 0) by copying, so later passes read written values.
                            let at = unsafe { y_ptr.get().add((i + r) * n + r0 + c) };
                            if t0 == 0 {
                                // SAFETY: as above: `cols` floats at `at` are this thread's.
                                unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), at, cols) };
                            } else {
                                // SAFETY: as above, and written by the pass at t0 == 0.
                                let dst = unsafe { std::slice::from_raw_parts_mut(at, cols) };
                                dst.iter_mut().zip(o).for_each(|(d, v)| *d += v);
                            }
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the blocks cover the n columns, the row blocks the m rows, and the first pass
    // over k wrote each element.
    unsafe { y.set_len(m * n) };
    y
}

/// [`matmul_words`] on AMX tiles: 32 x 32 output blocks, 16 pairs of k a step. x is laid out
/// step by step ([`x_tiles`]) and each W block's pair rows padded to a multiple of 16 with
/// zeros, so that every tile is whole.
fn matmul_words_amx(xp: &[u32], m: usize, n: usize, k: usize, row_words: impl Fn(usize, &mut [f32], &mut [u32]) + Sync) -> Vec<f32> {
    let pairs = k.div_ceil(2);
    let p16 = pairs.next_multiple_of(16);
    let xa = x_tiles(xp, m, pairs);
    // Every element is written by a block's stores before the length is set.
    let mut y = Vec::with_capacity(m * n);
    let y_ptr = SendPtr(y.as_mut_ptr());
    crate::cpu::parallel_ranges(n.div_ceil(NB), 1, |blocks| {
        // Pair rows past `pairs` stay zero.
        let mut words = crate::amx::Aligned::zeroed(p16 * NB);
        let (mut values, mut rows_buf) = (vec![0f32; k], vec![0u32; pairs * NB]);
        let mut c = crate::amx::Block([0f32; 1024]);
        // SAFETY: usable() was checked; the tiles are this thread's until released below.
        unsafe { crate::amx::configure() };
        for blk in blocks {
            let (r0, nr) = pack_block(blk, n, pairs, &row_words, &mut values, &mut rows_buf, &mut words.words_mut()[..pairs * NB]);
            for i in (0..m).step_by(32) {
                // SAFETY: configured above; block i / 32 of xa holds p16 / 16 steps of 512
                // words; words holds p16 pair rows of NB = 32 columns; both aligned.
                unsafe { crate::amx::block_32x32(xa.words().as_ptr().add(i * p16), words.words().as_ptr(), NB, p16 / 16, &mut c) };
                // SAFETY: this thread alone writes columns r0 .. r0 + nr of y.
                unsafe { store_block(y_ptr, &c.0, i, m, n, r0, nr) };
            }
        }
        // SAFETY: as for configure.
        unsafe { crate::amx::release() };
    });
    // SAFETY: the blocks cover the n columns and the row blocks the m rows.
    unsafe { y.set_len(m * n) };
    y
}

/// Block `blk` of W (rows blk * NB.. of n, written by `row_words` into `rows_buf`) as B = W_block^T
/// in pairs along k into `words`: word [t][j] = (W[r0 + j][2t], W[r0 + j][2t + 1]); rows past
/// W's end multiply as zeros. Returns (r0, rows in the block).
fn pack_block(blk: usize, n: usize, pairs: usize, row_words: &(impl Fn(usize, &mut [f32], &mut [u32]) + Sync), values: &mut [f32], rows_buf: &mut [u32], words: &mut [u32]) -> (usize, usize) {
    let (r0, nr) = (blk * NB, NB.min(n - blk * NB));
    for (j, row) in rows_buf.chunks_mut(pairs).enumerate().take(nr) {
        row_words(r0 + j, values, row);
    }
    rows_buf[nr * pairs..].fill(0);
    // SAFETY: the callers checked supported() (AVX-512F); both buffers hold NB x pairs words.
    unsafe { transpose_u32(rows_buf, words, NB, pairs) };
    (r0, nr)
}

/// Rows i.. (at most 32, fewer past m) of an AMX 32 x 32 output block `c` into y (m, n) at
/// columns col0..col0 + cols.
///
/// # Safety
/// y has room for m * n floats (they may be uninitialized: written, never read) and no other
/// thread writes those columns of these rows meanwhile.
unsafe fn store_block(y: SendPtr, c: &[f32; 1024], i: usize, m: usize, n: usize, col0: usize, cols: usize) {
    for r in 0..(m - i).min(32) {
        // SAFETY: row i + r < m, columns col0 + cols <= n: inside y, this caller's alone;
        // cols <= 32 values read from row r of c.
        unsafe { std::ptr::copy_nonoverlapping(c.as_ptr().add(r * 32), y.get().add((i + r) * n + col0), cols) };
    }
}

/// x's rows of `pairs` words laid out for [`crate::amx::block_32x32`]: blocks of 32 rows (the
/// count padded to a multiple of 32), each as steps of 16 words, a step's 32 rows of 16
/// words contiguous (512 words; zeros past x's rows and pairs); block `bi` starts at word
/// `bi * p16 * 32`. Every tile is whole, and both operands are read front to back.
fn x_tiles(xp: &[u32], m: usize, pairs: usize) -> crate::amx::Aligned {
    let (p16, m32) = (pairs.next_multiple_of(16), m.next_multiple_of(32));
    let mut xa = crate::amx::Aligned::zeroed_on_pool(m32 * p16);
    let out = SendPtr(xa.words_mut().as_mut_ptr());
    // Blocks of 32 rows over the pool (a training step's activations: megabytes).
    let min_blocks = if m * pairs < 1 << 18 { m32 / 32 } else { 1 };
    crate::cpu::parallel_ranges(m32 / 32, min_blocks.max(1), |blocks| {
        for bi in blocks {
            // SAFETY: block bi's p16 * 32 words belong to this range alone.
            let block = unsafe { std::slice::from_raw_parts_mut(out.get().add(bi * p16 * 32), p16 * 32) };
            for (i, src) in xp.chunks(pairs).enumerate().take(m.min(bi * 32 + 32)).skip(bi * 32) {
                let whole = src.chunks_exact(16);
                let (tail, steps) = (whole.remainder(), pairs / 16);
                for (s, words) in whole.enumerate() {
                    // A constant-size copy (inlined moves: a memcpy call per 64 bytes took 4% of a
                    // training step).
                    let at = s * 512 + i % 32 * 16;
                    let dst: &mut [u32; 16] = (&mut block[at..at + 16]).try_into().expect("16 words");
                    *dst = words.try_into().expect("16 words");
                }
                if !tail.is_empty() {
                    let at = steps * 512 + i % 32 * 16;
                    block[at..at + tail.len()].copy_from_slice(tail);
                }
            }
        }
    });
    xa
}

/// `dst[c * rows + r] = src[r * cols + c]`: a (rows, cols) matrix of 32-bit words transposed,
/// rows a multiple of 16, in 16 x 16 tiles through AVX-512 shuffles (one scalar store per
/// word, strided, took a quarter of a bf16 prompt where the GEMMs pack their blocks).
///
/// # Safety
/// AVX-512F must be available; `src` and `dst` hold rows * cols words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_u32(src: &[u32], dst: &mut [u32], rows: usize, cols: usize) {
    use std::arch::x86_64::*;
    debug_assert!(rows % 16 == 0 && src.len() >= rows * cols && dst.len() >= rows * cols);
    let whole = cols / 16 * 16;
    for j0 in (0..rows).step_by(16) {
        for t0 in (0..whole).step_by(16) {
            // SAFETY: rows j0..j0 + 16 <= rows, words t0..t0 + 16 <= cols of each: inside src;
            // the stores write words (t0 + i) * rows + j0 .. + 16, inside dst.
            unsafe {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(src.as_ptr().add((j0 + i) * cols + t0) as *const _);
                }
                // 32-bit, then 64-bit interleaves within 128-bit lanes, then 128-bit lanes.
                let mut a = [_mm512_setzero_si512(); 16];
                for i in 0..8 {
                    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
                }
                for i in 0..4 {
                    r[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
                    r[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
                    r[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
                    r[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
                }
                for i in 0..4 {
                    for h in 0..2 {
                        a[8 * h + i] = _mm512_shuffle_i32x4::<0x88>(r[8 * h + i], r[8 * h + 4 + i]);
                        a[8 * h + 4 + i] = _mm512_shuffle_i32x4::<0xDD>(r[8 * h + i], r[8 * h + 4 + i]);
                    }
                }
                for i in 0..4 {
                    for h in 0..2 {
                        r[4 * h + i] = _mm512_shuffle_i32x4::<0x88>(a[4 * h + i], a[8 + 4 * h + i]);
                        r[8 + 4 * h + i] = _mm512_shuffle_i32x4::<0xDD>(a[4 * h + i], a[8 + 4 * h + i]);
                    }
                }
                for (i, v) in r.iter().enumerate() {
                    _mm512_storeu_si512(dst.as_mut_ptr().add((t0 + i) * rows + j0) as *mut _, *v);
                }
            }
        }
    }
    for j in 0..rows {
        for t in whole..cols {
            dst[t * rows + j] = src[j * cols + t];
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn transpose_u32(_: &[u32], _: &mut [u32], _: usize, _: usize) {
    unreachable!("supported() is false off x86_64")
}

/// `x @ w^T` for bf16 x (.., k) and a dense bf16 w (n, k) on the CPU, as a candle op without
/// backward: prefill of bf16 models on CPUs with AVX512-BF16 (`vdpbf16ps`), where candle's
/// bf16 matmul runs at a fraction of the f32 speed.
pub struct Bf16Linear;

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "lmx-bf16-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("bf16 linear needs contiguous inputs");
        };
        let mut dims = xl.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("bf16 linear: input {dims:?} does not end in {k} features");
        }
        let x = &xs.as_slice::<half::bf16>()?[x0..x1];
        let w = half::slice::HalfFloatSliceExt::reinterpret_cast(&ws.as_slice::<half::bf16>()?[w0..w1]);
        let m = x.len() / k;
        let y = if k % 2 == 0 {
            matmul_bf16_rows(half::slice::HalfFloatSliceExt::reinterpret_cast(x), m, n, k, w)
        } else {
            let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            matmul_rows(&x, m, n, k, |r, out| out.iter_mut().zip(&w[r * k..(r + 1) * k]).for_each(|(o, &b)| *o = half::bf16::from_bits(b).to_f32()))
        };
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::BF16(to_bf16(&y)), Shape::from(dims)))
    }
}

/// f32 values rounded to bf16 (to nearest even), split over the decode pool's threads. The
/// result is not zeroed first (a serial memset of a prompt's outputs, while the pool's workers
/// wait): each range converts through a small buffer and copies it in.
fn to_bf16(y: &[f32]) -> Vec<half::bf16> {
    let mut out: Vec<half::bf16> = Vec::with_capacity(y.len());
    let out_ptr = SendPtr(out.as_mut_ptr());
    crate::cpu::parallel_ranges(y.len().div_ceil(4096), 4, |chunks| {
        let (a, b) = (chunks.start * 4096, (chunks.end * 4096).min(y.len()));
        let mut buf = [half::bf16::ZERO; 256];
        for at in (a..b).step_by(256) {
            let len = (b - at).min(256);
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut buf[..len], &y[at..at + len]);
            // SAFETY: elements a..b of `out` (capacity y.len()) belong to this range alone.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), out_ptr.get().add(at), len) };
        }
    });
    // SAFETY: the ranges wrote every element 0..y.len().
    unsafe { out.set_len(y.len()) };
    out
}

/// Pairs of k per pass over a B panel: KC * 32 columns * 4 bytes = 64 KB, in L2.
const KC: usize = 512;

/// y (m, n) = x (m, k) @ B, x given as f32 (rounded to bf16 here), f32 result. Panics if the
/// CPU lacks AVX512-BF16 (check [`supported`]) or x is shorter than (m, k).
pub fn matmul(x: &[f32], m: usize, b: &Packed) -> Vec<f32> {
    assert!(supported(), "bf16 matmul needs AVX512-BF16");
    let k = b.k;
    assert!(x.len() >= m * k, "bf16 matmul: x is shorter than ({m}, {k})");
    let xp = pack_x(x, m, k);
    if crate::amx::usable() {
        return matmul_amx(&xp, m, b);
    }
    matmul_avx512(&xp, m, b)
}

/// [`matmul`] on AVX512-BF16: 8 x 32 output blocks.
fn matmul_avx512(xp: &[u32], m: usize, b: &Packed) -> Vec<f32> {
    let (k, n) = (b.k, b.n);
    let (pairs, p16) = (k.div_ceil(2), k.div_ceil(2).next_multiple_of(16));
    let mut y = vec![0f32; m * n];
    let y_ptr = SendPtr(y.as_mut_ptr());
    // Ranges own 32-column panels of B and walk them in chunks of KC pairs, running every
    // 8-row block of x past each chunk and accumulating into y.
    crate::cpu::parallel_ranges(b.n_pad / 32, 1, |panels| {
        panels.for_each(|p| {
            let cols = (n - p * 32).min(32);
            let mut out = [[0f32; 32]; MR];
            for t0 in (0..pairs).step_by(KC) {
                let t1 = (t0 + KC).min(pairs);
                for i in (0..m).step_by(MR) {
                    let rows = (m - i).min(MR);
                    // SAFETY: supported() was checked; rows i..i+rows of xp hold `pairs` words
                    // each, and panel p of B is inside its n_pad columns.
                    unsafe { panel(xp, pairs, t0..t1, i, rows, &b.words.words()[p * p16 * 32..], 32, 0, &mut out) };
                    for (r, o) in out.iter().enumerate().take(rows) {
                        // SAFETY: row i + r, columns p*32 .. p*32 + cols are inside y; this task
                        // alone writes panel p.
                        let dst = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add((i + r) * n + p * 32), cols) };
                        if t0 == 0 {
                            dst.copy_from_slice(&o[..cols]);
                        } else {
                            dst.iter_mut().zip(o).for_each(|(d, v)| *d += v);
                        }
                    }
                }
            }
        })
    });
    y
}

/// [`matmul`] on AMX tiles: tasks own 32-column panels of B, 32 x 32 output blocks.
fn matmul_amx(xp: &[u32], m: usize, b: &Packed) -> Vec<f32> {
    let (k, n) = (b.k, b.n);
    let pairs = k.div_ceil(2);
    let p16 = pairs.next_multiple_of(16);
    let xa = x_tiles(xp, m, pairs);
    // Every element is written by a panel's blocks before the length is set.
    let mut y = Vec::with_capacity(m * n);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // On the decode pool, as the other products (rayon's sleeping workers took a tenth of a
    // training step to wake).
    crate::cpu::parallel_ranges(b.n_pad / 32, 1, |panels| {
        let mut c = crate::amx::Block([0f32; 1024]);
        // SAFETY: usable() was checked; the tiles are this thread's until released below.
        unsafe { crate::amx::configure() };
        for p in panels {
            let cols = (n - p * 32).min(32);
            for i in (0..m).step_by(32) {
                // SAFETY: block i / 32 of xa holds p16 / 16 steps of 512 words; panel p of B
                // holds p16 pair rows of 32 words; both aligned.
                unsafe { crate::amx::block_32x32(xa.words().as_ptr().add(i * p16), b.words.words().as_ptr().add(p * p16 * 32), 32, p16 / 16, &mut c) };
                // SAFETY: this range alone writes panel p of y.
                unsafe { store_block(y_ptr, &c.0, i, m, n, p * 32, cols) };
            }
        }
        // SAFETY: as for configure.
        unsafe { crate::amx::release() };
    });
    // SAFETY: the panels cover the n columns and the blocks the m rows.
    unsafe { y.set_len(m * n) };
    y
}

/// One row of f32 values as bf16 pairs (little-endian words: element 2t low, 2t + 1 high, so
/// the words are simply the bf16 row), 16 values per conversion instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn pack_row(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let k = src.len();
    let out = dst.as_mut_ptr() as *mut u16;
    let mut e = 0;
    while e + 16 <= k {
        // SAFETY: 16 values read from src[e..], 16 bf16 written to dst's bytes [2e, 2e + 32),
        // inside its ceil(k / 2) words.
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(e));
            let b: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(out.add(e) as *mut __m256i, b);
        }
        e += 16;
    }
    for (j, &v) in src.iter().enumerate().skip(e) {
        // SAFETY: j < k <= 2 * dst.len().
        unsafe { *out.add(j) = crate::cpu_fused::bf16_of(v).to_bits() };
    }
    if k % 2 == 1 {
        // SAFETY: the last word's high half pads an odd row.
        unsafe { *out.add(k) = 0 };
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_row(_: &[f32], _: &mut [u32]) {
    unreachable!("supported() is false off x86_64")
}

/// Two rows of f32 values as bf16 pairs, `dst[j] = (lo[j], hi[j])` (lo in the low half), 16
/// words per step: a pair row of a [`Packed`] panel. The scalar conversion of two elements a
/// word had taken ~5% of a QLoRA step (rows dequantized in the backward pass).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn pack_pairs(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(lo.len()).min(hi.len());
    let mut j = 0;
    while j + 16 <= n {
        // SAFETY: 16 values read from lo[j..] and hi[j..], 16 words written to dst[j..].
        unsafe {
            let l: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(lo.as_ptr().add(j))));
            let h: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(hi.as_ptr().add(j))));
            let w = _mm512_or_si512(_mm512_cvtepu16_epi32(l), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            _mm512_storeu_si512(dst.as_mut_ptr().add(j) as *mut _, w);
        }
        j += 16;
    }
    for ((d, l), h) in dst[j..n].iter_mut().zip(&lo[j..n]).zip(&hi[j..n]) {
        *d = u32::from(crate::cpu_fused::bf16_of(*l).to_bits()) | (u32::from(crate::cpu_fused::bf16_of(*h).to_bits()) << 16);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_pairs(_: &[f32], _: &[f32], _: &mut [u32]) {
    unreachable!("supported() is false off x86_64")
}

/// Rows of x per microkernel call (8 rows x 32 columns = 16 zmm accumulators).
const MR: usize = 8;

/// out[r][0..32] = sum over pairs t of x[i + r] pair t * B pair row t, columns c0..c0+32.
/// Rows past `rows` repeat the last valid row (computed, never stored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel(xp: &[u32], pairs: usize, ts: std::ops::Range<usize>, i: usize, rows: usize, b: &[u32], n_pad: usize, c0: usize, out: &mut [[f32; 32]; MR]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let xr: [*const u32; MR] = std::array::from_fn(|r| xp.as_ptr().wrapping_add((i + r.min(rows - 1)) * pairs));
    let mut bp = b.as_ptr().wrapping_add(ts.start * n_pad + c0);
    for t in ts {
        // SAFETY: pair row t of B has n_pad >= c0 + 32 words; x rows have `pairs` words.
        let (b0, b1) = unsafe { (_mm512_loadu_si512(bp as *const _), _mm512_loadu_si512(bp.add(16) as *const _)) };
        // SAFETY: __m512i and __m512bh are both 64 plain bytes.
        let (b0, b1) = unsafe { (std::mem::transmute::<__m512i, __m512bh>(b0), std::mem::transmute::<__m512i, __m512bh>(b1)) };
        for r in 0..MR {
            // SAFETY: as above; x row r has a word at pair t.
            let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*xr[r].add(t) as i32)) };
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
        bp = bp.wrapping_add(n_pad);
    }
    for r in 0..MR {
        // SAFETY: out rows hold 32 floats.
        unsafe {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), acc[r][1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn panel(_: &[u32], _: usize, _: std::ops::Range<usize>, _: usize, _: usize, _: &[u32], _: usize, _: usize, _: &mut [[f32; 32]; MR]) {
    unreachable!("supported() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 reference on the same bf16 values, for shapes with row, column and k tails:
    /// both kernels of the packed-B product and of the row product (AVX512-BF16, and AMX where
    /// usable).
    #[test]
    fn matches_a_reference_dot_product() {
        if !supported() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut s = 1u64;
        let mut rnd = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (m, n, k) in [(5, 7, 64), (4, 36, 576), (9, 3, 50), (1, 1, 31), (17, 40, 33), (3, 5, 1500), (10, 130, 1100)] {
            let xf: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let x = to_bf16_bits(&xf);
            let w = to_bf16_bits(&(0..n * k).map(|_| rnd()).collect::<Vec<_>>());
            let f = |b: u16| f64::from(half::bf16::from_bits(b).to_f32());
            // x @ w^T through the transposed packing, and x @ w2 with w2 = w^T as (k, n) rows.
            let y = matmul(&xf, m, &Packed::from_rows_transposed(&w, n, k));
            let w2: Vec<u16> = (0..k * n).map(|e| w[(e % n) * k + e / n]).collect();
            let y2 = matmul(&xf, m, &Packed::from_rows(&w2, k, n));
            let y8 = matmul(&xf, m, &Packed::from_row_fn(k, n, |kk, out| out.iter_mut().zip(&w2[kk * n..(kk + 1) * n]).for_each(|(o, b)| *o = half::bf16::from_bits(*b).to_f32())));
            let y3 = matmul_rows(&xf, m, n, k, |r, out| out.iter_mut().zip(&w[r * k..(r + 1) * k]).for_each(|(o, b)| *o = half::bf16::from_bits(*b).to_f32()));
            // Both kernels behind matmul_rows, whichever this CPU takes.
            let copy_row = |r: usize, _: &mut [f32], words: &mut [u32]| {
                for (t, word) in words.iter_mut().enumerate() {
                    let hi = if 2 * t + 1 < k { u32::from(w[r * k + 2 * t + 1]) } else { 0 };
                    *word = u32::from(w[r * k + 2 * t]) | hi << 16;
                }
            };
            let xp = pack_x(&xf, m, k);
            let y5 = matmul_words_avx512(&xp, m, n, k, copy_row);
            let y6 = if crate::amx::usable() { matmul_words_amx(&xp, m, n, k, copy_row) } else { y5.clone() };
            // And both kernels behind matmul.
            let y7 = matmul_avx512(&xp, m, &Packed::from_rows_transposed(&w, n, k));
            if k % 2 == 0 {
                let y4 = matmul_bf16_rows(&x, m, n, k, &w);
                assert_eq!(y3, y4, "({m},{n},{k}): bf16 rows packed directly and through f32");
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| f(x[i * k + t]) * f(w[j * k + t])).sum();
                    for got in [y[i * n + j], y2[i * n + j], y3[i * n + j], y5[i * n + j], y6[i * n + j], y7[i * n + j], y8[i * n + j]] {
                        assert!((f64::from(got) - want).abs() < 1e-4 * (k as f64).sqrt(), "({m},{n},{k}) [{i},{j}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    /// `cargo test --release -p lmx-core bf16_speed -- --ignored --nocapture`: GFLOP/s of the
    /// bf16 kernel and of the f32 gemm on a training-sized product.
    #[test]
    #[ignore]
    fn bf16_speed() {
        let (m, n, k) = (256usize, 1536usize, 576usize);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let packed = super::Packed::from_rows_transposed(&super::to_bf16_bits(&w), n, k);
        let flops = 2.0 * (m * n * k) as f64;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(super::matmul(&x, m, &packed));
        }
        println!("bf16: {:.1} GFLOP/s", 20.0 * flops / t.elapsed().as_secs_f64() / 1e9);
        let xt = candle_core::Tensor::from_vec(x, (m, k), &candle_core::Device::Cpu).expect("x");
        let wt = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).expect("w");
        let t = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(xt.matmul(&wt.t().expect("t")).expect("mm"));
        }
        println!("f32 gemm: {:.1} GFLOP/s", 20.0 * flops / t.elapsed().as_secs_f64() / 1e9);
    }
}
