//! The quantized matmul as a candle op: `x @ W^T` and its backward `g @ W`, with the kernel
//! chosen by the input's device. The CPU kernels live in `kernels.rs`; a device without a
//! kernel says so.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{kernels, QuantizedMatrix};

/// `x @ W^T` (transpose: false) for a quantized W, as a candle op, or `g @ W` (transpose: true),
/// which is its backward pass.
pub(super) struct QMatMul {
    pub(super) q: Arc<QuantizedMatrix>,
    pub(super) transpose: bool,
    /// Float activations only (training: the forward must match its backward); otherwise
    /// 4- and 8-bit products take the int8 kernels where they apply.
    pub(super) exact: bool,
}

/// Most tokens of one sequence in a product that go one at a time through the decode
/// kernels ([`decode_rows`]): a speculative step's draft, a short prompt.
const DECODE_TOKENS: usize = 8;

/// True when the rows of an input of these dims each take the decode kernels, as a token
/// alone does: a batch of sequences one token each (dims (batch, 1, features)), or a few
/// tokens of one sequence. The product of each row then does not depend on the others, so a
/// sequence decoded in a batch, or checked in a speculative step, gives the tokens it gives
/// alone; longer prompts take the int8 product (whose sums run in another order).
pub(super) fn decode_rows(dims: &[usize]) -> bool {
    dims.len() < 2 || dims[dims.len() - 2] <= DECODE_TOKENS
}

/// `x @ [W_0; W_1; ...]^T` for decoded rows ([`decode_rows`]) of an input the matrices share,
/// as one candle op without backward: x rounded to int8 once and all products in one
/// parallel step. (Prompts take [`q8_many`].)
pub(super) struct QMatMulMany {
    pub(super) qs: Vec<Arc<QuantizedMatrix>>,
}

impl CustomOp1 for QMatMulMany {
    fn name(&self) -> &'static str {
        "lmx-qmatmul-many"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = self.qs[0].cols;
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("quantized matmul: input {:?} does not end in {k} features", dims);
        }
        let x = input_f32(s, l, "quantized matmul")?;
        if k == 0 {
            // Empty shares of row-parallel products (their part of the all-sum is 0).
            let (m, n): (usize, usize) = (dims[..dims.len() - 1].iter().product(), self.qs.iter().map(|q| q.rows).sum());
            *dims.last_mut().expect("k is the last dim") = n;
            return Ok((output(vec![0.0; m * n], s.dtype()), Shape::from(dims)));
        }
        let m = x.len() / k;
        let qs: Vec<&QuantizedMatrix> = self.qs.iter().map(|q| &**q).collect();
        if let Some(last) = dims.last_mut() {
            *last = qs.iter().map(|q| q.rows).sum();
        }
        Ok((output(kernels::qmatvec_many(&qs, &x, m), s.dtype()), Shape::from(dims)))
    }
}

/// `[x @ W_0^T, x @ W_1^T, ...]` for several rows of a CPU input x (..., cols) off the tape,
/// by the int8 product (callers check [`kernels::q8_gemm_applies`]), in x's dtype: each
/// matrix's output written where it stays, with no joint output to split and copy.
pub(super) fn q8_many(qs: &[&QuantizedMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else { candle_core::bail!("the int8 quantized product runs on the CPU") };
    let xs = input_f32(s, layout, "quantized matmul")?;
    let k = x.dim(candle_core::D::Minus1)?;
    let shape = |n: usize| {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has features") = n;
        dims
    };
    if qs.iter().any(|q| q.cols != k) {
        candle_core::bail!("quantized matmul: input {:?} does not end in {} features", x.dims(), qs[0].cols);
    }
    if k == 0 {
        // Empty shares of row-parallel products (their part of the all-sum is 0).
        return qs.iter().map(|q| Tensor::zeros(shape(q.rows), x.dtype(), x.device())).collect();
    }
    let m = xs.len() / k;
    fn tensors<T: crate::cpu_fused::Elem>(ys: Vec<Vec<T>>, shape: impl Fn(usize) -> Vec<usize>, qs: &[&QuantizedMatrix], dev: &candle_core::Device) -> Result<Vec<Tensor>> {
        ys.into_iter().zip(qs).map(|(y, q)| Tensor::from_vec(y, shape(q.rows), dev)).collect()
    }
    match x.dtype() {
        DType::BF16 => tensors(kernels::qmatmul_many_q8::<bf16>(qs, &xs, m), shape, qs, x.device()),
        DType::F16 => tensors(kernels::qmatmul_many_q8::<f16>(qs, &xs, m), shape, qs, x.device()),
        _ => tensors(kernels::qmatmul_many_q8::<f32>(qs, &xs, m), shape, qs, x.device()),
    }
}

/// The int8 product of several rows of x by one matrix, stored in the input's dtype.
fn q8_output(q: &QuantizedMatrix, x: &[f32], m: usize, dtype: DType) -> CpuStorage {
    fn one<T>(mut ys: Vec<Vec<T>>) -> Vec<T> {
        ys.pop().expect("one output per matrix")
    }
    match dtype {
        DType::BF16 => CpuStorage::BF16(one(kernels::qmatmul_many_q8(&[q], x, m))),
        DType::F16 => CpuStorage::F16(one(kernels::qmatmul_many_q8(&[q], x, m))),
        _ => CpuStorage::F32(one(kernels::qmatmul_many_q8(&[q], x, m))),
    }
}

/// The result in the input's dtype.
fn output(y: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(crate::cpu_fused::rounded::<bf16>(&y)),
        DType::F16 => CpuStorage::F16(y.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(y),
    }
}

/// Reads a contiguous f32/bf16/f16 input as f32 (an f32 input borrowed, not copied).
fn input_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} needs a contiguous input")))?;
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => std::borrow::Cow::Owned(crate::cpu_fused::widened(&v[start..end])),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("{what}: input dtype {:?} is not supported", other.dtype()),
    })
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "lmx-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let q = &self.q;
        let (k, n) = if self.transpose { (q.rows, q.cols) } else { (q.cols, q.rows) };
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("quantized matmul: input {:?} does not end in {k} features", dims);
        }
        let x = input_f32(s, l, "quantized matmul")?;
        if k == 0 {
            // A rank's empty share of a row-parallel product (its part of the all-sum is 0).
            let m: usize = dims[..dims.len() - 1].iter().product();
            *dims.last_mut().expect("k is the last dim") = n;
            return Ok((output(vec![0.0; m * n], s.dtype()), Shape::from(dims)));
        }
        let m = x.len() / k;
        let training_bf16 = self.exact && m > 1 && q.bf16_training && crate::bf16_gemm::supported();
        let decode = decode_rows(&dims);
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        if !self.transpose && !self.exact && decode {
            return Ok((output(kernels::qmatvec_many(&[q], &x, m), s.dtype()), Shape::from(dims)));
        }
        if !self.transpose && !self.exact && kernels::q8_gemm_applies(&[q]) {
            return Ok((q8_output(q, &x, m, s.dtype()), Shape::from(dims)));
        }
        let y = if self.transpose && training_bf16 {
            // QLoRA's backward in bf16 products with f32 sums, as the forward below: W
            // dequantized row by row straight into the packed operand.
            crate::bf16_gemm::matmul(&x, m, &crate::bf16_gemm::Packed::from_row_fn(q.rows, q.cols, |r, out| q.dequantize_row(r, out)))
        } else if self.transpose {
            kernels::qmatmul_t(q, &x, m)
        } else if training_bf16 {
            // Training on a quantized base with bf16 scales (QLoRA): the frozen weights multiply
            // as a bf16 base's do (dequantized rows rounded to bf16, activations rounded to bf16
            // at the product, f32 sums), as PyTorch + bitsandbytes compute QLoRA, at twice the
            // f32 rate.
            crate::bf16_gemm::matmul_rows(&x, m, q.rows, q.cols, |r, out| q.dequantize_row(r, out))
        } else if self.exact {
            kernels::qmatmul_exact(q, &x, m)
        } else if m > 1 && s.dtype() == DType::BF16 && crate::bf16_gemm::supported() {
            // bf16 prefill: rows dequantized block by block into the AVX512-BF16 kernel (the
            // precision of a bf16 model's matmuls, twice the f32 multiply rate).
            crate::bf16_gemm::matmul_rows(&x, m, q.rows, q.cols, |r, out| q.dequantize_row(r, out))
        } else {
            kernels::qmatmul_exact(q, &x, m)
        };
        Ok((output(y, s.dtype()), Shape::from(dims)))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = QMatMul { q: self.q.clone(), transpose: !self.transpose, exact: true };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
