//! Portable CPU kernels for packed weights: products with a block of dequantized rows fed to
//! gemm (prefill, backward), a row-at-a-time product for one token (decode: integer kernels
//! on int8 activations for 4- and 8-bit weights, float ones otherwise), and group
//! dequantization.

use std::ops::Range;

use super::{get_bits, GroupParams, QuantizedMatrix, Scale};
use crate::amx::Aligned;
use crate::cpu::{parallel_ranges, SendPtr, MIN_ROWS_PER_THREAD};
use crate::cpu_fused::Elem;
use rayon::prelude::*;

/// Rows of W dequantized together for a multi-row product (fits in L2 at 4 KiB columns).
const BLOCK_ROWS: usize = 64;

/// y (m, rows) = x (m, cols) @ W^T with float activations.
pub fn qmatmul_exact(q: &QuantizedMatrix, x: &[f32], m: usize) -> Vec<f32> {
    if m == 1 {
        let mut y = vec![0f32; q.rows];
        let out = SendPtr(y.as_mut_ptr());
        parallel_ranges(q.rows, MIN_ROWS_PER_THREAD, |rows| {
            // SAFETY: ranges are disjoint and inside y, which outlives the call.
            let ys = unsafe { std::slice::from_raw_parts_mut(out.get().add(rows.start), rows.len()) };
            float_rows(q, x, rows, ys);
        });
        return y;
    }
    let mut y = vec![0f32; m * q.rows];
    // Several rows of x: dequantize a block of W rows into a scratch buffer and hand it to
    // gemm; the full dequantized matrix never exists.
    let n_blocks = q.rows.div_ceil(BLOCK_ROWS);
    let y_ptr = SendPtr(y.as_mut_ptr());
    // On the decode pool, as every kernel of a forward pass (rayon's workers would fight its
    // spinning ones for the cores).
    parallel_ranges(n_blocks, 1, |blocks| {
        let mut scratch = Vec::new();
        for blk in blocks {
            let r0 = blk * BLOCK_ROWS;
            let nr = BLOCK_ROWS.min(q.rows - r0);
            scratch.resize(nr * q.cols, 0f32);
            for (i, row) in scratch.chunks_mut(q.cols).enumerate() {
                q.dequantize_row(r0 + i, row);
            }
            // SAFETY: each block writes only columns r0..r0 + nr of y (disjoint across
            // ranges); strides describe x (m, cols) row-major, scratch^T (cols, nr) and y
            // (m, rows).
            unsafe {
                gemm::gemm(
                    m,
                    nr,
                    q.cols,
                    y_ptr.get().add(r0),
                    1,
                    q.rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    q.cols as isize,
                    scratch.as_ptr(),
                    q.cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    y
}

/// gx (m, cols) = g (m, rows) @ W. Tasks own disjoint column ranges (whole groups) of gx
/// and walk W's rows in blocks, dequantizing only their columns of each block.
pub fn qmatmul_t(q: &QuantizedMatrix, g: &[f32], m: usize) -> Vec<f32> {
    let mut gx = vec![0f32; m * q.cols];
    let n_groups = q.cols / q.group_size;
    let tasks = (4 * rayon::current_num_threads()).clamp(1, n_groups);
    let groups_per_task = n_groups.div_ceil(tasks);
    let gx_ptr = SendPtr(gx.as_mut_ptr());
    (0..n_groups.div_ceil(groups_per_task)).into_par_iter().for_each(|t| {
        let g0 = t * groups_per_task;
        let g1 = (g0 + groups_per_task).min(n_groups);
        let (c0, width) = (g0 * q.group_size, (g1 - g0) * q.group_size);
        let mut scratch = vec![0f32; BLOCK_ROWS * width];
        for r0 in (0..q.rows).step_by(BLOCK_ROWS) {
            let nr = BLOCK_ROWS.min(q.rows - r0);
            for (i, row) in scratch.chunks_mut(width).take(nr).enumerate() {
                q.dequantize_row_groups(r0 + i, g0..g1, row);
            }
            // SAFETY: this task alone writes columns c0..c0 + width of gx (m, cols);
            // g is (m, rows) row-major and scratch (nr, width) row-major.
            unsafe {
                gemm::gemm(
                    m,
                    width,
                    nr,
                    gx_ptr.get().add(c0),
                    1,
                    q.cols as isize,
                    r0 > 0,
                    g.as_ptr().add(r0),
                    1,
                    q.rows as isize,
                    scratch.as_ptr(),
                    1,
                    width as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    gx
}

/// Bytes of matrix rows that every row of x meets before the next rows ([`qmatvec_many`]
/// with several rows of x): they stay in L1/L2 while read again, so the weights come from
/// memory once for all rows.
const DECODE_BLOCK_BYTES: usize = 32 * 1024;

/// Decode: [W_0 x_i, W_1 x_i, ...] concatenated for each of the m rows x_i of x, for
/// matrices that share x (a layer's q/k/v or gate/up projections), rows split over threads;
/// 4- and 8-bit weights use the integer kernels on int8 activations ([`Q8Act`]), other widths
/// the float ones. Each row's outputs are computed exactly
/// as for that row alone (the decode kernels), so a sequence decoded in a batch gives the
/// tokens it gives alone. A row is rounded to int8 once for all the matrices of one format;
/// all matrix rows form one parallel step, and with several rows of x each block of
/// matrix rows meets every row of x while it is in cache.
pub fn qmatvec_many(qs: &[&QuantizedMatrix], x: &[f32], m: usize) -> Vec<f32> {
    let total: usize = qs.iter().map(|q| q.rows).sum();
    let mut y = vec![0f32; m * total];
    qmatvec_many_into(qs, x, m, &mut y);
    y
}

/// [`qmatvec_many`] into `y` (m rows of the matrices' rows together), which it overwrites.
pub(crate) fn qmatvec_many_into(qs: &[&QuantizedMatrix], x: &[f32], m: usize, y: &mut [f32]) {
    let total: usize = qs.iter().map(|q| q.rows).sum();
    let cols = qs[0].cols;
    assert!(y.len() == m * total && x.len() == m * cols, "qmatvec_many_into: {} inputs / {} outputs for {m} rows", x.len(), y.len());
    let out = SendPtr(y.as_mut_ptr());
    // x is rounded once per distinct (cols, bits, group size, scale dtype): matrix i uses the
    // activations of the first matrix like it, `owner[i]`.
    let owner: Vec<usize> = (0..qs.len()).map(|i| (0..i).find(|&j| same_act(qs[j], qs[i])).unwrap_or(i)).collect();
    let acts: Vec<Vec<Option<Q8Act>>> = x.chunks_exact(cols).map(|x| qs.iter().enumerate().map(|(i, q)| if owner[i] == i { Q8Act::new(q, x) } else { None }).collect()).collect();
    let row_bytes = qs.iter().map(|q| q.packed.len() * 4 / q.rows.max(1)).max().unwrap_or(1).max(1);
    let block = if m == 1 { usize::MAX } else { (DECODE_BLOCK_BYTES / row_bytes).max(4) };
    parallel_ranges(total, MIN_ROWS_PER_THREAD, |range| {
        for start in range.clone().step_by(block) {
            let range = start..range.end.min(start.saturating_add(block));
            for (r, (acts, x)) in acts.iter().zip(x.chunks_exact(cols)).enumerate() {
                let mut first = 0;
                for (i, q) in qs.iter().enumerate() {
                    let (lo, hi) = (range.start.max(first), range.end.min(first + q.rows));
                    if lo < hi {
                        // SAFETY: ranges are disjoint and inside y's row r, which outlives
                        // the call.
                        let ys = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * total + lo), hi - lo) };
                        let rows = lo - first..hi - first;
                        match (acts[owner[i]].as_ref(), &q.scales, &q.biases) {
                            (Some(a), GroupParams::Bf16(s), GroupParams::Bf16(b)) => int8_rows(q, s, b, a, rows, ys),
                            (Some(a), GroupParams::F16(s), GroupParams::F16(b)) => int8_rows(q, s, b, a, rows, ys),
                            (Some(a), GroupParams::F32(s), GroupParams::F32(b)) => int8_rows(q, s, b, a, rows, ys),
                            _ => float_rows(q, x, rows, ys),
                        }
                    }
                    first += q.rows;
                }
            }
        }
    });
    for (act, q) in acts.into_iter().flat_map(|row| row.into_iter().zip(qs)) {
        if let Some(act) = act {
            act.recycle(q);
        }
    }
}

/// Matrix rows per block of the int8 product of several rows ([`qmatmul_many_q8`]): the 16
/// i32 lanes of a 512-bit register.
const QB: usize = 16;

/// Rows of x per call of the int8 product's kernel (with 16 matrix rows per register: 8
/// i32 and 8 f32 accumulators).
pub(super) const GEMM_MR: usize = 8;

/// True when [`qmatmul_many_q8`] takes these matrices on this CPU (AVX-512 VNNI).
pub(super) fn q8_gemm_applies(qs: &[&QuantizedMatrix]) -> bool {
    matches!(level(), Level::Vnni | Level::Vnni512) && qs.iter().all(|q| Q8Act::fits(q) && q.cols == qs[0].cols)
}

/// Each row of x (m, cols) rounded to int8 for `q`'s kernels, rows split over threads. The
/// rows' buffers are allocated before the split, on the calling thread: allocated inside it,
/// both threads took the allocator's lock at once (the binary keeps one malloc arena), and
/// allocation and the lock's waits took ~14% of a 2-thread prompt's samples (now ~5%).
fn q8_rows(q: &QuantizedMatrix, x: &[f32], m: usize) -> Vec<Q8Act> {
    let mut acts: Vec<Q8Act> = (0..m).map(|_| Q8Act::zeroed(q)).collect();
    let out = SendPtr(acts.as_mut_ptr());
    parallel_ranges(m, 4, |rows| {
        for i in rows {
            // SAFETY: ranges are disjoint and inside `acts`, which outlives the call.
            unsafe { (*out.get().add(i)).quantize(&x[i * q.cols..(i + 1) * q.cols], q.group_size, q.bits) };
        }
    });
    acts
}

/// `[x @ W_0^T, x @ W_1^T, ...]`, each (m, rows of W_i), for several rows of x (prefill) with
/// the integer kernels: x rounded to int8 per group once per distinct matrix format, as in
/// decode ([`Q8Act`]), and each block of 16 matrix rows interleaved word by word (packed
/// codes copied, not dequantized) and run past all rows of x, 8 at a time. Blocks split over
/// threads on the decode pool; each writes its columns of its matrix's own output (no joint
/// output to split and copy afterwards). Callers check [`q8_gemm_applies`].
///
/// Each matrix takes the path it takes alone (the AMX tiles where its groups allow them, else
/// VNNI), whatever shares its input: the two round their float sums differently, and a
/// matrix's product must not depend on its neighbours (a layer's q/k/v together equal each
/// alone).
pub fn qmatmul_many_q8<T: Elem>(qs: &[&QuantizedMatrix], x: &[f32], m: usize) -> Vec<Vec<T>> {
    let (tiles, rest): (Vec<usize>, Vec<usize>) = (0..qs.len()).partition(|&i| amx_applies(&[qs[i]]));
    match (tiles.is_empty(), rest.is_empty()) {
        (true, _) => qmatmul_many_vnni(qs, x, m),
        (false, true) => qmatmul_many_amx(qs, x, m),
        (false, false) => {
            let pick = |ix: &[usize]| ix.iter().map(|&i| qs[i]).collect::<Vec<_>>();
            let mut out: Vec<Vec<T>> = (0..qs.len()).map(|_| Vec::new()).collect();
            for (i, y) in tiles.iter().zip(qmatmul_many_amx(&pick(&tiles), x, m)) {
                out[*i] = y;
            }
            for (i, y) in rest.iter().zip(qmatmul_many_vnni(&pick(&rest), x, m)) {
                out[*i] = y;
            }
            out
        }
    }
}

/// True when [`qmatmul_many_q8`] takes the AMX tiles for these matrices: AMX-INT8 granted,
/// AVX-512 VNNI not capped by `LMX_KERNELS`, groups of 64 or 128 (a tile's row is 64 bytes).
fn amx_applies(qs: &[&QuantizedMatrix]) -> bool {
    level() == Level::Vnni512 && crate::amx::int8_usable() && qs.iter().all(|q| q.group_size % 64 == 0)
}

/// [`qmatmul_many_q8`] with AVX-512 VNNI alone (`amx`: false) or on the AMX tiles where
/// they apply, to compare the two.
#[cfg(test)]
pub(super) fn qmatmul_many_q8_with(amx: bool, qs: &[&QuantizedMatrix], x: &[f32], m: usize) -> Option<Vec<Vec<f32>>> {
    match amx {
        true => amx_applies(qs).then(|| qmatmul_many_amx(qs, x, m)),
        false => Some(qmatmul_many_vnni(qs, x, m)),
    }
}

/// One activation format's rows for the AMX product, 16 rows a chunk (the last padded with
/// zero rows): each level's codes as `tdpbusd` B tiles, tile t of a chunk holding, in its row
/// k, bytes 4k..4k + 4 of elements 64t.. of each of the 16 rows; `dx` and `xsums` per chunk as
/// [groups][16].
struct AmxActs {
    chunks: usize,
    cols: usize,
    groups: usize,
    /// 64-byte aligned for the tile loads, as `fine`.
    codes: crate::amx::Aligned,
    fine: crate::amx::Aligned,
    dx: Vec<f32>,
    xsums: Vec<f32>,
}

impl AmxActs {
    /// The m rows of x (m, q.cols) coded for `q` ([`Q8Act`]) and laid out as tiles, chunks
    /// split over the decode pool's threads (one pass: each row coded into a reused buffer,
    /// then its chunk transposed).
    fn new(q: &QuantizedMatrix, x: &[f32], m: usize) -> Self {
        let (cols, groups) = (q.cols, q.cols / q.group_size);
        let (chunks, words) = (m.div_ceil(16), cols / 4);
        let mut t = AmxActs {
            chunks,
            cols,
            groups,
            codes: Aligned::zeroed(chunks * 16 * words),
            fine: Aligned::zeroed(chunks * 16 * words),
            dx: vec![0.0; chunks * 16 * groups],
            xsums: vec![0.0; chunks * 16 * groups],
        };
        let ptrs = (SendPtr(t.codes.words_mut().as_mut_ptr()), SendPtr(t.fine.words_mut().as_mut_ptr()), SendPtr(t.dx.as_mut_ptr()), SendPtr(t.xsums.as_mut_ptr()));
        parallel_ranges(chunks, 1, |range| {
            let (codes, fine, dx, xsums) = ptrs;
            let mut act = Q8Act::coded(q, &x[..cols], false).expect("amx_applies checked the format");
            let (mut src_codes, mut src_fine) = (vec![0u32; 16 * words], vec![0u32; 16 * words]);
            for ch in range {
                let rows = 16.min(m - ch * 16);
                src_codes.fill(0);
                src_fine.fill(0);
                for r in 0..rows {
                    let i = ch * 16 + r;
                    act.quantize(&x[i * cols..(i + 1) * cols], q.group_size, q.bits);
                    for (level, src) in [(&act.codes, &mut src_codes), (&act.fine, &mut src_fine)] {
                        for (w, c) in src[r * words..(r + 1) * words].iter_mut().zip(level.chunks_exact(4)) {
                            *w = u32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]);
                        }
                    }
                    for g in 0..groups {
                        // SAFETY: chunk ch's per-group values belong to this range alone.
                        unsafe {
                            *dx.get().add((ch * groups + g) * 16 + r) = act.dx[g];
                            *xsums.get().add((ch * groups + g) * 16 + r) = act.xsums[g];
                        }
                    }
                }
                for (src, dst) in [(&src_codes, codes), (&src_fine, fine)] {
                    // SAFETY: chunk ch's 16 x words words belong to this range alone;
                    // amx_applies checked AVX-512.
                    unsafe {
                        let dst = std::slice::from_raw_parts_mut(dst.get().add(ch * 16 * words), 16 * words);
                        crate::bf16_gemm::transpose_u32(src, dst, 16, words);
                    }
                }
            }
        });
        t
    }

    /// Chunk `ch`'s (codes, fine, dx, xsums).
    fn chunk(&self, ch: usize) -> (*const u8, *const u8, &[f32], &[f32]) {
        // A chunk is 16 rows of cols / 4 words.
        let (words, g) = (4 * self.cols, 16 * self.groups);
        (self.codes.words()[ch * words..].as_ptr() as *const u8, self.fine.words()[ch * words..].as_ptr() as *const u8, &self.dx[ch * g..(ch + 1) * g], &self.xsums[ch * g..(ch + 1) * g])
    }
}

/// The work of a several-row product over matrices sharing their input: for each matrix the
/// first one that takes the same int8 activations (whose codes it shares), and the blocks of
/// `rows` matrix rows as (matrix, first row).
fn plan(qs: &[&QuantizedMatrix], rows: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let owner = (0..qs.len()).map(|i| (0..i).find(|&j| same_act(qs[j], qs[i])).unwrap_or(i)).collect();
    let blocks = qs.iter().enumerate().flat_map(|(i, q)| (0..q.rows).step_by(rows).map(move |r0| (i, r0))).collect();
    (owner, blocks)
}

/// One output (m, q.rows) per matrix, to be written in place by the blocks of a product
/// ([`Outputs::write`]) and then taken whole ([`Outputs::finish`]).
struct Outputs<T> {
    ys: Vec<Vec<T>>,
    ptrs: Vec<SendPtr<T>>,
    widths: Vec<usize>,
    m: usize,
}

impl<T> Outputs<T> {
    fn new(qs: &[&QuantizedMatrix], m: usize) -> Self {
        let mut ys: Vec<Vec<T>> = qs.iter().map(|q| Vec::with_capacity(m * q.rows)).collect();
        let ptrs = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
        Outputs { ys, ptrs, widths: qs.iter().map(|q| q.rows).collect(), m }
    }

    /// Matrix i's output at (row, col).
    /// SAFETY: row < m and col < the matrix's rows; no other thread writes the same element.
    unsafe fn write(&self, i: usize, row: usize, col: usize, v: T) {
        // SAFETY: inside matrix i's output (m, widths[i]), as the caller promised.
        unsafe { self.ptrs[i].get().add(row * self.widths[i] + col).write(v) };
    }

    /// Matrix i's outputs at (row, col..col + v.len()), rounded to T (one loop, which
    /// vectorizes).
    /// SAFETY: row < m and col + v.len() <= the matrix's rows; no other thread writes these.
    unsafe fn write_row(&self, i: usize, row: usize, col: usize, v: &[f32])
    where
        T: Elem,
    {
        // SAFETY: inside matrix i's output (m, widths[i]), as the caller promised.
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptrs[i].get().add(row * self.widths[i] + col), v.len()) };
        out.iter_mut().zip(v).for_each(|(o, v)| *o = T::of(*v));
    }

    /// The outputs, every element of which the caller has written.
    /// SAFETY: [`Outputs::write`] was called for every element of every output.
    unsafe fn finish(mut self) -> Vec<Vec<T>> {
        for (y, w) in self.ys.iter_mut().zip(&self.widths) {
            // SAFETY: the capacity is m * w, every element written, as the caller promised.
            unsafe { y.set_len(self.m * w) };
        }
        self.ys
    }
}

/// [`qmatmul_many_q8`] on AMX tiles: activations coded and laid out as tiles once
/// ([`AmxActs`]); each block of 32 matrix rows as one byte per element (4-bit rows unpacked
/// into a scratch buffer, 8-bit rows read in place), scales and biases as f32, then run past
/// every chunk of 16 activation rows ([`x86::amx_block_q8`](super::x86::amx_block_q8)).
/// Blocks split over threads on the decode pool.
fn qmatmul_many_amx<T: Elem>(qs: &[&QuantizedMatrix], x: &[f32], m: usize) -> Vec<Vec<T>> {
    let (owner, blocks) = plan(qs, AMX_ROWS);
    let acts: Vec<Option<AmxActs>> = qs.iter().enumerate().map(|(i, q)| (owner[i] == i).then(|| AmxActs::new(q, x, m))).collect();
    // Every element is written below before the lengths are set.
    let ys = Outputs::new(qs, m);
    parallel_ranges(blocks.len(), 1, |range| {
        let (mut bytes, mut s, mut b) = (Aligned::default(), Vec::new(), Vec::new());
        let mut out = [[0f32; 16]; AMX_ROWS];
        // SAFETY: amx_applies checked AMX; the tiles are this thread's until released below.
        unsafe { crate::amx::configure() };
        for &(i, r0) in &blocks[range] {
            let q = qs[i];
            let (nr, groups) = (AMX_ROWS.min(q.rows - r0), q.cols / q.group_size);
            let a = amx_rows(q, r0, nr, &mut bytes);
            for (params, out) in [(&q.scales, &mut s), (&q.biases, &mut b)] {
                out.clear();
                out.resize(AMX_ROWS * groups, 0.0);
                for j in 0..nr {
                    params.fill((r0 + j) * groups, &mut out[j * groups..(j + 1) * groups]);
                }
            }
            let t = acts[owner[i]].as_ref().expect("the owner codes the activations");
            for ch in 0..t.chunks {
                let (codes, fine, dx, xsums) = t.chunk(ch);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: amx_applies checked AVX-512 and AMX-INT8, configured above; `a`
                // holds 32 rows of q.cols bytes q.cols apart; the chunk's tiles cover q.cols.
                unsafe {
                    super::x86::amx_block_q8(a, q.cols, codes, fine, q.group_size, &s, &b, dx, xsums, &mut out)
                };
                for (j, o) in out.iter().enumerate().take(nr) {
                    for (r, v) in o.iter().enumerate().take(m - ch * 16) {
                        // SAFETY: row ch * 16 + r < m, column r0 + j < q.rows; this block
                        // alone writes column r0 + j of matrix i's output.
                        unsafe { ys.write(i, ch * 16 + r, r0 + j, T::of(*v)) };
                    }
                }
            }
        }
        // SAFETY: as for configure.
        unsafe { crate::amx::release() };
    });
    // SAFETY: the blocks cover every matrix row and the chunks every row of x, so every
    // element of every output was written.
    unsafe { ys.finish() }
}

/// Matrix rows per block of the AMX product: two A tiles.
const AMX_ROWS: usize = 32;

/// Rows r0..r0 + nr of `q` as one byte per element ([`AMX_ROWS`] rows, q.cols apart, on a
/// 64-byte boundary; rows past nr zero): 8-bit rows in place where the block is whole and
/// aligned, else through `buf`.
fn amx_rows(q: &QuantizedMatrix, r0: usize, nr: usize, buf: &mut Aligned) -> *const u8 {
    let words = q.cols * q.bits / 32;
    let packed = &q.packed[r0 * words..(r0 + nr) * words];
    // SAFETY: u32 words viewed as their bytes.
    let packed = unsafe { std::slice::from_raw_parts(packed.as_ptr() as *const u8, packed.len() * 4) };
    if q.bits == 8 && nr == AMX_ROWS && packed.as_ptr().align_offset(64) == 0 {
        return packed.as_ptr();
    }
    if buf.words().len() != AMX_ROWS * q.cols / 4 {
        *buf = Aligned::zeroed(AMX_ROWS * q.cols / 4);
    }
    let bytes = buf.bytes_mut();
    if q.bits == 8 {
        bytes[..packed.len()].copy_from_slice(packed);
        bytes[packed.len()..].fill(0);
    } else if q.bits != 4 {
        bytes[nr * q.cols..].fill(0);
        for (j, row) in bytes.chunks_exact_mut(q.cols).take(nr).enumerate() {
            unpack_row(q, r0 + j, row);
        }
    } else {
        bytes[2 * packed.len()..].fill(0);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: amx_applies checked AVX-512 (so AVX2); 4-bit rows are whole runs of 64.
        unsafe {
            super::x86::unpack_nibbles(packed, bytes)
        };
    }
    bytes.as_ptr()
}

/// [`qmatmul_many_q8`] on AVX-512 VNNI.
fn qmatmul_many_vnni<T: Elem>(qs: &[&QuantizedMatrix], x: &[f32], m: usize) -> Vec<Vec<T>> {
    let (owner, blocks) = plan(qs, QB);
    let acts: Vec<Option<Vec<Q8Act>>> = qs.iter().enumerate().map(|(i, q)| (owner[i] == i).then(|| q8_rows(q, x, m))).collect();
    let refs: Vec<Vec<&Q8Act>> = acts.iter().map(|a| a.iter().flatten().collect()).collect();
    // Every element is written below before the lengths are set.
    let ys = Outputs::new(qs, m);
    parallel_ranges(blocks.len(), 1, |range| {
        let (mut w, mut s, mut b, mut tmp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut out = [[0f32; 16]; GEMM_MR];
        for &(i, r0) in &blocks[range] {
            let q = qs[i];
            let nr = QB.min(q.rows - r0);
            interleave(q, r0, nr, &mut w, &mut s, &mut b, &mut tmp);
            let rows = &refs[owner[i]];
            for i0 in (0..m).step_by(GEMM_MR) {
                let chunk = &rows[i0..(i0 + GEMM_MR).min(m)];
                gemm_block(q, &w, &s, &b, chunk, &mut out);
                for (r, o) in out.iter().enumerate().take(chunk.len()) {
                    // SAFETY: row i0 + r < m, columns r0..r0 + nr < q.rows; this block alone
                    // writes them in matrix i's output.
                    unsafe { ys.write_row(i, i0 + r, r0, &o[..nr]) };
                }
            }
        }
    });
    // SAFETY: the blocks cover every matrix row and the steps of GEMM_MR every row of x,
    // so every element of every output was written.
    unsafe { ys.finish() }
}

/// Rows r0..r0 + nr of `q` interleaved for [`gemm_block`]: `w[t * 16 + j]` = word t of row
/// r0 + j, `s`/`b[g * 16 + j]` its group g's scale/bias as f32; rows past nr are zeros. The
/// rows are transposed in 16 x 16 tiles (a strided store per word took 5% of a 4-bit prompt).
/// The outputs and the scratch `tmp` are reused from block to block (no allocation per block).
fn interleave(q: &QuantizedMatrix, r0: usize, nr: usize, w: &mut Vec<u32>, s: &mut Vec<f32>, b: &mut Vec<f32>, tmp: &mut Vec<u32>) {
    let groups = q.cols / q.group_size;
    // 5- and 6-bit rows as 8-bit ones, one byte a code.
    let words = q.cols * gemm_bits(q) / 32;
    w.resize(words * QB, 0);
    s.resize(groups * QB, 0.0);
    b.resize(groups * QB, 0.0);
    let src: &[u32] = if gemm_bits(q) != q.bits {
        tmp.clear();
        tmp.resize(QB * words, 0);
        for (j, row) in tmp.chunks_exact_mut(words).take(nr).enumerate() {
            // SAFETY: u32 words viewed as their bytes (cols of them).
            let bytes = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut u8, q.cols) };
            unpack_row(q, r0 + j, bytes);
        }
        tmp
    } else if nr == QB {
        &q.packed[r0 * words..(r0 + QB) * words]
    } else {
        tmp.clear();
        tmp.extend_from_slice(&q.packed[r0 * words..(r0 + nr) * words]);
        tmp.resize(QB * words, 0);
        tmp
    };
    // SAFETY: q8_gemm_applies checked AVX-512 (VNNI on 512-bit registers); both hold QB x
    // words words.
    unsafe { crate::bf16_gemm::transpose_u32(src, w, QB, words) };
    for (params, out) in [(&q.scales, &mut *s), (&q.biases, &mut *b)] {
        // The rows' values in row order (rows past nr zero), as bits, then transposed into out.
        tmp.clear();
        tmp.resize(QB * groups, 0);
        let values: &mut [f32] = as_f32s(tmp);
        for j in 0..nr {
            params.fill((r0 + j) * groups, &mut values[j * groups..(j + 1) * groups]);
        }
        let t: &mut [u32] = as_bits(out);
        // SAFETY: as above; QB x groups words each.
        unsafe { crate::bf16_gemm::transpose_u32(tmp, t, QB, groups) };
    }
}

/// The same memory as f32 (every u32 bit pattern is an f32).
fn as_f32s(v: &mut [u32]) -> &mut [f32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// The same memory as u32 (every f32's bits).
fn as_bits(v: &mut [f32]) -> &mut [u32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// The bit width of `q`'s rows as the prefill products read them: 5 and 6 bits
/// unpacked to bytes ([`unpack_row`]).
fn gemm_bits(q: &QuantizedMatrix) -> usize {
    if q.bits == 4 {
        4
    } else {
        8
    }
}

/// One block of [`qmatmul_many_q8`] with the kernel for `q`'s bit width and group size.
fn gemm_block(q: &QuantizedMatrix, w: &[u32], s: &[f32], b: &[f32], acts: &[&Q8Act], out: &mut [[f32; 16]; GEMM_MR]) {
    let groups = q.cols / q.group_size;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: q8_gemm_applies checked AVX-512 VNNI; interleave sized w, s, b for the block;
    // every act has q.cols codes.
    unsafe {
        use super::x86::gemm_q8_vnni as k;
        match (gemm_bits(q), q.group_size) {
            (4, 32) => k::<4, 32>(w, s, b, groups, acts, out),
            (4, 64) => k::<4, 64>(w, s, b, groups, acts, out),
            (4, 128) => k::<4, 128>(w, s, b, groups, acts, out),
            (8, 32) => k::<8, 32>(w, s, b, groups, acts, out),
            (8, 64) => k::<8, 64>(w, s, b, groups, acts, out),
            (8, 128) => k::<8, 128>(w, s, b, groups, acts, out),
            _ => unreachable!("Q8Act::fits admits 4 and 8 bits, groups of 32, 64 and 128"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("q8_gemm_applies is false off x86_64")
}

/// True when `b` takes the same int8 activations as `a`.
fn same_act(a: &QuantizedMatrix, b: &QuantizedMatrix) -> bool {
    (a.cols, a.bits, a.group_size, a.scales.dtype(), a.biases.dtype()) == (b.cols, b.bits, b.group_size, b.scales.dtype(), b.biases.dtype())
}

/// The instruction set the integer decode kernels use on this CPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(dead_code)] // each architecture constructs its own variants
pub(super) enum Level {
    /// Portable Rust (the reference the others are tested against).
    Scalar,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX2 + FMA + AVX-512 VNNI on 256-bit registers.
    Vnni,
    /// x86-64 AVX-512 (F, BW, VL) VNNI on 512-bit registers.
    Vnni512,
    /// aarch64 NEON (widening multiplies).
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

/// The best [`Level`] this CPU runs (`LMX_KERNELS=vnni|avx2|neon|scalar` asks for a lower one,
/// to compare them).
pub(super) fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("LMX_KERNELS").ok();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let vnni = avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512vnni");
            match cap.as_deref() {
                Some("scalar") => Level::Scalar,
                Some("avx2") if avx2 => Level::Avx2,
                Some("vnni") if vnni => Level::Vnni,
                _ if vnni && has!("avx512bw") => Level::Vnni512,
                _ if vnni => Level::Vnni,
                _ if avx2 => Level::Avx2,
                _ => Level::Scalar,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            match cap.as_deref() {
                Some("scalar") => Level::Scalar,
                Some("neon") => Level::Neon,
                _ if std::arch::is_aarch64_feature_detected!("dotprod") => Level::NeonDot,
                _ => Level::Neon,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = cap;
            Level::Scalar
        }
    })
}

/// Whether this CPU's integer kernels read `bits`-bit codes as stored where they are neither 4
/// nor 8 bits: 5 and 6 bits with AVX-512 VNNI on 512-bit registers and VBMI, which spreads
/// them to bytes as they load (`x86::narrow_bytes`). Elsewhere, and for 2 and 3 bits, a model
/// holds them 4 or 8 bits wide ([`QuantizedMatrix::widened`]). Llama-1B-shaped decode, Zen 4,
/// tok/s as stored / widened: 6 bits 25.2-25.6 / 18.5-19.6 (1 thread), 32.3-44.0 /
/// 24.9-33.1 (2); 5 bits 27.8-27.9 / 19.9-20.3, 42.8-48.6 / 34.7-36.4; 3 bits 24.4-27.8 /
/// 38.0-41.1, 44.2-49.8 / 43.9-47.7: three bits as stored are bound by the instructions that
/// spread them (64 codes a step, where 4-bit slots go 128), and gain only memory.
/// `LMX_NARROW=0` widens every width.
pub fn runs_narrow(bits: usize) -> bool {
    static VBMI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let vbmi = *VBMI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            level() == Level::Vnni512 && std::arch::is_x86_feature_detected!("avx512vbmi") && std::env::var("LMX_NARROW").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    });
    matches!(bits, 5 | 6) && vbmi
}

/// `q`'s row `r` as one byte a code (5- or 6-bit rows, for the prefill products,
/// which read them as 8-bit rows) into `out` (q.cols bytes).
fn unpack_row(q: &QuantizedMatrix, r: usize, out: &mut [u8]) {
    let words = q.cols * q.bits / 32;
    let row = &q.packed[r * words..(r + 1) * words];
    #[cfg(target_arch = "x86_64")]
    if runs_narrow(q.bits) {
        // SAFETY: runs_narrow checked AVX-512 VBMI; the row holds q.cols codes (a multiple
        // of 32: whole groups) and out at least q.cols bytes.
        unsafe { super::x86::unpack_narrow(q.bits, row.as_ptr() as *const u8, q.cols, out) };
        return;
    }
    for (e, o) in out[..q.cols].iter_mut().enumerate() {
        *o = get_bits(row, e * q.bits, q.bits) as u8;
    }
}

/// Outputs `rows` of a 4- or 8-bit matrix against int8 activations.
fn int8_rows<S: Scale>(q: &QuantizedMatrix, s: &[S], b: &[S], act: &Q8Act, rows: Range<usize>, ys: &mut [f32]) {
    let groups = q.cols / q.group_size;
    let words = q.cols * q.bits / 32;
    rows_q8(level(), &q.packed[rows.start * words..rows.end * words], q.bits, q.group_size, &s[rows.start * groups..], &b[rows.start * groups..], act, ys);
}

/// `out.len()` consecutive outputs of a 4- or 8-bit matrix against int8 activations, with
/// the kernels of `level`: `rows` holds those rows' codes; `s` and `b` start at the first
/// row's first group and may run on to the end of the matrix's.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_q8<S: Scale>(level: Level, rows: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &Q8Act, out: &mut [f32]) {
    // Other widths than 4 and 8 bits: the 512-bit kernels where the CPU reads them as stored
    // (runs_narrow), else the portable ones.
    let level = if matches!(bits, 4 | 8) || (level == Level::Vnni512 && runs_narrow(bits)) { level } else { Level::Scalar };
    match level {
        // SAFETY: `level` says the CPU has these features; Q8Act::new checked the shapes.
        #[cfg(target_arch = "x86_64")]
        Level::Vnni => unsafe { super::x86::rows_q8_vnni(rows, bits, group_size, s, b, act, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Vnni512 => unsafe { super::x86::rows_q8_vnni512(rows, bits, group_size, s, b, act, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { super::x86::rows_q8_avx2(rows, bits, group_size, s, b, act, out) },
        // SAFETY: as above (NeonDot only where `dotprod` was detected).
        #[cfg(target_arch = "aarch64")]
        Level::Neon | Level::NeonDot => unsafe { super::arm::rows_q8(level == Level::NeonDot, rows, bits, group_size, s, b, act, out) },
        _ => {
            let (words, groups) = (act.codes.len() * bits / 32, act.codes.len() / group_size);
            for (r, o) in out.iter_mut().enumerate() {
                *o = scalar_row_q8(&rows[r * words..(r + 1) * words], bits, group_size, &s[r * groups..], &b[r * groups..], act);
            }
        }
    }
}

/// Portable reference for the integer decode kernels: the same integer sums per group, the
/// same float arithmetic per group.
pub(super) fn scalar_row_q8<S: Scale>(row: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &Q8Act) -> f32 {
    let mut total = 0f32;
    for g in 0..act.codes.len() / group_size {
        let sum = |codes: &[i8]| -> i32 { (g * group_size..(g + 1) * group_size).map(|e| get_bits(row, e * bits, bits) as i32 * i32::from(codes[Q8Act::position(e, bits)])).sum() };
        let isum = sum(&act.codes) as f32 + sum(&act.fine) as f32 * (1.0 / FINE);
        total += s[g].f32() * act.dx[g] * isum + b[g].f32() * act.xsums[g];
    }
    total
}

/// Outputs `rows` with the float kernels (bit widths without an integer kernel).
fn float_rows(q: &QuantizedMatrix, x: &[f32], rows: Range<usize>, ys: &mut [f32]) {
    // sum_g b_g * sum(x_g) does not depend on the row: sum x per group once.
    let xsums: Vec<f32> = x.chunks(q.group_size).map(|g| g.iter().sum()).collect();
    let groups = q.cols / q.group_size;
    let (mut s, mut b) = (vec![0f32; groups], vec![0f32; groups]);
    for (r, y) in rows.zip(ys) {
        *y = row_dot(q, r, x, &xsums, &mut s, &mut b);
    }
}

/// One token's activations as int8 codes for the integer kernels, in two levels: per
/// quantization group a scale `dx = max|x| / 127` and one code per element (llama.cpp's Q8
/// activations), then the rounding error of each element coded again with the scale
/// `dx / FINE` (its `fine` code), so `x ~ dx * (code + fine / FINE)` to within
/// `max|x| / 64516` per group. One level alone zeroes the small values of a group that holds
/// an outlier, and SmolLM2's activations have outliers: one level moved 8-bit SmolLM2's
/// perplexity by 7.8% (LICENSE text), two by 0.1%, against MLX's float product. Also kept
/// per group: the exact float sum (for the bias term, `bias * sum x`) and the sums of both
/// codes (for the AVX2 8-bit kernel, which multiplies codes minus 128). Integer
/// multiply-adds take a few instructions per 64 weights where widening to f32 takes 12 or
/// more, and they need no dequantized copy of the weights.
///
/// For 4-bit weights the codes of each 64 elements are ordered [even elements][odd
/// elements], the order in which 32 packed bytes split into low and high nibbles. The
/// per-group arrays are padded with zeros to a multiple of 8 groups: the SIMD kernels take 8
/// groups per step.
pub struct Q8Act {
    pub(super) codes: Vec<i8>,
    pub(super) fine: Vec<i8>,
    /// 4-bit weights only: `codes` and `fine` with each 128-element span reordered for a
    /// 64-byte load of packed weights ([`Q8Act::paired`]); empty otherwise.
    pub(super) pair_codes: Vec<i8>,
    pub(super) pair_fine: Vec<i8>,
    pub(super) dx: Vec<f32>,
    pub(super) xsums: Vec<f32>,
    pub(super) code_sums: Vec<i32>,
    pub(super) fine_sums: Vec<i32>,
}

/// Decode activations kept per thread between products, with the (columns, group size,
/// bits) they were sized for ([`Q8Act::recycle`]).
type SpareActs = Vec<((usize, usize, usize), Q8Act)>;

thread_local! {
    static SPARE_ACTS: std::cell::RefCell<SpareActs> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Activations kept per thread: a layer's products code at most a few distinct shapes.
const MAX_SPARE_ACTS: usize = 8;

/// The second level's step: `dx / FINE` (the first level's rounding error is within
/// `dx / 2`, which the fine codes span with 127 steps).
pub(super) const FINE: f32 = 254.0;

impl Q8Act {
    /// The activations for `q`'s integer kernels, or None where they do not apply (bit
    /// widths other than 4 and 8, 4-bit rows that are not a multiple of 64, scales and biases
    /// of different dtypes).
    pub(super) fn new(q: &QuantizedMatrix, x: &[f32]) -> Option<Self> {
        Self::coded(q, x, true)
    }

    /// As [`new`](Self::new), with the 4-bit decode kernels' [`paired`](Self::paired) order
    /// only when `paired` (the prefill product reads the codes in their plain order).
    fn coded(q: &QuantizedMatrix, x: &[f32], paired: bool) -> Option<Self> {
        if !Self::fits(q) || x.len() != q.cols {
            return None;
        }
        let mut a = Self::spare(q).unwrap_or_else(|| Self::zeroed(q));
        a.quantize(x, q.group_size, q.bits);
        if q.bits == 4 && paired {
            Self::paired(&a.codes, &mut a.pair_codes);
            Self::paired(&a.fine, &mut a.pair_fine);
        } else {
            a.pair_codes.clear();
            a.pair_fine.clear();
        }
        Some(a)
    }

    /// Activations put back by [`recycle`](Self::recycle) on this thread for a matrix of
    /// `q`'s shape (columns, group size, bits): every code is rewritten by `quantize`, and the
    /// per-group padding, never written, is still zero.
    fn spare(q: &QuantizedMatrix) -> Option<Self> {
        SPARE_ACTS.with_borrow_mut(|spare| {
            let i = spare.iter().position(|(k, _)| *k == Self::shape(q))?;
            Some(spare.swap_remove(i).1)
        })
    }

    /// Keeps these activations of a matrix of `q`'s shape for the next product on this thread
    /// (a decode step's products would otherwise allocate and free eight vectors each).
    pub(super) fn recycle(self, q: &QuantizedMatrix) {
        SPARE_ACTS.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE_ACTS {
                spare.push((Self::shape(q), self));
            }
        });
    }

    /// What sizes and lays out `q`'s activations: (columns, group size, bits).
    fn shape(q: &QuantizedMatrix) -> (usize, usize, usize) {
        (q.cols, q.group_size, q.bits)
    }

    /// All zeros, sized for `q` (which [`fits`](Self::fits)), unpaired.
    fn zeroed(q: &QuantizedMatrix) -> Self {
        let padded = (q.cols / q.group_size).next_multiple_of(8);
        Q8Act {
            codes: vec![0; q.cols],
            fine: vec![0; q.cols],
            pair_codes: Vec::new(),
            pair_fine: Vec::new(),
            dx: vec![0.0; padded],
            xsums: vec![0.0; padded],
            code_sums: vec![0; padded],
            fine_sums: vec![0; padded],
        }
    }

    /// 4-bit codes (in [`position`](Self::position) order) rearranged per 128-element span
    /// for a 64-byte load of packed weights, whose low nibbles are the even elements of two
    /// 64-element runs A and B and whose high nibbles their odd ones: [A even | B even | A odd
    /// | B odd], 32 codes each (the middle two swapped). A last run of 64 stays as it is.
    fn paired(codes: &[i8], out: &mut Vec<i8>) {
        out.clear();
        out.extend_from_slice(codes);
        for span in out.chunks_exact_mut(128) {
            let (a, b) = span.split_at_mut(64);
            a[32..].swap_with_slice(&mut b[..32]);
        }
    }

    /// Both levels of codes for x: AVX-512 or AVX2 where the CPU has them, else portable.
    fn quantize(&mut self, x: &[f32], group_size: usize, bits: usize) {
        #[cfg(target_arch = "x86_64")]
        if level() != Level::Scalar && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features were just checked; groups are 32, 64 or 128 elements and
            // the arrays are sized for x.
            unsafe { super::x86::quantize_act(x, group_size, bits, self) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if level() != Level::Scalar {
            // SAFETY: every level but Scalar has AVX2 and FMA; shapes as above.
            unsafe { super::x86::quantize_act256(x, group_size, bits, self) };
            return;
        }
        self.quantize_scalar(x, group_size, bits);
    }

    /// Portable reference for the two levels of codes (x86's AVX-512 version is tested
    /// against it).
    pub(super) fn quantize_scalar(&mut self, x: &[f32], group_size: usize, bits: usize) {
        for (g, xg) in x.chunks_exact(group_size).enumerate() {
            let amax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dx = amax / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let (mut sum, mut codes, mut fines) = (0f32, 0i32, 0i32);
            for (i, v) in xg.iter().enumerate() {
                let c = round_to_i8(v * inv);
                let f = round_to_i8(((v - f32::from(c) * dx) * (inv * FINE)).clamp(-127.0, 127.0));
                let at = Self::position(g * group_size + i, bits);
                (self.codes[at], self.fine[at]) = (c, f);
                sum += v;
                codes += i32::from(c);
                fines += i32::from(f);
            }
            (self.dx[g], self.xsums[g], self.code_sums[g], self.fine_sums[g]) = (dx, sum, codes, fines);
        }
    }

    /// Whether `q` takes int8 activations: 4 bits in rows of whole 64-element runs, 8 bits,
    /// or 5 and 6 bits where this CPU reads them as stored ([`runs_narrow`]), with
    /// scales and biases of one dtype.
    fn fits(q: &QuantizedMatrix) -> bool {
        let bits = match q.bits {
            4 => q.cols % 64 == 0,
            8 => true,
            b => runs_narrow(b),
        };
        bits && q.scales.dtype() == q.biases.dtype()
    }

    /// Where element `e`'s code sits.
    pub(super) fn position(e: usize, bits: usize) -> usize {
        if bits == 4 {
            let (run, j) = (e / 64 * 64, e % 64);
            run + (j % 2) * 32 + j / 2
        } else {
            e
        }
    }
}

/// `v` (within ±127.5) rounded half to even, as i8, without a libm call: adding 1.5 * 2^23
/// leaves the integer part in the low mantissa bits.
#[inline]
fn round_to_i8(v: f32) -> i8 {
    let magic = 12_582_912.0f32;
    ((v + magic).to_bits() as i32 - magic.to_bits() as i32) as i8
}

/// One output of a single-row product: sum over groups of scale * (x . q) + bias * sum(x).
/// `s`, `b` are scratch buffers of one f32 per group.
fn row_dot(q: &QuantizedMatrix, r: usize, x: &[f32], xsums: &[f32], s: &mut [f32], b: &mut [f32]) -> f32 {
    let words = q.cols * q.bits / 32;
    let row = &q.packed[r * words..(r + 1) * words];
    let groups = s.len();
    q.scales.fill(r * groups, s);
    q.biases.fill(r * groups, b);
    let bias_part: f32 = b.iter().zip(xsums).map(|(b, xs)| b * xs).sum();
    #[cfg(target_arch = "x86_64")]
    if (q.bits == 4 || q.bits == 8) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked above); `row` holds `cols` codes.
        return unsafe { super::x86::row_dot(row, q.bits, q.group_size, s, x) } + bias_part;
    }
    let mut acc = 0f32;
    for (g, sg) in s.iter().enumerate() {
        let (dot, _) = scalar_group_dot(row, g * q.group_size, q.bits, &x[g * q.group_size..(g + 1) * q.group_size]);
        acc += sg * dot;
    }
    acc + bias_part
}

/// Portable reference for the SIMD group dot product: (sum x_i * q_i, sum x_i).
pub fn scalar_group_dot(row: &[u32], start: usize, bits: usize, x: &[f32]) -> (f32, f32) {
    let (mut dot, mut xsum) = (0f32, 0f32);
    for (i, xi) in x.iter().enumerate() {
        dot += xi * get_bits(row, (start + i) * bits, bits) as f32;
        xsum += xi;
    }
    (dot, xsum)
}

/// Dequantizes one group (`out.len()` elements from element `start`).
pub fn dequantize_group(row: &[u32], start: usize, bits: usize, scale: f32, bias: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if (bits == 4 || bits == 8) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked above); the group lies inside `row`.
        unsafe { super::x86::dequantize_group(row, start, bits, scale, bias, out) };
        return;
    }
    scalar_dequantize_group(row, start, bits, scale, bias, out);
}

/// Portable reference for [`dequantize_group`].
pub fn scalar_dequantize_group(row: &[u32], start: usize, bits: usize, scale: f32, bias: f32, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        // Fused multiply-add, as the SIMD path computes it.
        *o = (get_bits(row, (start + i) * bits, bits) as f32).mul_add(scale, bias);
    }
}
