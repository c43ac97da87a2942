//! Finite-difference gradient checks, for every op with a hand-written or composed backward.
//!
//! `check_grad(f, x, tol)` compares the tape gradient of `L(x) = sum(f(x) * r)` (r a fixed
//! random tensor, so every output element matters with a different weight) with central
//! differences `(L(x + h e_i) - L(x - h e_i)) / 2h` on up to 24 coordinates spread over x.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Largest absolute elementwise difference of two tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Checks the gradient of `f` at `x` (f32) against central differences. The error is the
/// largest coordinate difference divided by the largest gradient magnitude; above `tol` the
/// check fails with every compared coordinate in the message.
pub fn check_grad(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor, tol: f32) -> Result<()> {
    let x = x.to_dtype(DType::F32)?.contiguous()?.detach();
    let probe = f(&x)?;
    // A fixed pseudo-random projection (a tiny LCG: no dependence on candle's RNG).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let r: Vec<f32> = (0..probe.elem_count())
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let r = Tensor::from_vec(r, probe.shape(), &Device::Cpu)?.to_device(x.device())?;
    let var = Var::from_tensor(&x)?;
    check_var_grads(|| (f(var.as_tensor())?.to_dtype(DType::F32)? * &r)?.sum_all(), &[&var], tol)
}

/// Checks the tape gradients of a scalar `loss()` with respect to variables `vars` (a model's
/// trainable tensors) against central differences on up to 24 coordinates of each, perturbing
/// the variables in place (and restoring them).
pub fn check_var_grads(loss: impl Fn() -> Result<Tensor>, vars: &[&Var], tol: f32) -> Result<()> {
    let value = || -> Result<f64> { Ok(f64::from(loss()?.to_dtype(DType::F32)?.to_scalar::<f32>()?)) };
    let grads = loss()?.backward()?;
    for (vi, var) in vars.iter().enumerate() {
        let saved = var.as_tensor().detach().copy()?;
        let base = saved.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let analytic = grads.get(var.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached variable {vi}")))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = base.len();
        let picks: Vec<usize> = if n <= 24 { (0..n).collect() } else { (0..24).map(|i| i * n / 24 + (i * 7) % (n / 24).max(1)).collect() };
        let scale = analytic.iter().fold(0f32, |m, g| m.max(g.abs())).max(1e-3);
        let mut worst = 0f32;
        let mut report = Vec::new();
        for &i in &picks {
            let h = 1e-2f32 * base[i].abs().max(0.1);
            let at = |d: f32| -> Result<f64> {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, saved.shape(), saved.device())?.to_dtype(saved.dtype())?)?;
                value()
            };
            let numeric = ((at(h)? - at(-h)?) / (2.0 * f64::from(h))) as f32;
            let err = (numeric - analytic[i]).abs() / scale;
            worst = worst.max(err);
            report.push(format!("[{i}] tape {:.5} numeric {numeric:.5}", analytic[i]));
        }
        var.set(&saved)?;
        if worst > tol {
            candle_core::bail!("gradient check of variable {vi} failed: relative error {worst:.2e} > {tol:.0e}\n{}", report.join("\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check can fail: a function whose tape gradient is wrong (half of it is detached)
    /// is caught.
    #[test]
    fn a_wrong_gradient_fails_the_check() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?;
        check_grad(|x| x.sqr(), &x, 1e-2)?;
        let err = check_grad(|x| x.detach().sqr()? + x, &x, 1e-2).expect_err("detached square must fail");
        assert!(err.to_string().contains("gradient check of variable 0 failed"), "{err}");
        Ok(())
    }
}
