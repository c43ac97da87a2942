//! CPU kernels for decoding: matrix-vector products that stream the weights once at memory
//! bandwidth. One token's forward is a chain of `y = W x` with W (out, in) row-major, so each
//! output is a contiguous dot product; rows are split across threads. AVX2+FMA is chosen at
//! run time, with a scalar path the tests compare it against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape};
use half::{bf16, f16};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::frozen::{gemm_f32_serial, Mat};

/// Runs `f` over `0..n` split into one contiguous range per thread (fewer when a range would
/// hold less than `min_per_thread` items), on candle's persistent barrier pool: its workers
/// spin between calls, so the many short parallel steps of one decoded token each start in
/// well under a microsecond, where waking rayon workers from sleep costs several (and at 2
/// threads made decoding slower than at 1). The calling thread takes the first range.
///
/// A machine with more runnable threads than cores (other work, tests side by side) can
/// leave a worker off its core for a scheduler slice (milliseconds) while the caller spins at
/// the barrier for it, at any of the hundreds of barriers of a token. When calls wait that
/// long for their workers, calls run their ranges one after another on the calling thread
/// for a while (see [`Stalls`]): the same ranges, so the same results.
/// Must not be called from inside such a range (the pool is not re-entrant).
pub fn parallel_ranges(n: usize, min_per_thread: usize, f: impl Fn(Range<usize>) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let threads = (pool.n_workers() + 1).min(n / min_per_thread.max(1)).max(1);
    if threads == 1 {
        return f(0..n);
    }
    let per = n.div_ceil(threads);
    // Range i of the split; the last ones may be empty (n = 4 over 3 threads: 2, 2, 0).
    let run = |i: usize| {
        let r = (i * per).min(n)..((i + 1) * per).min(n);
        if !r.is_empty() {
            f(r);
        }
    };
    let start = Stalls::now_ns();
    if STALLS.serial(start) {
        return (0..threads).for_each(run);
    }
    let (caller, caller_done) = (pool.n_workers(), AtomicU64::new(0));
    pool.execute(|tid| {
        // The caller (numbered last) takes range 0, worker i range i + 1; extra workers none.
        let i = if tid == caller { 0 } else { tid + 1 };
        if i < threads {
            run(i);
        }
        if tid == caller {
            caller_done.store(Stalls::now_ns(), Ordering::Relaxed);
        }
    });
    let (done, end) = (caller_done.into_inner(), Stalls::now_ns());
    STALLS.record(threads, done - start, end - done, end);
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 + FMA and for
/// baseline x86-64 (4 lanes), and runs the widest this CPU has: elementwise loops (SiLU,
/// norms, rotary embeddings, bf16 roundings, log-sum-exp) vectorize 16 or 8 lanes wide. The
/// same operations run in the same order (LLVM neither reorders float sums nor fuses a
/// multiply and an add on its own), so every variant gives the same bits. The body is an
/// `#[inline(always)]` function called from `#[target_feature]` ones: a closure handed to such
/// a function is not inlined into it (it stays baseline code), so it has to be an item.
macro_rules! widest {
    ($(#[$m:meta])* $v:vis fn $name:ident $(<$($g:ident: $bound:path),*>)? ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $v fn $name $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
                unsafe fn avx512 $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? { body($($a),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2 $(<$($g: $bound),*>)? ($($a: $t),*) $(-> $r)? { body($($a),*) }
                match $crate::cpu::vector_width() {
                    // SAFETY: vector_width found every feature of the variant.
                    16 => return unsafe { avx512($($a),*) },
                    // SAFETY: as above.
                    8 => return unsafe { avx2($($a),*) },
                    _ => {}
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use widest;

/// f32 lanes of the widest vectors [`widest`] functions run on: 16 (AVX-512 F/BW/VL), 8
/// (AVX2, FMA, F16C) or 4 (baseline x86-64, and every other architecture).
#[inline]
pub(crate) fn vector_width() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            return if has!("avx512f") && has!("avx512bw") && has!("avx512vl") { 16 } else { 8 };
        }
    }
    4
}

/// When [`parallel_ranges`] runs on the calling thread alone: while the pool is slower than
/// the caller alone would be. A call stalls when its caller, done with its own range, waits
/// for the workers more than [`Stalls::WAIT_NS`] plus half its own time (balanced ranges
/// finish within microseconds of each other; a worker kept off its core waits for a scheduler
/// slice, 1-5 ms). At each stall the recent calls are weighed: their time on the pool (the
/// caller's own time plus its waits) against their work done alone (the caller's own time
/// times the ranges, which were balanced), both decaying by half every [`Stalls::WINDOW_NS`].
/// When the pool took longer, calls run on the caller alone for a back-off:
/// [`Stalls::MIN_BACKOFF_NS`], doubled up to [`Stalls::MAX_BACKOFF_NS`] while the pool is
/// slower again as soon as it is tried. The first call after a back-off is not weighed (its
/// workers slept and take a while to wake).
///
/// Measured on the 2-core VM used for development: idle, stalls come in bursts of 2-5 a few ms
/// apart, a burst every few hundred ms, and the pool stays ahead; beside one busy process a
/// stall comes every scheduler slice and the caller alone is faster. With many threads, one
/// of them off its core costs less than running everything on one, and the pool is kept.
struct Stalls {
    state: std::sync::Mutex<StallState>,
}

#[derive(Default)]
struct StallState {
    /// Start of the current decay window.
    since_ns: u64,
    /// Recent calls' time on the pool, and the same work's estimated time on the caller alone.
    pool_ns: u64,
    alone_ns: u64,
    serial_until_ns: u64,
    backoff_ns: u64,
    /// The next pool call follows a back-off (its workers parked).
    waking: bool,
}

static STALLS: Stalls = Stalls::new();

impl Stalls {
    const WAIT_NS: u64 = 500_000;
    const WINDOW_NS: u64 = 20_000_000;
    const MIN_BACKOFF_NS: u64 = 10_000_000;
    const MAX_BACKOFF_NS: u64 = 400_000_000;

    const fn new() -> Self {
        Stalls { state: std::sync::Mutex::new(StallState { since_ns: 0, pool_ns: 0, alone_ns: 0, serial_until_ns: 0, backoff_ns: Self::MIN_BACKOFF_NS, waking: false }) }
    }

    /// Nanoseconds since the first call (a monotonic clock).
    fn now_ns() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    fn serial(&self, now_ns: u64) -> bool {
        self.state.lock().is_ok_and(|s| now_ns < s.serial_until_ns)
    }

    /// A call over `ranges` ranges that ended at `now` (on [`Stalls::now_ns`]'s clock): its
    /// caller took `own_ns` for its range, then waited `wait_ns` for the workers.
    fn record(&self, ranges: usize, own_ns: u64, wait_ns: u64, now: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        if std::mem::take(&mut s.waking) {
            return;
        }
        while now >= s.since_ns + Self::WINDOW_NS {
            (s.pool_ns, s.alone_ns) = (s.pool_ns / 2, s.alone_ns / 2);
            s.since_ns = if s.pool_ns == 0 && s.alone_ns == 0 { now } else { s.since_ns + Self::WINDOW_NS };
        }
        s.pool_ns += own_ns + wait_ns;
        s.alone_ns += own_ns * ranges as u64;
        if wait_ns <= Self::WAIT_NS + own_ns / 2 || s.pool_ns <= s.alone_ns {
            return;
        }
        // Slower again right after a back-off: back off longer.
        s.backoff_ns = if s.serial_until_ns > 0 && now < s.serial_until_ns + 2 * Self::WINDOW_NS { (2 * s.backoff_ns).min(Self::MAX_BACKOFF_NS) } else { Self::MIN_BACKOFF_NS };
        s.serial_until_ns = now + s.backoff_ns;
        (s.pool_ns, s.alone_ns, s.waking) = (0, 0, true);
    }
}

/// Rows per thread below which a decode product (matrix-vector, dense or quantized) stays on
/// one thread.
pub(crate) const MIN_ROWS_PER_THREAD: usize = 16;

/// Values of k per pass of [`x86::gemm_nt_rows`]: 6 activation rows of it (24 KiB) stay in
/// L1. Chunks of 512 cost a Llama-1B-shaped F16 prompt 20% (more reductions); whole rows
/// (8,192) were level with 1,024.
#[cfg(target_arch = "x86_64")]
const NT_CHUNK: usize = 1024;

/// `x @ w^T` for several f32 rows (prefill of f32 models) on the decode pool: blocks of 64
/// output columns split over its threads (candle's matmul would run on rayon, whose workers
/// fight the pool's spinning ones for the cores), each block tiles of dot products
/// ([`x86::gemm_nt_rows`]) where the CPU has AVX2 (512-bit ones with AVX-512), else a
/// single-threaded gemm. `x`: (.., k) contiguous; `w`: (n, k) contiguous, f32 or f16
/// (widened as loaded, or a block at a time for the gemm); no backward.
pub struct F32Linear;

impl CustomOp2 for F32Linear {
    fn name(&self) -> &'static str {
        "lmx-f32-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let mut dims = xl.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("f32 linear: input {dims:?} does not end in {k} features");
        }
        let x = contiguous::<f32>(xs, xl)?;
        // f16 weights (an f16 checkpoint's, kept as stored in an f32 model): the tiles widen
        // them as they load; the gemm below widens a block of rows at a time into a scratch
        // reused by the range's blocks (a whole f32 copy per product had cost fresh pages: a
        // 1B model's prompt spent 20% of its samples zeroing them).
        #[derive(Clone, Copy)]
        enum Weights<'a> {
            F32(&'a [f32]),
            F16(&'a [f16]),
        }
        let w = match ws.dtype() {
            DType::F16 => Weights::F16(contiguous::<f16>(ws, wl)?),
            _ => Weights::F32(contiguous::<f32>(ws, wl)?),
        };
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        let y_ptr = SendPtr(y.as_mut_ptr());
        const BLOCK: usize = 64;
        // Tiles of dot products straight on the operands (no packing, f16 widened in
        // registers): 2x the gemm below on a Llama-1B-shaped F16 prompt (AVX-512; AVX2 1.9x).
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            let wide = std::arch::is_x86_feature_detected!("avx512f");
            parallel_ranges(n.div_ceil(BLOCK), 1, |blocks| {
                for blk in blocks {
                    let cols = blk * BLOCK..(blk * BLOCK + BLOCK).min(n);
                    // SAFETY: AVX2, FMA and F16C checked above, AVX-512F for `wide`; w is
                    // (n, k) and x (m, k); this block alone writes columns `cols` of y (m, n).
                    unsafe {
                        match (w, wide) {
                            (Weights::F32(w), true) => x86::gemm_nt_rows::<_, true>(w, x, m, k, n, cols, y_ptr.get()),
                            (Weights::F16(w), true) => x86::gemm_nt_rows::<_, true>(w, x, m, k, n, cols, y_ptr.get()),
                            (Weights::F32(w), false) => x86::gemm_nt_rows::<_, false>(w, x, m, k, n, cols, y_ptr.get()),
                            (Weights::F16(w), false) => x86::gemm_nt_rows::<_, false>(w, x, m, k, n, cols, y_ptr.get()),
                        }
                    }
                }
            });
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        }
        parallel_ranges(n.div_ceil(BLOCK), 1, |blocks| {
            let mut scratch = Vec::new();
            for blk in blocks {
                let (c0, nb) = (blk * BLOCK, BLOCK.min(n - blk * BLOCK));
                let rows: &[f32] = match w {
                    Weights::F32(w) => &w[c0 * k..(c0 + nb) * k],
                    Weights::F16(w) => {
                        use half::slice::HalfFloatSliceExt;
                        scratch.resize(nb * k, 0f32);
                        w[c0 * k..(c0 + nb) * k].convert_to_f32_slice(&mut scratch);
                        &scratch
                    }
                };
                // SAFETY: this block alone writes columns c0..c0 + nb of y (m, n); x is (m, k)
                // and `rows` (nb, k) are read as the (k, nb) right operand.
                unsafe {
                    let (lhs, rhs) = (Mat { ptr: x.as_ptr(), rs: k as isize, cs: 1 }, Mat { ptr: rows.as_ptr(), rs: 1, cs: k as isize });
                    gemm_f32_serial(m, nb, k, y_ptr.get().add(c0), n as isize, lhs, rhs);
                }
            }
        });
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// `a @ b` for a (.., m, k) and b (.., k, n) with the same leading dims. f32 tensors on the CPU
/// and off the gradient tape take [`PoolMatMul`] (the decode pool; any strides of the last two
/// dims, so transposed views are read as they are); everything else candle's matmul.
/// Training's small f32 products (a low-rank update and its gradients, attention's backward)
/// ran on rayon through candle, whose second worker the pool's spinning one kept from its
/// core: they ran on one thread.
pub fn matmul(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let r = a.rank();
    let fits = a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 && r >= 2 && b.rank() == r && a.dims()[..r - 2] == b.dims()[..r - 2] && a.dim(r - 1)? == b.dim(r - 2)?;
    if fits && !a.track_op() && !b.track_op() && batch_stride(a.layout()).is_some() && batch_stride(b.layout()).is_some() {
        return a.apply_op2_no_bwd(b, &PoolMatMul);
    }
    a.matmul(b)
}

/// The stride between the matrices of a (.., rows, cols) layout whose leading dims collapse
/// into one (0 for a single matrix); None when they do not.
fn batch_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r <= 2 {
        return Some(0);
    }
    (0..r - 3).all(|i| dims[i] == 1 || strides[i] == strides[i + 1] * dims[i + 1]).then_some(strides[r - 3])
}

/// The op behind [`matmul`]: the product's matrices and, within each, ranges of its longer
/// output side, split over the decode pool, each a single-threaded gemm on the operands' own
/// strides. The result is contiguous.
pub struct PoolMatMul;

impl CustomOp2 for PoolMatMul {
    fn name(&self) -> &'static str {
        "lmx-pool-matmul"
    }

    fn cpu_fwd(&self, a_s: &CpuStorage, al: &Layout, b_s: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(av), CpuStorage::F32(bv)) = (a_s, b_s) else { candle_core::bail!("pool matmul: expected f32 operands") };
        let (ad, bd) = (al.dims(), bl.dims());
        let r = ad.len();
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        let (Some(abs), Some(bbs)) = (batch_stride(al), batch_stride(bl)) else { candle_core::bail!("pool matmul: leading dims must collapse") };
        let batch: usize = ad[..r - 2].iter().product();
        let (ast, bst) = (al.stride(), bl.stride());
        let mut dims = ad.to_vec();
        dims[r - 1] = n;
        let (lhs, rhs) = (
            Mat { ptr: av[al.start_offset()..].as_ptr(), rs: ast[r - 2] as isize, cs: ast[r - 1] as isize },
            Mat { ptr: bv[bl.start_offset()..].as_ptr(), rs: bst[r - 2] as isize, cs: bst[r - 1] as isize },
        );
        // SAFETY: candle's layouts: matrix i of a starts i * abs past a's offset and holds
        // (m, k) elements at its strides inside a's storage; likewise b's (k, n).
        let y = unsafe { gemm_on_pool(batch, m, n, k, lhs, abs, rhs, bbs) };
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// `batch` products `a_i (m, k) @ b_i (k, n)` into a contiguous (batch, m, n) result, on the
/// decode pool: the matrices and each one's longer output side split into pieces (so that the
/// threads have work to balance when there are few matrices), each a single-threaded gemm on
/// the operands' own strides. `lhs` and `rhs` describe matrix 0; matrix i starts `i * a_step`
/// (`i * b_step`) elements further.
///
/// # Safety
/// Every matrix must lie, at its strides, inside live memory that nothing writes meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_on_pool(batch: usize, m: usize, n: usize, k: usize, lhs: Mat, a_step: usize, rhs: Mat, b_step: usize) -> Vec<f32> {
    if k == 0 || m * n == 0 {
        return vec![0f32; batch * m * n];
    }
    // Every element is written by one gemm below (which does not read its destination).
    let mut y = Vec::<f32>::with_capacity(batch * m * n);
    let long = m.max(n);
    let pieces = 8usize.div_ceil(batch).min(long.div_ceil(16)).max(1);
    let per = long.div_ceil(pieces);
    let tasks = batch * pieces;
    let y_ptr = SendPtr(y.as_mut_ptr());
    let (a0, b0) = (SendPtr(lhs.ptr as *mut f32), SendPtr(rhs.ptr as *mut f32));
    let min_tasks = if batch * m * n * k < 1 << 16 { tasks } else { 1 };
    parallel_ranges(tasks, min_tasks, |ts| {
        for t in ts {
            let (bi, p) = (t / pieces, t % pieces);
            let (lo, hi) = (p * per, ((p + 1) * per).min(long));
            if lo >= hi {
                continue;
            }
            // Rows lo..hi of a (m the longer side) or columns lo..hi of b.
            let (rows, cols) = if m >= n { (lo..hi, 0..n) } else { (0..m, lo..hi) };
            // SAFETY: the caller's contract for the operands; this task alone writes rows
            // `rows`, columns `cols` of matrix bi of y.
            unsafe {
                let l = Mat { ptr: a0.get().add(bi * a_step).offset(rows.start as isize * lhs.rs), ..lhs };
                let r = Mat { ptr: b0.get().add(bi * b_step).offset(cols.start as isize * rhs.cs), ..rhs };
                gemm_f32_serial(rows.len(), cols.len(), k, y_ptr.get().add(bi * m * n + rows.start * n + cols.start), n as isize, l, r);
            }
        }
    });
    // SAFETY: the tasks' rows and columns cover each of the batch's (m, n) matrices.
    unsafe { y.set_len(batch * m * n) };
    y
}

/// `x @ w^T` for a few rows of activations (decode: one token per sequence of a batch), as a
/// candle op (no backward: used only when nothing is on the gradient tape). `x`: (.., k) with
/// at most [`MATVEC_MAX_ROWS`] rows; `w`: (n, k), same dtype. Each weight row is read once for
/// all activation rows, and every output is the same dot product as for a single row, so a
/// sequence's logits in a batch are bit for bit its logits alone.
pub struct MatVec;

/// [`MatVec`]'s f32 products: `y` (m, n) = `x` (m, k) times `w` (n, k) transposed.
pub(crate) fn matvec_f32(w: &[f32], x: &[f32], m: usize, k: usize, y: &mut [f32]) {
    let n = w.len() / k.max(1);
    assert!(k > 0 && w.len() == n * k && x.len() == m * k && y.len() == m * n, "matvec: w {} / x {} / y {} values for rows of {k}", w.len(), x.len(), y.len());
    matvec_rows(w, x, m, k, n, y, |row, i| scalar::dot_f32(&w[row * k..(row + 1) * k], &x[i * k..(i + 1) * k]));
}

/// [`MatVec`]'s products of f16 weights (an f16 checkpoint's, kept as stored in an f32
/// model on the CPU, which has no f16 arithmetic) and f32 activations: `y` (m, n) = `x` (m, k)
/// times `w` (n, k) transposed, the weights widened as they are read (F16C).
pub(crate) fn matvec_f16(w: &[f16], x: &[f32], m: usize, k: usize, y: &mut [f32]) {
    let n = w.len() / k.max(1);
    assert!(k > 0 && w.len() == n * k && x.len() == m * k && y.len() == m * n, "matvec: w {} / x {} / y {} values for rows of {k}", w.len(), x.len(), y.len());
    matvec_rows(w, x, m, k, n, y, |row, i| scalar::dot_f16(&w[row * k..(row + 1) * k], &x[i * k..(i + 1) * k]));
}

/// [`MatVec`]'s bf16 products, before rounding: `vdpbf16ps` on the bf16 activations where the
/// CPU has AVX512-BF16, else widened to f32.
pub(crate) fn matvec_bf16(w: &[bf16], x: &[bf16], m: usize, k: usize, y: &mut [f32]) {
    let n = w.len() / k.max(1);
    assert!(k > 0 && w.len() == n * k && x.len() == m * k && y.len() == m * n, "matvec: w {} / x {} / y {} values for rows of {k}", w.len(), x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if dpbf16() {
        let out = SendPtr(y.as_mut_ptr());
        // SAFETY: `dpbf16()` checked the CPU; w is n rows of k and x m rows of k; each range's
        // columns are written by its call alone.
        parallel_ranges(n, MIN_ROWS_PER_THREAD, |rows| unsafe { x86::matvec_rows_dpbf16(w, x, m, k, n, rows, out.get()) });
        return;
    }
    let x: Vec<f32> = crate::cpu_fused::widened(x);
    matvec_rows(w, &x, m, k, n, y, |row, i| scalar::dot_bf16(&w[row * k..(row + 1) * k], &x[i * k..(i + 1) * k]));
}

/// [`matvec_bf16`] of one row `x` by several matrices (each rows of `k`) in one parallel
/// step, their outputs one after another in `y`: the same products (each row's dot product
/// does not depend on the split), one barrier instead of one per matrix. None (nothing
/// written) where the CPU lacks AVX512-BF16.
pub(crate) fn matvec_many_bf16(ws: &[&[bf16]], x: &[bf16], k: usize, y: &mut [f32]) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if dpbf16() {
        let ns: Vec<usize> = ws.iter().map(|w| w.len() / k.max(1)).collect();
        let total: usize = ns.iter().sum();
        assert!(k > 0 && ws.iter().zip(&ns).all(|(w, n)| w.len() == n * k) && x.len() == k && y.len() == total, "matvec_many_bf16: shapes");
        let out = SendPtr(y.as_mut_ptr());
        parallel_ranges(total, MIN_ROWS_PER_THREAD, |range| {
            let mut first = 0;
            for (w, &n) in ws.iter().zip(&ns) {
                let (lo, hi) = (range.start.max(first), range.end.min(first + n));
                if lo < hi {
                    // SAFETY: `dpbf16()` checked the CPU; w is n rows of k, x one row of k;
                    // matrix rows lo - first..hi - first write y[lo..hi], this range's alone.
                    unsafe { x86::matvec_rows_dpbf16(w, x, 1, k, n, lo - first..hi - first, out.get().add(first)) };
                }
                first += n;
            }
        });
        return Some(());
    }
    let _ = (ws, x, k, y);
    None
}

/// Most activation rows [`MatVec`] takes (beyond, a GEMM's blocking wins).
pub const MATVEC_MAX_ROWS: usize = 64;

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("matvec needs contiguous inputs".into()))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "lmx-matvec"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let mut out_dims = xl.dims().to_vec();
        let m = xl.shape().elem_count() / k.max(1);
        if out_dims.last() != Some(&k) || m == 0 || m > MATVEC_MAX_ROWS {
            candle_core::bail!("matvec: x {:?} is not 1 to {MATVEC_MAX_ROWS} rows of {k} for weight {:?}", xl.dims(), wl.dims());
        }
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let mut y = vec![0f32; m * n];
        let storage = match ws.dtype() {
            DType::F16 if xs.dtype() == DType::F32 => {
                matvec_f16(contiguous::<f16>(ws, wl)?, contiguous::<f32>(xs, xl)?, m, k, &mut y);
                CpuStorage::F32(y)
            }
            DType::F32 => {
                matvec_f32(contiguous::<f32>(ws, wl)?, contiguous::<f32>(xs, xl)?, m, k, &mut y);
                CpuStorage::F32(y)
            }
            DType::BF16 => {
                matvec_bf16(contiguous::<bf16>(ws, wl)?, contiguous::<bf16>(xs, xl)?, m, k, &mut y);
                CpuStorage::BF16(crate::cpu_fused::rounded::<bf16>(&y))
            }
            other => candle_core::bail!("matvec: dtype {other:?} is not supported"),
        };
        Ok((storage, Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout, ws: &candle_core::CudaStorage, wl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_fused::matvec_bf16(xs, xl, ws, wl)
    }
}

/// Fills `y` (m, n) with `y[i][r] = w[r] . x[i]`, weight rows split over the decode pool:
/// the AVX2 tiles where the CPU has them, else `portable(r, i)`. Either way each result is
/// computed the same for every m.
#[allow(unused_variables)]
fn matvec_rows<W: Copy + Send + Sync + LanesIfX86>(w: &[W], x: &[f32], m: usize, k: usize, n: usize, y: &mut [f32], portable: impl Fn(usize, usize) -> f32 + Sync) {
    let out = SendPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let (fast, wide) = (avx2(), m >= 8 && std::arch::is_x86_feature_detected!("avx512f"));
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    parallel_ranges(n, MIN_ROWS_PER_THREAD, |rows| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX2 and FMA (and for `wide` AVX-512F) are present; w is n rows of k
            // and x m rows of k (the caller's shapes); this range's columns are written by
            // this call alone.
            unsafe {
                if wide {
                    x86::matvec_rows_wide(w, x, m, k, n, rows, out.get())
                } else {
                    x86::matvec_rows(w, x, m, k, n, rows, out.get())
                }
            };
            return;
        }
        for r in rows {
            for i in 0..m {
                // SAFETY: column r belongs to this range alone; i * n + r is inside y (m * n),
                // which outlives the call.
                unsafe { *out.get().add(i * n + r) = portable(r, i) };
            }
        }
    });
}

/// The weight types [`matvec_rows`] reads (the AVX2 loads on x86).
#[cfg(target_arch = "x86_64")]
trait LanesIfX86: x86::Lanes {}
#[cfg(target_arch = "x86_64")]
impl<T: x86::Lanes> LanesIfX86 for T {}
#[cfg(not(target_arch = "x86_64"))]
trait LanesIfX86 {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> LanesIfX86 for T {}

/// True where bf16 products take `vdpbf16ps` ([`x86::matvec_rows_dpbf16`]): AVX512-BF16,
/// unless `LMX_DPBF16=0`.
#[cfg(target_arch = "x86_64")]
fn dpbf16() -> bool {
    static DPBF16: OnceLock<bool> = OnceLock::new();
    *DPBF16.get_or_init(|| {
        !std::env::var("LMX_DPBF16").is_ok_and(|v| v == "0")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// How far ahead (bytes) [`x86::matvec_rows`] asks for weight rows into L2: 16 KiB on Intel
/// CPUs, where it was measured to help, 0 (the hardware's prefetchers alone) on AMD ones,
/// where it was measured to cost (see there); `LMX_MATVEC_PREFETCH` sets it, to compare.
#[cfg(target_arch = "x86_64")]
fn matvec_prefetch() -> usize {
    static AHEAD: OnceLock<usize> = OnceLock::new();
    *AHEAD.get_or_init(|| {
        let id = std::arch::x86_64::__cpuid(0);
        let amd = [id.ebx, id.edx, id.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "AuthenticAMD"
        std::env::var("LMX_MATVEC_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(if amd { 0 } else { 16384 })
    })
}

/// True where the AVX2 + FMA kernels run.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
}

/// `w . x` (f32 weights).
pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { x86::dot_f32(w, x) };
    }
    scalar::dot_f32(w, x)
}

/// `w . x` (bf16 weights, f32 accumulation).
pub(crate) fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { x86::dot_bf16(w, x) };
    }
    scalar::dot_bf16(w, x)
}

/// `acc += p * v` (f32 values).
pub(crate) fn axpy_f32(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += p * x;
    }
}

/// `acc += p * v` (bf16 values).
pub(crate) fn axpy_bf16(acc: &mut [f32], p: f32, v: &[bf16]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { x86::axpy_bf16(acc, p, v) };
    }
    for (a, x) in acc.iter_mut().zip(v) {
        *a += p * x.to_f32();
    }
}

/// Portable reference kernels.
pub mod scalar {
    use half::bf16;

    /// Dot product of an f32 weight row and x.
    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = w.len() / 8 * 8;
        for (wc, xc) in w[..chunks].chunks_exact(8).zip(x[..chunks].chunks_exact(8)) {
            for i in 0..8 {
                acc[i] += wc[i] * xc[i];
            }
        }
        let tail: f32 = w[chunks..].iter().zip(&x[chunks..]).map(|(a, b)| a * b).sum();
        acc.iter().sum::<f32>() + tail
    }

    /// Dot product of a bf16 weight row and f32 x, accumulated in f32.
    pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }

    /// Dot product of an f16 weight row and f32 x, accumulated in f32.
    pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Weight element types the multi-row product reads, 8 at a time, widened to f32.
    pub(super) trait Lanes: Copy {
        /// # Safety
        /// The CPU must support AVX2; 8 values are readable at `p`.
        unsafe fn load8(p: *const Self) -> __m256;
        /// # Safety
        /// The CPU must support AVX-512F; 16 values are readable at `p`.
        unsafe fn load16(p: *const Self) -> __m512;
        fn f32(self) -> f32;
    }

    impl Lanes for f32 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats at p.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller guarantees 16 readable floats at p.
            unsafe { _mm512_loadu_ps(p) }
        }
        fn f32(self) -> f32 {
            self
        }
    }

    impl Lanes for bf16 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bf16 values at p.
            unsafe { load_bf16(p) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller guarantees 16 readable bf16 values at p.
            let raw = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        }
        fn f32(self) -> f32 {
            self.to_f32()
        }
    }

    impl Lanes for half::f16 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f16 values at p.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: the caller guarantees 16 readable f16 values at p.
            _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) })
        }
        fn f32(self) -> f32 {
            self.to_f32()
        }
    }

    /// Dot products of weight row `r` with activation rows `i0..i0 + C` (rows of `k`), each
    /// computed exactly as [`dot_f32`] computes one (four 8-lane FMA chains over blocks of 32,
    /// then blocks of 8 into the first, the chains summed pairwise, the tail in order), so
    /// every result is the same whatever tile computed it. The weight row is read once for
    /// the C activation rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<W: Lanes, const C: usize>(w: &[W], x: &[f32], k: usize, r: usize, i0: usize) -> [f32; C] {
        let mut acc = [[_mm256_setzero_ps(); 4]; C];
        let (wp, xp) = (w.as_ptr().wrapping_add(r * k), x.as_ptr());
        let xrow = |b: usize, j: usize| xp.wrapping_add((i0 + b) * k + j);
        let mut j = 0;
        // SAFETY (all loads): row r of w and rows i0 + b of x hold k >= j + 8 elements.
        while j + 32 <= k {
            for q in 0..4 {
                let wv = unsafe { W::load8(wp.add(j + 8 * q)) };
                for (b, a) in acc.iter_mut().enumerate() {
                    a[q] = _mm256_fmadd_ps(wv, unsafe { _mm256_loadu_ps(xrow(b, j + 8 * q)) }, a[q]);
                }
            }
            j += 32;
        }
        while j + 8 <= k {
            let wv = unsafe { W::load8(wp.add(j)) };
            for (b, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(wv, unsafe { _mm256_loadu_ps(xrow(b, j)) }, a[0]);
            }
            j += 8;
        }
        let mut out = [0f32; C];
        let wt = &w[r * k + j..(r + 1) * k];
        for (b, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
            let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let xt = &x[(i0 + b) * k + j..(i0 + b + 1) * k];
            *o = hsum(sum) + wt.iter().zip(xt).map(|(p, q)| p.f32() * q).sum::<f32>();
        }
        out
    }

    /// [`tile`] for weight rows `r` and `r + 1` at once, in 512-bit registers: each holds two
    /// of [`tile`]'s 8-lane chains side by side (lanes 0-7 one chain, 8-15 the next), so every
    /// lane sees the same FMAs in the same order and each result is bit for bit [`tile`]'s;
    /// each activation vector is loaded once for both rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    #[allow(clippy::needless_range_loop)] // acc[a][b][h] pairs three index spaces
    unsafe fn tile512<W: Lanes, const A: usize, const C: usize>(w: &[W], x: &[f32], k: usize, r: usize, i0: usize) -> [[f32; C]; A] {
        let mut acc = [[[_mm512_setzero_ps(); 2]; C]; A];
        let wrow = |a: usize, j: usize| w.as_ptr().wrapping_add((r + a) * k + j);
        let xrow = |b: usize, j: usize| x.as_ptr().wrapping_add((i0 + b) * k + j);
        let mut j = 0;
        // SAFETY (all loads): rows r, r + 1 of w and rows i0 + b of x hold k >= j + 16 (or 8)
        // elements.
        while j + 32 <= k {
            for h in 0..2 {
                let wv: [__m512; A] = std::array::from_fn(|a| unsafe { W::load16(wrow(a, j + 16 * h)) });
                for b in 0..C {
                    let xv = unsafe { _mm512_loadu_ps(xrow(b, j + 16 * h)) };
                    for a in 0..A {
                        acc[a][b][h] = _mm512_fmadd_ps(wv[a], xv, acc[a][b][h]);
                    }
                }
            }
            j += 32;
        }
        let lo = |z: __m512| _mm512_castps512_ps256(z);
        let hi = |z: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
        let mut out = [[0f32; C]; A];
        for a in 0..A {
            for b in 0..C {
                let z = &acc[a][b];
                let mut c = [lo(z[0]), hi(z[0]), lo(z[1]), hi(z[1])];
                let mut jj = j;
                while jj + 8 <= k {
                    c[0] = _mm256_fmadd_ps(unsafe { W::load8(wrow(a, jj)) }, unsafe { _mm256_loadu_ps(xrow(b, jj)) }, c[0]);
                    jj += 8;
                }
                let sum = _mm256_add_ps(_mm256_add_ps(c[0], c[1]), _mm256_add_ps(c[2], c[3]));
                let (wt, xt) = (&w[(r + a) * k + jj..(r + a + 1) * k], &x[(i0 + b) * k + jj..(i0 + b + 1) * k]);
                out[a][b] = hsum(sum) + wt.iter().zip(xt).map(|(p, q)| p.f32() * q).sum::<f32>();
            }
        }
        out
    }

    /// Dot products of weight rows `w + a * k` (a < A) with activation rows `x + b * k`
    /// (b < C) over their first `len` values: one 16-lane FMA chain each, 16 values a step,
    /// the tail in order (a prompt's products; no decode result has to match them).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; A rows of `len` values at `w` and C at `x`, each `k`
    /// apart, are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    #[allow(clippy::needless_range_loop)] // acc[a][b] pairs two index spaces
    unsafe fn dots<W: Lanes, const A: usize, const C: usize>(w: *const W, x: *const f32, k: usize, len: usize) -> [[f32; C]; A] {
        let mut acc = [[_mm512_setzero_ps(); C]; A];
        let mut j = 0;
        // SAFETY (all loads): the caller's rows hold len >= j + 16 values.
        while j + 16 <= len {
            let wv: [__m512; A] = std::array::from_fn(|a| unsafe { W::load16(w.add(a * k + j)) });
            for b in 0..C {
                let xv = unsafe { _mm512_loadu_ps(x.add(b * k + j)) };
                for a in 0..A {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            j += 16;
        }
        let mut out = [[0f32; C]; A];
        for a in 0..A {
            for b in 0..C {
                // SAFETY: values j..len of the caller's rows.
                let tail: f32 = (j..len).map(|t| unsafe { (*w.add(a * k + t)).f32() * *x.add(b * k + t) }).sum();
                out[a][b] = _mm512_reduce_add_ps(acc[a][b]) + tail;
            }
        }
        out
    }

    /// [`dots`] in 256-bit registers (CPUs with AVX2 but not AVX-512): one 8-lane chain
    /// each, 8 values a step.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; shapes as in [`dots`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // acc[a][b] pairs two index spaces
    unsafe fn dots256<W: Lanes, const A: usize, const C: usize>(w: *const W, x: *const f32, k: usize, len: usize) -> [[f32; C]; A] {
        let mut acc = [[_mm256_setzero_ps(); C]; A];
        let mut j = 0;
        // SAFETY (all loads): the caller's rows hold len >= j + 8 values.
        while j + 8 <= len {
            let wv: [__m256; A] = std::array::from_fn(|a| unsafe { W::load8(w.add(a * k + j)) });
            for b in 0..C {
                let xv = unsafe { _mm256_loadu_ps(x.add(b * k + j)) };
                for a in 0..A {
                    acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            j += 8;
        }
        let mut out = [[0f32; C]; A];
        for a in 0..A {
            for b in 0..C {
                // SAFETY: values j..len of the caller's rows.
                let tail: f32 = (j..len).map(|t| unsafe { (*w.add(a * k + t)).f32() * *x.add(b * k + t) }).sum();
                out[a][b] = hsum(acc[a][b]) + tail;
            }
        }
        out
    }

    /// `y (m, n) = x (m, k) . w (n, k)^T` for weight rows `rows` (a prompt's product, compute
    /// bound), without packing either operand: k in chunks of [`NT_CHUNK`](super::NT_CHUNK) values, and within a chunk
    /// tiles of 6 activation rows by 4 weight rows ([`dots`]: 10 loads per 24 FMAs; `WIDE`
    /// false: 4 by 2 in 256-bit registers, [`dots256`], for CPUs without AVX-512). A chunk's
    /// activation rows stay in L1 while the range's weight rows (the caller's block, sized
    /// for L2) pass by; each chunk's sums are added to the last's.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and AVX-512F when `WIDE`; `w` holds the rows
    /// of `k`, `x` holds `m` rows of `k`, and `y` points at `m * n` writable floats of which
    /// this call alone writes the columns `rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm_nt_rows<W: Lanes, const WIDE: bool>(w: &[W], x: &[f32], m: usize, k: usize, n: usize, rows: std::ops::Range<usize>, y: *mut f32) {
        /// Tiles of C activation rows from `i` by the range's weight rows, 4 (`WIDE`) or 2 at
        /// a time then the rest, for values k0..k0 + len.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn row_tiles<W: Lanes, const C: usize, const WIDE: bool>(w: &[W], x: &[f32], k: usize, n: usize, rows: &std::ops::Range<usize>, y: *mut f32, i: usize, k0: usize, len: usize) {
            let mut r = rows.start;
            while r < rows.end {
                macro_rules! run {
                    ($A:literal) => {{
                        // SAFETY: weight rows r..r + A and activation rows i..i + C hold
                        // values k0..k0 + len (the caller's shapes).
                        let (wp, xp) = unsafe { (w.as_ptr().add(r * k + k0), x.as_ptr().add(i * k + k0)) };
                        // SAFETY: as above; AVX-512F where WIDE (the caller's contract).
                        let t = unsafe {
                            if WIDE {
                                dots::<W, $A, C>(wp, xp, k, len)
                            } else {
                                dots256::<W, $A, C>(wp, xp, k, len)
                            }
                        };
                        for (a, col) in t.iter().enumerate() {
                            for (b, v) in col.iter().enumerate() {
                                // SAFETY: column r + a is in `rows`, row i + b < m.
                                unsafe {
                                    let o = y.add((i + b) * n + r + a);
                                    *o = if k0 == 0 { *v } else { *o + v };
                                }
                            }
                        }
                        r += $A;
                    }};
                }
                match (rows.end - r).min(if WIDE { 4 } else { 2 }) {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
        }
        let mut k0 = 0;
        while k0 < k {
            let len = super::NT_CHUNK.min(k - k0);
            let mut i = 0;
            while i < m {
                let c = (m - i).min(if WIDE { 6 } else { 4 });
                // SAFETY: the caller's shapes, CPU and columns, for activation rows i..i + c.
                unsafe {
                    match c {
                        1 => row_tiles::<W, 1, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                        2 => row_tiles::<W, 2, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                        3 => row_tiles::<W, 3, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                        4 => row_tiles::<W, 4, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                        5 => row_tiles::<W, 5, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                        _ => row_tiles::<W, 6, WIDE>(w, x, k, n, &rows, y, i, k0, len),
                    }
                }
                i += c;
            }
            k0 += len;
        }
    }

    /// [`matvec_rows`] for 8 or more activation rows (compute-bound) on CPUs with AVX-512F:
    /// pairs of weight rows by 4 activation rows ([`tile512`]); the same results. Fewer rows
    /// stay memory-bound, where one weight row at a time streams faster.
    ///
    /// # Safety
    /// As [`matvec_rows`], and the CPU supports AVX-512F.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn matvec_rows_wide<W: Lanes>(w: &[W], x: &[f32], m: usize, k: usize, n: usize, rows: std::ops::Range<usize>, y: *mut f32) {
        let mut r = rows.start;
        // Three weight rows per tile (24 accumulators: 14 loads per 24 FMAs, where pairs take
        // 12 per 16), then a pair, then the last row alone.
        macro_rules! rows_of {
            ($A:literal) => {
                while r + $A <= rows.end {
                    // The rows after next on their way from memory while these are computed
                    // (a large matrix streams; the tiles below re-read these rows from L1).
                    let next = w.as_ptr().wrapping_add((r + 2 * $A) * k) as *const i8;
                    for line in (0..$A * k * std::mem::size_of::<W>()).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(line));
                    }
                    let mut i = 0;
                    while i < m {
                        macro_rules! run {
                            ($C:literal) => {{
                                // SAFETY: the tile stays inside w and x (the caller's shapes).
                                let t = unsafe { tile512::<W, $A, $C>(w, x, k, r, i) };
                                for (a, row) in t.iter().enumerate() {
                                    for (b, v) in row.iter().enumerate() {
                                        // SAFETY: column r + a is in `rows`, row i + b < m.
                                        unsafe { *y.add((i + b) * n + r + a) = *v };
                                    }
                                }
                                i += $C;
                            }};
                        }
                        match m - i {
                            1 => run!(1),
                            2 => run!(2),
                            3 => run!(3),
                            _ => run!(4),
                        }
                    }
                    r += $A;
                }
            };
        }
        rows_of!(3);
        rows_of!(2);
        // SAFETY: as above, for the last odd row.
        unsafe { matvec_rows(w, x, m, k, n, r..rows.end, y) };
    }

    /// `y[i * n + r] = w[r] . x[i]` for weight rows `rows` and all `m` activation rows: each
    /// weight row streamed once per 3 activation rows (from cache after the first), rows in
    /// order (one sequential stream, as the prefetchers like it).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` holds the rows of `k`, `x` holds `m` rows of
    /// `k`, and `y` points at `m * n` writable floats of which this call alone writes the
    /// columns `rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_rows<W: Lanes>(w: &[W], x: &[f32], m: usize, k: usize, n: usize, rows: std::ops::Range<usize>, y: *mut f32) {
        // Rows `matvec_prefetch()` bytes ahead asked into L2 while this one is computed (Intel
        // CPUs only, by default). It had helped one thread read SmolLM2's f32 weights on a 2-core Xeon (~8
        // -> 15 GB/s) and a 49152 x 576 f32 matrix from memory on Zen 4 (12.6-14.9 -> 17.1-17.7
        // GB/s), but in whole models on Zen 4 it cost: SmolLM2 F32 decode 35-36 tok/s with it
        // at 16 KiB, 49 without (1 thread); a Llama-1B-shaped F16 file 6.2-6.4 -> 9.7 (1
        // thread), 10.0-10.1 -> 13.3-13.7 (2).
        let row_bytes = k * std::mem::size_of::<W>();
        let pf = super::matvec_prefetch();
        let ahead = (pf / row_bytes.max(1)).max(1);
        for r in rows.clone() {
            if pf > 0 && r + ahead < rows.end {
                let next = w.as_ptr().wrapping_add((r + ahead) * k) as *const i8;
                for line in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(line));
                }
            }
            let mut i = 0;
            while i < m {
                macro_rules! run {
                    ($C:literal) => {{
                        // SAFETY: the tile stays inside w and x (the caller's shapes).
                        let t = unsafe { tile::<W, $C>(w, x, k, r, i) };
                        for (b, v) in t.iter().enumerate() {
                            // SAFETY: column r is in `rows`, row i + b < m.
                            unsafe { *y.add((i + b) * n + r) = *v };
                        }
                        i += $C;
                    }};
                }
                match m - i {
                    1 => run!(1),
                    2 => run!(2),
                    _ => run!(3),
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` and `x` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 floats at i + 8j < n.
        unsafe {
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i + 8 * j)), _mm256_loadu_ps(xp.add(i + 8 * j)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + w[i..n].iter().zip(&x[i..n]).map(|(a, b)| a * b).sum::<f32>()
    }

    /// Dot products of bf16 weight row `r` with bf16 activation rows `i0..i0 + C` (rows of
    /// `k`) by `vdpbf16ps`: four 16-lane chains over blocks of 128 (each step adds a pair of
    /// exact bf16 products), blocks of 32 into the first chain, the last partial block masked
    /// (zeros add nothing); chains summed pairwise. Each result is computed the same whatever
    /// C, so a row of a batch gets its value alone.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn tile_dpbf16<const C: usize>(w: &[bf16], x: &[bf16], k: usize, r: usize, i0: usize) -> [f32; C] {
        let mut acc = [[_mm512_setzero_ps(); 4]; C];
        let wp = w.as_ptr().wrapping_add(r * k) as *const i16;
        let xrow = |b: usize, j: usize| x.as_ptr().wrapping_add((i0 + b) * k + j) as *const i16;
        let pair = |v: __m512i| -> __m512bh { unsafe { std::mem::transmute(v) } };
        let mut j = 0;
        // SAFETY (all loads): row r of w and rows i0 + b of x hold k >= j + 32 elements, or
        // the load is masked to the elements left.
        while j + 128 <= k {
            for q in 0..4 {
                let wv = pair(unsafe { _mm512_loadu_si512(wp.add(j + 32 * q) as *const _) });
                for (b, a) in acc.iter_mut().enumerate() {
                    a[q] = _mm512_dpbf16_ps(a[q], wv, pair(unsafe { _mm512_loadu_si512(xrow(b, j + 32 * q) as *const _) }));
                }
            }
            j += 128;
        }
        while j < k {
            let left = (k - j).min(32);
            let mask: __mmask32 = if left == 32 { !0 } else { (1u32 << left) - 1 };
            let wv = pair(unsafe { _mm512_maskz_loadu_epi16(mask, wp.add(j)) });
            for (b, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_dpbf16_ps(a[0], wv, pair(unsafe { _mm512_maskz_loadu_epi16(mask, xrow(b, j)) }));
            }
            j += 32;
        }
        acc.map(|a| _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))))
    }

    /// `y[i * n + r] = w[r] . x[i]` for bf16 weights and bf16 activations on CPUs with
    /// AVX512-BF16: [`tile_dpbf16`] over up to 4 activation rows per pass of a weight row.
    /// Half the instructions of widening to f32, and no software prefetch: the hardware's
    /// streams as fast or faster here (Zen 4, 1 thread, Llama-1B shapes from memory: 13 GB/s
    /// widened, 21-27 by `vdpbf16ps`; prefetching 2-16 KiB ahead gained nothing;
    /// `bf16_matvec_from_memory`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW and AVX512-BF16; shapes as in [`matvec_rows`].
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn matvec_rows_dpbf16(w: &[bf16], x: &[bf16], m: usize, k: usize, n: usize, rows: std::ops::Range<usize>, y: *mut f32) {
        for r in rows {
            let mut i = 0;
            while i < m {
                macro_rules! run {
                    ($C:literal) => {{
                        // SAFETY: the tile stays inside w and x (the caller's shapes).
                        let t = unsafe { tile_dpbf16::<$C>(w, x, k, r, i) };
                        for (b, v) in t.iter().enumerate() {
                            // SAFETY: column r is in `rows`, row i + b < m.
                            unsafe { *y.add((i + b) * n + r) = *v };
                        }
                        i += $C;
                    }};
                }
                match m - i {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
        }
    }

    /// 8 bf16 values widened to f32 (bf16 is the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 values at p.
        let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    /// `acc += p * v`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_bf16(acc: &mut [f32], p: f32, v: &[bf16]) {
        let n = acc.len().min(v.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        // SAFETY: every access covers 8 elements at i + 8 <= n.
        unsafe {
            while i + 8 <= n {
                let a = acc.as_mut_ptr().add(i);
                _mm256_storeu_ps(a, _mm256_fmadd_ps(pv, load_bf16(v.as_ptr().add(i)), _mm256_loadu_ps(a)));
                i += 8;
            }
        }
        for (a, x) in acc[i..n].iter_mut().zip(&v[i..n]) {
            *a += p * x.to_f32();
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` and `x` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 elements at i + 8j < n.
        unsafe {
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load_bf16(wp.add(i + 8 * j)), _mm256_loadu_ps(xp.add(i + 8 * j)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(load_bf16(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + w[i..n].iter().zip(&x[i..n]).map(|(a, b)| a.to_f32() * b).sum::<f32>()
    }
}

/// A pointer to one output buffer that parallel tasks write disjoint parts of.
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the Sync wrapper, not the raw field).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}
// SAFETY: every user writes only its own, disjoint part of the buffer, which outlives the tasks.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The pool's matmul equals candle's on plain, transposed and batched operands (a
    /// transposed view read through its strides, leading dims collapsed, a narrowed start),
    /// products too small to split and large enough to, either side the longer; an operand on
    /// the tape takes candle's product and keeps its gradient.
    #[test]
    fn pool_matmul_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (batch, m, k, n) in [(vec![], 3, 5, 4), (vec![], 200, 96, 8), (vec![], 8, 96, 300), (vec![2, 3], 40, 16, 70), (vec![3], 1, 7, 1), (vec![2], 64, 0, 5)] {
            let shape = |a: usize, b: usize| -> Vec<usize> { batch.iter().copied().chain([a, b]).collect() };
            let a = Tensor::randn(0f32, 1.0, shape(m, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, shape(k, n), &dev)?;
            let bt = Tensor::randn(0f32, 1.0, shape(n, k), &dev)?;
            let at = Tensor::randn(0f32, 1.0, shape(k + 1, m), &dev)?.narrow(batch.len(), 1, k)?;
            for (x, y) in [(a.clone(), b.clone()), (a.clone(), bt.t()?), (at.t()?, b.clone()), (at.t()?, bt.t()?)] {
                let (got, want) = (matmul(&x, &y)?, x.matmul(&y)?);
                assert_eq!(got.dims(), want.dims());
                let d = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>().unwrap_or(0.0);
                assert!(d < 1e-4, "{batch:?} {m}x{k}x{n}: off by {d}");
            }
        }
        let v = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 2), &dev)?;
        let grads = matmul(v.as_tensor(), &w)?.sum_all()?.backward()?;
        assert!(grads.get(v.as_tensor()).is_some(), "an operand on the tape keeps its gradient");
        Ok(())
    }

    /// Stalls that leave the pool ahead of the caller alone change nothing (an idle machine's
    /// bursts; many threads with one of them late); stalls that put it behind run calls on the
    /// caller for the shortest back-off, and again right after it for twice as long (up to the
    /// longest), not counting the first call after a back-off; much later, the shortest again.
    #[test]
    fn stalls_back_off_when_the_pool_falls_behind() {
        const MS: u64 = 1_000_000;
        const US: u64 = 1_000;
        let st = Stalls::new();
        let serial = |t: u64| st.serial(t);
        // Calls of 20 us on 2 ranges every 25 us, and a burst of two 3 ms stalls: still ahead.
        let mut t = MS;
        let calls = |st: &Stalls, n: usize, ranges: usize, t: &mut u64| {
            for _ in 0..n {
                *t += 25 * US;
                st.record(ranges, 20 * US, US, *t);
            }
        };
        calls(&st, 800, 2, &mut t);
        for _ in 0..2 {
            t += 3 * MS;
            st.record(2, 20 * US, 3 * MS, t);
        }
        assert!(!serial(t + US), "an idle machine's burst keeps the pool");
        // Many ranges: a 4 ms stall every 4 ms still leaves 16 ranges ahead of one.
        let many = Stalls::new();
        let mut u = MS;
        for _ in 0..20 {
            calls(&many, 100, 16, &mut u);
            u += 4 * MS;
            many.record(16, 20 * US, 4 * MS, u);
        }
        assert!(!many.serial(u + US), "16 ranges with one late keep the pool");
        // 2 ranges, a 4 ms stall after every 2.5 ms of calls: behind within a few stalls, so
        // 10 ms alone from the stall that tipped it.
        let behind = |st: &Stalls, t: &mut u64| {
            for _ in 0..5 {
                calls(st, 100, 2, t);
                *t += 4 * MS;
                st.record(2, 20 * US, 4 * MS, *t);
                if st.serial(*t + US) {
                    return;
                }
            }
            panic!("the pool stayed in use though it fell behind");
        };
        behind(&st, &mut t);
        assert!(serial(t + 10 * MS - US) && !serial(t + 10 * MS), "the pool behind backs off for 10 ms");
        // Right after: the first call (waking workers) is not weighed; behind again, twice as long.
        t += 10 * MS;
        st.record(2, 20 * US, 3 * MS, t);
        assert!(!serial(t + US), "the waking call is not weighed");
        behind(&st, &mut t);
        assert!(serial(t + 20 * MS - US) && !serial(t + 20 * MS), "behind again right after: 20 ms");
        // Much later, behind again: the shortest back-off.
        t += 5000 * MS;
        st.record(2, 20 * US, US, t);
        behind(&st, &mut t);
        assert!(serial(t + 10 * MS - US) && !serial(t + 10 * MS), "much later the back-off starts again at 10 ms");
    }

    /// Ranges run on the caller alone (as after stalls) give exactly what the pool gives.
    #[test]
    fn ranges_on_the_caller_equal_the_pool() -> Result<()> {
        let dev = Device::Cpu;
        let (a, b) = (Tensor::randn(0f32, 1.0, (300, 96), &dev)?, Tensor::randn(0f32, 1.0, (96, 70), &dev)?);
        let pooled = matmul(&a, &b)?.flatten_all()?.to_vec1::<f32>()?;
        let set = |until: u64| STALLS.state.lock().map(|mut s| s.serial_until_ns = until).expect("stall state");
        set(u64::MAX);
        let alone = matmul(&a, &b);
        set(0);
        assert_eq!(alone?.flatten_all()?.to_vec1::<f32>()?, pooled);
        Ok(())
    }

    /// The dispatched (SIMD where available) kernels equal the scalar ones on random data,
    /// including lengths that leave a tail.
    #[test]
    fn simd_matches_scalar() -> Result<()> {
        for k in [1usize, 7, 8, 33, 576, 1539] {
            let w = Tensor::randn(0f32, 1.0, k, &Device::Cpu)?.to_vec1::<f32>()?;
            let x = Tensor::randn(0f32, 1.0, k, &Device::Cpu)?.to_vec1::<f32>()?;
            let got = dot_f32(&w, &x);
            let want = scalar::dot_f32(&w, &x);
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "f32 k={k}: {got} vs {want}");
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            let got = dot_bf16(&wb, &x);
            let want = scalar::dot_bf16(&wb, &x);
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "bf16 k={k}: {got} vs {want}");
            // acc += 0.5 * w, against the scalar loop.
            let (mut got, mut want) = (x.clone(), x.clone());
            axpy_bf16(&mut got, 0.5, &wb);
            for (a, v) in want.iter_mut().zip(&wb) {
                *a += 0.5 * v.to_f32();
            }
            assert_eq!(got, want, "axpy bf16 k={k}");
        }
        Ok(())
    }

    /// The `vdpbf16ps` kernel (where the CPU has AVX512-BF16) equals the scalar dot product
    /// of the same bf16 values, for lengths with masked tails and 1 to 6 activation rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn dpbf16_kernel_matches_scalar() -> Result<()> {
        if !dpbf16() {
            eprintln!("no AVX512-BF16 here: nothing to check");
            return Ok(());
        }
        for k in [1usize, 7, 33, 128, 301, 576, 2048] {
            for m in [1usize, 2, 5, 6] {
                let n = 37;
                let w: Vec<bf16> = Tensor::randn(0f32, 1.0, n * k, &Device::Cpu)?.to_dtype(DType::BF16)?.to_vec1()?;
                let x: Vec<bf16> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)?.to_dtype(DType::BF16)?.to_vec1()?;
                let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                let mut y = vec![0f32; m * n];
                // SAFETY: dpbf16() checked the CPU; w is n rows of k, x m rows of k, y m * n.
                unsafe { x86::matvec_rows_dpbf16(&w, &x, m, k, n, 0..n, y.as_mut_ptr()) };
                for i in 0..m {
                    for r in 0..n {
                        let want = scalar::dot_bf16(&w[r * k..(r + 1) * k], &xf[i * k..(i + 1) * k]);
                        let got = y[i * n + r];
                        assert!((got - want).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + want.abs()), "k={k} m={m} row {r} x {i}: {got} vs {want}");
                    }
                }
            }
        }
        Ok(())
    }

    /// The op equals candle's matmul.
    #[test]
    fn matvec_op_matches_matmul() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (1, 1, 300), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (130, 300), &Device::Cpu)?;
        let want = x.broadcast_matmul(&w.t()?)?;
        let got = x.apply_op2_no_bwd(&w, &MatVec)?;
        assert_eq!(got.dims(), &[1, 1, 130]);
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-3, "f32 diff {d}");
        let (xb, wb) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
        let want = xb.to_dtype(DType::F32)?.broadcast_matmul(&wb.to_dtype(DType::F32)?.t()?)?;
        let got = xb.apply_op2_no_bwd(&wb, &MatVec)?.to_dtype(DType::F32)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 0.25, "bf16 diff {d} (bf16 output rounding)");
        Ok(())
    }

    /// f16 weights by f32 activations (an f16 checkpoint in an f32 model): decode rows and a
    /// prompt's give bit for bit what the same values as f32 weights give, and the scalar
    /// reference agrees within rounding.
    #[test]
    fn f16_weights_equal_their_values_in_f32() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (130, 300), &Device::Cpu)?.to_dtype(DType::F16)?;
        let w32 = w.to_dtype(DType::F32)?;
        for rows in [1usize, 3, 9, 100] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 300), &Device::Cpu)?;
            let (got, want) = (crate::ops::linear(&x, &w, None)?, crate::ops::linear(&x, &w32, None)?);
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?, "{rows} rows");
        }
        let (wv, xv) = (w.flatten_all()?.to_vec1::<f16>()?, Tensor::randn(0f32, 1.0, 300, &Device::Cpu)?.to_vec1::<f32>()?);
        let mut y = vec![0f32; 130];
        matvec_f16(&wv, &xv, 1, 300, &mut y);
        for (r, got) in y.iter().enumerate() {
            let want = scalar::dot_f16(&wv[r * 300..(r + 1) * 300], &xv);
            assert!((got - want).abs() < 1e-3, "row {r}: {got} against {want}");
        }
        Ok(())
    }

    /// A prompt's f32 and f16 products (several rows: [`F32Linear`]) against f64 dot
    /// products, in shapes that leave partial tiles, tails of k below 16 and a last chunk
    /// of k shorter than the others.
    #[test]
    fn prompt_products_match_a_reference() -> Result<()> {
        for (m, n, k) in [(9usize, 70usize, 2100usize), (13, 5, 17), (7, 3, 1), (12, 129, 1024), (6, 64, 15)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w16 = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.to_dtype(DType::F16)?;
            let (xv, wv) = (x.flatten_all()?.to_vec1::<f32>()?, w16.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            let w32 = w16.to_dtype(DType::F32)?;
            let mut outs =
                vec![(DType::F16, x.apply_op2_no_bwd(&w16, &F32Linear)?.flatten_all()?.to_vec1::<f32>()?), (DType::F32, x.apply_op2_no_bwd(&w32, &F32Linear)?.flatten_all()?.to_vec1::<f32>()?)];
            // The 256-bit tiles (CPUs without AVX-512) where this CPU can run them.
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                let (mut y16, mut y32) = (vec![0f32; m * n], vec![0f32; m * n]);
                let f16s = w16.flatten_all()?.to_vec1::<f16>()?;
                // SAFETY: AVX2, FMA and F16C checked; w (n, k), x (m, k), y (m, n), all rows.
                unsafe {
                    x86::gemm_nt_rows::<_, false>(&f16s, &xv, m, k, n, 0..n, y16.as_mut_ptr());
                    x86::gemm_nt_rows::<_, false>(&wv, &xv, m, k, n, 0..n, y32.as_mut_ptr());
                }
                outs.extend([(DType::F16, y16), (DType::F32, y32)]);
            }
            for (dtype, y) in outs {
                for (o, got) in y.iter().enumerate() {
                    let (i, r) = (o / n, o % n);
                    let row = |v: &[f32], at: usize| v[at * k..(at + 1) * k].iter().map(|&t| t as f64).collect::<Vec<_>>();
                    let (a, b) = (row(&xv, i), row(&wv, r));
                    let want: f64 = a.iter().zip(&b).map(|(p, q)| p * q).sum();
                    let scale: f64 = a.iter().zip(&b).map(|(p, q)| (p * q).abs()).sum();
                    assert!((*got as f64 - want).abs() <= 1e-5 * scale.max(1.0), "{m}x{n}x{k} {dtype:?}: y[{i}][{r}] = {got}, want {want}");
                }
            }
        }
        Ok(())
    }

    /// Speed of the matrix-vector op against one dot product per row (ignored: a benchmark).
    #[test]
    #[ignore]
    fn matvec_speed() -> Result<()> {
        for (dtype, n, k) in [(DType::F32, 1536, 576), (DType::F32, 576, 1536), (DType::BF16, 49152, 576), (DType::F32, 49152, 576)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.to_dtype(dtype)?;
            for m in [1usize, 2, 4, 8, 16, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, 1, k), &Device::Cpu)?.to_dtype(dtype)?;
                x.apply_op2_no_bwd(&w, &MatVec)?;
                let t = Instant::now();
                for _ in 0..50 {
                    x.apply_op2_no_bwd(&w, &MatVec)?;
                }
                let op = t.elapsed().as_secs_f64() / 50.0;
                println!(
                    "{dtype:?} {n}x{k} m={m}: {:.3} ms ({:.1} GB/s of weights, {:.1} GFLOP/s)",
                    op * 1e3,
                    (w.elem_count() * dtype.size_in_bytes()) as f64 / op / 1e9,
                    (2 * m * n * k) as f64 / op / 1e9
                );
            }
            if dtype == DType::BF16 && n == 49152 {
                let wv: Vec<half::bf16> = w.flatten_all()?.to_vec1()?;
                let xv: Vec<f32> = Tensor::randn(0f32, 1.0, 576, &Device::Cpu)?.to_vec1()?;
                let mut y = vec![0f32; 49152];
                let t = Instant::now();
                for _ in 0..50 {
                    let out = SendPtr(y.as_mut_ptr());
                    parallel_ranges(49152, MIN_ROWS_PER_THREAD, |rows| {
                        for r in rows {
                            unsafe { *out.get().add(r) = dot_bf16(&wv[r * 576..(r + 1) * 576], &xv) };
                        }
                    });
                }
                let op = t.elapsed().as_secs_f64() / 50.0;
                println!("dot_bf16 per row: {:.3} ms", op * 1e3);
            }
        }
        Ok(())
    }

    /// bf16 decode products of Llama-1B-sized matrices streamed from memory (a rotation of
    /// 512 MB, past any cache): the f32-widening AVX2 kernel against `vdpbf16ps` (ignored: a
    /// benchmark; `cargo test --release -p lmx-core bf16_matvec_from_memory -- --ignored`).
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn bf16_matvec_from_memory() {
        let dp = std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw");
        for (n, k) in [(8192usize, 2048usize), (2048, 8192), (2048, 2048)] {
            let count = (512 << 20) / (2 * n * k);
            let mut seed = 1u32;
            let mut next = || {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                bf16::from_f32((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            };
            let ws: Vec<Vec<bf16>> = (0..count).map(|_| (0..n * k).map(|_| next()).collect()).collect();
            let ws16: Vec<Vec<f16>> = ws.iter().map(|w| w.iter().map(|v| f16::from_f32(v.to_f32())).collect()).collect();
            for m in [1usize, 4] {
                let xb: Vec<bf16> = (0..m * k).map(|_| next()).collect();
                let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                let mut y = vec![0f32; m * n];
                let mut z = vec![0f32; m * n];
                for round in 0..2 {
                    let time = |dpbf16: bool, y: &mut [f32]| {
                        let out = SendPtr(y.as_mut_ptr());
                        let t = Instant::now();
                        for w in ws.iter().cycle().take(3 * count) {
                            parallel_ranges(n, MIN_ROWS_PER_THREAD, |rows| unsafe {
                                if dpbf16 {
                                    x86::matvec_rows_dpbf16(w, &xb, m, k, n, rows, out.get())
                                } else {
                                    x86::matvec_rows(w, &xf, m, k, n, rows, out.get())
                                }
                            });
                        }
                        (3 * count * 2 * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9
                    };
                    let widened = time(false, &mut y);
                    let dot = if dp { time(true, &mut z) } else { 0.0 };
                    let mut y16 = vec![0f32; m * n];
                    let t = Instant::now();
                    for w in ws16.iter().cycle().take(3 * count) {
                        let out = SendPtr(y16.as_mut_ptr());
                        parallel_ranges(n, MIN_ROWS_PER_THREAD, |rows| unsafe { x86::matvec_rows(w, &xf, m, k, n, rows, out.get()) });
                    }
                    let from_f16 = (3 * count * 2 * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9;
                    println!("{n}x{k} m={m} round {round}: widened {widened:.1} GB/s, vdpbf16ps {dot:.1} GB/s, f16 {from_f16:.1} GB/s");
                }
                if dp {
                    let d = y.iter().zip(&z).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    println!("  max |widened - vdpbf16ps| = {d:e}");
                }
            }
        }
    }

    /// Several rows (a batch of sequences, one token each) give each row exactly its
    /// single-row result, in f32 and bf16, with a row length that leaves a tail (k = 301) and
    /// row counts that leave partial tiles.
    #[test]
    fn matvec_rows_equal_single_rows_bit_for_bit() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (131, 301), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let w = w.to_dtype(dtype)?;
            for m in [2, 3, 5, 17, MATVEC_MAX_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (m, 1, 301), &Device::Cpu)?.to_dtype(dtype)?;
                let all = x.apply_op2_no_bwd(&w, &MatVec)?.to_dtype(DType::F32)?;
                let want = x.to_dtype(DType::F32)?.broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?;
                let d = (&all - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < if dtype == DType::F32 { 1e-3 } else { 0.25 }, "{dtype:?} m={m}: {d}");
                for i in 0..m {
                    let one = x.narrow(0, i, 1)?.apply_op2_no_bwd(&w, &MatVec)?.to_dtype(DType::F32)?;
                    let d = (one - all.narrow(0, i, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert_eq!(d, 0.0, "{dtype:?}: row {i} of {m} differs from the row alone");
                }
            }
        }
        Ok(())
    }
}
