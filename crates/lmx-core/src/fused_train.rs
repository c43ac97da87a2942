//! Fused kernels of training, each one pass where candle's composition took a chain of ops
//! with an f32 temporary apiece: the backwards of the SiLU-gated product and of RMS norm
//! (called from `taped`'s backwards) and Adam's update (`ops::adam_step`). CPU kernels here,
//! CUDA ones in `cuda_train`; both keep the composition's f32 arithmetic and its roundings.

use crate::cpu::{parallel_ranges, SendPtr};
use crate::cpu_fused::{by_dtype, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// `out[i] = f(i)` for i in 0..n, split over the decode pool's threads.
fn fill<T: Copy + Send + Sync>(out: &mut [T], f: impl Fn(usize) -> T + Sync) {
    let n = out.len();
    let ptr = SendPtr(out.as_mut_ptr());
    parallel_ranges(n, 1 << 14, |r| {
        // SAFETY: the ranges are disjoint and inside `out`, which outlives the call.
        let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r.start), r.len()) };
        for (o, i) in o.iter_mut().zip(r) {
            *o = f(i);
        }
    });
}

/// The backward of `silu(gate) * up`: inputs gate, up and the output's gradient (one dtype,
/// one shape, contiguous); output (2, ..shape): the gate's gradient, then up's. With
/// s = sigmoid(gate), d_up = dy gate s and d_gate = dy up s (gate (1 - s) + 1), in f32.
pub struct SiluMulBwd;

fn silu_mul_bwd_elems<T: Elem>(gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout, ds: &CpuStorage, dl: &Layout) -> Result<Vec<T>> {
    let (g, u, d) = (slice::<T>(gs, gl)?, slice::<T>(us, ul)?, slice::<T>(ds, dl)?);
    let n = g.len();
    let mut out = vec![T::of(0.0); 2 * n];
    fill(&mut out, |i| {
        let j = i % n;
        let (gv, uv, dv) = (g[j].f32(), u[j].f32(), d[j].f32());
        let s = 1.0 / (1.0 + (-gv).exp());
        T::of(if i < n { dv * uv * s * (gv * (1.0 - s) + 1.0) } else { dv * gv * s })
    });
    Ok(out)
}

/// The shape `(2, ..dims)` after checking that the three inputs agree.
fn three_alike(what: &str, (a, ad): (&Layout, DType), (b, bd): (&Layout, DType), (c, cd): (&Layout, DType)) -> Result<Shape> {
    if a.dims() != b.dims() || a.dims() != c.dims() || ad != bd || ad != cd {
        candle_core::bail!("{what}: inputs {:?} {ad:?}, {:?} {bd:?}, {:?} {cd:?} disagree", a.dims(), b.dims(), c.dims());
    }
    Ok(Shape::from([&[2], a.dims()].concat()))
}

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "lmx-silu-mul-bwd"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout, ds: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = three_alike("silu_mul backward", (gl, gs.dtype()), (ul, us.dtype()), (dl, ds.dtype()))?;
        Ok((by_dtype!(gs.dtype(), silu_mul_bwd_elems(gs, gl, us, ul, ds, dl)), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = three_alike("silu_mul backward", (gl, gs.dtype()), (ul, us.dtype()), (dl, ds.dtype()))?;
        Ok((crate::cuda_train::silu_mul_bwd(gs, gl, us, ul, ds, dl)?, shape))
    }
}

/// RMS norm's input gradient: inputs x (rows of d), the weight (d) and the output's gradient
/// (as x), contiguous, one dtype. With r = 1 / rms(x) and gw = dy w rounded to the dtype (as
/// the composition's product), dx = r (gw - x r mean(gw x r)).
pub struct RmsNormBwd {
    /// Added to the mean square.
    pub eps: f32,
}

fn rms_norm_bwd_rows<T: Elem>(xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, ds: &CpuStorage, dl: &Layout, eps: f32) -> Result<Vec<T>> {
    let (x, w, dy) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?, slice::<T>(ds, dl)?);
    let d = w.len();
    let mut out = vec![T::of(0.0); x.len()];
    let ptr = SendPtr(out.as_mut_ptr());
    parallel_ranges(x.len() / d, 8, |rows| {
        for row in rows {
            let (xr, gr) = (&x[row * d..(row + 1) * d], &dy[row * d..(row + 1) * d]);
            // SAFETY: row `row` of `out` belongs to this range alone; `out` outlives the call.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(row * d), d) };
            let gw = |i: usize| T::of(gr[i].f32() * w[i].f32()).f32();
            let (mut ss, mut sgx) = (0f64, 0f64);
            for (i, xv) in xr.iter().enumerate() {
                let xv = f64::from(xv.f32());
                ss += xv * xv;
                sgx += f64::from(gw(i)) * xv;
            }
            let r = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
            let m = (sgx / d as f64) as f32 * r;
            for (i, o) in o.iter_mut().enumerate() {
                *o = T::of((gw(i) - xr[i].f32() * r * m) * r);
            }
        }
    });
    Ok(out)
}

fn rms_norm_bwd_check((xl, xd): (&Layout, DType), (wl, wd): (&Layout, DType), (dl, dd): (&Layout, DType)) -> Result<()> {
    if xl.dims() != dl.dims() || xl.dims().last() != Some(&wl.shape().elem_count()) || xd != wd || xd != dd {
        candle_core::bail!("rms_norm backward: x {:?} {xd:?}, weight {:?} {wd:?} and gradient {:?} {dd:?} disagree", xl.dims(), wl.dims(), dl.dims());
    }
    Ok(())
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "lmx-rms-norm-bwd"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, ds: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        rms_norm_bwd_check((xl, xs.dtype()), (wl, ws.dtype()), (dl, ds.dtype()))?;
        Ok((by_dtype!(xs.dtype(), rms_norm_bwd_rows(xs, xl, ws, wl, ds, dl, self.eps)), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        rms_norm_bwd_check((xl, xs.dtype()), (wl, ws.dtype()), (dl, ds.dtype()))?;
        Ok((crate::cuda_train::rms_norm_bwd(xs, xl, ws, wl, ds, dl, self.eps)?, xl.shape().clone()))
    }
}

/// Adam's update (MLX's semantics) of f32 values: inputs the values p, their gradient g and
/// the moments (2, ..p) (m then v); output (3, ..p): the new values, m and v.
/// m' = m b1 + g (1 - b1), v' = v b2 + g^2 (1 - b2), p' = p keep - step m' / (sqrt(v') c2 + eps).
pub struct Adam {
    /// keep, b1, 1 - b1, b2, 1 - b2, step, c2, eps (each rounded to f32 once, as the
    /// composition's scalar multiplications round theirs).
    pub h: [f32; 8],
}

fn adam_check((pl, pd): (&Layout, DType), (gl, gd): (&Layout, DType), (ml, md): (&Layout, DType)) -> Result<Shape> {
    if pl.dims() != gl.dims() || ml.dims() != [&[2], pl.dims()].concat() || [pd, gd, md].iter().any(|&d| d != DType::F32) {
        candle_core::bail!("adam: values {:?} {pd:?}, gradient {:?} {gd:?} and moments {:?} {md:?} disagree (f32, moments (2, ..values))", pl.dims(), gl.dims(), ml.dims());
    }
    Ok(Shape::from([&[3], pl.dims()].concat()))
}

impl CustomOp3 for Adam {
    fn name(&self) -> &'static str {
        "lmx-adam"
    }
    fn cpu_fwd(&self, ps: &CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout, ms: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = adam_check((pl, ps.dtype()), (gl, gs.dtype()), (ml, ms.dtype()))?;
        let (p, g, mv) = (slice::<f32>(ps, pl)?, slice::<f32>(gs, gl)?, slice::<f32>(ms, ml)?);
        let n = p.len();
        let [keep, b1, nb1, b2, nb2, step, c2, eps] = self.h;
        let mut out = vec![0f32; 3 * n];
        for i in 0..n {
            let m = mv[i] * b1 + g[i] * nb1;
            let v = mv[n + i] * b2 + g[i] * g[i] * nb2;
            out[i] = p[i] * keep - (m * step) / (v.sqrt() * c2 + eps);
            out[n + i] = m;
            out[2 * n + i] = v;
        }
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = adam_check((pl, ps.dtype()), (gl, gs.dtype()), (ml, ms.dtype()))?;
        Ok((crate::cuda_train::adam(ps, pl, gs, gl, ms, ml, self.h)?, shape))
    }
}

/// Attention's backward over rows of raw scores S = q k^T (rows grouped (.., rep, q_len): row
/// r takes mask row r % q_len), as `taped::attention_bwd`'s composition: x = S scale, capped
/// to c tanh(x / c) with a cap, plus the f32 additive mask (q_len, cols); P = softmax(x) in
/// f32. Inputs (S, mask) give P rounded to S's dtype (for dV = P^T dO); (S, dP, mask) give
/// dS = P (dP - rowsum(dP P)) (1 - tanh^2 with a cap) scale. Two passes over S where the
/// composition made a dozen over f32 copies of it.
pub struct AttentionScores {
    /// Multiplies the raw scores.
    pub scale: f32,
    /// The soft cap c (0: none).
    pub cap: f32,
    /// Queries per group of rows (the mask's rows).
    pub q_len: usize,
}

impl AttentionScores {
    fn x(&self, s: f32, m: f32) -> f32 {
        let x = s * self.scale;
        (if self.cap > 0.0 { (x / self.cap).tanh() * self.cap } else { x }) + m
    }

    /// (max, sum of exp(x - max)) of a row.
    fn stats<T: Elem>(&self, s: &[T], m: &[f32]) -> (f32, f32) {
        let top = s.iter().zip(m).map(|(&v, &m)| self.x(v.f32(), m)).fold(f32::NEG_INFINITY, f32::max);
        (top, s.iter().zip(m).map(|(&v, &m)| (self.x(v.f32(), m) - top).exp()).sum())
    }

    fn rows<T: Elem>(&self, ss: &CpuStorage, sl: &Layout, dp: Option<(&CpuStorage, &Layout)>, ms: &CpuStorage, ml: &Layout) -> Result<Vec<T>> {
        let (s, mask) = (slice::<T>(ss, sl)?, slice::<f32>(ms, ml)?);
        let dp = match dp {
            Some((ds, dl)) => Some(slice::<T>(ds, dl)?),
            None => None,
        };
        let cols = ml.dims().last().copied().unwrap_or(1);
        let mut out = vec![T::of(0.0); s.len()];
        let ptr = SendPtr(out.as_mut_ptr());
        parallel_ranges(s.len() / cols, 4, |rows| {
            for row in rows {
                let (sr, mr) = (&s[row * cols..(row + 1) * cols], &mask[row % self.q_len * cols..][..cols]);
                // SAFETY: row `row` of `out` belongs to this range alone; `out` outlives the call.
                let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(row * cols), cols) };
                let (top, total) = self.stats(sr, mr);
                let p = |j: usize| (self.x(sr[j].f32(), mr[j]) - top).exp() / total;
                let Some(dp) = dp else {
                    o.iter_mut().enumerate().for_each(|(j, o)| *o = T::of(p(j)));
                    continue;
                };
                let dr = &dp[row * cols..(row + 1) * cols];
                let rowsum: f32 = (0..cols).map(|j| dr[j].f32() * p(j)).sum();
                for (j, o) in o.iter_mut().enumerate() {
                    let mut d = p(j) * (dr[j].f32() - rowsum);
                    if self.cap > 0.0 {
                        let t = (sr[j].f32() * self.scale / self.cap).tanh();
                        d *= 1.0 - t * t;
                    }
                    *o = T::of(d * self.scale);
                }
            }
        });
        Ok(out)
    }

    /// [`AttentionScores::rows`] in the scores' dtype, after the checks.
    fn cpu(&self, ss: &CpuStorage, sl: &Layout, dp: Option<(&CpuStorage, &Layout)>, ms: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check((sl, ss.dtype()), dp.map(|(ds, dl)| (dl, ds.dtype())), (ml, ms.dtype()))?;
        let out = match ss.dtype() {
            DType::F32 => CpuStorage::F32(self.rows::<f32>(ss, sl, dp, ms, ml)?),
            DType::BF16 => CpuStorage::BF16(self.rows::<bf16>(ss, sl, dp, ms, ml)?),
            DType::F16 => CpuStorage::F16(self.rows::<f16>(ss, sl, dp, ms, ml)?),
            other => candle_core::bail!("attention backward: dtype {other:?}"),
        };
        Ok((out, sl.shape().clone()))
    }

    fn check(&self, (sl, sd): (&Layout, DType), dp: Option<(&Layout, DType)>, (ml, md): (&Layout, DType)) -> Result<()> {
        let cols = sl.dims().last().copied().unwrap_or(0);
        let rows = sl.shape().elem_count() / cols.max(1);
        if md != DType::F32 || ml.dims() != [self.q_len, cols] || rows % self.q_len != 0 || dp.is_some_and(|(dl, dd)| dl.dims() != sl.dims() || dd != sd) {
            candle_core::bail!("attention backward: scores {:?} {sd:?}, gradient {:?} and mask {:?} {md:?} disagree (q_len {})", sl.dims(), dp.map(|d| d.0.dims().to_vec()), ml.dims(), self.q_len);
        }
        Ok(())
    }
}

impl candle_core::CustomOp2 for AttentionScores {
    fn name(&self) -> &'static str {
        "lmx-attention-probs"
    }
    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, ms: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(ss, sl, None, ms, ml)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ss: &candle_core::CudaStorage, sl: &Layout, ms: &candle_core::CudaStorage, ml: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check((sl, ss.dtype()), None, (ml, ms.dtype()))?;
        Ok((crate::cuda_train::attention_scores(ss, sl, None, ms, ml, self.q_len, self.scale, self.cap)?, sl.shape().clone()))
    }
}

impl CustomOp3 for AttentionScores {
    fn name(&self) -> &'static str {
        "lmx-attention-dscores"
    }
    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, ds: &CpuStorage, dl: &Layout, ms: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(ss, sl, Some((ds, dl)), ms, ml)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check((sl, ss.dtype()), Some((dl, ds.dtype())), (ml, ms.dtype()))?;
        Ok((crate::cuda_train::attention_scores(ss, sl, Some((ds, dl)), ms, ml, self.q_len, self.scale, self.cap)?, sl.shape().clone()))
    }
}

/// The products of a low-rank (LoRA) update with its small f32 factors, reading the wide
/// operand (the layer's input, or the output's gradient; f32, bf16 or f16) as it is, where
/// candle's composition cast it to f32 first (in the forward, and twice in the backward). A
/// factor `m` stands for the (k, r) matrix M (k the wide side, r the rank): m itself, or with
/// `m_t` m is (r, k) and M its transpose. Sums in f32, in no fixed order.
pub enum Skinny {
    /// (x (n, k), m) -> scale x M, (n, r) f32.
    In { scale: f32, m_t: bool },
    /// (x (n, k), y (n, r) f32) -> scale x^T y, (k, r) f32, or its transpose (r, k) with `t`.
    Outer { scale: f32, t: bool },
    /// (y (n, r) f32, m) -> y M^T times scale, rounded to `dtype`, (n, k); with a third input
    /// `add` (n, k) in `dtype` (a `CustomOp3`), add plus that, rounded again (as candle's add of
    /// the two would).
    Out { scale: f32, m_t: bool, dtype: DType },
}

/// (k, r) of factor `m` as M, given its wide side k.
fn factor_dims(ml: &Layout, m_t: bool) -> Result<(usize, usize)> {
    let (d0, d1) = ml.shape().dims2()?;
    Ok(if m_t { (d1, d0) } else { (d0, d1) })
}

/// M(i, j) of factor `m` (contiguous).
fn at(m: &[f32], k: usize, r: usize, m_t: bool) -> impl Fn(usize, usize) -> f32 + Sync + '_ {
    move |i, j| if m_t { m[j * k + i] } else { m[i * r + j] }
}

impl Skinny {
    /// The output's shape and dtype after checking the inputs' (layout, dtype).
    fn check(&self, (l1, d1): (&Layout, DType), (l2, d2): (&Layout, DType)) -> Result<(Shape, DType)> {
        let bad = |what: &str| -> Result<(Shape, DType)> { candle_core::bail!("low-rank product ({what}): inputs {:?} {d1:?} and {:?} {d2:?} disagree", l1.dims(), l2.dims()) };
        let (n, w) = l1.shape().dims2()?;
        match *self {
            Skinny::In { m_t, .. } => {
                let (k, r) = factor_dims(l2, m_t)?;
                if k != w || d2 != DType::F32 {
                    return bad("in");
                }
                Ok(((n, r).into(), DType::F32))
            }
            Skinny::Outer { t, .. } => {
                let (n2, r) = l2.shape().dims2()?;
                if n2 != n || d2 != DType::F32 {
                    return bad("outer");
                }
                Ok((Shape::from(if t { (r, w) } else { (w, r) }), DType::F32))
            }
            Skinny::Out { m_t, dtype, .. } => {
                let (k, r) = factor_dims(l2, m_t)?;
                if r != w || d1 != DType::F32 || d2 != DType::F32 {
                    return bad("out");
                }
                Ok(((n, k).into(), dtype))
            }
        }
    }

    /// [`Skinny::Out`] with its addend: the shape after checking the addend's.
    fn check_add(&self, l1: (&Layout, DType), l2: (&Layout, DType), (l3, d3): (&Layout, DType)) -> Result<Shape> {
        let (shape, dtype) = self.check(l1, l2)?;
        if !matches!(self, Skinny::Out { .. }) || l3.dims() != shape.dims() || d3 != dtype {
            candle_core::bail!("low-rank product: an addend {:?} {d3:?} for an output {:?} {dtype:?} (the output product only)", l3.dims(), shape.dims());
        }
        Ok(shape)
    }

    fn cpu_in<T: Elem>(xs: &CpuStorage, xl: &Layout, ms: &CpuStorage, ml: &Layout, scale: f32, m_t: bool) -> Result<Vec<f32>> {
        let (x, m) = (slice::<T>(xs, xl)?, slice::<f32>(ms, ml)?);
        let (k, r) = factor_dims(ml, m_t)?;
        let mm = at(m, k, r, m_t);
        let mut y = vec![0f32; x.len() / k * r];
        fill(&mut y, |e| scale * x[e / r * k..][..k].iter().enumerate().map(|(i, v)| v.f32() * mm(i, e % r)).sum::<f32>());
        Ok(y)
    }

    fn cpu_outer<T: Elem>(xs: &CpuStorage, xl: &Layout, ys: &CpuStorage, yl: &Layout, scale: f32, t: bool) -> Result<Vec<f32>> {
        let (x, y) = (slice::<T>(xs, xl)?, slice::<f32>(ys, yl)?);
        let (n, k) = xl.shape().dims2()?;
        let r = yl.dim(1)?;
        let mut z = vec![0f32; k * r];
        fill(&mut z, |e| {
            let (i, j) = if t { (e % k, e / k) } else { (e / r, e % r) };
            scale * (0..n).map(|row| x[row * k + i].f32() * y[row * r + j]).sum::<f32>()
        });
        Ok(z)
    }
}

impl candle_core::CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "lmx-low-rank-product"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, dtype) = self.check((l1, s1.dtype()), (l2, s2.dtype()))?;
        macro_rules! wide {
            ($f:ident, $($arg:expr),*) => {
                match s1.dtype() {
                    DType::F32 => Self::$f::<f32>($($arg),*)?,
                    DType::BF16 => Self::$f::<bf16>($($arg),*)?,
                    DType::F16 => Self::$f::<f16>($($arg),*)?,
                    other => candle_core::bail!("low-rank product: dtype {other:?}"),
                }
            };
        }
        let out = match *self {
            Skinny::In { scale, m_t } => CpuStorage::F32(wide!(cpu_in, s1, l1, s2, l2, scale, m_t)),
            Skinny::Outer { scale, t } => CpuStorage::F32(wide!(cpu_outer, s1, l1, s2, l2, scale, t)),
            Skinny::Out { scale, m_t, .. } => by_dtype!(dtype, cpu_out_of(s1, l1, s2, l2, None, scale, m_t)),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, _) = self.check((l1, s1.dtype()), (l2, s2.dtype()))?;
        Ok((crate::cuda_train::skinny(self, s1, l1, s2, l2, None)?, shape))
    }
}

impl CustomOp3 for Skinny {
    fn name(&self) -> &'static str {
        "lmx-low-rank-product-add"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = self.check_add((l1, s1.dtype()), (l2, s2.dtype()), (l3, s3.dtype()))?;
        let Skinny::Out { scale, m_t, dtype } = *self else { unreachable!("checked") };
        Ok((by_dtype!(dtype, cpu_out_of(s1, l1, s2, l2, Some((s3, l3)), scale, m_t)), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.check_add((l1, s1.dtype()), (l2, s2.dtype()), (l3, s3.dtype()))?;
        Ok((crate::cuda_train::skinny(self, s1, l1, s2, l2, Some((s3, l3)))?, shape))
    }
}

/// [`Skinny::Out`] on the CPU (a free function for `by_dtype!`), with its addend if any.
fn cpu_out_of<T: Elem>(ys: &CpuStorage, yl: &Layout, ms: &CpuStorage, ml: &Layout, add: Option<(&CpuStorage, &Layout)>, scale: f32, m_t: bool) -> Result<Vec<T>> {
    let (y, m) = (slice::<f32>(ys, yl)?, slice::<f32>(ms, ml)?);
    let add = match add {
        Some((s, l)) => Some(slice::<T>(s, l)?),
        None => None,
    };
    let (k, r) = factor_dims(ml, m_t)?;
    let mm = at(m, k, r, m_t);
    let mut o = vec![T::of(0.0); y.len() / r * k];
    fill(&mut o, |e| {
        let v = T::of((0..r).map(|j| y[e / k * r + j] * mm(e % k, j)).sum::<f32>() * scale);
        add.map_or(v, |a| T::of(a[e].f32() + v.f32()))
    });
    Ok(o)
}
