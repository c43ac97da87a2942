//! The tensor ops lmx models are built from.
//!
//! Each op has two implementations behind one name: a fused candle kernel used for inference,
//! and a composition of differentiable candle primitives used whenever an input is tracked by
//! the gradient tape (fine-tuning). The fused kernels have no backward pass, so the choice is
//! made per call from `Tensor::track_op`, and both paths are tested against each other.

use candle_core::{DType, Device, Result, Tensor, D};

/// True when `x` is on a CUDA device in a dtype lmx's fused CUDA kernels take (f32, bf16).
fn fused_cuda(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda() && crate::cuda_fused::supports(x.dtype())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// Whether RMS norm takes lmx's fused CUDA kernel (`LMX_CUDA_FUSED_NORM=0` takes the
/// composition). In session 5 the 4096-token prefill of a Llama-3-8B-shaped bf16 model hit a
/// device-side assert in the embedding lookup of a later step with a fused norm in 4 of 5 runs;
/// since the decode attention kernel was rewritten (session 9) 16 such runs were clean (see
/// docs/BENCHMARKS.md), and the fused norm makes bf16 decode 1.5x faster.
fn cuda_fused_norm() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_FUSED_NORM").is_ok_and(|v| v == "0"))
}

/// Whether causal attention on the GPU takes lmx's fused softmax kernel
/// (`LMX_CUDA_CAUSAL_SOFTMAX=0` composes candle's ops instead, for comparisons).
#[cfg(feature = "cuda")]
fn cuda_causal_softmax() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_CAUSAL_SOFTMAX").is_ok_and(|v| v == "0"))
}

/// Whether causal bf16 attention on the GPU takes the flash kernel (`LMX_CUDA_FLASH=0`: the
/// products and the fused softmax).
#[cfg(feature = "cuda")]
fn cuda_flash() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_FLASH").is_ok_and(|v| v == "0"))
}

/// Whether ops on the tape (training) run their inference kernels and one node with a
/// closed-form backward ([`crate::taped`]; `LMX_TAPED_OPS=0`: candle's compositions, every
/// intermediate on the tape).
fn taped_ops() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_TAPED_OPS").is_ok_and(|v| v == "0"))
}

/// True when any input is recorded on the gradient tape, so the op must be differentiable.
fn on_tape(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// Root-mean-square normalisation over the last dimension, as Hugging Face's `LlamaRMSNorm`:
/// statistics in f32, the normalised value cast back to the input dtype, then scaled by `weight`.
/// On the CPU lmx's fused kernel does this in one pass with Hugging Face's two roundings;
/// elsewhere candle's fused kernel is used for f32 and the composition for other dtypes.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if !on_tape(&[x, weight]) && x.dtype() == weight.dtype() {
        if x.device().is_cpu() || (fused_cuda(x) && cuda_fused_norm()) {
            return x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &crate::cpu_fused::RmsNorm { eps });
        }
        if x.dtype() == DType::F32 && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, weight, eps);
        }
    }
    if taped_ops() && on_tape(&[x, weight]) && x.dtype() == weight.dtype() && x.dims().last() == Some(&weight.elem_count()) {
        let y = rms_norm(&x.detach(), &weight.detach(), eps)?;
        return crate::taped::taped(&[x, weight], &y, move |t, g| Ok(crate::taped::rms_norm_bwd(t[0], t[1], g, eps)?.to_vec()));
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps as f64)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// `x + h` and [`rms_norm`] of it: the residual stream's update and the next block's input.
/// Returns (sum, normalised sum), equal to the separate add and norm; off the tape one pass
/// (one launch on a GPU instead of two), else the composition.
pub fn add_rms_norm(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    add_rms_norm_coded(x, h, weight, eps, None)
}

/// [`add_rms_norm`] whose normalised sum, for one row on a GPU, is also coded into `target`
/// for the integer products that read it next (offered to them: no coding launch between).
pub fn add_rms_norm_coded(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f32, target: Option<&crate::quant::CodeTarget>) -> Result<(Tensor, Tensor)> {
    if !on_tape(&[x, h, weight])
        && x.dtype() == weight.dtype()
        && h.dtype() == weight.dtype()
        && x.dims() == h.dims()
        && (x.device().is_cpu() || (fused_cuda(x) && cuda_fused_norm() && cuda_add_norm()))
    {
        let codes = code_buffer(target, x)?;
        let both = x.contiguous()?.apply_op3_no_bwd(&h.contiguous()?, &weight.contiguous()?, &crate::cpu_fused::AddRmsNorm { eps, codes: codes.clone() })?;
        let (sum, normed) = (both.get(0)?, both.get(1)?);
        #[cfg(feature = "cuda")]
        if let Some((buf, spec)) = &codes {
            crate::quant::cuda::offer_codes(&normed, *spec, buf);
        }
        return Ok((sum, normed));
    }
    let sum = (x + h)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// `target`'s buffer for the outputs of decode attention's queries `q` (1, heads, 1, d) on a
/// GPU, one row of heads * d, where the kernel can code them: groups within a head, at most 256
/// values (a group's threads in one warp).
fn head_codes(target: Option<&crate::quant::CodeTarget>, q: &Tensor) -> Result<Option<(Tensor, (usize, usize))>> {
    #[cfg(feature = "cuda")]
    if let (Some(t), &[1, heads, 1, d]) = (target.filter(|_| crate::quant::cuda::offered_codes() && head_codes_on()), q.dims()) {
        let (bits, gs) = t.spec();
        if q.device().is_cuda() && matches!(bits, 4 | 8) && gs % 8 == 0 && gs <= 256 && d % gs == 0 && d <= 256 {
            return Ok(t.buffer(heads * d, q.device())?.map(|b| (b.clone(), (bits, gs))));
        }
    }
    let _ = (target, q);
    Ok(None)
}

/// Whether decode attention codes its outputs for the output projection
/// (`LMX_CUDA_ATTENTION_CODES=0`: the projection codes them, for comparisons).
#[cfg(feature = "cuda")]
fn head_codes_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_ATTENTION_CODES").is_ok_and(|v| v == "0"))
}

/// `target`'s buffer for one row of `x` (a GPU decode step), with its (bits, group size).
fn code_buffer(target: Option<&crate::quant::CodeTarget>, x: &Tensor) -> Result<Option<(Tensor, (usize, usize))>> {
    #[cfg(feature = "cuda")]
    if let Some(t) = target.filter(|_| crate::quant::cuda::offered_codes()) {
        let cols = x.dims().last().copied().unwrap_or(0);
        if x.device().is_cuda() && x.elem_count() == cols {
            return Ok(t.buffer(cols, x.device())?.map(|b| (b.clone(), t.spec())));
        }
    }
    let _ = (target, x);
    Ok(None)
}

/// Whether [`add_rms_norm`] takes its one CUDA kernel (`LMX_CUDA_ADD_NORM=0`: an add and a
/// norm, for comparisons).
fn cuda_add_norm() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_ADD_NORM").is_ok_and(|v| v == "0"))
}

/// Rotary position embedding in the "rotate half" layout of Hugging Face models.
/// `x`: (b, n_heads, seq, head_dim); `cos`, `sin`: (seq, head_dim / 2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !on_tape(&[x, cos, sin]) && x.device().is_cpu() && x.dtype() == cos.dtype() && x.dtype() == sin.dtype() && x.stride().last() == Some(&1) {
        return x.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &crate::cpu_fused::Rope);
    }
    if !on_tape(&[x, cos, sin]) {
        let x = x.contiguous()?;
        return candle_nn::rotary_emb::rope(&x, &cos.contiguous()?, &sin.contiguous()?);
    }
    if taped_ops() && !on_tape(&[cos, sin]) {
        // The rotation's transpose is the rotation by the opposite angle.
        let y = rope(&x.detach(), cos, sin)?;
        let (cos, sin) = (cos.clone(), sin.neg()?);
        return crate::taped::taped(&[x], &y, move |_, g| Ok(vec![Some(rope(&g.contiguous()?, &cos, &sin)?)]));
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(0)?.unsqueeze(0)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(0)?.unsqueeze(0)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !on_tape(&[x]) && x.is_contiguous() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// SiLU (x * sigmoid(x)); candle's op is differentiable.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// The greedy pick of one row of f32 `logits` (any shape of one row): u32 (2,) on the logits'
/// device holding the first index of the largest logit and its log probability's bits (the
/// logit minus the row's log-sum-exp), with the `masked` ids (at most 8) counted as -inf. On a
/// GPU one small kernel, so that a decode step hands the host 8 bytes instead of the logits.
pub fn pick_greedy(logits: &Tensor, masked: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.flatten_all()?.apply_op1_no_bwd(&PickGreedy { masked: vec![masked.to_vec()] })
}

/// [`pick_greedy`] of every row of `logits` (rows, vocab), row r leaving out `masked[r]`: u32
/// (rows * 2,), each row's token and log probability's bits. On a GPU two launches for all the
/// rows (a batch's decode step), not two a row.
pub fn pick_greedy_rows(logits: &Tensor, masked: &[Vec<u32>]) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if rows != masked.len() {
        crate::bail!("pick_greedy_rows: {rows} rows of logits and {} lists of masked ids", masked.len());
    }
    logits.contiguous()?.apply_op1_no_bwd(&PickGreedy { masked: masked.to_vec() })
}

/// The first index of the largest value; NaN never counts as the largest (a NaN first value
/// does not hide a real maximum after it), and a row with none larger than -inf gives 0. The
/// GPU's pick agrees.
pub fn first_argmax(row: &[f32]) -> usize {
    // Two passes that vectorize, where one running (index, value) pair does not: the largest
    // value (NaN never taken), then the first block of 64 that holds it, then its place there.
    let top = crate::cpu_fused::max(row);
    if top == f32::NEG_INFINITY {
        return 0;
    }
    let block = row.chunks(64).position(|c| c.iter().fold(false, |any, &v| any | (v == top))).unwrap_or(0);
    64 * block + row[64 * block..].iter().position(|&v| v == top).unwrap_or(0)
}

/// The greedy pick of each of `masked.len()` rows (the input split evenly), each with its own
/// masked ids.
struct PickGreedy {
    masked: Vec<Vec<u32>>,
}

impl candle_core::CustomOp1 for PickGreedy {
    fn name(&self) -> &'static str {
        "lmx-pick-greedy"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(all) = s else { candle_core::bail!("lmx-pick-greedy takes f32 logits") };
        let all = &all[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let n = all.len() / self.masked.len().max(1);
        let mut out = Vec::with_capacity(2 * self.masked.len());
        for (row, masked) in all.chunks(n.max(1)).zip(&self.masked) {
            let mut row = row.to_vec();
            for &id in masked {
                if let Some(v) = row.get_mut(id as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            let best = first_argmax(&row);
            let logprob = row.get(best).map_or(f32::NEG_INFINITY, |v| v - crate::cpu_fused::log_sum_exp(&row));
            out.extend([best as u32, logprob.to_bits()]);
        }
        let len = out.len();
        Ok((candle_core::CpuStorage::U32(out), candle_core::Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let out = match &self.masked[..] {
            [one] => crate::cuda_fused::pick_greedy(s, l, one)?,
            rows => crate::cuda_fused::pick_greedy_rows(s, l, rows)?,
        };
        Ok((out, candle_core::Shape::from(2 * self.masked.len())))
    }
}

/// `silu(gate) * up`, the gated product of SwiGLU feed-forward blocks (one fused pass on the CPU).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !on_tape(&[gate, up]) && (gate.device().is_cpu() || fused_cuda(gate)) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &crate::cpu_fused::SiluMul);
    }
    if taped_ops() && on_tape(&[gate, up]) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        let y = silu_mul(&gate.detach(), &up.detach())?;
        return crate::taped::taped(&[gate, up], &y, |t, g| Ok(crate::taped::silu_mul_bwd(t[0], t[1], g)?.to_vec()));
    }
    gate.silu()? * up
}

/// [`silu_mul`] whose output, for one row on a GPU, is also coded into `target` for the
/// integer product that reads it next (offered to it: no coding launch between).
pub fn silu_mul_coded(gate: &Tensor, up: &Tensor, target: Option<&crate::quant::CodeTarget>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if !on_tape(&[gate, up]) && fused_cuda(gate) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        if let Some((buf, spec)) = code_buffer(target, gate)? {
            let y = gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &crate::cuda_fused::SiluMulCoded { codes: buf.clone(), spec })?;
            crate::quant::cuda::offer_codes(&y, spec, &buf);
            return Ok(y);
        }
    }
    let _ = target;
    silu_mul(gate, up)
}

/// Adam's update of one parameter with MLX's semantics: `m' = b1 m + (1 - b1) g`,
/// `v' = b2 v + (1 - b2) g^2`, `p' = keep p - step m' / (c2 sqrt(v') + eps)` (the optimizer
/// picks keep = 1 - lr weight_decay, step = lr or lr / (1 - b1^t), c2 = 1 or
/// 1 / sqrt(1 - b2^t)). `moments`: (2, ..p), m then v. Returns (p', moments'). f32 values take
/// one fused pass (one launch on a GPU, not 13); other dtypes the composition.
pub fn adam_step(p: &Tensor, g: &Tensor, moments: &Tensor, [keep, b1, b2, step, c2, eps]: [f64; 6]) -> Result<(Tensor, Tensor)> {
    if [p, g, moments].iter().all(|t| t.dtype() == DType::F32) && moments.dims() == [&[2], p.dims()].concat() && p.dims() == g.dims() {
        let h = [keep, b1, 1.0 - b1, b2, 1.0 - b2, step, c2, eps].map(|v| v as f32);
        let all = p.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &moments.contiguous()?, &crate::fused_train::Adam { h })?;
        return Ok((all.get(0)?, all.narrow(0, 1, 2)?));
    }
    let (m, v) = (moments.get(0)?, moments.get(1)?);
    let m = ((m * b1)? + (g * (1.0 - b1))?)?;
    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let upd = ((&m * step)? / ((v.sqrt()? * c2)? + eps)?)?;
    let p = ((p * keep)? - upd)?;
    Ok((p, Tensor::stack(&[m, v], 0)?))
}

/// A low-rank (LoRA) update: `scale * (x @ a) @ b` for x (rows, in), a (in, r), b (r, out),
/// computed in a's dtype and returned in x's. On the tape one node whose backward recomputes
/// `x @ a` (rows x r, small) instead of keeping the f32 copies and products. On a GPU with f32
/// factors its products read x as it is (`fused_train::Skinny`), never an f32 copy of it.
pub fn low_rank(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let z = |x: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
        // The skinny products have no backward of their own: off the tape only (the taped
        // node's forward runs on detached inputs).
        if crate::taped::skinny(x, a, b) && !on_tape(&[x, a, b]) {
            return crate::taped::low_rank_skinny(x, a, b, scale, None);
        }
        // Scaled at the rank-wide product (rows x r), not the output (rows x out).
        let mm = crate::cpu::matmul;
        mm(&(mm(&x.to_dtype(a.dtype())?, a)? * scale)?, b)?.to_dtype(dtype)
    };
    if !(taped_ops() && on_tape(&[x, a, b])) {
        return z(x, a, b);
    }
    let y = z(&x.detach(), &a.detach(), &b.detach())?;
    crate::taped::taped(&[x, a, b], &y, move |t, g| Ok(crate::taped::low_rank_bwd(t[0], t[1], t[2], g, scale)?.to_vec()))
}

/// The transposed product of a frozen layer: `g @ W` for the output's gradient g (rows, out).
pub type FrozenBackward = std::sync::Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A frozen layer with a LoRA update, `base(x) + scale (x a) b` for x (.., in), a (in, r),
/// b (r, out), in x's dtype; `base` is the frozen product x (rows, in) -> (rows, out) and
/// `base_t` makes its input's gradient (called on the tape only). `None` when x, a and b are
/// all off the tape or the taped ops are off (`LMX_TAPED_OPS=0`): the caller composes the
/// two. On the tape one node over
/// (x, a, b) whose backward gives x `base_t(g) + g b^T a^T` in one gradient, where the
/// composition was five nodes (the product, two reshapes, the update, the sum), each of which
/// candle's backward seeds with zeros and adds into.
pub fn lora_linear(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, base: impl Fn(&Tensor) -> Result<Tensor>, base_t: impl FnOnce() -> FrozenBackward) -> Result<Option<Tensor>> {
    if !(taped_ops() && on_tape(&[x, a, b])) {
        return Ok(None);
    }
    let base_t = base_t();
    let (in_f, out) = (x.dim(D::Minus1)?, b.dim(1)?);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    let (x2, ad, bd) = (x.detach().reshape(((), in_f))?, a.detach(), b.detach());
    let base_y = base(&x2)?.to_dtype(x.dtype())?;
    let y = if crate::taped::skinny(&x2, &ad, &bd) { crate::taped::low_rank_skinny(&x2, &ad, &bd, scale, Some(&base_y))? } else { (base_y + low_rank(&x2, &ad, &bd, scale)?)? };
    let y = y.reshape(dims)?;
    crate::taped::taped(&[x, a, b], &y, move |t, g| Ok(crate::taped::lora_linear_bwd(t[0], t[1], t[2], g, scale, &*base_t)?.to_vec())).map(Some)
}

/// True when every value of `t` is finite (integer tensors always are): 0 * x is 0 for a
/// finite x and NaN otherwise, so one pass and one sum find any NaN or infinity.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    if let Some(finite) = cpu_all_finite(t) {
        return Ok(finite);
    }
    Ok(t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite())
}

/// [`all_finite`] over a contiguous CPU tensor's values where they lie ([`raw_all_finite`]),
/// without a copy; None for other tensors.
fn cpu_all_finite(t: &Tensor) -> Option<bool> {
    use candle_core::{CpuStorage, Storage};
    fn bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: the float types below have no padding, and any byte may be read as a u8.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = &*storage else { return None };
    let data = match cpu {
        CpuStorage::BF16(v) => bytes(&v[start..end]),
        CpuStorage::F16(v) => bytes(&v[start..end]),
        CpuStorage::F32(v) => bytes(&v[start..end]),
        CpuStorage::F64(v) => bytes(&v[start..end]),
        _ => return None,
    };
    Some(raw_all_finite(data, t.dtype()))
}

/// False when the raw little-endian values of a tensor of `dtype` include a NaN or an
/// infinity (all exponent bits set). Integer tensors are always finite.
pub fn raw_all_finite(data: &[u8], dtype: DType) -> bool {
    fn none_special<const N: usize>(data: &[u8], mask: u32) -> bool {
        // One pass, no early exit, so the loop vectorizes; a few GB/s per core.
        !data.chunks_exact(N).fold(false, |bad, c| {
            let mut b = [0u8; 4];
            b[..N].copy_from_slice(c);
            bad | (u32::from_le_bytes(b) & mask == mask)
        })
    }
    match dtype {
        DType::F32 => none_special::<4>(data, 0x7f80_0000),
        DType::BF16 => none_special::<2>(data, 0x7f80),
        DType::F16 => none_special::<2>(data, 0x7c00),
        DType::F64 => data.chunks_exact(8).all(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])).is_finite()),
        _ => true,
    }
}

/// Rows up to which any product is memory-bound and goes through [`crate::cpu::MatVec`].
const MATVEC_SMALL: usize = 8;

/// A batch of sequences, one query each (decode), each attending to every key of its own
/// cache: `q` (b, n_heads, 1, head_dim), `keys[i]` / `values[i]` (1, n_kv_heads, len_i,
/// head_dim) on the CPU. One op for the batch ([`crate::cpu_fused::DecodeAttentionRows`]).
pub fn decode_attention_rows(q: &Tensor, keys: Vec<Tensor>, values: Vec<Tensor>, scale: f64) -> Result<Tensor> {
    let op = crate::cpu_fused::DecodeAttentionRows { scale: scale as f32, keys, values };
    q.contiguous()?.apply_op1_no_bwd(&op)
}

/// One query per head (decode) attending to every key of a quantized KV cache on the CPU:
/// `q` (b, n_heads, 1, head_dim); `k`, `v` the cache's [packed u32 codes, scales, biases], each
/// (b, n_kv_heads, kv_len, ..). The codes are read as stored ([`crate::cpu_fused::QuantizedDecodeAttention`]).
pub fn decode_attention_quantized(q: &Tensor, k: &[Tensor; 3], v: &[Tensor; 3], bits: usize, group_size: usize, scale: f64) -> Result<Tensor> {
    let f32s = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>() };
    let op = crate::cpu_fused::QuantizedDecodeAttention { scale: scale as f32, bits, group_size, params: [f32s(&k[1])?, f32s(&k[2])?, f32s(&v[1])?, f32s(&v[2])?] };
    q.contiguous()?.apply_op3_no_bwd(&k[0], &v[0], &op)
}

/// `x @ weight^T (+ bias)` for a weight stored as (out_features, in_features).
/// One decoded token per sequence on the CPU (a single row, or a batch of sequences one
/// position each, up to [`crate::cpu::MATVEC_MAX_ROWS`]; or up to 8 rows of any shape) goes
/// through lmx's matrix-vector
/// kernel, which reads the weights once at memory bandwidth and gives each row the result it
/// has alone; everything else through a GEMM.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    // A few rows of any kind (speculative decoding's verification of a few draft tokens) are
    // memory-bound too.
    let decode = rows <= MATVEC_SMALL || (x.rank() == 3 && x.dim(1)? == 1 && rows <= crate::cpu::MATVEC_MAX_ROWS);
    let half_weight = half_weight(x, weight);
    let fast = decode && x.device().is_cpu() && !on_tape(&[x, weight]) && (half_weight || x.dtype() == weight.dtype() && matches!(x.dtype(), DType::F32 | DType::BF16)) && weight.is_contiguous();
    let y = match x.dims() {
        // Fine-tuning around a frozen weight: only the input's gradient is computed.
        _ if x.track_op() && !weight.track_op() => crate::frozen::frozen_linear(x, weight)?,
        _ if fast => x.contiguous()?.apply_op2_no_bwd(weight, &crate::cpu::MatVec)?,
        // A decode step's few bf16 rows on a GPU: lmx's kernel reads the weight once at the
        // card's bandwidth (cuBLAS's GEMM for one row reads an 8B model's at ~2.4 TB/s of 4.2).
        #[cfg(feature = "cuda")]
        _ if !on_tape(&[x, weight]) && crate::cuda_fused::matvec_fits(x, weight) => x.contiguous()?.apply_op2_no_bwd(weight, &crate::cpu::MatVec)?,
        // Several bf16 rows (prefill): the AVX512-BF16 kernel where the CPU has it.
        _ if bf16_prefill(x, weight) => x.contiguous()?.apply_op2_no_bwd(weight, &crate::bf16_gemm::Bf16Linear)?,
        // Several f32 rows by f16 weights: widened a block of rows at a time, then as f32 (a
        // prompt's products do `rows` multiply-adds per weight; widening costs one pass).
        _ if half_weight => x.contiguous()?.apply_op2_no_bwd(weight, &crate::cpu::F32Linear)?,
        // Several f32 rows: gemm on the decode pool.
        _ if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 && weight.is_contiguous() && weight.rank() == 2 && !on_tape(&[x, weight]) => {
            x.contiguous()?.apply_op2_no_bwd(weight, &crate::cpu::F32Linear)?
        }
        [b, t, k] if x.is_contiguous() => {
            // One 2-D matmul over all rows is faster than a batched broadcast.
            x.reshape((b * t, *k))?.matmul(&weight.t()?)?.reshape((*b, *t, ()))?
        }
        _ => x.broadcast_matmul(&weight.t()?)?,
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// True when `x @ weight^T` multiplies f32 activations by f16 weights on the CPU (an f16
/// checkpoint's, kept as stored in an f32 model: the CPU has no f16 arithmetic), nothing on
/// the gradient tape.
fn half_weight(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F16 && weight.is_contiguous() && weight.rank() == 2 && !on_tape(&[x, weight])
}

/// True when `x @ weight^T` can take [`crate::bf16_gemm::Bf16Linear`]: bf16 operands on the
/// CPU, nothing on the gradient tape, a CPU with AVX512-BF16.
fn bf16_prefill(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::BF16 && weight.dtype() == DType::BF16 && weight.is_contiguous() && weight.rank() == 2 && !on_tape(&[x, weight]) && crate::bf16_gemm::supported()
}

/// The additive causal mask for `seq_len` new queries after `offset` cached positions:
/// shape (seq_len, offset + seq_len), 0 where attention is allowed and -inf elsewhere.
/// With a sliding `window`, a query also ignores keys `window` or more positions behind it.
pub fn causal_mask(seq_len: usize, offset: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = offset + seq_len;
    if !device.is_cpu() {
        // Built where it is used: a 2048 x 4096 mask is 32 MB to fill and upload from the host.
        return causal_mask_from_ops(seq_len, offset, window, device);
    }
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            let pos = i + offset;
            (0..total).map(move |j| if j > pos || pos - j >= window { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (seq_len, total), device)
}

/// [`causal_mask`] computed by tensor ops on `device` (positions compared), not filled on the host.
fn causal_mask_from_ops(seq_len: usize, offset: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let pos = Tensor::arange(offset as u32, (offset + seq_len) as u32, device)?.reshape((seq_len, 1))?;
    mask_for_positions(&pos, offset + seq_len, window)
}

/// The additive (q, kv_len) mask of queries at the u32 positions `pos` (q, 1) over keys
/// 0..kv_len: 0 for a key at or before its query (and, with a window, fewer than `window`
/// positions behind it), -inf for the others.
fn mask_for_positions(pos: &Tensor, kv_len: usize, window: Option<usize>) -> Result<Tensor> {
    let key = Tensor::arange(0u32, kv_len as u32, pos.device())?.reshape((1, kv_len))?;
    let mut seen = key.broadcast_le(pos)?;
    if let Some(w) = window {
        // Key j is seen when pos - j < w, i.e. j + w > pos.
        seen = (seen * key.affine(1.0, w as f64)?.broadcast_gt(pos)?)?;
    }
    let zeros = Tensor::zeros(seen.shape(), DType::F32, pos.device())?;
    seen.where_cond(&zeros, &zeros.affine(0.0, f64::NEG_INFINITY)?)
}

/// Which keys each query sees in [`attention`].
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// Every key (one new query over the whole cache).
    None,
    /// Causal, as [`causal_mask`] builds it: the queries are the last q_len of kv_len
    /// positions, and with a `window` a query ignores keys `window` or more positions behind
    /// it. `additive` is the same mask as a (q_len, kv_len) tensor, for the general path.
    Causal { window: Option<usize>, additive: &'a Tensor },
    /// Any additive f32 (q_len, kv_len) mask.
    Additive(&'a Tensor),
    /// One query at the position a u32 tensor (1,) holds, seeing the keys up to it (and with
    /// a window, not those `window` or more positions behind it): a cache buffer longer than
    /// what is written, whose length lives on the device (a captured decode step replays at
    /// every length).
    Upto { pos: &'a Tensor, window: Option<usize> },
}

impl<'a> Mask<'a> {
    fn additive(self) -> Option<&'a Tensor> {
        match self {
            Mask::None | Mask::Upto { .. } => None,
            Mask::Causal { additive, .. } | Mask::Additive(additive) => Some(additive),
        }
    }
}

/// The additive (1, kv_len) mask of [`Mask::Upto`]: 0 for the keys the query sees, -inf
/// for the others.
fn upto_mask(pos: &Tensor, window: Option<usize>, kv_len: usize) -> Result<Tensor> {
    mask_for_positions(&pos.flatten_all()?.to_dtype(DType::U32)?.reshape((1, 1))?, kv_len, window)
}

/// Writes one position of keys or values `new` (1, heads, 1, d) into `buf` (1, heads,
/// capacity, d, contiguous) in place, at the position the u32 tensor `pos` (1,) holds; on a
/// GPU the position is read by the kernel, so a captured decode step replays at every position.
pub fn kv_write(buf: &Tensor, new: &Tensor, pos: &Tensor) -> Result<()> {
    let new = if new.stride().last() == Some(&1) { new.clone() } else { new.contiguous()? };
    buf.inplace_op3(&new, pos, &crate::cpu_fused::KvWrite)
}

/// A decode step's rotary embedding and cache write at a device position: returns `q` (1,
/// n_heads, 1, d) rotated, and writes `k` (1, n_kv, 1, d) rotated and `v` into `kbuf` / `vbuf`
/// at `pos`, as [`rope`] and [`kv_write`] do. On a GPU one kernel does all four (a launch each
/// cost ~3 us of a replayed step); `LMX_CUDA_ROPE_KV=0` takes the four, for comparisons.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor, kbuf: &Tensor, vbuf: &Tensor, pos: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_cuda(q) && cuda_rope_kv() && !on_tape(&[q, k, v]) && [k, v, cos, sin, kbuf, vbuf].iter().all(|t| t.dtype() == q.dtype()) {
        let op = crate::cuda_fused::RopeKvWrite { cos: cos.contiguous()?, sin: sin.contiguous()?, kbuf: kbuf.clone(), vbuf: vbuf.clone(), pos: Some(pos.clone()), offset: 0 };
        // (1, 1, nq, d) is (1, nq, 1, d) in memory.
        return contiguous_heads(q)?.apply_op3_no_bwd(&contiguous_heads(k)?, &contiguous_heads(v)?, &op)?.reshape(q.dims());
    }
    let q = rope(q, cos, sin)?;
    kv_write(kbuf, &rope(k, cos, sin)?, pos)?;
    kv_write(vbuf, v, pos)?;
    Ok(q)
}

/// `t` itself when its last dimension is contiguous, else a contiguous copy.
#[cfg(feature = "cuda")]
fn contiguous_heads(t: &Tensor) -> Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// [`rope_kv_write`] of a prompt chunk: `q` (1, heads, l, d) and `k` (1, kv_heads, l, d) rotated
/// by `cos`/`sin` (l, d / 2), keys and values `v` written into the buffers `kbuf`/`vbuf`
/// (1, kv_heads, cap, d) at positions `offset..offset + l` (host positions); returns the rotated
/// queries (1, heads, l, d), on a GPU a view of (1, l, heads, d): one kernel there instead of the
/// transposing copies, two rotations and two writes.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write_rows(q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor, kbuf: &Tensor, vbuf: &Tensor, offset: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_cuda(q) && cuda_rope_kv() && q.dim(0)? == 1 && !on_tape(&[q, k, v]) && [k, v, cos, sin, kbuf, vbuf].iter().all(|t| t.dtype() == q.dtype()) {
        let op = crate::cuda_fused::RopeKvWrite { cos: cos.contiguous()?, sin: sin.contiguous()?, kbuf: kbuf.clone(), vbuf: vbuf.clone(), pos: None, offset };
        return contiguous_heads(q)?.apply_op3_no_bwd(&contiguous_heads(k)?, &contiguous_heads(v)?, &op)?.transpose(1, 2);
    }
    let q = rope(q, cos, sin)?;
    kbuf.slice_set(&rope(k, cos, sin)?.contiguous()?, 2, offset)?;
    vbuf.slice_set(&v.contiguous()?, 2, offset)?;
    Ok(q)
}

/// Whether [`decode_rows`] takes a decode step of `rows` sequences with queries `q` (b, heads,
/// 1, head_dim): on a GPU, in f32 or bf16, heads of at most 256 (`LMX_CUDA_DECODE_ROWS=0`: row
/// by row, for comparisons).
pub fn decode_rows_fit(q: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| !std::env::var("LMX_CUDA_DECODE_ROWS").is_ok_and(|v| v == "0"));
        on && fused_cuda(q) && q.rank() == 4 && q.dim(2).is_ok_and(|l| l == 1) && q.dim(3).is_ok_and(|d| d <= 256 && d % 2 == 0) && !on_tape(&[q])
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = q;
        false
    }
}

/// A decode step of a batch of sequences, one cache each, in one op on a GPU (see
/// [`decode_rows_fit`]): `q` (b, heads, 1, d) and `k`/`v` (b, kv_heads, 1, d) before rotation;
/// row r rotates by row r of `cos`/`sin` (b, 1, d / 2, or (1, d / 2) shared by rows at one position) ("rotate half", as [`rope`]), writes
/// its key and value into `kbufs[r]`/`vbufs[r]` (1, kv_heads, cap, d) at position `offsets[r]`,
/// and attends to the `offsets[r] + 1` keys there. Returns (b, heads, 1, d), each row as the same
/// step alone computes it.
#[allow(clippy::too_many_arguments)]
pub fn decode_rows(q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor, kbufs: Vec<Tensor>, vbufs: Vec<Tensor>, offsets: Vec<usize>, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = crate::cuda_fused::DecodeRows { cos: cos.contiguous()?, sin: sin.contiguous()?, kbufs, vbufs, offsets, scale: scale as f32 };
        contiguous_heads(q)?.apply_op3_no_bwd(&contiguous_heads(k)?, &contiguous_heads(v)?, &op)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, cos, sin, kbufs, vbufs, offsets, scale);
        crate::bail!("a batch's decode step in one op runs on a GPU only")
    }
}

/// Whether [`rope_kv_write`] takes its one CUDA kernel (`LMX_CUDA_ROPE_KV=0`: four launches).
#[cfg(feature = "cuda")]
fn cuda_rope_kv() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_ROPE_KV").is_ok_and(|v| v == "0"))
}

/// Scaled dot-product attention with grouped-query heads.
///
/// `q`: (b, n_heads, q_len, head_dim); `k`, `v`: (b, n_kv_heads, kv_len, head_dim); `mask`:
/// which keys each query sees. On the CPU, off the tape and without soft-capping or sinks,
/// fused kernels on the decode pool take one query ([`crate::cpu_fused::DecodeAttention`])
/// or a causal block of them ([`crate::cpu_fused::PrefillAttention`]). The scores and softmax are computed in f32,
/// as transformers' eager attention does, then cast back to the input dtype. `softcap` caps
/// the scores at `c * tanh(s / c)` (Gemma 2) before the mask. `sinks` (n_heads): a learned
/// logit per query head that joins every softmax as one more, value-less key (gpt-oss), so a
/// head can attend to nothing.
/// Query heads that share a key/value head are folded into the query-length axis, so keys
/// and values are never copied per head.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask<'_>, scale: f64, softcap: Option<f64>, sinks: Option<&Tensor>) -> Result<Tensor> {
    attention_coded(q, k, v, mask, scale, softcap, sinks, None)
}

/// [`attention`] whose outputs, where a GPU decode step of one sequence computes them, are
/// also written coded for `target`'s integer product (the output projection) and offered to it
/// ([`crate::quant::CodeTarget`]; [`crate::quant::follow_codes`] passes the offer on to the
/// heads' reshaped view): the product then codes nothing itself.
#[allow(clippy::too_many_arguments)]
pub fn attention_coded(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask<'_>, scale: f64, softcap: Option<f64>, sinks: Option<&Tensor>, target: Option<&crate::quant::CodeTarget>) -> Result<Tensor> {
    if on_tape(&[q, k, v]) && sinks.is_none() && !matches!(mask, Mask::Upto { .. }) && taped_ops() {
        // Training: the inference kernels off the tape, the scores recomputed in the backward.
        let y = attention(&q.detach(), &k.detach(), &v.detach(), mask, scale, softcap, None)?.transpose(1, 2)?;
        let additive = mask.additive().cloned();
        let bwd = move |t: &[&crate::taped::Input], g: &Tensor| Ok(crate::taped::attention_bwd(t[0], t[1], t[2], g, additive.as_ref(), scale, softcap)?.map(Some).to_vec());
        return crate::taped::taped(&[q, k, v], &y, bwd)?.transpose(1, 2);
    }
    let (b, n_heads, q_len, head_dim) = q.dims4()?;
    // lmx's CUDA decode attention holds a head of at most 256 values per warp.
    let fused = q.device().is_cpu() || (fused_cuda(q) && q_len == 1 && head_dim <= 256);
    if softcap.is_none() && sinks.is_none() && fused && !on_tape(&[q, k, v]) && q.dtype() == k.dtype() && k.dtype() == v.dtype() && v.dim(3)? == head_dim {
        match mask {
            Mask::None | Mask::Upto { .. } if q_len == 1 => {
                let (upto, window) = if let Mask::Upto { pos, window } = mask { (Some(pos.clone()), window) } else { (None, None) };
                let codes = head_codes(target, q)?;
                let op = crate::cpu_fused::DecodeAttention { scale: scale as f32, upto, window, codes: codes.clone() };
                let y = q.contiguous()?.apply_op3_no_bwd(k, v, &op)?;
                #[cfg(feature = "cuda")]
                if let Some((buf, spec)) = &codes {
                    crate::quant::cuda::offer_codes(&y, *spec, buf);
                }
                return Ok(y);
            }
            Mask::Causal { window, .. } if q.device().is_cpu() => {
                let op = crate::cpu_fused::PrefillAttention { scale: scale as f32, window };
                return q.contiguous()?.apply_op3_no_bwd(k, v, &op);
            }
            _ => {}
        }
    }
    #[cfg(feature = "cuda")]
    if let Mask::Causal { window, .. } = mask {
        // Causal bf16 queries on the GPU: flash attention, the scores never stored.
        if q.device().is_cuda() && cuda_flash() && sinks.is_none() && !on_tape(&[q, k, v]) && crate::cuda_fused::flash_fits(q, k, v) {
            let op = crate::cuda_fused::FlashAttention { offset: k.dim(2)? - q_len, window, scale: scale as f32, softcap: softcap.map(|c| c as f32) };
            return q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2);
        }
        // Otherwise the scores' scale, cap, mask and softmax in one kernel.
        if fused_cuda(q) && cuda_causal_softmax() && sinks.is_none() && !on_tape(&[q, k, v]) && q.dtype() == k.dtype() && k.dtype() == v.dtype() {
            let (n_kv_heads, kv_len) = (k.dim(1)?, k.dim(2)?);
            let q = q.contiguous()?.reshape((b, n_kv_heads, n_heads / n_kv_heads * q_len, head_dim))?;
            // Keys and values padded to a multiple of 8 positions (zeros, never seen): cuBLAS
            // takes its fast kernels only for 16-byte aligned rows of scores (a 4095-key
            // chunk ran on a kernel 3x slower).
            let pad = kv_len.next_multiple_of(8) - kv_len;
            let padded = |t: &Tensor| -> Result<Tensor> {
                let mut dims = t.dims().to_vec();
                dims[2] = pad;
                Tensor::cat(&[t, &Tensor::zeros(dims, t.dtype(), t.device())?], 2)
            };
            let (k, v) = if pad > 0 { (padded(k)?, padded(v)?) } else { (k.clone(), v.clone()) };
            let op = crate::cuda_fused::CausalSoftmax { q_len, offset: kv_len - q_len, window, scale: scale as f32, softcap: softcap.map(|c| c as f32) };
            let probs = q.matmul(&k.t()?)?.apply_op1_no_bwd(&op)?;
            return probs.matmul(&v)?.reshape((b, n_heads, q_len, v.dim(3)?));
        }
    }
    let upto;
    let mask = match mask {
        Mask::Upto { pos, window } if q_len == 1 => {
            upto = upto_mask(pos, window, k.dim(2)?)?;
            Some(&upto)
        }
        Mask::Upto { .. } => candle_core::bail!("attention: a mask up to a device position takes one query, not {q_len}"),
        m => m.additive(),
    };
    let n_kv_heads = k.dim(1)?;
    let n_rep = n_heads / n_kv_heads;
    let dtype = q.dtype();
    // (b, n_kv_heads, n_rep * q_len, head_dim)
    let q = q.reshape((b, n_kv_heads, n_rep * q_len, head_dim))?;
    // Scaled in f32: candle scales a bf16 tensor element by element through two roundings
    // (a fifth of a 512-token prefill); in f32 the loop vectorizes and rounds once.
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    let scores = match softcap {
        Some(c) => ((scores / c)?.tanh()? * c)?,
        None => scores,
    };
    let scores = match mask {
        Some(m) => {
            let m = if n_rep > 1 { m.repeat((n_rep, 1))? } else { m.clone() };
            scores.broadcast_add(&m)?
        }
        None => scores,
    };
    let probs = match sinks {
        Some(sinks) => {
            // One more column per row: the sink of the row's query head, (b, n_kv, n_rep * q_len, 1).
            let kv_len = scores.dim(3)?;
            let column = sinks.to_dtype(DType::F32)?.reshape((n_kv_heads, n_rep, 1))?.broadcast_as((n_kv_heads, n_rep, q_len))?;
            let column = column.reshape((1, n_kv_heads, n_rep * q_len, 1))?.broadcast_as((b, n_kv_heads, n_rep * q_len, 1))?;
            softmax_last_dim(&Tensor::cat(&[&scores, &column.contiguous()?], 3)?)?.narrow(3, 0, kv_len)?
        }
        None => softmax_last_dim(&scores)?,
    };
    let probs = probs.to_dtype(dtype)?.contiguous()?;
    // Values may be narrower than queries and keys (DeepSeek's latent attention).
    probs.matmul(v)?.reshape((b, n_heads, q_len, v.dim(3)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// `all_finite` finds a NaN or an infinity anywhere in every float dtype, in contiguous
    /// tensors (read where they lie), views inside a larger buffer and strided views (the
    /// one-pass sum), and passes the finite extremes (the largest value, -0, subnormals).
    #[test]
    fn all_finite_finds_every_non_finite_value() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let max = match dtype {
                DType::F16 => 65504.0,
                DType::BF16 => 3.0e38,
                _ => 1.0e30,
            };
            let finite = Tensor::new(&[0.0f64, -0.0, 1.5, -max, max, 1e-40, -2.5e-5], &dev)?.to_dtype(dtype)?;
            assert!(super::all_finite(&finite)?, "{dtype:?}");
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                for at in [0, 777, 2047] {
                    let mut v = vec![0.25f64; 2048];
                    v[at] = bad;
                    let t = Tensor::from_vec(v, (32, 64), &dev)?.to_dtype(dtype)?;
                    assert!(!super::all_finite(&t)?, "{dtype:?} {bad} at {at}");
                    let (row, col) = (at / 64, at % 64);
                    assert!(!super::all_finite(&t.narrow(0, row, 1)?)?, "{dtype:?} {bad}: its row");
                    assert!(super::all_finite(&t.narrow(0, (row + 1) % 32, 1)?)?, "{dtype:?} {bad}: another row");
                    assert!(!super::all_finite(&t.t()?.narrow(0, col, 1)?)?, "{dtype:?} {bad}: its column, strided");
                }
            }
        }
        Ok(())
    }

    /// Attention read from a quantized cache as stored equals attention over the same cache
    /// dequantized, for 4 and 8 bits, grouped heads, in f32 and bf16 queries.
    #[test]
    fn quantized_decode_attention_equals_the_dequantized_cache() -> Result<()> {
        let dev = Device::Cpu;
        let (kv_heads, len, d) = (2, 37, 64);
        for (bits, gs) in [(8, 64), (4, 32)] {
            let quantize = |t: &Tensor| -> Result<([Tensor; 3], Tensor)> {
                let q = crate::quant::QuantizedMatrix::quantize(&t.reshape((kv_heads * len, d))?, bits, gs)?;
                let (p, s, b) = q.to_tensors()?;
                let shape = |t: Tensor| -> Result<Tensor> {
                    let w = t.dim(1)?;
                    t.reshape((1, kv_heads, len, w))
                };
                Ok(([shape(p)?, shape(s)?, shape(b)?], q.dequantize()?.reshape((1, kv_heads, len, d))?))
            };
            let (kq, kd) = quantize(&Tensor::randn(0f32, 1.0, (1, kv_heads, len, d), &dev)?)?;
            let (vq, vd) = quantize(&Tensor::randn(0f32, 1.0, (1, kv_heads, len, d), &dev)?)?;
            for dtype in [DType::F32, DType::BF16] {
                let q = Tensor::randn(0f32, 1.0, (1, 4, 1, d), &dev)?.to_dtype(dtype)?;
                let want = attention(&q, &kd.to_dtype(dtype)?, &vd.to_dtype(dtype)?, Mask::None, 0.125, None, None)?.to_dtype(DType::F32)?;
                let got = decode_attention_quantized(&q, &kq, &vq, bits, gs, 0.125)?.to_dtype(DType::F32)?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(max_abs_diff(&got, &want) < tol, "{bits}-bit {dtype:?}: {}", max_abs_diff(&got, &want));
            }
        }
        Ok(())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0));
        d.and_then(|d| d.to_scalar::<f32>()).unwrap_or(f32::INFINITY)
    }

    /// The fused (inference) and composed (training) paths of every op agree.
    #[test]
    fn fused_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let xv = Var::from_tensor(&x)?;
        let xt = xv.as_tensor();
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-5)?, &rms_norm(xt, &w, 1e-5)?) < 1e-5);
        assert!(max_abs_diff(&rope(&x, &cos, &sin)?, &rope(xt, &cos, &sin)?) < 1e-5);
        assert!(max_abs_diff(&softmax_last_dim(&x)?, &softmax_last_dim(xt)?) < 1e-6);
        let up = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        assert!(max_abs_diff(&silu_mul(&x, &up)?, &silu_mul(xt, &up)?) < 1e-5);
        // bf16: the fused CPU norm rounds exactly as the composed (Hugging Face) formula.
        let (xb, wb) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
        let fused = rms_norm(&xb, &wb, 1e-5)?.to_dtype(DType::F32)?;
        let xbv = Var::from_tensor(&xb)?;
        let composed = rms_norm(xbv.as_tensor(), &wb, 1e-5)?.to_dtype(DType::F32)?;
        // Within one bf16 rounding of the largest value (equal on x86-64; candle's composed bf16
        // ops round differently on aarch64).
        let scale = composed.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(max_abs_diff(&fused, &composed) <= scale / 128.0, "bf16 rms_norm {}", max_abs_diff(&fused, &composed));
        // The composed path really is on the tape.
        let grads = rms_norm(xt, &w, 1e-5)?.sum_all()?.backward()?;
        assert!(grads.get(xt).is_some());
        Ok(())
    }

    /// The fused residual add + norm equals the add, then the norm, bit for bit (f32 and bf16,
    /// rows of SmolLM2-sized outliers), and its composed path (on the tape) agrees.
    #[test]
    fn add_rms_norm_equals_the_add_then_the_norm() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let x = (Tensor::randn(0f32, 300.0, (2, 3, 64), &dev)?).to_dtype(dtype)?;
            let h = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev)?.to_dtype(dtype)?;
            let w = Tensor::randn(1f32, 0.1, 64, &dev)?.to_dtype(dtype)?;
            let (sum, normed) = add_rms_norm(&x, &h, &w, 1e-5)?;
            // The exact sum, rounded once (candle's bf16 add rounds differently on aarch64).
            let want_sum = (x.to_dtype(DType::F32)? + h.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
            let want = rms_norm(&want_sum, &w, 1e-5)?;
            assert_eq!(sum.dims(), x.dims());
            assert_eq!(max_abs_diff(&sum.to_dtype(DType::F32)?, &want_sum.to_dtype(DType::F32)?), 0.0, "{dtype:?} sum");
            assert_eq!(max_abs_diff(&normed.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?), 0.0, "{dtype:?} norm");
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 8), &dev)?)?;
        let h = Tensor::randn(0f32, 1.0, (1, 4, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let (_, on_tape) = add_rms_norm(x.as_tensor(), &h, &w, 1e-5)?;
        let (_, fused) = add_rms_norm(&x.as_tensor().detach(), &h, &w, 1e-5)?;
        assert!(max_abs_diff(&on_tape, &fused) < 1e-5);
        assert!(on_tape.sum_all()?.backward()?.get(x.as_tensor()).is_some());
        Ok(())
    }

    /// On the GPU too, the fused add + norm equals the add, then the norm, bit for bit (rows of
    /// 4096 and 2048 values, which take the kernel keeping a thread's 8 values in registers,
    /// and 576, which does not; 1 and 3 rows; f32 and bf16), and the codes it writes for a
    /// one-row product are those the product would make of the normalised row. Skipped
    /// without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn add_rms_norm_on_the_gpu_equals_the_add_then_the_norm() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        let host = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.to_device(&Device::Cpu) };
        for dtype in [DType::F32, DType::BF16] {
            for d in [4096usize, 2048, 576] {
                for rows in [1usize, 3] {
                    let x = Tensor::randn(0f32, 30.0, (1, rows, d), &Device::Cpu)?.to_dtype(dtype)?.to_device(&gpu)?;
                    let h = Tensor::randn(0f32, 1.0, (1, rows, d), &Device::Cpu)?.to_dtype(dtype)?.to_device(&gpu)?;
                    let w = Tensor::randn(1f32, 0.1, d, &Device::Cpu)?.to_dtype(dtype)?.to_device(&gpu)?;
                    let target = crate::quant::CodeTarget::new((4, 64));
                    let (sum, normed) = add_rms_norm_coded(&x, &h, &w, 1e-5, Some(&target))?;
                    let want_sum = (x.to_dtype(DType::F32)? + h.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
                    let want = rms_norm(&want_sum, &w, 1e-5)?;
                    let name = format!("{dtype:?}, {rows} rows of {d}");
                    assert_eq!(max_abs_diff(&host(&sum)?, &host(&want_sum)?), 0.0, "{name}: the sums differ");
                    assert_eq!(max_abs_diff(&host(&normed)?, &host(&want)?), 0.0, "{name}: the norms differ");
                    if rows == 1 {
                        let Some(buf) = target.buffer(d, &gpu)? else { panic!("{name}: no codes buffer") };
                        let used = d / 2 + 2 * d / 64;
                        let got = buf.flatten_all()?.narrow(0, 0, used)?.to_vec1::<u32>()?;
                        let fresh = crate::quant::cuda::code_rows(&normed.reshape((1, d))?, 4, 64)?.flatten_all()?.narrow(0, 0, used)?.to_vec1::<u32>()?;
                        let first = got.iter().zip(&fresh).position(|(a, b)| a != b);
                        assert_eq!(first, None, "{name}: the codes differ from the product's own at int {first:?}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention and linear layers pass gradients to their inputs and weights on the tape
    /// (the training path avoids the fused kernels, which have no backward), and the tape
    /// gradient of a linear layer matches the analytic one.
    #[test]
    fn attention_and_linear_are_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1, 8), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 8), &dev)?)?;
        // One row: the case that uses the matrix-vector kernel off the tape.
        let y = linear(x.as_tensor(), w.as_tensor(), None)?;
        let grads = y.sum_all()?.backward()?;
        // d(sum(x W^T))/dx = sum of W's rows.
        let want = w.as_tensor().sum(0)?;
        let got = grads.get(x.as_tensor()).expect("dx").flatten_all()?;
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert!(grads.get(w.as_tensor()).is_some());

        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev)?)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev)?;
        let mask = causal_mask(3, 0, None, &dev)?;
        let out = attention(q.as_tensor(), k.as_tensor(), &v, Mask::Additive(&mask), 0.35, None, None)?;
        let grads = out.sqr()?.sum_all()?.backward()?;
        for (name, t) in [("q", q.as_tensor()), ("k", k.as_tensor())] {
            let g = grads.get(t).expect("grad").abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(g.is_finite() && g > 0.0, "no gradient reaches {name}");
        }
        Ok(())
    }

    /// Finite-difference checks of the differentiable paths the training forward uses.
    #[test]
    fn training_paths_pass_gradient_checks() -> Result<()> {
        use crate::gradcheck::check_grad;
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev)?;
        let w = (Tensor::randn(0f32, 0.3, 8, &dev)? + 1.0)?;
        check_grad(|x| rms_norm(x, &w, 1e-5), &x, 1e-2)?;
        check_grad(|w| rms_norm(&x, w, 1e-5), &w, 1e-2)?;
        let (a, b) = (Tensor::randn(0f32, 1.0, (8, 3), &dev)?, Tensor::randn(0f32, 1.0, (3, 5), &dev)?);
        let x2 = x.reshape((24, 8))?;
        check_grad(|x| low_rank(x, &a, &b, 0.7), &x2, 1e-2)?;
        check_grad(|a| low_rank(&x2, a, &b, 0.7), &a, 1e-2)?;
        check_grad(|b| low_rank(&x2, &a, b, 0.7), &b, 1e-2)?;
        let cos = Tensor::randn(0f32, 1.0, (4, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (4, 4), &dev)?;
        check_grad(|x| rope(x, &cos, &sin), &x, 1e-2)?;
        check_grad(softmax_last_dim, &x, 1e-2)?;
        let up = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev)?;
        check_grad(|g| silu_mul(g, &up), &x, 1e-2)?;
        let wl = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        check_grad(|x| linear(x, &wl, None), &x, 1e-2)?;
        // Attention, through q, k and v in turn (GQA: 4 query heads on 2 kv heads).
        let q = Tensor::randn(0f32, 1.0, (1, 4, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let mask = causal_mask(5, 0, None, &dev)?;
        check_grad(|q| attention(q, &k, &v, Mask::Additive(&mask), 0.35, None, None), &q, 1e-2)?;
        check_grad(|k| attention(&q, k, &v, Mask::Additive(&mask), 0.35, None, None), &k, 1e-2)?;
        check_grad(|v| attention(&q, &k, v, Mask::Additive(&mask), 0.35, None, None), &v, 1e-2)?;
        // Two sequences, 3 queries after 4 cached keys, a window of 5, soft-capping.
        let q = (Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev)? * 2.0)?;
        let k = (Tensor::randn(0f32, 1.0, (2, 2, 7, 8), &dev)? * 2.0)?;
        let v = Tensor::randn(0f32, 1.0, (2, 2, 7, 8), &dev)?;
        let mask = causal_mask(3, 4, Some(5), &dev)?;
        let causal = || Mask::Causal { window: Some(5), additive: &mask };
        check_grad(|q| attention(q, &k, &v, causal(), 0.35, Some(3.0), None), &q, 1e-2)?;
        check_grad(|k| attention(&q, k, &v, causal(), 0.35, Some(3.0), None), &k, 1e-2)?;
        check_grad(|v| attention(&q, &k, v, causal(), 0.35, Some(3.0), None), &v, 1e-2)?;
        Ok(())
    }

    /// Attention on the tape (the forward off the tape, the scores recomputed in the backward)
    /// gives the output and the q, k, v gradients of candle's composition: grouped heads, a
    /// window, soft-capping, queries after cached keys.
    #[test]
    fn recomputed_attention_equals_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (q, k, v) = (
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, (2, 6, 9, 16), &dev)? * 2.0)?)?,
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, (2, 2, 13, 16), &dev)? * 2.0)?)?,
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 13, 16), &dev)?)?,
        );
        let r = Tensor::randn(0f32, 1.0, (2, 6, 9, 16), &dev)?;
        for (window, softcap) in [(None, None), (Some(6), Some(4.0))] {
            let mask = causal_mask(9, 4, window, &dev)?;
            let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Mask::Causal { window, additive: &mask }, 0.3, softcap, None)?;
            // The composition, written out: heads repeated per group.
            let rep = |t: &Tensor| -> Result<Tensor> { Tensor::cat(&(0..6).map(|h| t.narrow(1, h / 3, 1)).collect::<Result<Vec<_>>>()?, 1) };
            let s = (q.as_tensor().matmul(&rep(k.as_tensor())?.t()?)? * 0.3)?;
            let s = match softcap {
                Some(c) => ((s / c)?.tanh()? * c)?,
                None => s,
            };
            let want = softmax_last_dim(&s.broadcast_add(&mask)?)?.matmul(&rep(v.as_tensor())?)?;
            assert!(max_abs_diff(&got, &want) < 1e-5, "output {}", max_abs_diff(&got, &want));
            let (g1, g2) = ((got * &r)?.sum_all()?.backward()?, (want * &r)?.sum_all()?.backward()?);
            for (name, t) in [("q", q.as_tensor()), ("k", k.as_tensor()), ("v", v.as_tensor())] {
                let d = max_abs_diff(g1.get(t).expect("grad"), g2.get(t).expect("grad"));
                assert!(d < 1e-4, "{name} gradient differs by {d} (window {window:?}, cap {softcap:?})");
            }
        }
        Ok(())
    }

    /// The greedy pick (CPU, and the GPU's kernel when there is one) is the first index of the
    /// largest logit, masked ids left out, with the log probability log_softmax gives: a row of
    /// 128256 logits with the maximum twice (the first wins) and masked once, a row whose
    /// largest logit is masked, and a row of -inf; the rows of one length picked in one op
    /// (`pick_greedy_rows`) as each alone.
    #[test]
    fn pick_greedy_is_the_first_argmax_and_its_log_probability() -> Result<()> {
        #[allow(unused_mut)]
        let mut devices = vec![Device::Cpu];
        #[cfg(feature = "cuda")]
        devices.extend(Device::new_cuda(0).ok());
        let n = 128_256;
        let mut row = Tensor::randn(0f32, 3.0, n, &Device::Cpu)?.to_vec1::<f32>()?;
        row[70_001] = 40.0;
        row[90_000] = 40.0;
        row[5] = 50.0;
        // No spikes: every logit counts in the log-sum-exp (the largest one masked).
        let plain = Tensor::randn(0f32, 3.0, n, &Device::Cpu)?.to_vec1::<f32>()?;
        let top_plain = (0..n).fold(0, |b, i| if plain[i] > plain[b] { i } else { b }) as u32;
        // Ties: 2048 apart (the GPU kernel's neighbouring blocks), 256 apart (one of its threads),
        // and in its last, partial block.
        let mut tie = Tensor::randn(0f32, 3.0, n, &Device::Cpu)?.to_vec1::<f32>()?;
        tie[1000] = 60.0;
        tie[1000 + 2048] = 60.0;
        // A NaN at index 0 does not hide the largest value.
        let mut nan_first = Tensor::randn(0f32, 1.0, 5000, &Device::Cpu)?.to_vec1::<f32>()?;
        nan_first[0] = f32::NAN;
        nan_first[7] = 30.0;
        let mut near = Tensor::randn(0f32, 3.0, n, &Device::Cpu)?.to_vec1::<f32>()?;
        near[300 + 2048 * 5] = 60.0;
        near[300 + 2048 * 5 + 256] = 60.0;
        near[n - 3] = 60.0;
        let cases: Vec<(Vec<f32>, Vec<u32>, Option<u32>)> = vec![
            (row.clone(), vec![5], Some(70_001)),
            (row.clone(), vec![5, 70_001, 17], Some(90_000)),
            (row.clone(), vec![], Some(5)),
            (vec![f32::NEG_INFINITY; 1000], vec![], Some(0)),
            (plain, vec![top_plain, 3], None),
            (tie, vec![], Some(1000)),
            (nan_first, vec![], Some(7)),
            (near.clone(), vec![], Some(300 + 2048 * 5)),
            (near, vec![300 + 2048 * 5, 300 + 2048 * 5 + 256], Some(n as u32 - 3)),
        ];
        for dev in &devices {
            for (logits, masked, want) in &cases {
                let mut m = logits.clone();
                for &i in masked {
                    m[i as usize] = f32::NEG_INFINITY;
                }
                let want = &want.unwrap_or_else(|| (0..m.len()).fold(0, |b, i| if m[i] > m[b] { i } else { b }) as u32);
                // The second row of two (a view at an offset, as a batch's rows are).
                let noise = Tensor::randn(0f32, 1.0, logits.len(), &Device::Cpu)?.to_vec1::<f32>()?;
                let t = Tensor::from_slice(&[noise, logits.clone()].concat(), (2, logits.len()), dev)?;
                let got = pick_greedy(&t.get(1)?, masked)?.to_vec1::<u32>()?;
                assert_eq!(got[0], *want, "{dev:?} masked {masked:?}");
                let top = m.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                let lp = m[*want as usize] as f64 - (top + m.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln());
                let got_lp = f32::from_bits(got[1]) as f64;
                // All -inf: no probability (NaN) either way.
                assert!((lp.is_nan() && got_lp.is_nan()) || (got_lp - lp).abs() < 1e-4, "{dev:?}: log probability {got_lp} vs {lp}");
            }
            // The rows of full length in one op (a batch's step), each with its own masked ids:
            // the same words as each row alone.
            let full: Vec<&(Vec<f32>, Vec<u32>, Option<u32>)> = cases.iter().filter(|c| c.0.len() == n).collect();
            let t = Tensor::from_slice(&full.iter().flat_map(|c| c.0.clone()).collect::<Vec<f32>>(), (full.len(), n), dev)?;
            let masks: Vec<Vec<u32>> = full.iter().map(|c| c.1.clone()).collect();
            let together = pick_greedy_rows(&t, &masks)?.to_vec1::<u32>()?;
            let alone: Vec<u32> = (0..full.len()).map(|i| pick_greedy(&t.get(i)?, &masks[i])?.to_vec1::<u32>()).collect::<Result<Vec<_>>>()?.concat();
            assert_eq!(together, alone, "{dev:?}: {} rows picked together and alone", full.len());
        }
        Ok(())
    }

    /// Adam's fused f32 update (the CPU's, and the GPU's when there is one) equals the
    /// composition in f64 over three steps, with weight decay and bias correction.
    #[test]
    fn fused_adam_equals_the_composition() -> Result<()> {
        #[allow(unused_mut)]
        let mut devices = vec![Device::Cpu];
        #[cfg(feature = "cuda")]
        devices.extend(Device::new_cuda(0).ok());
        for dev in &devices {
            let p0 = Tensor::randn(0f32, 1.0, (37, 5), &Device::Cpu)?;
            let (mut p, mut mv) = (p0.to_device(dev)?, Tensor::zeros((2, 37, 5), DType::F32, dev)?);
            let (mut p64, mut mv64) = (p0.to_dtype(DType::F64)?, Tensor::zeros((2, 37, 5), DType::F64, &Device::Cpu)?);
            for t in 1..=3 {
                let g = (Tensor::randn(0f32, 1.0, (37, 5), &Device::Cpu)? * 0.1)?;
                let (b1, b2, lr) = (0.9f64, 0.999f64, 1e-2);
                let h = [1.0 - lr * 0.01, b1, b2, lr / (1.0 - b1.powi(t)), 1.0 / (1.0 - b2.powi(t)).sqrt(), 1e-8];
                (p, mv) = adam_step(&p, &g.to_device(dev)?, &mv, h)?;
                (p64, mv64) = adam_step(&p64, &g.to_dtype(DType::F64)?, &mv64, h)?;
                let (got, want) = (p.to_device(&Device::Cpu)?, p64.to_dtype(DType::F32)?);
                assert!(max_abs_diff(&got, &want) < 1e-6, "{dev:?} step {t}: values off by {}", max_abs_diff(&got, &want));
                let (got, want) = (mv.to_device(&Device::Cpu)?, mv64.to_dtype(DType::F32)?);
                assert!(max_abs_diff(&got, &want) < 1e-7, "{dev:?} step {t}: moments off by {}", max_abs_diff(&got, &want));
            }
        }
        Ok(())
    }

    /// Grouped-query attention equals attention with keys and values repeated per head.
    #[test]
    fn gqa_matches_repeated_heads() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let mask = causal_mask(3, 2, None, &dev)?;
        let got = attention(&q, &k, &v, Mask::Additive(&mask), 0.3, None, None)?;
        // Reference: repeat each kv head twice (head h uses kv head h / 2).
        let rep = |t: &Tensor| -> Result<Tensor> { Tensor::cat(&[t.narrow(1, 0, 1)?, t.narrow(1, 0, 1)?, t.narrow(1, 1, 1)?, t.narrow(1, 1, 1)?], 1) };
        let (k4, v4) = (rep(&k)?, rep(&v)?);
        let s = (q.matmul(&k4.t()?)? * 0.3)?.broadcast_add(&mask)?;
        let want = softmax_last_dim(&s)?.matmul(&v4)?;
        assert!(max_abs_diff(&got, &want) < 1e-5);
        Ok(())
    }

    /// Soft-capped attention (Gemma 2) equals the formula: scores `c * tanh(s / c)`, then the
    /// mask and softmax; the single-query fast path does not apply.
    #[test]
    fn softcapped_attention_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        // Fixed inputs, not random ones: random scores sometimes saturate the softmax both
        // with and without the cap, and the check that the cap matters then failed by chance.
        let wave = |f: f32, phase: f32, scale: f32| -> Result<Tensor> {
            let x: Vec<f32> = (0..48).map(|i| scale * (f * i as f32 + phase).sin()).collect();
            Tensor::from_vec(x, (1, 2, 3, 8), &dev)
        };
        let (q, k, v) = (wave(0.9, 0.3, 2.0)?, wave(0.95, 0.5, 2.0)?, wave(1.3, 2.0, 1.0)?);
        let mask = causal_mask(3, 0, None, &dev)?;
        let got = attention(&q, &k, &v, Mask::Additive(&mask), 0.35, Some(5.0), None)?;
        let s = (q.matmul(&k.t()?)? * 0.35)?;
        let s = ((s / 5.0)?.tanh()? * 5.0)?.broadcast_add(&mask)?;
        let want = softmax_last_dim(&s)?.matmul(&v)?;
        assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
        let uncapped = attention(&q, &k, &v, Mask::Additive(&mask), 0.35, None, None)?;
        assert!(max_abs_diff(&got, &uncapped) > 0.1, "the cap must matter for these scores: {}", max_abs_diff(&got, &uncapped));
        let one = attention(&q.narrow(2, 2, 1)?, &k, &v, Mask::None, 0.35, Some(5.0), None)?;
        assert!(max_abs_diff(&one, &want.narrow(2, 2, 1)?) < 1e-5, "single query");
        Ok(())
    }

    /// Attention sinks (gpt-oss) equal the formula: each query head's sink logit joins the
    /// softmax as an extra column that is then dropped, so the weights sum to less than one.
    #[test]
    fn attention_sinks_match_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev)?;
        let sinks = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let mask = causal_mask(3, 0, None, &dev)?;
        let got = attention(&q, &k, &v, Mask::Additive(&mask), 0.35, None, Some(&sinks))?;
        // Reference per head: kv head h / 2, scores + mask, then [scores, sink] softmax.
        let mut heads = Vec::new();
        for h in 0..4 {
            let (qh, kh, vh) = (q.narrow(1, h, 1)?, k.narrow(1, h / 2, 1)?, v.narrow(1, h / 2, 1)?);
            let s = (qh.matmul(&kh.t()?)? * 0.35)?.broadcast_add(&mask)?;
            let sink = sinks.narrow(0, h, 1)?.reshape((1, 1, 1, 1))?.broadcast_as((2, 1, 3, 1))?.contiguous()?;
            let p = softmax_last_dim(&Tensor::cat(&[&s, &sink], 3)?)?.narrow(3, 0, 3)?;
            heads.push(p.contiguous()?.matmul(&vh)?);
        }
        let want = Tensor::cat(&heads, 1)?;
        assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
        let plain = attention(&q, &k, &v, Mask::Additive(&mask), 0.35, None, None)?;
        assert!(max_abs_diff(&got, &plain) > 1e-3, "the sinks must matter");
        Ok(())
    }

    /// The fused single-query attention equals the general path, with keys and values read
    /// through strided cache views.
    #[test]
    fn decode_attention_matches_general_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 6, 1, 16), &dev)?;
        // A (2, 2, 32, 16) buffer of which 19 positions are filled: a non-contiguous view.
        let kbuf = Tensor::randn(0f32, 1.0, (2, 2, 32, 16), &dev)?;
        let vbuf = Tensor::randn(0f32, 1.0, (2, 2, 32, 16), &dev)?;
        let (k, v) = (kbuf.narrow(2, 0, 19)?, vbuf.narrow(2, 0, 19)?);
        let fused = attention(&q, &k, &v, Mask::None, 0.25, None, None)?;
        let qv = Var::from_tensor(&q)?;
        let general = attention(qv.as_tensor(), &k.contiguous()?, &v.contiguous()?, Mask::None, 0.25, None, None)?;
        assert!(max_abs_diff(&fused, &general) < 1e-5, "{}", max_abs_diff(&fused, &general));
        Ok(())
    }

    /// The fused causal attention of several queries equals the general path: grouped heads,
    /// queries after cached positions, keys and values read through strided cache views,
    /// with and without a sliding window, more query positions than one block, f32 and bf16.
    #[test]
    fn prefill_attention_matches_general_attention() -> Result<()> {
        let dev = Device::Cpu;
        let (offset, l) = (7, 37);
        let q = Tensor::randn(0f32, 1.0, (2, 6, l, 16), &dev)?;
        let kbuf = Tensor::randn(0f32, 1.0, (2, 2, 64, 16), &dev)?;
        let vbuf = Tensor::randn(0f32, 1.0, (2, 2, 64, 16), &dev)?;
        for window in [None, Some(5)] {
            for dtype in [DType::F32, DType::BF16] {
                let (q, kbuf, vbuf) = (q.to_dtype(dtype)?, kbuf.to_dtype(dtype)?, vbuf.to_dtype(dtype)?);
                let (k, v) = (kbuf.narrow(2, 0, offset + l)?, vbuf.narrow(2, 0, offset + l)?);
                let mask = causal_mask(l, offset, window, &dev)?;
                let fused = attention(&q, &k, &v, Mask::Causal { window, additive: &mask }, 0.25, None, None)?;
                let general = attention(&q, &k.contiguous()?, &v.contiguous()?, Mask::Additive(&mask), 0.25, None, None)?;
                let (fused, general) = (fused.to_dtype(DType::F32)?, general.to_dtype(DType::F32)?);
                let tol = if dtype == DType::F32 { 1e-5 } else { 3e-2 };
                assert!(max_abs_diff(&fused, &general) < tol, "{window:?} {dtype:?}: {}", max_abs_diff(&fused, &general));
            }
        }
        Ok(())
    }

    #[test]
    fn causal_mask_shape_and_values() -> Result<()> {
        let m = causal_mask(2, 1, None, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0], vec![0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
        let inf = f32::NEG_INFINITY;
        let m = causal_mask(2, 2, Some(2), &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0], vec![inf, 0.0, 0.0, inf]);
        assert_eq!(m[1], vec![inf, inf, 0.0, 0.0]);
        // The GPU's version, built by tensor ops, is the same mask.
        for (n, off, w) in [(2, 1, None), (2, 2, Some(2)), (5, 7, Some(3)), (4, 0, None), (6, 3, Some(1))] {
            let host = causal_mask(n, off, w, &Device::Cpu)?.to_vec2::<f32>()?;
            assert_eq!(causal_mask_from_ops(n, off, w, &Device::Cpu)?.to_vec2::<f32>()?, host, "{n} queries after {off}, window {w:?}");
        }
        Ok(())
    }

    /// Whether every value of `t` is finite (candle's max skips a NaN after the first value).
    #[cfg(feature = "cuda")]
    fn all_finite(t: &Tensor) -> Result<bool> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
    }

    /// How far |got - want| goes past `rel * |want| + abs` at most (0 or less: within bounds).
    #[cfg(feature = "cuda")]
    fn excess(got: &Tensor, want: &Tensor, rel: f64, abs: f64) -> Result<f32> {
        let bound = ((want.abs()? * rel)? + abs)?;
        (got.sub(want)?.abs()? - bound)?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// lmx's bf16 products for a decode step's few rows on the GPU equal f32 products of the
    /// same bf16 values within the output's rounding, and a row's outputs among m rows equal its
    /// outputs alone, bit for bit: rows of 8 to 14336 values, 1 to 8 activation rows, weights
    /// whose row count no block size divides, a weight that starts inside its buffer. Skipped
    /// without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn bf16_matvec_on_the_gpu_equals_f32_products() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        // (weight rows, row length, activation rows)
        for (n, k, m) in [(1000, 4096, 1), (37, 576, 3), (301, 14336, 8), (5, 8, 2), (129, 64, 5), (4099, 256, 1)] {
            let wbuf = bf(Tensor::randn(0f32, 1.0, (n + 3, k), &Device::Cpu)?)?;
            let w = wbuf.narrow(0, 3, n)?;
            let x = bf(Tensor::randn(0f32, 1.0, (m, 1, k), &Device::Cpu)?)?;
            let want = x.to_dtype(DType::F32)?.reshape((m, k))?.matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let (xg, wg) = (x.to_device(&gpu)?, wbuf.to_device(&gpu)?.narrow(0, 3, n)?);
            assert!(crate::cuda_fused::matvec_fits(&xg, &wg), "({n}, {k}) x {m} rows not taken by the kernel");
            let got = linear(&xg, &wg, None)?;
            assert_eq!(got.dims(), &[m, 1, n]);
            let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.reshape((m, n))?;
            assert!(all_finite(&got)?, "({n}, {k}) x {m} rows: not finite");
            let over = excess(&got, &want, 4e-3, 1e-3)?;
            eprintln!("({n}, {k}) x {m} rows: max error {}", max_abs_diff(&got, &want));
            assert!(over <= 0.0, "({n}, {k}) x {m} rows: an output off by {over} more than bf16 rounding allows");
            for i in 0..m {
                let alone = linear(&xg.narrow(0, i, 1)?, &wg, None)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
                assert_eq!(max_abs_diff(&alone, &got.get(i)?), 0.0, "({n}, {k}): row {i} of {m} differs from the row alone");
            }
        }
        Ok(())
    }

    /// Decode attention on the GPU (one bf16 query a head) equals f32 attention on the CPU
    /// over the same bf16 values within the output's bf16 rounding: grouped heads, head sizes
    /// 64 to 128, 1 to 2,000 keys (one split and several), keys and values read from longer
    /// buffers, at a device position (a recorded step: the buffer's later positions unwritten)
    /// with and without a window. Over the same keys every way rounds alike, bit for bit: at a
    /// device position over a buffer of a multiple of 1,024 positions (as recorded steps grow
    /// them: splits past the keys left empty), over a view of it, and over a view of a buffer
    /// of a multiple of 256 (as normal steps grow them). Skipped without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn decode_attention_on_the_gpu_equals_f32_attention() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let host = |t: &Tensor| -> Result<Tensor> { f32s(&t.to_device(&Device::Cpu)?) };
        // (heads, kv heads, cached positions, head size, window)
        for (h, kvh, len, d, window) in
            [(32, 8, 1usize, 128, None), (32, 8, 100, 128, None), (8, 2, 300, 64, None), (32, 8, 700, 128, None), (4, 4, 2000, 128, Some(500)), (6, 2, 513, 96, None), (32, 8, 200, 128, Some(64))]
        {
            let cap = (len + 1).next_multiple_of(1024);
            let q = bf(Tensor::randn(0f32, 1.0, (1, h, 1, d), &Device::Cpu)?)?;
            let kbuf = bf(Tensor::randn(0f32, 1.0, (1, kvh, cap, d), &Device::Cpu)?)?;
            let vbuf = bf(Tensor::randn(0f32, 1.0, (1, kvh, cap, d), &Device::Cpu)?)?;
            let scale = 1.0 / (d as f64).sqrt();
            let lo = window.map_or(0, |w: usize| len.saturating_sub(w));
            let seen = |t: &Tensor| -> Result<Tensor> { f32s(&t.narrow(2, lo, len - lo)?.contiguous()?) };
            let want = attention(&f32s(&q)?, &seen(&kbuf)?, &seen(&vbuf)?, Mask::None, scale, None, None)?;
            let (qg, kg, vg) = (q.to_device(&gpu)?, kbuf.to_device(&gpu)?, vbuf.to_device(&gpu)?);
            let pos = Tensor::new(&[len as u32 - 1], &gpu)?;
            let mut got = vec![("at a device position", attention(&qg, &kg, &vg, Mask::Upto { pos: &pos, window }, scale, None, None)?)];
            if window.is_none() {
                got.push(("over a view", attention(&qg, &kg.narrow(2, 0, len)?, &vg.narrow(2, 0, len)?, Mask::None, scale, None, None)?));
                // The same keys in a buffer of another size.
                let small = len.next_multiple_of(256);
                let (ks, vs) = (kg.narrow(2, 0, small)?.contiguous()?, vg.narrow(2, 0, small)?.contiguous()?);
                got.push(("over a view of a smaller buffer", attention(&qg, &ks.narrow(2, 0, len)?, &vs.narrow(2, 0, len)?, Mask::None, scale, None, None)?));
            }
            let first = host(&got[0].1)?;
            for (how, y) in &got {
                let y = host(y)?;
                assert!(all_finite(&y)?, "heads {h}/{kvh} positions {len} {how}: not finite");
                assert_eq!(max_abs_diff(&y, &first), 0.0, "heads {h}/{kvh} positions {len}: {how} and at a device position differ");
                // The GPU's f32 result rounded to bf16: half a unit in the last place, 2^-9 of it.
                let over = excess(&y, &want, 4e-3, 1e-4)?;
                eprintln!("heads {h}/{kvh} positions {len} d {d} window {window:?} {how}: max error {}", max_abs_diff(&y, &want));
                assert!(over <= 0.0, "heads {h}/{kvh} positions {len} d {d} window {window:?} {how}: an output off by {over} more than bf16 rounding allows");
            }
        }
        Ok(())
    }

    /// A batch's decode step in one op on the GPU (`decode_rows`) equals each row's step alone
    /// (rotation and cache write in one kernel, then decode attention over a view of its
    /// buffer) bit for bit: outputs and written buffers, bf16 and f32, grouped heads, rows of
    /// 0 to 1,500 held keys in buffers of 256- and 1,024-multiples, more rows than one launch
    /// takes (32). Skipped without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn decode_rows_on_the_gpu_equal_each_row_alone() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        let host = |t: &Tensor| -> Result<Tensor> { t.to_device(&Device::Cpu)?.to_dtype(DType::F32) };
        // (dtype, rows, heads, kv heads, head size, rows sharing one row of angles)
        for (dtype, b, h, kvh, d, shared) in [(DType::BF16, 3, 32, 8, 128, false), (DType::BF16, 35, 8, 2, 64, false), (DType::F32, 5, 6, 2, 96, false), (DType::BF16, 4, 32, 8, 128, true)] {
            let lens: Vec<usize> = (0..b).map(|r| [0, 5, 63, 64, 130, 700, 1500][r % 7] + r).collect();
            let caps: Vec<usize> = lens.iter().enumerate().map(|(r, l)| (l + 1).next_multiple_of(if r % 2 == 0 { 256 } else { 1024 })).collect();
            let rand = |dims: &[usize]| -> Result<Tensor> { Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.to_dtype(dtype) };
            // As the projections give them: (b, 1, heads, d) seen as (b, heads, 1, d).
            let q = rand(&[b, 1, h, d])?.to_device(&gpu)?.transpose(1, 2)?;
            let k = rand(&[b, 1, kvh, d])?.to_device(&gpu)?.transpose(1, 2)?;
            let v = rand(&[b, 1, kvh, d])?.to_device(&gpu)?.transpose(1, 2)?;
            // Rows at one position share one row of angles (1, d / 2).
            let angles: &[usize] = if shared { &[1, d / 2] } else { &[b, 1, d / 2] };
            let (cos, sin) = (rand(angles)?.to_device(&gpu)?, rand(angles)?.to_device(&gpu)?);
            let bufs: Vec<(Tensor, Tensor)> = caps.iter().map(|&c| Ok((rand(&[1, kvh, c, d])?, rand(&[1, kvh, c, d])?))).collect::<Result<_>>()?;
            let on_gpu = || -> Result<(Vec<Tensor>, Vec<Tensor>)> { bufs.iter().map(|(k, v)| Ok((k.to_device(&gpu)?, v.to_device(&gpu)?))).collect() };
            let (kb, vb) = on_gpu()?;
            let scale = 1.0 / (d as f64).sqrt();
            let got = decode_rows(&q, &k, &v, &cos, &sin, kb.clone(), vb.clone(), lens.clone(), scale)?;
            assert_eq!(got.dims(), &[b, h, 1, d]);
            let (kb1, vb1) = on_gpu()?;
            for r in 0..b {
                let row = |t: &Tensor| t.narrow(0, r, 1);
                let (len, name) = (lens[r], format!("{dtype:?} rows {b}, heads {h}/{kvh}, d {d}, shared angles {shared}, row {r} ({} keys, buffer {})", lens[r], caps[r]));
                let angle = |t: &Tensor| if shared { Ok(t.clone()) } else { row(t)?.squeeze(0) };
                let q1 = rope_kv_write_rows(&row(&q)?, &row(&k)?, &row(&v)?, &angle(&cos)?, &angle(&sin)?, &kb1[r], &vb1[r], len)?;
                let want = attention(&q1.contiguous()?, &kb1[r].narrow(2, 0, len + 1)?, &vb1[r].narrow(2, 0, len + 1)?, Mask::None, scale, None, None)?;
                let y = host(&row(&got)?)?;
                assert!(all_finite(&y)?, "{name}: not finite");
                assert_eq!(max_abs_diff(&y, &host(&want)?), 0.0, "{name}: the batched step and the row alone differ");
                for (batched, alone, what) in [(&kb[r], &kb1[r], "keys"), (&vb[r], &vb1[r], "values")] {
                    assert_eq!(max_abs_diff(&host(batched)?, &host(alone)?), 0.0, "{name}: the {what} written differ");
                }
            }
        }
        Ok(())
    }

    /// Decode attention that codes its outputs for the output projection (`attention_coded`)
    /// writes the very codes the product would make of them (one split, 100 keys; split and
    /// merged, 700 keys of a 1,024-position buffer, by the last block or, under
    /// `LMX_CUDA_ATTENTION_MERGE=0`, a second launch), and the product reading them gives the
    /// values it gives coding anew. Skipped without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn decode_attention_codes_its_outputs_as_the_product_would() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        let (h, kvh, d) = (32, 8, 128);
        let rand = |dims: &[usize]| -> Result<Tensor> { Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.to_dtype(DType::BF16) };
        for (bits, gs) in [(4, 64), (8, 32), (4, 128)] {
            for len in [100usize, 700] {
                let q = rand(&[1, h, 1, d])?.to_device(&gpu)?;
                let (kb, vb) = (rand(&[1, kvh, len.next_multiple_of(1024), d])?.to_device(&gpu)?, rand(&[1, kvh, len.next_multiple_of(1024), d])?.to_device(&gpu)?);
                // 100 keys as their own tensor (one split); 700 as a view of the buffer.
                let (k, v) = if len < 128 { (kb.narrow(2, 0, len)?.contiguous()?, vb.narrow(2, 0, len)?.contiguous()?) } else { (kb.narrow(2, 0, len)?, vb.narrow(2, 0, len)?) };
                let w = std::sync::Arc::new(crate::quant::QuantizedMatrix::quantize(&rand(&[64, h * d])?, bits, gs)?);
                let target = crate::quant::CodeTarget::new((bits, gs));
                // The buffer exists from the first coded step on: run one to make it.
                attention_coded(&q, &k, &v, Mask::None, 0.1, None, None, Some(&target))?;
                let y = attention_coded(&q, &k, &v, Mask::None, 0.1, None, None, Some(&target))?;
                let heads = y.transpose(1, 2)?.reshape((1, 1, h * d))?;
                crate::quant::follow_codes(&y, &heads);
                let name = format!("{bits} bits, groups of {gs}, {len} keys");
                let Some(buf) = target.buffer(h * d, &gpu)? else { panic!("{name}: no codes buffer") };
                let used = h * d / 2 + 2 * h * d / gs;
                let got = buf.flatten_all()?.narrow(0, 0, used)?.to_vec1::<u32>()?;
                let want = crate::quant::cuda::code_rows(&heads.reshape((1, h * d))?, bits, gs)?.flatten_all()?.narrow(0, 0, used)?.to_vec1::<u32>()?;
                let first = got.iter().zip(&want).position(|(a, b)| a != b);
                assert_eq!(first, None, "{name}: the attention's codes differ from the product's own at int {first:?}");
                let read = w.matmul(&heads)?;
                let fresh = w.matmul(&heads.copy()?)?;
                assert_eq!(
                    max_abs_diff(&read.to_dtype(DType::F32)?.to_device(&Device::Cpu)?, &fresh.to_dtype(DType::F32)?.to_device(&Device::Cpu)?),
                    0.0,
                    "{name}: the product of the offered codes differs"
                );
            }
        }
        Ok(())
    }

    /// Flash attention on the GPU (bf16) equals attention in f32 on the CPU over the same
    /// bf16 values, within bf16 rounding: head sizes 16 to 128, grouped heads, a chunk
    /// after cached positions, a sliding window, soft-capping, two sequences, keys and values
    /// read from a longer cache buffer, queries not contiguous. Skipped without a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn flash_attention_equals_f32_attention() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no GPU: skipped");
            return Ok(());
        };
        // (batch, heads, kv heads, queries, cached positions, head size, window, softcap)
        let cases = [
            (1, 8, 2, 100, 0, 64, None, None),
            (1, 4, 4, 130, 70, 128, None, None),
            (1, 6, 2, 150, 0, 96, Some(37), None),
            (2, 4, 1, 65, 3, 128, None, Some(30.0)),
            (1, 32, 8, 700, 300, 128, Some(500), None),
            (1, 4, 2, 64, 0, 16, None, None),
            (1, 4, 2, 33, 0, 32, None, None),
        ];
        for (b, h, kvh, l, cached, d, window, softcap) in cases {
            let kv_len = cached + l;
            let bf = |t: Tensor| t.to_dtype(DType::BF16);
            // Queries (b, l, h, d) seen as (b, h, l, d); keys and values the first kv_len
            // positions of a buffer of kv_len + 40.
            let q = bf(Tensor::randn(0f32, 1.0, (b, l, h, d), &Device::Cpu)?)?;
            let kbuf = bf(Tensor::randn(0f32, 1.0, (b, kvh, kv_len + 40, d), &Device::Cpu)?)?;
            let vbuf = bf(Tensor::randn(0f32, 1.0, (b, kvh, kv_len + 40, d), &Device::Cpu)?)?;
            let scale = 1.0 / (d as f64).sqrt();
            let mask = causal_mask(l, cached, window, &Device::Cpu)?;
            let f32s = |t: &Tensor| t.to_dtype(DType::F32);
            let (qc, kc, vc) = (f32s(&q.transpose(1, 2)?.contiguous()?)?, f32s(&kbuf.narrow(2, 0, kv_len)?)?, f32s(&vbuf.narrow(2, 0, kv_len)?)?);
            let want = attention(&qc, &kc.contiguous()?, &vc.contiguous()?, Mask::Additive(&mask), scale, softcap, None)?;
            let (qg, kg, vg) = (q.to_device(&gpu)?.transpose(1, 2)?, kbuf.to_device(&gpu)?.narrow(2, 0, kv_len)?, vbuf.to_device(&gpu)?.narrow(2, 0, kv_len)?);
            assert!(crate::cuda_fused::flash_fits(&qg, &kg, &vg), "case {b} {h} {kvh} {l} {d} not taken by the flash kernel");
            let gmask = mask.to_device(&gpu)?;
            let got = attention(&qg, &kg, &vg, Mask::Causal { window, additive: &gmask }, scale, softcap, None)?;
            let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let err = max_abs_diff(&got, &want);
            eprintln!("b {b} heads {h}/{kvh} queries {l} after {cached} d {d} window {window:?} cap {softcap:?}: max error {err}");
            assert!(err < 2e-2, "flash attention off by {err}");
        }
        Ok(())
    }
}
