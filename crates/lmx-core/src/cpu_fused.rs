//! Fused CPU kernels for the per-layer glue of a forward pass: RMS norm, rotary embedding,
//! SiLU-gated product and single-query attention. Rows split over threads on the decode pool
//! (`cpu::parallel_ranges`), never rayon, whose workers would compete with the pool's
//! spinning ones for the cores. Each replaces a chain of 5-10 small candle ops (each with its own
//! allocation and thread dispatch), which on a small model cost as much as streaming the
//! weights. Inference only: `ops` routes inputs on the gradient tape to the differentiable
//! compositions instead.

use crate::cpu::{parallel_ranges, widest, SendPtr};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// Element types the fused kernels run on: widened to f32 for arithmetic.
pub(crate) trait Elem: Copy + Send + Sync + candle_core::WithDType {
    fn f32(self) -> f32;
    fn of(v: f32) -> Self;
    /// The values of a storage of this type, to write in place.
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
    /// `y` (m, n) = `x` (m, k) times a dense `w` (n, k) transposed, as `cpu::MatVec` computes
    /// it before rounding; None for a type it does not take.
    fn matvec(w: &[Self], x: &[Self], m: usize, k: usize, y: &mut [f32]) -> Option<()> {
        let _ = (w, x, m, k, y);
        None
    }
    /// One row `x` by several dense matrices in one parallel step, their outputs one after
    /// another in `y`, each as [`Elem::matvec`] computes it; None (nothing written) where the
    /// type or the CPU has no such step.
    fn matvec_many(ws: &[&[Self]], x: &[Self], k: usize, y: &mut [f32]) -> Option<()> {
        let _ = (ws, x, k, y);
        None
    }
    /// `a . x`, accumulated in f32.
    fn dot(a: &[Self], x: &[f32]) -> f32 {
        a.iter().zip(x).map(|(a, b)| a.f32() * b).sum()
    }
    /// `acc += p * a`.
    fn axpy(acc: &mut [f32], p: f32, a: &[Self]) {
        for (o, v) in acc.iter_mut().zip(a) {
            *o += p * v.f32();
        }
    }
    /// `out[j * len + t] = key_t . q_j` for the `q.len() / d` queries of one key head.
    fn scores(keys: &KvRows<'_, Self>, bi: usize, kv: usize, q: &[f32], d: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(done) = x86_attention::scores(keys, bi, kv, q, d, out) {
            return done;
        }
        let len = keys.len;
        for t in 0..len {
            let row = keys.row(bi, kv, t, d);
            for (j, qj) in q.chunks_exact(d).enumerate() {
                out[j * len + t] = Self::dot(row, qj);
            }
        }
    }
    /// `acc_j += sum_t p[j * len + t] * value_t` for the `acc.len() / d` queries of one value
    /// head.
    fn weighted(values: &KvRows<'_, Self>, bi: usize, kv: usize, p: &[f32], d: usize, acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(done) = x86_attention::weighted(values, bi, kv, p, d, acc) {
            return done;
        }
        let len = values.len;
        for t in 0..len {
            let row = values.row(bi, kv, t, d);
            for (j, aj) in acc.chunks_exact_mut(d).enumerate() {
                Self::axpy(aj, p[j * len + t], row);
            }
        }
    }
    /// Whether [`Elem::load16`] exists for the type (the AVX-512 attention kernels).
    const LOAD16: bool = false;
    /// 16 values at `p` widened to f32.
    ///
    /// # Safety
    /// AVX-512F must be available, `LOAD16` true, 16 values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(_p: *const Self) -> std::arch::x86_64::__m512 {
        unreachable!("load16 of a type without LOAD16")
    }
}

impl Elem for f32 {
    fn matvec(w: &[Self], x: &[Self], m: usize, k: usize, y: &mut [f32]) -> Option<()> {
        crate::cpu::matvec_f32(w, x, m, k, y);
        Some(())
    }
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            other => candle_core::bail!("expected F32 values, got {:?}", other.dtype()),
        }
    }
    fn f32(self) -> f32 {
        self
    }
    fn of(v: f32) -> Self {
        v
    }
    fn dot(a: &[Self], x: &[f32]) -> f32 {
        crate::cpu::dot_f32(a, x)
    }
    fn axpy(acc: &mut [f32], p: f32, a: &[Self]) {
        crate::cpu::axpy_f32(acc, p, a)
    }
    const LOAD16: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    fn matvec(w: &[Self], x: &[Self], m: usize, k: usize, y: &mut [f32]) -> Option<()> {
        crate::cpu::matvec_bf16(w, x, m, k, y);
        Some(())
    }
    fn matvec_many(ws: &[&[Self]], x: &[Self], k: usize, y: &mut [f32]) -> Option<()> {
        crate::cpu::matvec_many_bf16(ws, x, k, y)
    }
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::BF16(v) => Ok(v),
            other => candle_core::bail!("expected BF16 values, got {:?}", other.dtype()),
        }
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        bf16_of(v)
    }
    fn dot(a: &[Self], x: &[f32]) -> f32 {
        crate::cpu::dot_bf16(a, x)
    }
    fn axpy(acc: &mut [f32], p: f32, a: &[Self]) {
        crate::cpu::axpy_bf16(acc, p, a)
    }
    const LOAD16: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller (a bf16 is the top half of an f32).
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16)) }
    }
}

/// `v` rounded to bf16 as `bf16::from_f32` rounds it (to nearest even; a NaN stays a NaN,
/// made quiet), without its branches: loops of these vectorize, where `from_f32`'s NaN test
/// kept them scalar (a 4-bit SmolLM2 prompt spent ~10% of its time rounding outputs).
#[inline(always)]
pub(crate) fn bf16_of(v: f32) -> bf16 {
    let u = v.to_bits();
    let rounded = u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16;
    let nan = (u >> 16) | 0x40;
    bf16::from_bits(if u & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded } as u16)
}

widest! {
    /// `y` rounded to T (bf16 by [`bf16_of`]), on the widest vectors.
    pub(crate) fn rounded<T: Elem>(y: &[f32]) -> Vec<T> {
        y.iter().map(|&v| T::of(v)).collect()
    }
}

widest! {
    /// `x` widened to f32, appended to `out`, on the widest vectors.
    pub(crate) fn widen_into<T: Elem>(x: &[T], out: &mut Vec<f32>) {
        out.extend(x.iter().map(|v| v.f32()));
    }
}

/// `x` widened to f32 ([`widen_into`]).
pub(crate) fn widened<T: Elem>(x: &[T]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    widen_into(x, &mut out);
    out
}

impl Elem for f16 {
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F16(v) => Ok(v),
            other => candle_core::bail!("expected F16 values, got {:?}", other.dtype()),
        }
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(v: f32) -> Self {
        f16::from_f32(v)
    }
}

pub(crate) fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fused op needs contiguous inputs".into()))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Dispatches a kernel generic over [`Elem`] on the storage dtype.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => CpuStorage::F32($f::<f32>($($arg),*)?),
            DType::BF16 => CpuStorage::BF16($f::<bf16>($($arg),*)?),
            DType::F16 => CpuStorage::F16($f::<f16>($($arg),*)?),
            other => candle_core::bail!("fused op: dtype {other:?} is not supported"),
        }
    };
}
pub(crate) use by_dtype;

/// RMS norm with Hugging Face's rounding: statistics in f32, the normalised value rounded to
/// the input dtype, then multiplied by the weight and rounded again.
pub struct RmsNorm {
    /// Added to the mean square.
    pub eps: f32,
}

fn rms_norm_rows<T: Elem>(xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, eps: f32) -> Result<Vec<T>> {
    Ok(norm_rows(slice::<T>(xs, xl)?, slice::<T>(ws, wl)?, eps))
}

fn norm_rows<T: Elem>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::of(0.0); x.len()];
    let out_ptr = SendPtr(out.as_mut_ptr());
    parallel_ranges(x.len() / d, 8, |rows| {
        // SAFETY: ranges of rows are disjoint and inside `out`, which outlives the call.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(rows.start * d), rows.len() * d) };
        norm_range(&x[rows.start * d..rows.end * d], w, eps, o);
    });
    out
}

widest! {
    /// The rows of `x` (each `w.len()` long) RMS-normalized and scaled by `w`, into `out`.
    pub(crate) fn norm_range<T: Elem>(x: &[T], w: &[T], eps: f32, out: &mut [T]) {
        let d = w.len();
        for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
            // The mean square is accumulated in f64: a sequential f32 sum drifts by ~1e-5
            // relative on rows with large outliers (SmolLM2 has activations near 25000),
            // enough to move bf16 outputs by an ulp that the model then amplifies. torch's
            // vectorized sum does not.
            let ss: f64 = xr.iter().map(|v| f64::from(v.f32()) * f64::from(v.f32())).sum();
            let variance = (ss / d as f64) as f32;
            let r = 1.0 / (variance + eps).sqrt();
            for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
                *o = T::of(T::of(xv.f32() * r).f32() * wv.f32());
            }
        }
    }
}

widest! {
    /// `x + h`, elementwise, rounded to T.
    pub(crate) fn add_elems<T: Elem>(x: &[T], h: &[T]) -> Vec<T> {
        x.iter().zip(h).map(|(a, b)| T::of(a.f32() + b.f32())).collect()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lmx-rms-norm"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        if xl.dims().last() != Some(&wl.shape().elem_count()) || xs.dtype() != ws.dtype() {
            candle_core::bail!("rms_norm: x {:?} {:?} and weight {:?} {:?} disagree", xl.dims(), xs.dtype(), wl.dims(), ws.dtype());
        }
        Ok((by_dtype!(xs.dtype(), rms_norm_rows(xs, xl, ws, wl, self.eps)), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout, ws: &candle_core::CudaStorage, wl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if xl.dims().last() != Some(&wl.shape().elem_count()) || xs.dtype() != ws.dtype() || !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("rms_norm: x {:?} {:?} and weight {:?} {:?} disagree", xl.dims(), xs.dtype(), wl.dims(), ws.dtype());
        }
        Ok((crate::cuda_fused::rms_norm(xs, xl, ws, wl, self.eps)?, xl.shape().clone()))
    }
}

/// `x + h` rounded to the dtype (as candle's add), then [`RmsNorm`] of it: the residual
/// stream's update and the next block's input in one pass. Output (2, ..x's shape): the sum,
/// then the normalised sum.
pub struct AddRmsNorm {
    /// Added to the mean square.
    pub eps: f32,
    /// On CUDA, a one-row buffer that also receives the normalised row coded for integer
    /// products of (bits, group size) weights (see `quant::CodeTarget`).
    pub codes: Option<(candle_core::Tensor, (usize, usize))>,
}

fn add_rms_norm_rows<T: Elem>(xs: &CpuStorage, xl: &Layout, hs: &CpuStorage, hl: &Layout, ws: &CpuStorage, wl: &Layout, eps: f32) -> Result<Vec<T>> {
    let (x, h) = (slice::<T>(xs, xl)?, slice::<T>(hs, hl)?);
    let mut out: Vec<T> = add_elems(x, h);
    let normed = norm_rows(&out, slice::<T>(ws, wl)?, eps);
    out.extend(normed);
    Ok(out)
}

/// The output shape of [`AddRmsNorm`] (2, ..x) after checking x, h and the weight: same
/// shapes and dtype, the weight as wide as a row, all contiguous.
fn add_rms_norm_shape((xl, xd): (&Layout, DType), (hl, hd): (&Layout, DType), (wl, wd): (&Layout, DType)) -> Result<Shape> {
    if xl.dims() != hl.dims() || xl.dims().last() != Some(&wl.shape().elem_count()) || xd != wd || hd != wd {
        candle_core::bail!("add_rms_norm: x {:?} {xd:?}, h {:?} {hd:?} and weight {:?} {wd:?} disagree", xl.dims(), hl.dims(), wl.dims());
    }
    if !xl.is_contiguous() || !hl.is_contiguous() || !wl.is_contiguous() {
        candle_core::bail!("add_rms_norm: x, h and the weight must be contiguous");
    }
    Ok(Shape::from([&[2], xl.dims()].concat()))
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "lmx-add-rms-norm"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, hs: &CpuStorage, hl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = add_rms_norm_shape((xl, xs.dtype()), (hl, hs.dtype()), (wl, ws.dtype()))?;
        Ok((by_dtype!(xs.dtype(), add_rms_norm_rows(xs, xl, hs, hl, ws, wl, self.eps)), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        hs: &candle_core::CudaStorage,
        hl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = add_rms_norm_shape((xl, xs.dtype()), (hl, hs.dtype()), (wl, ws.dtype()))?;
        let guard = self.codes.as_ref().map(|(t, spec)| (t.storage_and_layout(), *spec));
        let codes = match &guard {
            Some(((storage, layout), spec)) => match &**storage {
                candle_core::Storage::Cuda(c) => Some((c, *layout, *spec)),
                _ => candle_core::bail!("add_rms_norm: the codes' buffer is not on the GPU"),
            },
            None => None,
        };
        Ok((crate::cuda_fused::add_rms_norm(xs, xl, hs, hl, ws, wl, self.eps, codes)?, shape))
    }
}

/// `silu(gate) * up`, elementwise, computed in f32 with one rounding.
pub struct SiluMul;

fn silu_mul_elems<T: Elem>(gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<Vec<T>> {
    let (g, u) = (slice::<T>(gs, gl)?, slice::<T>(us, ul)?);
    let mut out = vec![T::of(0.0); g.len()];
    let out_ptr = SendPtr(out.as_mut_ptr());
    parallel_ranges(g.len(), 4096, |r| {
        // SAFETY: ranges are disjoint and inside `out`, which outlives the call.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r.start), r.len()) };
        silu_mul_range(o, &g[r.clone()], &u[r]);
    });
    Ok(out)
}

widest! {
    /// `o = silu(g) * u` (the exponential is straight-line code, so the loop vectorizes).
    pub(crate) fn silu_mul_range<T: Elem>(o: &mut [T], g: &[T], u: &[T]) {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            let g = g.f32();
            *o = T::of(g / (1.0 + exp(-g)) * u.f32());
        }
    }
}

/// e^x for f32 in straight-line arithmetic that vectorizes (no libm call): x = n ln 2 + r
/// with n an integer (ln 2 split in two parts so r is exact) and |r| <= ln 2 / 2, then
/// 2^n e^r with e^r a degree-7 Taylor polynomial. Relative error below 3e-7 (a few ulp) on
/// [-87, 88]; 0 below about -87.3 (no subnormals), infinity above about 88.4.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Rounded to nearest even by adding and removing 1.5 * 2^23 (round_ties_even would call
    // libm's rintf on baseline x86-64).
    // (n + magic)'s low mantissa bits hold n as an integer, which also gives 2^n without a
    // float-to-int conversion (Rust's saturating one does not vectorize well).
    let magic = 12_582_912.0f32;
    // Clamped first, so that the reduction stays small (-inf gives 0, not NaN).
    let x = x.clamp(-88.0, 88.8);
    let shifted = (x * std::f32::consts::LOG2_E).clamp(-127.0, 128.0) + magic;
    let n = shifted - magic;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n through the exponent bits (n = -127 gives 0, n = 128 infinity).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127).wrapping_sub(magic.to_bits()) << 23);
    p * scale
}

widest! {
    /// `ln(sum(exp(x)))` in one vectorizable pass (a log-softmax's normalizer over a
    /// vocabulary for every generated token's log-probability): relative error of a few 1e-7.
    pub fn log_sum_exp(x: &[f32]) -> f32 {
        let max = max(x);
        if !max.is_finite() {
            return max;
        }
        let mut acc = [0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|v| exp(v - max)).sum();
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += exp(v - max);
            }
        }
        (acc.iter().sum::<f32>() + tail).ln() + max
    }
}

/// The sum of `x` in 16 interleaved partial sums (which vectorizes, where one running sum
/// is a chain of dependent adds).
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `x` (-inf when empty), in 16 interleaved partial maxima (which vectorize,
/// where `f32::max` in one running value is a chain of dependent compares). NaNs are skipped,
/// as `f32::max` skips them.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    for c in chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    m.iter().fold(tail, |a, &v| if v > a { v } else { a })
}

/// `s = softmax(scale * s)` in place, in f32: scaled, its maximum, exponentials, then
/// normalized by one reciprocal.
#[inline(always)]
fn softmax_scaled_body(s: &mut [f32], scale: f32) {
    s.iter_mut().for_each(|x| *x *= scale);
    let m = max(s);
    s.iter_mut().for_each(|x| *x = exp(*x - m));
    let inv = 1.0 / sum(s);
    s.iter_mut().for_each(|x| *x *= inv);
}

/// [`softmax_scaled_body`] compiled for AVX2 (the same operations, 8 lanes instead of
/// baseline x86-64's 4: the same results).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_scaled_avx2(s: &mut [f32], scale: f32) {
    softmax_scaled_body(s, scale)
}

/// `s = softmax(scale * s)` in place (attention rows), on the widest vectors this CPU has.
pub(crate) fn softmax_scaled(s: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just checked.
        return unsafe { softmax_scaled_avx2(s, scale) };
    }
    softmax_scaled_body(s, scale)
}

/// Rotary position embedding ("rotate half", Hugging Face's layout) for inference: x (b,
/// heads, seq, head_dim) read through its strides (last dimension contiguous: the attention
/// block hands over a transposed view, which this saves copying), `cos`/`sin` (seq,
/// head_dim / 2); the output is contiguous. Rounded as Hugging Face's formula rounds in x's
/// dtype: `x1 cos - x2 sin` with each product rounded, then the difference.
pub struct Rope;

fn rope_rows<T: Elem>(xs: &CpuStorage, xl: &Layout, cs: &CpuStorage, cl: &Layout, ss: &CpuStorage, sl: &Layout) -> Result<Vec<T>> {
    let (&[b, h, t, d], st) = (xl.dims(), xl.stride()) else {
        candle_core::bail!("rope: x {:?} must be 4-D", xl.dims());
    };
    let half = d / 2;
    // cos/sin (t, half) for every batch row, or (b, t, half): each row at its own positions.
    let per_row = cl.dims() == [b, t, half];
    if st[3] != 1 || d % 2 != 0 || !(cl.dims() == [t, half] || per_row) || sl.dims() != cl.dims() {
        candle_core::bail!("rope: x {:?} (strides {st:?}), cos {:?}, sin {:?}", xl.dims(), cl.dims(), sl.dims());
    }
    let (x, x0) = (xs.as_slice::<T>()?, xl.start_offset());
    let (cos, sin) = (slice::<T>(cs, cl)?, slice::<T>(ss, sl)?);
    let mut out = vec![T::of(0.0); b * h * t * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let rows = RopeRows { x: &x[x0..], dims: [b, h, t, d], st: [st[0], st[1], st[2]], cos, sin, per_row };
    parallel_ranges(b * h * t, 16, |range| {
        // SAFETY: the range's rows of `out`, which outlives the call; ranges are disjoint.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(range.start * d), range.len() * d) };
        rope_range(rows, range, o);
    });
    Ok(out)
}

/// Where [`rope_range`] reads: x's rows through their strides, the angles' rows.
#[derive(Clone, Copy)]
pub(crate) struct RopeRows<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) dims: [usize; 4],
    pub(crate) st: [usize; 3],
    pub(crate) cos: &'a [T],
    pub(crate) sin: &'a [T],
    pub(crate) per_row: bool,
}

widest! {
    /// Rows `range` rotated into `out`: `[x1 c - x2 s, x2 c + x1 s]` for the halves x1, x2
    /// of each row, each product rounded to T, then the sum.
    pub(crate) fn rope_range<T: Elem>(rows: RopeRows<'_, T>, range: std::ops::Range<usize>, out: &mut [T]) {
        let [_, h, t, d] = rows.dims;
        let half = d / 2;
        for (r, o) in range.zip(out.chunks_exact_mut(d)) {
            let (bi, hi, ti) = (r / (h * t), r / t % h, r % t);
            let src = &rows.x[bi * rows.st[0] + hi * rows.st[1] + ti * rows.st[2]..][..d];
            let at = if rows.per_row { bi * t + ti } else { ti };
            let (c, s) = (&rows.cos[at * half..(at + 1) * half], &rows.sin[at * half..(at + 1) * half]);
            let (x1, x2) = src.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            // Zipped (no index, so no bounds checks), which vectorizes.
            for ((((o1, o2), (x1, x2)), c), s) in o1.iter_mut().zip(o2).zip(x1.iter().zip(x2)).zip(c).zip(s) {
                let (x1, x2, c, s) = (x1.f32(), x2.f32(), c.f32(), s.f32());
                *o1 = T::of(T::of(x1 * c).f32() - T::of(x2 * s).f32());
                *o2 = T::of(T::of(x2 * c).f32() + T::of(x1 * s).f32());
            }
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "lmx-rope"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, cs: &CpuStorage, cl: &Layout, ss: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        if xs.dtype() != cs.dtype() || xs.dtype() != ss.dtype() {
            candle_core::bail!("rope: x {:?}, cos {:?}, sin {:?} dtypes differ", xs.dtype(), cs.dtype(), ss.dtype());
        }
        Ok((by_dtype!(xs.dtype(), rope_rows(xs, xl, cs, cl, ss, sl)), xl.shape().clone()))
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "lmx-silu-mul"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() || gs.dtype() != us.dtype() {
            candle_core::bail!("silu_mul: gate {:?} and up {:?} disagree", gl.dims(), ul.dims());
        }
        Ok((by_dtype!(gs.dtype(), silu_mul_elems(gs, gl, us, ul)), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gs: &candle_core::CudaStorage, gl: &Layout, us: &candle_core::CudaStorage, ul: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if gl.dims() != ul.dims() || gs.dtype() != us.dtype() || !gl.is_contiguous() || !ul.is_contiguous() {
            candle_core::bail!("silu_mul: gate {:?} and up {:?} disagree", gl.dims(), ul.dims());
        }
        Ok((crate::cuda_fused::silu_mul(gs, gl, us, ul)?, gl.shape().clone()))
    }
}

/// Attention of one query position per sequence over all cached keys and values (a decode
/// step), with grouped-query heads. `q`: (b, n_heads, 1, head_dim) contiguous; `k`, `v`:
/// (b, n_kv_heads, kv_len, head_dim) with a contiguous last dimension (views of the cache).
/// Scores, softmax and the weighted sum run in f32; the output is rounded once.
pub struct DecodeAttention {
    /// Multiplies the scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// A u32 position (1,): only keys up to it count (a cache whose length lives on the
    /// device, as in a captured decode step); None: every key of the view.
    pub upto: Option<candle_core::Tensor>,
    /// With `upto`: keys this many or more positions behind it are not seen either.
    pub window: Option<usize>,
    /// On a GPU, one sequence: a buffer the outputs are also written to coded for the next
    /// integer product, with the codes' (bits, group size) ([`crate::quant::CodeTarget`]).
    pub codes: Option<(candle_core::Tensor, (usize, usize))>,
}

/// The keys `upto` (a u32 position) and `window` leave of `kv_len`, on the CPU: (first, count).
fn upto_range(upto: &candle_core::Tensor, window: Option<usize>, kv_len: usize) -> Result<(usize, usize)> {
    let pos = upto.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
    let Some(&p) = pos.first() else { candle_core::bail!("decode attention: an empty position tensor") };
    let end = (p as usize + 1).min(kv_len);
    let first = window.map_or(0, |w| (p as usize + 1).saturating_sub(w)).min(end);
    Ok((first, end - first))
}

/// Writes one position of keys or values into a (1, heads, capacity, d) buffer in place, at
/// the position a u32 tensor holds (read on the device on a GPU: a captured decode step
/// replays at every position). The sources are the new keys (1, heads, 1, d) and the position.
pub struct KvWrite;

impl candle_core::InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "lmx-kv-write"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout, pos: &CpuStorage, pl: &Layout) -> Result<()> {
        let (&[1, heads, cap, d], &[1, sh, 1, sd]) = (dl.dims(), sl.dims()) else {
            candle_core::bail!("kv write: buffer {:?} / keys {:?}: one sequence, one new position", dl.dims(), sl.dims());
        };
        if sh != heads || sd != d || !dl.is_contiguous() || sl.stride()[3] != 1 {
            candle_core::bail!("kv write: buffer {:?} / keys {:?} (strides {:?})", dl.dims(), sl.dims(), sl.stride());
        }
        let p = match pos {
            CpuStorage::U32(v) => v.get(pl.start_offset()).copied().unwrap_or(u32::MAX) as usize,
            _ => candle_core::bail!("kv write: the position must be u32"),
        };
        if p >= cap {
            candle_core::bail!("kv write: position {p} past the buffer's {cap} positions");
        }
        let (d0, s0, hs) = (dl.start_offset(), sl.start_offset(), sl.stride()[1]);
        macro_rules! copy {
            ($b:expr, $s:expr) => {{
                for h in 0..heads {
                    let at = d0 + (h * cap + p) * d;
                    $b[at..at + d].copy_from_slice(&$s[s0 + h * hs..s0 + h * hs + d]);
                }
            }};
        }
        match (dst, src) {
            (CpuStorage::F32(b), CpuStorage::F32(s)) => copy!(b, s),
            (CpuStorage::BF16(b), CpuStorage::BF16(s)) => copy!(b, s),
            (CpuStorage::F16(b), CpuStorage::F16(s)) => copy!(b, s),
            (b, s) => candle_core::bail!("kv write: buffer {:?} and keys {:?}", b.dtype(), s.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dl: &Layout, src: &candle_core::CudaStorage, sl: &Layout, pos: &candle_core::CudaStorage, pl: &Layout) -> Result<()> {
        crate::cuda_fused::kv_write(dst, dl, src, sl, pos, pl)
    }
}

fn strided<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [T], [usize; 3], usize)> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("attention: keys/values need a contiguous last dimension, got strides {st:?}");
    }
    Ok((s.as_slice::<T>()?, [st[0], st[1], st[2]], l.start_offset()))
}

/// Keys or values of one sequence as the decode kernels read them: the storage slice, the
/// strides of (batch, head, position), the start offset, and the positions.
pub(crate) struct KvRows<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) stride: [usize; 3],
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl<T: Copy> KvRows<'_, T> {
    /// Position `t` of key/value head `kv` of batch row `bi`: `d` values.
    #[inline]
    fn row(&self, bi: usize, kv: usize, t: usize, d: usize) -> &[T] {
        let base = self.start + bi * self.stride[0] + kv * self.stride[1] + t * self.stride[2];
        &self.data[base..base + d]
    }
}

/// Buffers of one thread's attention heads, reused across them.
#[derive(Default)]
struct AttentionScratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

/// Query heads `q` (consecutive rows of `d`) sharing key/value head `kv` of batch row `bi`,
/// over all its keys: scores, softmax, weighted sum, all in f32, into `out` (rounded once).
/// A head's arithmetic does not depend on which heads share the call, so a sequence's
/// output is the same alone and in a batch.
#[allow(clippy::too_many_arguments)]
fn attend_heads<T: Elem>(q: &[T], k: &KvRows<'_, T>, v: &KvRows<'_, T>, bi: usize, kv: usize, scale: f32, d: usize, buf: &mut AttentionScratch, out: &mut [T]) {
    if d == 0 || k.len == 0 {
        // No keys (or empty heads): nothing to attend to.
        out.iter_mut().for_each(|o| *o = T::of(0.0));
        return;
    }
    let (n, len) = (q.len() / d, k.len);
    buf.q.clear();
    buf.q.extend(q.iter().map(|x| x.f32()));
    buf.scores.resize(n * len, 0.0);
    T::scores(k, bi, kv, &buf.q, d, &mut buf.scores);
    for s in buf.scores.chunks_exact_mut(len) {
        softmax_scaled(s, scale);
    }
    buf.acc.clear();
    buf.acc.resize(n * d, 0.0);
    T::weighted(v, bi, kv, &buf.scores, d, &mut buf.acc);
    for (o, a) in out.iter_mut().zip(&buf.acc) {
        *o = T::of(*a);
    }
}

/// Heads `heads` of `(batch row, head)` pairs, `n_heads` per row, in runs that share a
/// key/value head (`kv_of(row, head)`), through [`attend_heads`].
fn attend_runs<T: Elem>(heads: std::ops::Range<usize>, n_heads: usize, kv_of: impl Fn(usize, usize) -> usize, mut run: impl FnMut(std::ops::Range<usize>, usize, usize)) {
    let mut h0 = heads.start;
    while h0 < heads.end {
        let (bi, kv) = (h0 / n_heads, kv_of(h0 / n_heads, h0 % n_heads));
        let mut h1 = h0 + 1;
        while h1 < heads.end && h1 / n_heads == bi && kv_of(bi, h1 % n_heads) == kv {
            h1 += 1;
        }
        run(h0..h1, bi, kv);
        h0 = h1;
    }
}

fn decode_attention<T: Elem>(qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout, scale: f32) -> Result<Vec<T>> {
    let q = slice::<T>(qs, ql)?;
    let (&[b, n_heads, _, d], &[_, n_kv, kv_len, _]) = (ql.dims(), kl.dims()) else {
        candle_core::bail!("decode attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
    };
    let n_rep = n_heads / n_kv;
    if vl.dims() != kl.dims() {
        candle_core::bail!("decode attention: keys {:?} and values {:?} differ in shape", kl.dims(), vl.dims());
    }
    let (k, ks_, k0) = strided::<T>(ks, kl)?;
    let (v, vs_, v0) = strided::<T>(vs, vl)?;
    let (k, v) = (KvRows { data: k, stride: ks_, start: k0, len: kv_len }, KvRows { data: v, stride: vs_, start: v0, len: kv_len });
    let mut out = vec![T::of(0.0); b * n_heads * d];
    attend_all(q, &k, &v, n_heads, n_rep, d, scale, &mut out);
    Ok(out)
}

/// Every query head of `q` (batch rows of `n_heads` heads of `d`), head h over key/value head
/// h / n_rep of its row, into `out`: heads split over threads, each range reusing its
/// buffers for all of its heads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_all<T: Elem>(q: &[T], k: &KvRows<'_, T>, v: &KvRows<'_, T>, n_heads: usize, n_rep: usize, d: usize, scale: f32, out: &mut [T]) {
    let out_ptr = SendPtr(out.as_mut_ptr());
    crate::cpu::parallel_ranges(q.len() / d.max(1), 1, |heads| {
        let mut buf = AttentionScratch::default();
        attend_runs::<T>(
            heads,
            n_heads,
            |_, h| h / n_rep,
            |hs, bi, kv| {
                // SAFETY: heads hs own out[hs.start * d..hs.end * d]; ranges are disjoint.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(hs.start * d), hs.len() * d) };
                attend_heads(&q[hs.start * d..hs.end * d], k, v, bi, kv, scale, d, &mut buf, o);
            },
        );
    });
}

/// [`DecodeAttention`] for a batch of sequences at different positions, each with its own
/// cache: `q` (b, n_heads, 1, head_dim) contiguous, row i attending to `keys[i]` and
/// `values[i]` ((1, n_kv_heads, len_i, head_dim), contiguous last dimension). One op for the
/// batch instead of one per sequence; the same arithmetic per head as [`DecodeAttention`].
pub struct DecodeAttentionRows {
    /// Multiplies the scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// Each sequence's keys.
    pub keys: Vec<candle_core::Tensor>,
    /// Each sequence's values.
    pub values: Vec<candle_core::Tensor>,
}

fn decode_attention_rows<T: Elem>(op: &DecodeAttentionRows, qs: &CpuStorage, ql: &Layout) -> Result<Vec<T>> {
    let q = slice::<T>(qs, ql)?;
    let &[b, n_heads, 1, d] = ql.dims() else {
        candle_core::bail!("decode attention rows: q {:?} must be (b, heads, 1, head_dim)", ql.dims());
    };
    if op.keys.len() != b || op.values.len() != b {
        candle_core::bail!("decode attention rows: {b} queries for {} key and {} value caches", op.keys.len(), op.values.len());
    }
    let guards: Vec<_> = op.keys.iter().chain(&op.values).map(|t| t.storage_and_layout()).collect();
    let mut rows = Vec::with_capacity(2 * b);
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(cpu) = &**storage else { candle_core::bail!("decode attention rows: a cache off the CPU") };
        let &[1, n_kv, len, dk] = layout.dims() else { candle_core::bail!("decode attention rows: a cache of shape {:?}", layout.dims()) };
        if dk != d || n_kv == 0 || n_heads % n_kv != 0 {
            candle_core::bail!("decode attention rows: a cache of shape {:?} for {n_heads} heads of {d}", layout.dims());
        }
        let (data, stride, start) = strided::<T>(cpu, layout)?;
        rows.push((KvRows { data, stride, start, len }, n_kv));
    }
    let (keys, values) = rows.split_at(b);
    if keys.iter().zip(values).any(|((k, nk), (v, nv))| k.len != v.len || nk != nv) {
        candle_core::bail!("decode attention rows: a sequence's keys and values differ in shape");
    }
    let mut out = vec![T::of(0.0); b * n_heads * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    crate::cpu::parallel_ranges(b * n_heads, 1, |heads| {
        let mut buf = AttentionScratch::default();
        attend_runs::<T>(
            heads,
            n_heads,
            |bi, h| h / (n_heads / keys[bi].1),
            |hs, bi, kv| {
                // SAFETY: heads hs own out[hs.start * d..hs.end * d]; ranges are disjoint.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(hs.start * d), hs.len() * d) };
                attend_heads(&q[hs.start * d..hs.end * d], &keys[bi].0, &values[bi].0, 0, kv, op.scale, d, &mut buf, o);
            },
        );
    });
    Ok(out)
}

impl candle_core::CustomOp1 for DecodeAttentionRows {
    fn name(&self) -> &'static str {
        "lmx-decode-attention-rows"
    }
    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((by_dtype!(qs.dtype(), decode_attention_rows(self, qs, ql)), ql.shape().clone()))
    }
}

/// [`DecodeAttention`] over keys and values in MLX's affine format (a quantized KV cache),
/// read as they are stored: each key and value row dequantized group by group into a small
/// buffer as it is used, so a step reads `bits / 16` of a bf16 cache's bytes and nothing the
/// size of the cache is written. The op's tensors are `q` (b, n_heads, 1, head_dim)
/// contiguous and the packed keys and values (b, n_kv_heads, kv_len, head_dim * bits / 32)
/// u32 with a contiguous last dimension; the scales and biases, (b, n_kv_heads, kv_len,
/// head_dim / group_size) in f32, ride in the op.
pub struct QuantizedDecodeAttention {
    /// Multiplies the scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// Bits per code.
    pub bits: usize,
    /// Elements per scale and bias.
    pub group_size: usize,
    /// Key scales, key biases, value scales, value biases.
    pub params: [Vec<f32>; 4],
}

fn quantized_decode_attention<T: Elem>(op: &QuantizedDecodeAttention, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<Vec<T>> {
    let q = slice::<T>(qs, ql)?;
    let (&[b, n_heads, _, d], &[_, n_kv, kv_len, words]) = (ql.dims(), kl.dims()) else {
        candle_core::bail!("quantized decode attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
    };
    let (gs, bits) = (op.group_size, op.bits);
    let groups = d / gs;
    if words * 32 != d * bits || d % gs != 0 || op.params.iter().any(|p| p.len() != b * n_kv * kv_len * groups) || vl.dims() != kl.dims() {
        candle_core::bail!("quantized decode attention: q {:?}, k {:?}, v {:?} do not fit {bits}-bit codes in groups of {gs}", ql.dims(), kl.dims(), vl.dims());
    }
    let n_rep = n_heads / n_kv;
    let (k, ks_, k0) = strided::<u32>(ks, kl)?;
    let (v, vs_, v0) = strided::<u32>(vs, vl)?;
    let [k_scales, k_biases, v_scales, v_biases] = &op.params;
    let mut out = vec![T::of(0.0); b * n_heads * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    crate::cpu::parallel_ranges(b * n_heads, 1, |heads| {
        let (mut qv, mut scores, mut acc, mut row) = (vec![0f32; d], vec![0f32; kv_len], vec![0f32; d], vec![0f32; d]);
        // Dequantizes row t of (sequence bi, key/value head kv) into `row`.
        let dequantize = |row: &mut [f32], packed: &[u32], base: usize, scales: &[f32], biases: &[f32], p: usize| {
            for (g, out) in row.chunks_mut(gs).enumerate() {
                crate::quant::kernels::dequantize_group(&packed[base..base + words], g * gs, bits, scales[p + g], biases[p + g], out);
            }
        };
        for bh in heads {
            let (bi, h) = (bh / n_heads, bh % n_heads);
            let kv = h / n_rep;
            for (a, x) in qv.iter_mut().zip(&q[bh * d..(bh + 1) * d]) {
                *a = x.f32();
            }
            let mut max = f32::NEG_INFINITY;
            for (t, s) in scores.iter_mut().enumerate() {
                let p = ((bi * n_kv + kv) * kv_len + t) * groups;
                dequantize(&mut row, k, k0 + bi * ks_[0] + kv * ks_[1] + t * ks_[2], k_scales, k_biases, p);
                *s = crate::cpu::dot_f32(&row, &qv) * op.scale;
                max = max.max(*s);
            }
            scores.iter_mut().for_each(|s| *s = exp(*s - max));
            let total = sum(&scores);
            acc.fill(0.0);
            for (t, w) in scores.iter().enumerate() {
                let p = ((bi * n_kv + kv) * kv_len + t) * groups;
                dequantize(&mut row, v, v0 + bi * vs_[0] + kv * vs_[1] + t * vs_[2], v_scales, v_biases, p);
                crate::cpu::axpy_f32(&mut acc, w / total, &row);
            }
            // SAFETY: head bh owns out[bh * d..(bh + 1) * d]; ranges are disjoint.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(bh * d), d) };
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = T::of(*a);
            }
        }
    });
    Ok(out)
}

impl CustomOp3 for QuantizedDecodeAttention {
    fn name(&self) -> &'static str {
        "lmx-quantized-decode-attention"
    }
    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((by_dtype!(qs.dtype(), quantized_decode_attention(self, qs, ql, ks, kl, vs, vl)), ql.shape().clone()))
    }
}

/// Causal attention of several query positions (prefill) with grouped-query heads, on the
/// decode pool: the queries are the last `q_len` of `kv_len` positions, a query at position
/// p sees keys j <= p (and p - j < `window`). Tasks are (sequence, key/value head, block of
/// 16 query positions): the block's query heads that share the key/value head form the rows
/// of two small f32 GEMMs, scores = Q K^T over the keys the block can see, then
/// softmax(scores) V. `q`: (b, n_heads, q_len, head_dim) contiguous; `k`, `v`: (b,
/// n_kv_heads, kv_len, head_dim) with a contiguous last dimension (views of the cache).
/// Scores, softmax and the weighted sum run in f32; the output is rounded once.
pub struct PrefillAttention {
    /// Multiplies the scores (1 / sqrt(head_dim)).
    pub scale: f32,
    /// Keys this many or more positions behind a query are not seen.
    pub window: Option<usize>,
}

/// Query positions per task of [`PrefillAttention`].
const QUERY_BLOCK: usize = 16;

/// `dst (m, n) = lhs (m, k) @ rhs`, row-major f32 buffers, rhs given by its strides (row,
/// column), on this thread.
#[allow(clippy::too_many_arguments)]
fn small_gemm(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], rhs: &[f32], rhs_rs: isize, rhs_cs: isize) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k);
    let (a, b) = (crate::frozen::Mat { ptr: lhs.as_ptr(), rs: k as isize, cs: 1 }, crate::frozen::Mat { ptr: rhs.as_ptr(), rs: rhs_rs, cs: rhs_cs });
    // SAFETY: dst holds m rows of n, lhs m rows of k, and the caller's strides keep every
    // rhs element (kk, j) = rhs[kk * rhs_rs + j * rhs_cs] inside rhs.
    unsafe { crate::frozen::gemm_f32_serial(m, n, k, dst.as_mut_ptr(), n as isize, a, b) };
}

#[allow(clippy::too_many_arguments)]
fn prefill_attention<T: Elem>(qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout, scale: f32, window: Option<usize>) -> Result<Vec<T>> {
    let q = slice::<T>(qs, ql)?;
    let (&[b, n_heads, t, d], &[_, n_kv, kv_len, _]) = (ql.dims(), kl.dims()) else {
        candle_core::bail!("prefill attention: q {:?} / k {:?} must be 4-D", ql.dims(), kl.dims());
    };
    if kv_len < t || n_heads % n_kv != 0 {
        candle_core::bail!("prefill attention: q {:?} does not fit k {:?}", ql.dims(), kl.dims());
    }
    let (n_rep, offset, window) = (n_heads / n_kv, kv_len - t, window.unwrap_or(usize::MAX));
    let (k, ks_, k0) = strided::<T>(ks, kl)?;
    let (v, vs_, v0) = strided::<T>(vs, vl)?;
    // Keys and values as contiguous f32 (b, n_kv, kv_len, d), converted once.
    let (mut kf, mut vf) = (vec![0f32; b * n_kv * kv_len * d], vec![0f32; b * n_kv * kv_len * d]);
    let (kf_ptr, vf_ptr) = (SendPtr(kf.as_mut_ptr()), SendPtr(vf.as_mut_ptr()));
    parallel_ranges(b * n_kv * kv_len, 64, |rows| {
        for r in rows {
            let (bi, kv, j) = (r / (n_kv * kv_len), r / kv_len % n_kv, r % kv_len);
            for (dst, src, st, s0) in [(&kf_ptr, k, ks_, k0), (&vf_ptr, v, vs_, v0)] {
                let base = s0 + bi * st[0] + kv * st[1] + j * st[2];
                // SAFETY: row r of the buffer is written by this range alone.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * d), d) };
                o.iter_mut().zip(&src[base..base + d]).for_each(|(o, x)| *o = x.f32());
            }
        }
    });
    let blocks = t.div_ceil(QUERY_BLOCK);
    let mut out = vec![T::of(0.0); b * n_heads * t * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    parallel_ranges(b * n_kv * blocks, 1, |tasks| {
        let (mut qf, mut sc, mut of) = (Vec::new(), Vec::new(), Vec::new());
        for task in tasks {
            let (bi, kv, blk) = (task / (n_kv * blocks), task / blocks % n_kv, task % blocks);
            let (i0, i1) = (blk * QUERY_BLOCK, ((blk + 1) * QUERY_BLOCK).min(t));
            // Keys some query of the block sees: from the first one's window to the last one.
            let (first, end) = ((offset + i0 + 1).saturating_sub(window), offset + i1);
            let n_keys = end - first;
            let head = (bi * n_kv + kv) * kv_len;
            let (kb, vb) = (&kf[(head + first) * d..(head + end) * d], &vf[(head + first) * d..(head + end) * d]);
            // Rows (query head of the group, position): n_rep * (i1 - i0) of them.
            let rows = n_rep * (i1 - i0);
            qf.clear();
            for rep in 0..n_rep {
                let h = kv * n_rep + rep;
                let base = ((bi * n_heads + h) * t + i0) * d;
                qf.extend(q[base..base + (i1 - i0) * d].iter().map(|x| x.f32()));
            }
            sc.resize(rows * n_keys, 0.0);
            small_gemm(rows, n_keys, d, &mut sc, &qf, kb, 1, d as isize);
            for (r, srow) in sc.chunks_mut(n_keys).enumerate() {
                let pos = offset + i0 + r % (i1 - i0);
                // Keys first + lo .. first + hi are this query's.
                let (lo, hi) = ((pos + 1).saturating_sub(window).max(first) - first, pos + 1 - first);
                softmax_scaled(&mut srow[lo..hi], scale);
                srow[..lo].fill(0.0);
                srow[hi..].fill(0.0);
            }
            of.resize(rows * d, 0.0);
            small_gemm(rows, d, n_keys, &mut of, &sc, vb, d as isize, 1);
            for (r, orow) in of.chunks(d).enumerate() {
                let (h, i) = (kv * n_rep + r / (i1 - i0), i0 + r % (i1 - i0));
                // SAFETY: (sequence bi, head h, position i) is written by this task alone.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(((bi * n_heads + h) * t + i) * d), d) };
                o.iter_mut().zip(orow).for_each(|(o, v)| *o = T::of(*v));
            }
        }
    });
    Ok(out)
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "lmx-prefill-attention"
    }
    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        if ql.dims().len() != 4 || kl.dims() != vl.dims() || !ql.is_contiguous() {
            candle_core::bail!("prefill attention: q {:?}, k {:?}, v {:?}", ql.dims(), kl.dims(), vl.dims());
        }
        Ok((by_dtype!(qs.dtype(), prefill_attention(qs, ql, ks, kl, vs, vl, self.scale, self.window)), ql.shape().clone()))
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "lmx-decode-attention"
    }
    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        if ql.dims().len() != 4 || ql.dims()[2] != 1 || kl.dims() != vl.dims() {
            candle_core::bail!("decode attention: q {:?}, k {:?}, v {:?}", ql.dims(), kl.dims(), vl.dims());
        }
        let (kl, vl) = match &self.upto {
            Some(upto) => {
                let (first, n) = upto_range(upto, self.window, kl.dims()[2])?;
                (kl.narrow(2, first, n)?, vl.narrow(2, first, n)?)
            }
            None => (kl.clone(), vl.clone()),
        };
        Ok((by_dtype!(qs.dtype(), decode_attention(qs, ql, ks, &kl, vs, &vl, self.scale)), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (q, k) = (ql.dims(), kl.dims());
        let fits = q.len() == 4 && k.len() == 4 && q[2] == 1 && q[0] == k[0] && q[3] == k[3] && k[1] > 0 && q[1] % k[1] == 0;
        if !fits || kl.dims() != vl.dims() || !ql.is_contiguous() {
            candle_core::bail!("decode attention: q {:?}, k {:?}, v {:?}", ql.dims(), kl.dims(), vl.dims());
        }
        let upto = self.upto.as_ref().map(|t| t.storage_and_layout());
        let upto = match &upto {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cuda(ps) => Some((ps, *layout)),
                _ => candle_core::bail!("decode attention: the position must be on the keys' GPU"),
            },
            None => None,
        };
        let codes = self.codes.as_ref().map(|(t, spec)| (t.storage_and_layout(), *spec));
        let codes = match &codes {
            Some(((storage, layout), spec)) => match &**storage {
                candle_core::Storage::Cuda(cs) => Some((cs, *layout, *spec)),
                _ => candle_core::bail!("decode attention: the codes' buffer must be on the keys' GPU"),
            },
            None => None,
        };
        Ok((crate::cuda_fused::decode_attention(qs, ql, ks, kl, vs, vl, self.scale, upto, self.window, codes)?, ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// The branch-free bf16 rounding gives `bf16::from_f32`'s bits: every pattern around
    /// the rounding boundaries (low halves 0x7FFF, 0x8000, 0x8001 with even and odd kept
    /// halves), infinities, NaNs of both signs, and a sweep of all f32 patterns in steps of 251.
    #[test]
    fn bf16_rounding_matches_half() {
        let check = |u: u32| assert_eq!(super::bf16_of(f32::from_bits(u)).to_bits(), half::bf16::from_f32(f32::from_bits(u)).to_bits(), "{u:#010x}");
        for hi in [0u32, 1, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0, 0x7FFF, 0x8000, 0xBF80, 0xFF7F, 0xFF80, 0xFF81, 0xFFFF] {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                check(hi << 16 | lo);
            }
        }
        (0..=u32::MAX).step_by(251).for_each(check);
    }

    /// The vectorizable exponential against libm's over the range SiLU and softmax use.
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(super::exp(-200.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert!(super::exp(f32::NAN).is_nan());
        assert!(super::exp(100.0).is_infinite());
    }

    /// Decode attention against a direct f64 computation: grouped heads (9 query heads on 3
    /// key/value heads), the head sizes with AVX-512 kernels (64, 128) and one without (40),
    /// key counts below, at and past a block of 16, f32 and bf16 caches; and a head's output
    /// does not depend on the heads computed beside it (the same query alone).
    #[test]
    fn decode_attention_matches_direct_computation() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for d in [64usize, 128, 40] {
            for len in [1usize, 16, 37] {
                for dtype in [DType::F32, DType::BF16] {
                    let q = Tensor::randn(0f32, 1.0, (1, 9, 1, d), &dev)?.to_dtype(dtype)?;
                    let k = Tensor::randn(0f32, 1.0, (1, 3, len, d), &dev)?.to_dtype(dtype)?;
                    let v = Tensor::randn(0f32, 1.0, (1, 3, len, d), &dev)?.to_dtype(dtype)?;
                    let scale = 1.0 / (d as f32).sqrt();
                    let got = q.apply_op3(&k, &v, super::DecodeAttention { scale, upto: None, window: None, codes: None })?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let (qf, kf, vf) =
                        (q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                    for h in 0..9 {
                        let kv = h / 3;
                        let s: Vec<f64> = (0..len).map(|t| (0..d).map(|i| f64::from(qf[h * d + i]) * f64::from(kf[(kv * len + t) * d + i])).sum::<f64>() * f64::from(scale)).collect();
                        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for i in 0..d {
                            let want = (0..len).map(|t| e[t] / z * f64::from(vf[(kv * len + t) * d + i])).sum::<f64>();
                            let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
                            assert!((f64::from(got[h * d + i]) - want).abs() <= tol * (1.0 + want.abs()), "d {d} len {len} {dtype:?} head {h} [{i}]: {} vs {want}", got[h * d + i]);
                        }
                    }
                    // Head 4 alone (its key/value head shared with no other query).
                    let alone = q
                        .narrow(1, 4, 1)?
                        .apply_op3(&k.narrow(1, 1, 1)?, &v.narrow(1, 1, 1)?, super::DecodeAttention { scale, upto: None, window: None, codes: None })?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    assert_eq!(alone, got[4 * d..5 * d], "d {d} len {len} {dtype:?}: head 4 alone");
                }
            }
        }
        Ok(())
    }

    /// The fused rotary embedding equals candle's on a transposed view (the attention block's
    /// layout), bit for bit in f32 and bf16.
    #[test]
    fn fused_rope_equals_candles_on_views() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let (x, cos, sin) = (x.to_dtype(dtype)?.transpose(1, 2)?, cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
            let got = crate::ops::rope(&x, &cos, &sin)?;
            let want = candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?;
            let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{dtype:?}");
        }
        Ok(())
    }
}

/// AVX-512 kernels of [`attend_heads`] for head sizes of 64 and 128: each key or value row is
/// loaded and widened once for all the queries that share it (grouped-query attention), and
/// the queries' accumulators stay in registers. Per query the same arithmetic whichever
/// queries share a call.
#[cfg(target_arch = "x86_64")]
mod x86_attention {
    use super::{Elem, KvRows};
    use std::arch::x86_64::*;

    /// Queries per pass over the keys.
    const PASS: usize = 4;

    fn applies<T: Elem>(d: usize) -> bool {
        T::LOAD16 && (d == 64 || d == 128) && std::arch::is_x86_feature_detected!("avx512f")
    }

    /// [`Elem::scores`] on AVX-512, or None where it does not apply.
    pub(super) fn scores<T: Elem>(keys: &KvRows<'_, T>, bi: usize, kv: usize, q: &[f32], d: usize, out: &mut [f32]) -> Option<()> {
        if !applies::<T>(d) {
            return None;
        }
        let base = keys.start + bi * keys.stride[0] + kv * keys.stride[1];
        assert!(keys.len == 0 || base + (keys.len - 1) * keys.stride[2] + d <= keys.data.len(), "attention: keys out of their storage");
        let len = keys.len;
        for (j0, qs) in q.chunks(PASS * d).enumerate() {
            let o = &mut out[j0 * PASS * len..];
            // SAFETY: AVX-512F was checked; every row read lies inside keys.data (asserted
            // above); `o` holds len values per query of the pass.
            unsafe {
                match (d, qs.len() / d) {
                    (64, 1) => scores_pass::<T, 4, 1>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (64, 2) => scores_pass::<T, 4, 2>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (64, 3) => scores_pass::<T, 4, 3>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (64, _) => scores_pass::<T, 4, 4>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (_, 1) => scores_pass::<T, 8, 1>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (_, 2) => scores_pass::<T, 8, 2>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (_, 3) => scores_pass::<T, 8, 3>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                    (_, _) => scores_pass::<T, 8, 4>(keys.data.as_ptr().add(base), keys.stride[2], len, qs, o),
                }
            }
        }
        Some(())
    }

    /// [`Elem::weighted`] on AVX-512, or None where it does not apply.
    pub(super) fn weighted<T: Elem>(values: &KvRows<'_, T>, bi: usize, kv: usize, p: &[f32], d: usize, acc: &mut [f32]) -> Option<()> {
        if !applies::<T>(d) {
            return None;
        }
        assert!(p.len() >= acc.len() / d * values.len, "attention: fewer weights than values");
        let base = values.start + bi * values.stride[0] + kv * values.stride[1];
        assert!(values.len == 0 || base + (values.len - 1) * values.stride[2] + d <= values.data.len(), "attention: values out of their storage");
        let len = values.len;
        for (j0, a) in acc.chunks_mut(PASS * d).enumerate() {
            let ps = &p[j0 * PASS * len..];
            // SAFETY: as in `scores`; `ps` holds len weights per query of the pass.
            unsafe {
                let v = values.data.as_ptr().add(base);
                match (d, a.len() / d) {
                    (64, 1) => weighted_pass::<T, 4, 1>(v, values.stride[2], len, ps, a),
                    (64, 2) => weighted_pass::<T, 4, 2>(v, values.stride[2], len, ps, a),
                    (64, 3) => weighted_pass::<T, 4, 3>(v, values.stride[2], len, ps, a),
                    (64, _) => weighted_pass::<T, 4, 4>(v, values.stride[2], len, ps, a),
                    (_, 1) => weighted_pass::<T, 8, 1>(v, values.stride[2], len, ps, a),
                    (_, 2) => weighted_pass::<T, 8, 2>(v, values.stride[2], len, ps, a),
                    (_, 3) => weighted_pass::<T, 8, 3>(v, values.stride[2], len, ps, a),
                    (_, _) => weighted_pass::<T, 8, 4>(v, values.stride[2], len, ps, a),
                }
            }
        }
        Some(())
    }

    /// The sums of 16 vectors' lanes, sum of `v[i]` in lane i: a tree of lane shuffles
    /// (46 instructions where 16 separate reductions take 128).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum16(v: &[__m512; 16]) -> __m512 {
        // Halves: [a's lane sums over 128-bit blocks 0+2 and 1+3 | b's], 2 keys per vector.
        let l1: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
        });
        // One 128-bit block per key, 4 partial sums each.
        let l2: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (l1[2 * i], l1[2 * i + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        });
        // Block q: [key q, key 4 + q] x 2 partial sums (and keys 8.. in the other vector).
        let l3: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (l2[2 * i], l2[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        let (a, b) = (_mm512_castps_pd(l3[0]), _mm512_castps_pd(l3[1]));
        // Block q: keys q, 4 + q, 8 + q, 12 + q: lane 4q + r holds key q + 4r.
        let l4 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), l4)
    }

    /// `out[j * len + t] = key_t . q_j` for N queries of C * 16 values: per block of 16
    /// keys, each key widened once for all queries, the 16 products' lanes summed together.
    ///
    /// # Safety
    /// AVX-512F must be available; rows `k + t * stride` (C * 16 values) readable for t < len;
    /// `q` holds N * C * 16 values and `out` N * len.
    #[allow(clippy::needless_range_loop)] // index loops over registers unroll; iterators did not
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_pass<T: Elem, const C: usize, const N: usize>(k: *const T, stride: usize, len: usize, q: &[f32], out: &mut [f32]) {
        // SAFETY (whole body): forwarded from the caller.
        unsafe {
            let qv: [[__m512; C]; N] = std::array::from_fn(|j| std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add((j * C + c) * 16))));
            let dot = |j: usize, kc: &[__m512; C]| {
                let mut a = _mm512_mul_ps(kc[0], qv[j][0]);
                for c in 1..C {
                    a = _mm512_fmadd_ps(kc[c], qv[j][c], a);
                }
                a
            };
            let load = |t: usize| -> [__m512; C] {
                let row = k.add(t * stride);
                std::array::from_fn(|c| T::load16(row.add(16 * c)))
            };
            let mut parts = [[_mm512_setzero_ps(); 16]; N];
            let blocks = len / 16 * 16;
            for t0 in (0..blocks).step_by(16) {
                for i in 0..16 {
                    let kc = load(t0 + i);
                    for j in 0..N {
                        parts[j][i] = dot(j, &kc);
                    }
                }
                for j in 0..N {
                    _mm512_storeu_ps(out.as_mut_ptr().add(j * len + t0), sum16(&parts[j]));
                }
            }
            for t in blocks..len {
                let kc = load(t);
                for j in 0..N {
                    *out.get_unchecked_mut(j * len + t) = _mm512_reduce_add_ps(dot(j, &kc));
                }
            }
        }
    }

    /// `acc_j += sum_t p[j * len + t] * value_t` for N queries of C * 16 values.
    ///
    /// # Safety
    /// As [`scores_pass`], with `p` holding N * len weights and `acc` N * C * 16 values.
    #[allow(clippy::needless_range_loop)] // index loops over registers unroll; iterators did not
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_pass<T: Elem, const C: usize, const N: usize>(v: *const T, stride: usize, len: usize, p: &[f32], acc: &mut [f32]) {
        // SAFETY (whole body): forwarded from the caller.
        unsafe {
            let mut a: [[__m512; C]; N] = std::array::from_fn(|j| std::array::from_fn(|c| _mm512_loadu_ps(acc.as_ptr().add((j * C + c) * 16))));
            for t in 0..len {
                let row = v.add(t * stride);
                let vc: [__m512; C] = std::array::from_fn(|c| T::load16(row.add(16 * c)));
                for (j, aj) in a.iter_mut().enumerate() {
                    let pj = _mm512_set1_ps(*p.get_unchecked(j * len + t));
                    for c in 0..C {
                        aj[c] = _mm512_fmadd_ps(pj, vc[c], aj[c]);
                    }
                }
            }
            for (j, aj) in a.iter().enumerate() {
                for (c, x) in aj.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add((j * C + c) * 16), *x);
                }
            }
        }
    }
}
