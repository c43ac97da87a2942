//! Ops for fine-tuning around weights that do not train.
//!
//! candle's matmul backward always computes the gradient of both operands; for a frozen
//! weight that is a second matmul as large as the forward one, thrown away. [`frozen_linear`]
//! records an op whose backward computes only the input's gradient (`grad @ W`), which is all
//! LoRA, DoRA and QLoRA need from a base layer. [`masked_cross_entropy`] is the training loss
//! in one pass over the logits, forward and backward, instead of a chain of elementwise ops
//! over a (tokens x vocabulary) matrix.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Row-major f32 matrices described by (rows, cols, row stride, col stride).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst (m, n) = lhs (m, k) @ rhs (k, n)` with the gemm crate on the calling thread alone (for
/// work split over the decode pool).
///
/// # Safety
/// Every pointer must be valid for the strided extent the dimensions describe, and `dst`
/// must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32_serial(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: isize, lhs: Mat, rhs: Mat) {
    // SAFETY: forwarded to the caller's contract; dst is written, not read (read_dst false).
    unsafe {
        gemm::gemm(m, n, k, dst, 1, dst_rs, false, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: expected f32, got {:?}", s.dtype()) };
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: needs a contiguous tensor")))?;
    Ok(&v[a..b])
}

/// `x @ W^T` where W (out, in) never receives a gradient. On the CPU in f32 the backward pass
/// computes only `grad_x = grad_y @ W`; elsewhere it falls back to candle's matmul.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let fast = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && !w.track_op();
    if !fast {
        if w.track_op() || w.rank() != 2 {
            return x.broadcast_matmul(&w.t()?);
        }
        // One node whose backward is the input's gradient alone: candle's matmul backward also
        // multiplies out the frozen weight's gradient (a product as large as the forward's).
        let (out, cols) = w.dims2()?;
        let rows = x.elem_count() / cols;
        let mut dims = x.dims().to_vec();
        let y = x.detach().contiguous()?.reshape((rows, cols))?.matmul(&w.t()?)?;
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        let w = w.clone();
        let x_dims = x.dims().to_vec();
        return crate::taped::taped(&[x], &y.reshape(dims)?, move |_, g| Ok(vec![Some(g.contiguous()?.reshape((rows, out))?.matmul(&w)?.reshape(x_dims.as_slice())?)]));
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, FrozenLinear { transpose: false })
}

/// `y = x @ W^T` (transpose: false) or `y = x @ W` (transpose: true, the backward product).
struct FrozenLinear {
    transpose: bool,
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "lmx-frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "frozen linear input")?;
        let w = f32_slice(ws, wl, "frozen linear weight")?;
        let (rows, cols) = wl.shape().dims2()?;
        // y = x @ W^T: x (m, cols) -> (m, rows); y = x @ W: x (m, rows) -> (m, cols).
        let (k, n) = if self.transpose { (rows, cols) } else { (cols, rows) };
        let mut dims = xl.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen linear: input {dims:?} does not end in {k} features");
        }
        let m = x.len() / k;
        let lhs = Mat { ptr: x.as_ptr(), rs: k as isize, cs: 1 };
        // W^T (cols, rows): element (kk, j) = W[j, kk]; W (rows, cols) row-major.
        let rhs = if self.transpose { Mat { ptr: w.as_ptr(), rs: cols as isize, cs: 1 } } else { Mat { ptr: w.as_ptr(), rs: 1, cs: cols as isize } };
        // On the decode pool (rayon's second worker would compete with the pool's spinning one).
        // SAFETY: x is (m, k) and the weight (rows, cols), contiguous and live.
        let y = unsafe { crate::cpu::gemm_on_pool(1, m, n, k, lhs, 0, rhs, 0) };
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = FrozenLinear { transpose: !self.transpose };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(w, &op)?), None))
    }
}

/// A frozen bf16 weight W (out, in), packed for the AVX512-BF16 kernel: the forward product
/// `x W^T` and, built on the first backward pass, the input-gradient product `g W`.
#[derive(Debug)]
pub struct Bf16Weight {
    rows: usize,
    cols: usize,
    /// W^T packed: element [c][r] is W[r][c] (the only copy of W kept).
    fwd: crate::bf16_gemm::Packed,
    bwd: std::sync::OnceLock<crate::bf16_gemm::Packed>,
}

impl Bf16Weight {
    /// Packs `w` (out, in), whose values must be bf16 (a bf16 checkpoint read as f32 is exact).
    /// None when this CPU has no AVX512-BF16.
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        if !crate::bf16_gemm::supported() || !w.device().is_cpu() {
            return Ok(None);
        }
        let (rows, cols) = w.dims2()?;
        let bits: Vec<u16> = w.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<half::bf16>()?.into_iter().map(half::bf16::to_bits).collect();
        let fwd = crate::bf16_gemm::Packed::from_rows_transposed(&bits, rows, cols);
        Ok(Some(Self { rows, cols, fwd, bwd: std::sync::OnceLock::new() }))
    }

    /// The weight as an f32 tensor (out, in).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let v: Vec<half::bf16> = (0..self.rows * self.cols).map(|e| half::bf16::from_bits(self.fwd.get(e % self.cols, e / self.cols))).collect();
        Tensor::from_vec(v, (self.rows, self.cols), &candle_core::Device::Cpu)?.to_dtype(DType::F32)
    }

    /// `x @ W^T` for f32 x (.., in); recorded on the tape when x is, with the backward pass
    /// `grad_x = grad_y @ W` (W never trains).
    pub fn matmul(self: &std::sync::Arc<Self>, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let op = FrozenBf16 { w: self.clone(), transpose: false };
        if x.track_op() {
            x.apply_op1(op)
        } else {
            x.apply_op1_no_bwd(&op)
        }
    }

    /// `g @ W` for g (.., out) in f32: the input's gradient of [`Bf16Weight::matmul`].
    pub fn matmul_t(self: &std::sync::Arc<Self>, g: &Tensor) -> Result<Tensor> {
        g.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&FrozenBf16 { w: self.clone(), transpose: true })
    }
}

/// `x @ W^T` (transpose: false) or `g @ W` (true) for a [`Bf16Weight`].
struct FrozenBf16 {
    w: std::sync::Arc<Bf16Weight>,
    transpose: bool,
}

impl CustomOp1 for FrozenBf16 {
    fn name(&self) -> &'static str {
        "lmx-frozen-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "frozen bf16 linear input")?;
        let w = &self.w;
        // The input-gradient packing (B = W) is built from the forward one on first use: layers
        // below the trained ones never need it.
        let packed = if self.transpose { w.bwd.get_or_init(|| crate::bf16_gemm::Packed::pack(w.rows, w.cols, |r, c| w.fwd.get(c, r))) } else { &w.fwd };
        let (k, n) = packed.dims();
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen bf16 linear: input {dims:?} does not end in {k} features");
        }
        let y = crate::bf16_gemm::matmul(x, x.len() / k, packed);
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = FrozenBf16 { w: self.w.clone(), transpose: !self.transpose };
        Ok(Some(grad.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Cross-entropy of each row of `logits` (n, vocab) against `targets[i]`, multiplied by
/// `weights[i]` (0 drops a row from the loss; 1 keeps it). Returns the (n,) weighted losses
/// (f32); the backward pass is `weight * (softmax - onehot)` per row, computed in one pass and
/// given in the logits' dtype. Statistics in f32 (f64 sums on the CPU, whose kernel takes f32
/// logits); on a GPU the kernels read bf16 logits as they are, so a batch's logits over a large
/// vocabulary are never copied to f32.
pub fn masked_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n || weights.len() != n {
        candle_core::bail!("cross entropy: {n} rows but {} targets and {} weights", targets.len(), weights.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross entropy: target id {t} is outside the vocabulary of {vocab}");
    }
    let dev = logits.device();
    let native = dev.is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16);
    let logits = if native { logits.contiguous()? } else { logits.to_dtype(DType::F32)?.contiguous()? };
    let (targets, weights) = (Tensor::from_slice(targets, n, dev)?, Tensor::from_slice(weights, n, dev)?);
    logits.apply_op3(&targets, &weights, CrossEntropy { backward: false })
}

/// The loss of [`masked_cross_entropy`] over (logits, u32 targets, f32 weights), or with
/// `backward` (the weights then scaled by the loss's gradient) the logits' gradient.
#[derive(Clone)]
struct CrossEntropy {
    backward: bool,
}

/// (max, log(sum(exp(row - max)))): the exponentials in 16 interleaved f32 sums through
/// `cpu_fused::exp` (which vectorizes; libm's scalar `expf` took 8% of a LoRA step over
/// SmolLM2's 49,152-token vocabulary), combined in f64.
fn log_sum_exp(row: &[f32]) -> (f32, f64) {
    let max = crate::cpu_fused::max(row);
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(crate::cpu_fused::exp(v - max))).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += crate::cpu_fused::exp(v - max);
        }
    }
    (max, (acc.iter().map(|&a| f64::from(a)).sum::<f64>() + tail).ln())
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lmx-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, ts: &CpuStorage, tl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = f32_slice(s, l, "cross entropy")?;
        let (n, vocab) = l.shape().dims2()?;
        let targets = &ts.as_slice::<u32>()?[tl.start_offset()..][..n];
        let weights = f32_slice(ws, wl, "cross entropy weights")?;
        if !self.backward {
            let mut losses = vec![0f32; n];
            let out = crate::cpu::SendPtr(losses.as_mut_ptr());
            crate::cpu::parallel_ranges(n, 1, |rows| {
                for i in rows.filter(|&i| weights[i] != 0.0) {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    let (max, lse) = log_sum_exp(row);
                    let loss = ((f64::from(max) + lse - f64::from(row[targets[i] as usize])) * f64::from(weights[i])) as f32;
                    // SAFETY: row i's loss belongs to this range alone.
                    unsafe { *out.get().add(i) = loss };
                }
            });
            return Ok((CpuStorage::F32(losses), Shape::from(n)));
        }
        // Every element is written below (rows of weight 0 with zeros), so the gradient is
        // not zeroed first (51 MB a step for SmolLM2's vocabulary and a batch of 4 x 64).
        let mut grad = Vec::<f32>::with_capacity(n * vocab);
        let dst = crate::cpu::SendPtr(grad.as_mut_ptr());
        crate::cpu::parallel_ranges(n, 1, |rows| {
            for i in rows {
                // SAFETY: row i's vocab elements belong to this range alone; written below
                // before they are read.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * vocab) as *mut std::mem::MaybeUninit<f32>, vocab) };
                let scale = weights[i];
                if scale == 0.0 {
                    out.iter_mut().for_each(|o| {
                        o.write(0.0);
                    });
                    continue;
                }
                let row = &logits[i * vocab..(i + 1) * vocab];
                let (max, lse) = log_sum_exp(row);
                let shift = max + lse as f32;
                for (o, &v) in out.iter_mut().zip(row) {
                    o.write(crate::cpu_fused::exp(v - shift) * scale);
                }
                let t = targets[i] as usize;
                out[t].write(crate::cpu_fused::exp(row[t] - shift) * scale - scale);
            }
        });
        // SAFETY: the n rows of vocab elements were all written above.
        unsafe { grad.set_len(n * vocab) };
        Ok((CpuStorage::F32(grad), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout, ts: &candle_core::CudaStorage, tl: &Layout, ws: &candle_core::CudaStorage, wl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = l.shape().dims2()?;
        let storage = crate::cuda_train::cross_entropy(s, l, ts, tl, ws, wl, self.backward)?;
        Ok((storage, if self.backward { l.shape().clone() } else { Shape::from(n) }))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, weights: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scales = (weights * grad.to_dtype(DType::F32)?)?.contiguous()?;
        let g = logits.apply_op3_no_bwd(targets, &scales, &CrossEntropy { backward: true })?;
        Ok((Some(g), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_grad, max_abs_diff};
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let want = x.as_tensor().broadcast_matmul(&w.t()?)?;
        assert!(max_abs_diff(&y, &want)? < 1e-5);
        check_grad(|x| frozen_linear(x, &w), &x.as_tensor().detach(), 1e-3)?;
        // Only the input gets a gradient.
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn bf16_frozen_linear_matches_matmul_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &dev)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let Some(bw) = Bf16Weight::new(&w)? else {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return Ok(());
        };
        let bw = std::sync::Arc::new(bw);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev)?;
        let xb = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let d = max_abs_diff(&bw.matmul(&x)?, &xb.broadcast_matmul(&w.t()?)?)?;
        assert!(d < 1e-3, "forward differs by {d}");
        // The input gradient is g @ W with g rounded to bf16 (as the kernel sees it).
        let xv = Var::from_tensor(&x)?;
        let g = Tensor::randn(0f32, 1.0, (2, 3, 40), &dev)?;
        let grads = (bw.matmul(xv.as_tensor())? * &g)?.sum_all()?.backward()?;
        let want = g.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.broadcast_matmul(&w)?;
        let d = max_abs_diff(grads.get(xv.as_tensor()).expect("dx"), &want)?;
        assert!(d < 1e-3, "backward differs by {d}");
        assert!(max_abs_diff(&bw.to_tensor()?, &w)? == 0.0);
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let logits = (Tensor::randn(0f32, 1.0, (4, 11), &dev)? * 3.0)?;
        let targets = [3u32, 0, 10, 7];
        let weights = [1f32, 0.0, 1.0, 1.0];
        let got = masked_cross_entropy(&logits, &targets, &weights)?.to_vec1::<f32>()?;
        let lsm = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f32>()?;
        for i in 0..4 {
            let want = -lsm[i][targets[i] as usize] * weights[i];
            assert!((got[i] - want).abs() < 1e-5, "row {i}: {} vs {want}", got[i]);
        }
        check_grad(|l| masked_cross_entropy(l, &targets, &weights), &logits, 1e-3)?;
        Ok(())
    }

    /// The GPU's loss kernels equal the CPU's on f32 logits and on bf16 ones (read as they
    /// are; the gradient in bf16): loss and gradient, odd and large vocabularies, a dropped
    /// row and a non-uniform gradient of the losses. Skipped without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cross_entropy_on_the_gpu_equals_the_cpu() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        for vocab in [11, 1000, 49152] {
            for dtype in [DType::F32, DType::BF16] {
                let logits = (Tensor::randn(0f32, 1.0, (5, vocab), &Device::Cpu)? * 4.0)?.to_dtype(dtype)?;
                let targets = [3u32, 0, 10, 7, 1];
                let weights = [1f32, 0.0, 1.0, 0.5, 1.0];
                let r = Tensor::new(&[1f32, 2.0, -1.0, 0.5, 3.0], &Device::Cpu)?;
                let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
                    let l = Var::from_tensor(&logits.to_device(dev)?)?;
                    let loss = masked_cross_entropy(l.as_tensor(), &targets, &weights)?;
                    let g = (&loss * r.to_device(dev)?)?.sum_all()?.backward()?;
                    let g = g.get(l.as_tensor()).expect("grad").to_device(&Device::Cpu)?;
                    assert_eq!(g.dtype(), dtype, "the gradient keeps the logits' dtype");
                    Ok((loss.to_device(&Device::Cpu)?, g.to_dtype(DType::F32)?))
                };
                let ((lc, gc), (lg, gg)) = (run(&Device::Cpu)?, run(&gpu)?);
                let (el, eg) = (max_abs_diff(&lc, &lg)?, max_abs_diff(&gc.to_dtype(dtype)?.to_dtype(DType::F32)?, &gg)?);
                eprintln!("vocab {vocab} {dtype:?}: loss off by {el}, gradient by {eg}");
                assert!(el < 2e-4, "vocab {vocab} {dtype:?}: loss off by {el}");
                // The GPU sums a row's exponentials in f32, the CPU in f64: over 49,152 terms
                // the f32 sum is off by ~sqrt(n) * 2^-24 ~ 1.3e-5 relative, on gradients up to
                // |r| = 3 (measured: 2.2e-6 to 4.4e-6; the bound was 1e-6, which random draws
                // passed or failed).
                assert!(eg < if dtype == DType::F32 { 2e-5 } else { 1.6e-2 }, "vocab {vocab} {dtype:?}: gradient off by {eg}");
            }
        }
        Ok(())
    }
}
