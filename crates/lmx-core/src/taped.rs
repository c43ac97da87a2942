//! Training ops without their intermediates on the gradient tape. Candle's composed ops put
//! every intermediate on the tape, and its backward seeds each gradient with zeros and adds
//! into it: a composed RMS norm was ~9 forward kernels, each kept until the backward, and ~30
//! backward ones. Here the forward runs the inference kernels off the tape (flash attention
//! on a GPU, the fused CPU kernels), [`taped`] puts its output on the tape as one node of the
//! op's inputs, and that node's backward is a closed form written for the op, recomputing
//! what it needs (attention's scores) instead of keeping it.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

/// An input of a taped op as its backward sees it: detached, with whether it was on the tape
/// (whether its gradient is wanted). Derefs to the tensor.
pub(crate) struct Input {
    t: Tensor,
    taped: bool,
}

impl std::ops::Deref for Input {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.t
    }
}

/// A backward: (the op's inputs, the output's gradient) -> a gradient per input (`None` for
/// inputs off the tape).
type Backward = dyn Fn(&[&Input], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// `y`, computed off the tape from `inputs` (1 to 3 tensors), as a node of the tape over them
/// whose backward is `bwd`. The node's value is a copy of `y` (contiguous, `y`'s shape).
pub(crate) fn taped(inputs: &[&Tensor], y: &Tensor, bwd: impl Fn(&[&Input], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static) -> Result<Tensor> {
    let op = Taped { y: y.clone(), bwd: Arc::new(bwd) };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("taped: 1 to 3 inputs, not {}", inputs.len()),
    }
}

struct Taped {
    y: Tensor,
    bwd: Arc<Backward>,
}

impl Taped {
    fn copy_of_y<S: BackendStorage>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S::Device: BackendDevice<Storage = S>,
    {
        let (storage, layout) = self.y.storage_and_layout();
        let Some(s) = pick(&storage) else { candle_core::bail!("taped: the output is on another device than the inputs") };
        // SAFETY: every element is written by the copy below.
        let mut out = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
        s.copy_strided_src(&mut out, 0, layout)?;
        Ok((out, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(candle_core::CpuStorage, Shape)> {
        self.copy_of_y(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        self.copy_of_y(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    /// The backward runs off the tape (on detached inputs: candle would otherwise record it,
    /// and ops on the tape take their compositions); inputs that were off it get no gradient.
    fn grads<const N: usize>(&self, inputs: [&Tensor; N], grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        let detached = inputs.map(|t| Input { t: t.detach(), taped: t.track_op() });
        let refs: Vec<&Input> = detached.iter().collect();
        let mut g = (self.bwd)(&refs, &grad.detach())?.into_iter();
        Ok(std::array::from_fn(|i| g.next().flatten().filter(|_| detached[i].taped)))
    }
}

impl CustomOp1 for Taped {
    fn name(&self) -> &'static str {
        "lmx-taped"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [ga] = self.grads([a], grad)?;
        Ok(ga)
    }
}

impl CustomOp2 for Taped {
    fn name(&self) -> &'static str {
        "lmx-taped"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for Taped {
    fn name(&self) -> &'static str {
        "lmx-taped"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], grad)?;
        Ok((ga, gb, gc))
    }
}

/// The gradient of `t` if it was on the tape.
fn if_taped(t: &Input, g: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if t.taped {
        g().map(Some)
    } else {
        Ok(None)
    }
}

/// `LMX_FUSED_BWD` is not 0.
fn fused_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_FUSED_BWD").is_ok_and(|v| v == "0"))
}

/// Whether a low-rank update's products take `fused_train::Skinny`'s kernels, which read its
/// wide operand as it is: on a GPU, with f32 factors and an f32 or bf16 input
/// (`LMX_FUSED_BWD=0`: the f32 compositions). On the CPU the compositions stay (measured
/// there only as a reference).
pub(crate) fn skinny(x: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    fused_on() && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// Whether the fused backward kernels (`fused_train`) take these tensors: one dtype, which
/// the device's kernels have (`LMX_FUSED_BWD=0`: the compositions, for comparisons).
fn fused(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    fused_on()
        && ts.iter().all(|t| t.dtype() == dtype)
        && match ts[0].device() {
            candle_core::Device::Cpu => matches!(dtype, DType::F32 | DType::BF16 | DType::F16),
            candle_core::Device::Cuda(_) => matches!(dtype, DType::F32 | DType::BF16),
            _ => false,
        }
}

/// Attention's backward: q (b, h, l, d), k and v (b, kv, s, d), grad (b, l, h, dv) (the
/// node's output is attention's (b, l, h, dv)). The scores and probabilities again (f32, as the
/// forward), then dV = P^T dO, dS = P (dO V^T - rowsum(dO V^T * P)), through the cap's
/// derivative, dQ = scale dS K, dK = scale dS^T Q. Query heads that share a key/value head are
/// folded into the query axis, as in the forward, so the gradients of shared keys and values
/// sum over their heads in the products.
pub(crate) fn attention_bwd(q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor, mask: Option<&Tensor>, scale: f64, softcap: Option<f64>) -> Result<[Tensor; 3]> {
    let (b, h, l, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let rep = h / kv;
    let q2 = q.reshape((b, kv, rep * l, d))?;
    let go = grad.transpose(1, 2)?.reshape((b, kv, rep * l, v.dim(3)?))?;
    let s = k.dim(2)?;
    if let Some(m) = mask.filter(|m| m.dtype() == DType::F32 && m.dims() == [l, s] && fused(&[q, k, v, grad])) {
        // The fused passes over the raw scores (`fused_train::AttentionScores`).
        let mm = crate::cpu::matmul;
        let (raw, m) = (mm(&q2, &k.t()?)?, m.contiguous()?);
        let op = crate::fused_train::AttentionScores { scale: scale as f32, cap: softcap.unwrap_or(0.0) as f32, q_len: l };
        let p = raw.apply_op2_no_bwd(&m, &op)?;
        let dv = mm(&p.t()?, &go)?;
        let ds = raw.apply_op3_no_bwd(&mm(&go, &v.t()?)?, &m, &op)?;
        let dq = mm(&ds, k)?.reshape((b, h, l, d))?;
        let dk = mm(&ds.t()?, &q2)?;
        return Ok([dq, dk, dv]);
    }
    attention_bwd_composed(q, k, v, grad, mask, scale, softcap)
}

/// [`attention_bwd`] as candle ops, f32 scores (any mask; the fused passes' reference).
fn attention_bwd_composed(q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor, mask: Option<&Tensor>, scale: f64, softcap: Option<f64>) -> Result<[Tensor; 3]> {
    let (b, h, l, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let rep = h / kv;
    let dtype = q.dtype();
    let q2 = q.reshape((b, kv, rep * l, d))?;
    let go = grad.transpose(1, 2)?.reshape((b, kv, rep * l, v.dim(3)?))?;
    let raw = (q2.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    let (scores, capped) = match softcap {
        Some(c) => {
            let t = (raw / c)?.tanh()?;
            ((&t * c)?, Some(t))
        }
        None => (raw, None),
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(&if rep > 1 { m.repeat((rep, 1))? } else { m.clone() })?,
        None => scores,
    };
    let p = crate::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let dv = p.to_dtype(dtype)?.t()?.matmul(&go)?;
    let dp = go.matmul(&v.t()?)?.to_dtype(DType::F32)?;
    let rows = (&dp * &p)?.sum_keepdim(D::Minus1)?;
    let ds = (p * dp.broadcast_sub(&rows)?)?;
    let ds = match capped {
        Some(t) => (ds * t.sqr()?.affine(-1.0, 1.0)?)?,
        None => ds,
    };
    let ds = (ds * scale)?.to_dtype(dtype)?;
    let dq = ds.matmul(k)?.reshape((b, h, l, d))?;
    let dk = ds.t()?.matmul(&q2)?;
    Ok([dq, dk, dv])
}

/// RMS norm's backward, as Hugging Face's norm computes (statistics in f32, the normalised
/// value rounded to x's dtype, then times the weight): with r = 1 / rms(x) and n = x r,
/// dx = r (g w - n mean(g w n)), dw = sum over rows of g round(n).
pub(crate) fn rms_norm_bwd(x: &Input, w: &Input, grad: &Tensor, eps: f32) -> Result<[Option<Tensor>; 2]> {
    if !w.taped && fused(&[&**x, &**w, grad]) {
        let dx = if_taped(x, || x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &crate::fused_train::RmsNormBwd { eps }))?;
        return Ok([dx, None]);
    }
    rms_norm_bwd_composed(x, w, grad, eps)
}

/// [`rms_norm_bwd`] as candle ops (the fused kernel's reference; the weight's gradient).
fn rms_norm_bwd_composed(x: &Input, w: &Input, grad: &Tensor, eps: f32) -> Result<[Option<Tensor>; 2]> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
    let n = xf.broadcast_mul(&r)?;
    let gw = grad.broadcast_mul(w)?.to_dtype(DType::F32)?;
    let dx = if_taped(x, || {
        let m = (&gw * &n)?.mean_keepdim(D::Minus1)?;
        gw.sub(&n.broadcast_mul(&m)?)?.broadcast_mul(&r)?.to_dtype(dtype)
    })?;
    let dw = if_taped(w, || {
        let cols = w.elem_count();
        (grad.to_dtype(DType::F32)? * n.to_dtype(dtype)?.to_dtype(DType::F32)?)?.reshape(((), cols))?.sum(0)?.to_dtype(w.dtype())?.reshape(w.shape())
    })?;
    Ok([dx, dw])
}

/// `silu(gate) * up`'s backward, in f32: with s = sigmoid(gate), d_up = g gate s,
/// d_gate = g up s (1 + gate (1 - s)).
pub(crate) fn silu_mul_bwd(gate: &Input, up: &Input, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
    if fused(&[&**gate, &**up, grad]) && gate.dims() == up.dims() {
        let both = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &grad.contiguous()?, &crate::fused_train::SiluMulBwd)?;
        return Ok([if_taped(gate, || both.get(0))?, if_taped(up, || both.get(1))?]);
    }
    silu_mul_bwd_composed(gate, up, grad)
}

/// [`silu_mul_bwd`] as candle ops (the fused kernel's reference).
fn silu_mul_bwd_composed(gate: &Input, up: &Input, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
    let dtype = gate.dtype();
    let (gf, uf, g) = (gate.to_dtype(DType::F32)?, up.to_dtype(DType::F32)?, grad.to_dtype(DType::F32)?);
    let s = candle_nn::ops::sigmoid(&gf)?;
    let d_up = if_taped(up, || ((&g * &gf)? * &s)?.to_dtype(dtype))?;
    let d_gate = if_taped(gate, || {
        let ds = ((&gf * s.affine(-1.0, 1.0)?)? + 1.0)?;
        (((g * uf)? * s)? * ds)?.to_dtype(dtype)
    })?;
    Ok([d_gate, d_up])
}

/// The low-rank update's backward: with G = scale g (f32) and H = x a (recomputed),
/// db = H^T G, da = x^T (G b^T), dx = G b^T a^T.
pub(crate) fn low_rank_bwd(x: &Input, a: &Input, b: &Input, grad: &Tensor, scale: f64) -> Result<[Option<Tensor>; 3]> {
    if skinny(x, a, b) {
        return low_rank_bwd_skinny(x, a, b, grad, scale, None);
    }
    low_rank_bwd_composed(x, a, b, grad, scale)
}

/// [`low_rank_bwd`] as candle ops, in the factors' dtype (the skinny products' reference).
fn low_rank_bwd_composed(x: &Input, a: &Input, b: &Input, grad: &Tensor, scale: f64) -> Result<[Option<Tensor>; 3]> {
    // The scale multiplies the rank-wide products (rows x r), not the gradient (rows x out).
    let g = grad.to_dtype(a.dtype())?;
    let xf = x.to_dtype(a.dtype())?;
    let mm = crate::cpu::matmul;
    let db = if_taped(b, || mm(&(mm(&xf, a)? * scale)?.t()?, &g))?;
    let gb = (mm(&g, &b.t()?)? * scale)?;
    let da = if_taped(a, || mm(&xf.t()?, &gb))?;
    let dx = if_taped(x, || mm(&gb, &a.t()?)?.to_dtype(x.dtype()))?;
    Ok([dx, da, db])
}

/// [`crate::ops::lora_linear`]'s backward: x (.., in) gets `base_t(g) + g b^T a^T` (one
/// gradient), a and b the low-rank update's.
pub(crate) fn lora_linear_bwd(x: &Input, a: &Input, b: &Input, grad: &Tensor, scale: f64, base_t: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<[Option<Tensor>; 3]> {
    let (in_f, out) = (x.dim(D::Minus1)?, grad.dim(D::Minus1)?);
    let x2 = Input { t: x.reshape(((), in_f))?, taped: x.taped };
    let g2 = grad.reshape(((), out))?;
    if skinny(x, a, b) {
        // The frozen product's gradient is the addend of the update's (one pass, no sum).
        let base = if x.taped { Some(base_t(&g2)?.to_dtype(x.dtype())?) } else { None };
        let [dx, da, db] = low_rank_bwd_skinny(&x2, a, b, &g2, scale, base.as_ref())?;
        return Ok([dx.map(|d| d.reshape(x.shape())).transpose()?, da, db]);
    }
    let [dx, da, db] = low_rank_bwd(&x2, a, b, &g2, scale)?;
    let dx = match dx {
        Some(d) => Some((base_t(&g2)?.to_dtype(d.dtype())? + d)?.reshape(x.shape())?),
        None => None,
    };
    Ok([dx, da, db])
}

/// `scale (x a) b` rounded to x's dtype through `fused_train::Skinny`'s products (x read as it
/// is; a and b f32): the forward whose backward is [`low_rank_bwd_skinny`].
/// With `add` (rows, out) in x's dtype: add plus that, rounded again (as candle's sum).
pub(crate) fn low_rank_skinny(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, add: Option<&Tensor>) -> Result<Tensor> {
    use crate::fused_train::Skinny;
    let h = x.contiguous()?.apply_op2_no_bwd(&a.contiguous()?, &Skinny::In { scale: 1.0, m_t: false })?;
    let op = Skinny::Out { scale: scale as f32, m_t: true, dtype: x.dtype() };
    match add {
        Some(add) => h.apply_op3_no_bwd(&b.contiguous()?, &add.contiguous()?, &op),
        None => h.apply_op2_no_bwd(&b.contiguous()?, &op),
    }
}

/// [`low_rank_bwd`] through `fused_train::Skinny`'s products, which read x and the gradient
/// as they are: H = x a, gb = scale g b^T, db = scale H^T g, da = x^T gb, dx = gb a^T.
/// `dx_add` (x's shape and dtype) is added to x's gradient in the same pass.
fn low_rank_bwd_skinny(x: &Input, a: &Input, b: &Input, grad: &Tensor, scale: f64, dx_add: Option<&Tensor>) -> Result<[Option<Tensor>; 3]> {
    use crate::fused_train::Skinny;
    let (xc, ac, bc, g, s) = (x.contiguous()?, a.contiguous()?, b.contiguous()?, grad.contiguous()?, scale as f32);
    let gb = g.apply_op2_no_bwd(&bc, &Skinny::In { scale: s, m_t: true })?;
    let db = if_taped(b, || g.apply_op2_no_bwd(&xc.apply_op2_no_bwd(&ac, &Skinny::In { scale: 1.0, m_t: false })?, &Skinny::Outer { scale: s, t: true }))?;
    let da = if_taped(a, || xc.apply_op2_no_bwd(&gb, &Skinny::Outer { scale: 1.0, t: false }))?;
    let dx = if_taped(x, || {
        let op = Skinny::Out { scale: 1.0, m_t: false, dtype: x.dtype() };
        match dx_add {
            Some(add) => gb.apply_op3_no_bwd(&ac, &add.contiguous()?, &op),
            None => gb.apply_op2_no_bwd(&ac, &op),
        }
    })?;
    Ok([dx, da, db])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::max_abs_diff;
    use candle_core::Device;

    /// The CPU, and the GPU when there is one.
    fn devices() -> Vec<Device> {
        #[allow(unused_mut)]
        let mut devices = vec![Device::Cpu];
        #[cfg(feature = "cuda")]
        devices.extend(Device::new_cuda(0).ok());
        devices
    }

    fn input(t: &Tensor) -> Input {
        Input { t: t.clone(), taped: true }
    }

    /// The largest difference of `a` and `b` in units of the dtype's rounding at `b`'s scale
    /// (max |a - b| / max |b| / epsilon).
    fn ulps(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.to_dtype(DType::F32).and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>()).expect("scale");
        let eps = match b.dtype() {
            DType::BF16 => 1.0 / 128.0,
            DType::F16 => 1.0 / 1024.0,
            _ => f32::EPSILON,
        };
        max_abs_diff(a, b).expect("difference") / scale / eps
    }

    /// The fused backwards of the SiLU product and of RMS norm (the CPU's, and the GPU's when
    /// there is one) equal the compositions they replace, over rows with large values: within
    /// a few f32 roundings in f32, an ulp of the output's scale in bf16 and f16 (two for RMS
    /// norm's dx, whose composition rounds twice).
    #[test]
    fn fused_backwards_equal_the_compositions() -> Result<()> {
        let devices = devices();
        for dev in &devices {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dev.is_cuda() && dtype == DType::F16 {
                    continue;
                }
                let t = |shape: (usize, usize, usize), s: f64| -> Result<Tensor> { (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * s)?.to_dtype(dtype) };
                let (gate, up, g) = (t((3, 5, 72), 4.0)?, t((3, 5, 72), 2.0)?, t((3, 5, 72), 1.0)?);
                let on = |x: &Tensor| x.to_device(dev);
                let fused = silu_mul_bwd(&input(&on(&gate)?), &input(&on(&up)?), &on(&g)?)?;
                let composed = silu_mul_bwd_composed(&input(&gate), &input(&up), &g)?;
                for (name, a, b) in [("gate", &fused[0], &composed[0]), ("up", &fused[1], &composed[1])] {
                    let (a, b) = (a.as_ref().expect("grad").to_device(&Device::Cpu)?, b.as_ref().expect("grad"));
                    let e = ulps(&a, b);
                    assert!(e <= if dtype == DType::F32 { 16.0 } else { 1.01 }, "{dev:?} {dtype:?} silu_mul d_{name}: {e} ulps");
                }
                let (x, w, g) = (t((3, 5, 96), 30.0)?, (t((1, 1, 96), 0.2)?.flatten_all()? + 1.0)?, t((3, 5, 96), 1.0)?);
                let frozen = Input { t: on(&w)?, taped: false };
                let fused = rms_norm_bwd(&input(&on(&x)?), &frozen, &on(&g)?, 1e-5)?;
                let composed = rms_norm_bwd_composed(&input(&x), &Input { t: w.clone(), taped: false }, &g, 1e-5)?;
                let (a, b) = (fused[0].as_ref().expect("grad").to_device(&Device::Cpu)?, composed[0].as_ref().expect("grad"));
                let e = ulps(&a, b);
                // The composition rounds grad * w to the dtype before its f32 part and its
                // result once more, the fused op only its result: up to ~1.5 ulps apart (1.08
                // seen under qemu-aarch64 on random inputs).
                assert!(e <= if dtype == DType::F32 { 64.0 } else { 2.0 }, "{dev:?} {dtype:?} rms_norm dx: {e} ulps");
                assert!(fused[1].is_none());
            }
        }
        Ok(())
    }

    /// The low-rank update's skinny products (forward and backward) equal the f32
    /// compositions: ranks under and over one tile of 8, odd sizes and multiples of 8, f32 and bf16 inputs;
    /// the f32 factors' gradients within f32 roundings, x's gradient and the output within an
    /// ulp in bf16. The CPU's, and the GPU's when there is one.
    #[test]
    fn skinny_low_rank_equals_the_composition() -> Result<()> {
        let devices = devices();
        let r = |shape: (usize, usize), s: f64| -> Result<Tensor> { Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * s };
        // The last two: rows of a multiple of 8 values (as a model's), batches not a multiple
        // of 8 rows, ranks of one and two tiles.
        for (n, k, rank, o) in [(37, 70, 3, 45), (64, 96, 12, 33), (37, 64, 8, 48), (20, 256, 16, 1032)] {
            let (x, a, b, g) = (r((n, k), 2.0)?, r((k, rank), 0.3)?, r((rank, o), 0.3)?, r((n, o), 1.0)?);
            for dev in &devices {
                for dtype in [DType::F32, DType::BF16] {
                    let (xd, gd) = (x.to_dtype(dtype)?, g.to_dtype(dtype)?);
                    let want_y = (xd.to_dtype(DType::F32)?.matmul(&a)?.matmul(&b)? * 1.5)?.to_dtype(dtype)?;
                    let want = low_rank_bwd_composed(&input(&xd), &input(&a), &input(&b), &gd, 1.5)?;
                    let on = |t: &Tensor| t.to_device(dev);
                    let y = low_rank_skinny(&on(&xd)?, &on(&a)?, &on(&b)?, 1.5, None)?;
                    let got = low_rank_bwd_skinny(&input(&on(&xd)?), &input(&on(&a)?), &input(&on(&b)?), &on(&gd)?, 1.5, None)?;
                    let e = ulps(&y.to_device(&Device::Cpu)?, &want_y);
                    assert!(e <= if dtype == DType::F32 { 64.0 } else { 1.01 }, "{dev:?} {dtype:?} rank {rank}: output off by {e} ulps");
                    for (name, a, b) in [("x", &got[0], &want[0]), ("a", &got[1], &want[1]), ("b", &got[2], &want[2])] {
                        let (a, b) = (a.as_ref().expect("grad").to_device(&Device::Cpu)?, b.as_ref().expect("grad"));
                        assert_eq!(a.dims(), b.dims(), "d{name}");
                        let e = ulps(&a, b);
                        assert!(e <= if b.dtype() == DType::F32 { 64.0 } else { 1.01 }, "{dev:?} {dtype:?} rank {rank}: d{name} off by {e} ulps");
                    }
                    // With addends: the output plus a frozen product's, x's gradient plus another's.
                    let (add, dx_add) = (r((n, o), 3.0)?.to_dtype(dtype)?, r((n, k), 3.0)?.to_dtype(dtype)?);
                    let y = low_rank_skinny(&on(&xd)?, &on(&a)?, &on(&b)?, 1.5, Some(&on(&add)?))?;
                    let dx = low_rank_bwd_skinny(&input(&on(&xd)?), &input(&on(&a)?), &input(&on(&b)?), &on(&gd)?, 1.5, Some(&on(&dx_add)?))?[0].clone().expect("grad");
                    let want_dx = (want[0].as_ref().expect("grad") + &dx_add)?;
                    for (name, got, want) in [("output", y, (&add + &want_y)?), ("dx", dx, want_dx)] {
                        let e = ulps(&got.to_device(&Device::Cpu)?, &want);
                        assert!(e <= if dtype == DType::F32 { 64.0 } else { 1.01 }, "{dev:?} {dtype:?} rank {rank}: {name} with an addend off by {e} ulps");
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention's fused backward passes over the scores equal the composition: grouped
    /// heads, queries after cached keys, a window, soft-capping, two sequences; f32 within f32
    /// roundings, bf16 within two ulps of each gradient's scale (the products then sum ulp
    /// differences of the rounded scores' gradient). The CPU's, and the GPU's when there is one.
    #[test]
    fn fused_attention_backward_equals_the_composition() -> Result<()> {
        let devices = devices();
        let r = |shape: (usize, usize, usize, usize), s: f64| -> Result<Tensor> { Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * s };
        let (q, k, v, g) = (r((2, 6, 9, 16), 2.0)?, r((2, 2, 13, 16), 2.0)?, r((2, 2, 13, 16), 1.0)?, r((2, 9, 6, 16), 1.0)?);
        for dev in &devices {
            for dtype in [DType::F32, DType::BF16] {
                for (window, softcap) in [(None, None), (Some(6), Some(4.0))] {
                    let mask = crate::ops::causal_mask(9, 4, window, &Device::Cpu)?;
                    let c = |t: &Tensor| t.to_dtype(dtype);
                    let want = attention_bwd_composed(&c(&q)?, &c(&k)?, &c(&v)?, &c(&g)?, Some(&mask), 0.3, softcap)?;
                    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(dev);
                    let got = attention_bwd(&on(&q)?, &on(&k)?, &on(&v)?, &on(&g)?, Some(&mask.to_device(dev)?), 0.3, softcap)?;
                    for (name, a, b) in [("q", &got[0], &want[0]), ("k", &got[1], &want[1]), ("v", &got[2], &want[2])] {
                        let e = ulps(&a.to_device(&Device::Cpu)?, b);
                        assert!(e <= if dtype == DType::F32 { 64.0 } else { 2.0 }, "{dev:?} {dtype:?} window {window:?} cap {softcap:?}: d{name} off by {e} ulps");
                    }
                }
            }
        }
        Ok(())
    }
}
