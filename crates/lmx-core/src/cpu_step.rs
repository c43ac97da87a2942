//! One decode token through a stack of Llama-style layers on the CPU in one call, on plain
//! buffers: no candle tensor per op.
//!
//! Op by op, a token of a small model spends a large share of its time on candle's
//! bookkeeping rather than on arithmetic: every op allocates its output, its shape and
//! strides, and views (reshape, transpose, narrow) allocate theirs; a SmolLM2 token made about
//! 9,500 `malloc` calls. Here a token's hidden state, norms, products, rotation, cache write,
//! attention and SiLU product run on a few vectors allocated once per token, through the same
//! kernels (`cpu_fused`, `quant::kernels`) in the same order, so the numbers are those of the
//! op-by-op forward, bit for bit. The layers and the cache decide when it applies
//! (`lmx_nn`'s decoder); it computes.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use crate::cpu::parallel_ranges;
use crate::cpu_fused::{add_elems, attend_all, norm_range, rope_range, rounded, silu_mul_range, widen_into, Elem, KvRows, RopeRows};
use crate::quant::kernels::qmatvec_many_into;
use crate::quant::QuantizedMatrix;

/// Whether decode steps on this thread take this path: `LMX_CPU_STEP=0` turns it off for the
/// process (for comparisons), [`set_enabled`] for the calling thread.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    OVERRIDE.get().unwrap_or_else(|| *ON.get_or_init(|| !std::env::var("LMX_CPU_STEP").is_ok_and(|v| v == "0")))
}

/// Turns the path on or off for the decode steps the calling thread runs (tests and
/// benchmarks comparing both; other threads keep theirs).
pub fn set_enabled(on: bool) {
    OVERRIDE.set(Some(on));
}

/// Tokens this path has run on the calling thread.
pub fn steps_taken() -> usize {
    STEPS.get()
}

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
    static STEPS: Cell<usize> = const { Cell::new(0) };
}

/// A projection's matrix (out, in): packed in MLX's affine format, or a dense tensor of the
/// model's dtype (f32 or bf16), or f16 in an f32 model (an f16 checkpoint kept as stored).
#[derive(Clone, Copy)]
pub enum StepMatrix<'a> {
    Quantized(&'a QuantizedMatrix),
    Dense(&'a Tensor),
}

impl StepMatrix<'_> {
    /// (rows, columns).
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            StepMatrix::Quantized(q) => Ok((q.rows, q.cols)),
            StepMatrix::Dense(w) => w.dims2(),
        }
    }

    /// Whether a step of `dtype` takes it as the op-by-op products do: a quantized matrix
    /// whose products may take int8 activations (not one built for training), a contiguous
    /// dense matrix of the step's dtype.
    fn fits(&self, dtype: DType) -> bool {
        match self {
            StepMatrix::Quantized(q) => !q.exact,
            StepMatrix::Dense(w) => {
                // f16 weights in an f32 step: an f16 checkpoint kept as stored (`MatVec`'s f16 products).
                let stored = w.dtype() == dtype || (w.dtype() == DType::F16 && dtype == DType::F32);
                stored && w.is_contiguous() && w.rank() == 2 && w.device().is_cpu() && matches!(dtype, DType::F32 | DType::BF16)
            }
        }
    }
}

/// A projection: its matrix and, where it has one, its bias (out,) of the step's dtype.
#[derive(Clone, Copy)]
pub struct StepLinear<'a> {
    pub matrix: StepMatrix<'a>,
    pub bias: Option<&'a Tensor>,
}

/// An attention block as a decode step reads it: `o(attn(rope(norm_q(q)), rope(norm_k(k)), v))`
/// over all cached positions (grouped-query heads; "rotate half" on every feature).
pub struct StepAttention<'a> {
    /// The query, key and value projections.
    pub qkv: [StepLinear<'a>; 3],
    /// The output projection.
    pub o: StepLinear<'a>,
    /// RMS norms over each query / key head before rotation (Qwen3): weight (head_dim,), epsilon.
    pub q_norm: Option<(&'a Tensor, f32)>,
    pub k_norm: Option<(&'a Tensor, f32)>,
    /// Query heads, key/value heads (a divisor of the query heads) and their size.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the attention scores.
    pub scale: f32,
    /// A sliding window: the step applies only while the cache holds no more positions.
    pub window: Option<usize>,
}

/// The weights of one decoder layer as a decode step reads them: `x + attn(norm(x))`, then
/// `x + down(silu(gate(n)) * up(n))` with `n = norm(x)`.
pub struct StepWeights<'a> {
    /// The attention block's input norm's weight (hidden,) and epsilon.
    pub attn_norm: (&'a Tensor, f32),
    /// The feed-forward block's input norm's weight (hidden,) and epsilon.
    pub mlp_norm: (&'a Tensor, f32),
    pub attn: StepAttention<'a>,
    /// The gate and up projections.
    pub gate_up: [StepLinear<'a>; 2],
    /// The down projection.
    pub down: StepLinear<'a>,
}

/// A layer with its cache: `keys` and `values` (1, kv_heads, capacity, head_dim), contiguous,
/// with room at the step's position.
pub struct StepLayer<'a> {
    pub weights: StepWeights<'a>,
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
}

/// One token x (1, 1, hidden) at position `pos` through `layers`, rotated by `cos` and `sin`
/// (1, head_dim / 2): writes each layer's key and value at `pos` and attends to the `pos + 1`
/// positions there. Returns (x, h) whose sum is the last layer's output (the final norm adds
/// them, as after the op-by-op layers). None where the step does not apply: a matrix whose
/// products take float activations (training), a dtype other than f32/bf16/f16, or inputs
/// not of one dtype.
pub fn decode_layers(x: &Tensor, layers: &[StepLayer<'_>], pos: usize, cos: &Tensor, sin: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = x.dtype();
    let same = |t: &Tensor| t.dtype() == dtype && t.device().is_cpu();
    let vector = |t: &Tensor| same(t) && t.is_contiguous();
    let linear = |l: &StepLinear<'_>| l.matrix.fits(dtype) && l.bias.is_none_or(vector);
    let fits = layers.iter().all(|l| {
        let (w, a) = (&l.weights, &l.weights.attn);
        let norms = [Some(w.attn_norm), Some(w.mlp_norm), a.q_norm, a.k_norm].into_iter().flatten().all(|(t, _)| vector(t));
        // Beyond its window a layer masks the oldest positions: op by op.
        let seen = a.window.is_none_or(|win| pos < win);
        norms && seen && same(l.keys) && same(l.values) && a.qkv.iter().chain(&w.gate_up).chain([&a.o, &w.down]).all(linear)
    });
    if layers.is_empty() || !x.device().is_cpu() || !same(cos) || !same(sin) || !fits {
        return Ok(None);
    }
    let (hidden, h) = match dtype {
        DType::F32 => run::<f32>(x, layers, pos, cos, sin)?,
        DType::BF16 => run::<bf16>(x, layers, pos, cos, sin)?,
        DType::F16 => run::<f16>(x, layers, pos, cos, sin)?,
        _ => return Ok(None),
    };
    STEPS.set(STEPS.get() + 1);
    Ok(Some((hidden, h)))
}

/// A contiguous CPU tensor's values.
fn values<T: Elem>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<()>) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else { candle_core::bail!("decode step: a tensor is not on the CPU") };
    f(crate::cpu_fused::slice::<T>(s, layout)?)
}

/// A contiguous CPU tensor's values, copied.
fn vec_of<T: Elem>(t: &Tensor) -> Result<Vec<T>> {
    let mut out = Vec::new();
    values::<T>(t, |v| {
        out = v.to_vec();
        Ok(())
    })?;
    Ok(out)
}

/// The buffers of one token, reused from layer to layer.
struct Scratch<T> {
    /// The residual stream and the pending block output (added before the next norm).
    x: Vec<T>,
    h: Option<Vec<T>>,
    normed: Vec<T>,
    products: Products,
}

/// A product's input widened to f32, and its outputs.
#[derive(Default)]
struct Products {
    xf: Vec<f32>,
    yf: Vec<f32>,
}

impl<T: Elem> Scratch<T> {
    /// `x += h` (rounded to T) where a block's output is pending, then the norm of x into
    /// `normed`: the op-by-op forward's `add_rms_norm` (or `rms_norm` before the first layer).
    fn add_norm(&mut self, (w, eps): (&Tensor, f32)) -> Result<()> {
        if let Some(h) = self.h.take() {
            self.x = add_elems(&self.x, &h);
        }
        let (x, normed) = (&self.x, &mut self.normed);
        values::<T>(w, |w| {
            if w.len() != x.len() {
                candle_core::bail!("decode step: a norm of {} features over a hidden state of {}", w.len(), x.len());
            }
            norm_range(x, w, eps, normed);
            Ok(())
        })
    }
}

impl Products {
    /// The products of `ls` with `input`, as the op-by-op forward computes them: quantized
    /// matrices that share the input in one parallel step (`quant::matmul_many` on one row),
    /// dense ones likewise where the type has it, otherwise one product each (dense as
    /// `cpu::MatVec`); each rounded to T, then its bias added (rounded again).
    fn run<T: Elem>(&mut self, ls: &[StepLinear<'_>], input: &[T]) -> Result<Vec<T>> {
        // Each matrix's outputs: rows start..start + rows of the joint output.
        let mut spans = Vec::with_capacity(ls.len());
        let mut start = 0;
        for l in ls {
            let (r, c) = l.matrix.dims()?;
            if c != input.len() {
                candle_core::bail!("decode step: a product of {c} features over an input of {}", input.len());
            }
            spans.push(start..start + r);
            start += r;
        }
        self.xf.clear();
        widen_into(input, &mut self.xf);
        self.yf.resize(start, 0.0);
        let quantized: Option<Vec<&QuantizedMatrix>> = ls.iter().map(|l| if let StepMatrix::Quantized(q) = l.matrix { Some(q) } else { None }).collect();
        let dense: Option<Vec<&Tensor>> = ls.iter().map(|l| if let StepMatrix::Dense(w) = l.matrix { Some(w) } else { None }).collect();
        match (quantized, dense) {
            (Some(qs), _) => qmatvec_many_into(&qs, &self.xf, 1, &mut self.yf),
            (_, Some(ws)) if ws.len() > 1 && ws.iter().all(|w| w.dtype() != DType::F16) && dense_many(&ws, input, &mut self.yf)?.is_some() => {}
            _ => {
                for (l, span) in ls.iter().zip(&spans) {
                    let y = &mut self.yf[span.clone()];
                    match l.matrix {
                        StepMatrix::Quantized(q) => qmatvec_many_into(&[q], &self.xf, 1, y),
                        StepMatrix::Dense(w) if w.dtype() == DType::F16 => values::<f16>(w, |w| {
                            crate::cpu::matvec_f16(w, &self.xf, 1, self.xf.len(), y);
                            Ok(())
                        })?,
                        StepMatrix::Dense(w) => {
                            values::<T>(w, |w| T::matvec(w, input, 1, input.len(), y).ok_or_else(|| candle_core::Error::Msg("decode step: a dense matrix of a dtype without products".into())))?
                        }
                    }
                }
            }
        }
        let mut out: Vec<T> = rounded(&self.yf);
        for (l, span) in ls.iter().zip(spans) {
            let Some(b) = l.bias else { continue };
            values::<T>(b, |b| {
                if b.len() != span.len() {
                    candle_core::bail!("decode step: a bias of {} values for {} outputs", b.len(), span.len());
                }
                for (o, b) in out[span].iter_mut().zip(b) {
                    *o = T::of(o.f32() + b.f32());
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// Each head (`w.len()` values) of `x` RMS-normalized and scaled by `w`, in place (as
/// `ops::rms_norm` over the heads).
fn norm_heads<T: Elem>(x: &mut [T], (w, eps): (&Tensor, f32)) -> Result<()> {
    let src = x.to_vec();
    values::<T>(w, |w| {
        if w.is_empty() || x.len() % w.len() != 0 {
            candle_core::bail!("decode step: a head norm of {} features over {} values", w.len(), x.len());
        }
        norm_range(&src, w, eps, x);
        Ok(())
    })
}

/// [`Elem::matvec_many`] over dense matrices `ws` (rows of `input.len()`), where the type and
/// the CPU have it.
fn dense_many<T: Elem>(ws: &[&Tensor], input: &[T], y: &mut [f32]) -> Result<Option<()>> {
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(c) => crate::cpu_fused::slice::<T>(c, l),
            _ => candle_core::bail!("decode step: a matrix is not on the CPU"),
        })
        .collect::<Result<Vec<&[T]>>>()?;
    Ok(T::matvec_many(&slices, input, input.len(), y))
}

/// Rotates `heads` heads of `d` ("rotate half", as `cpu_fused::Rope` on one position).
fn rotate<T: Elem>(x: &[T], heads: usize, d: usize, cos: &[T], sin: &[T]) -> Vec<T> {
    let mut out = vec![T::of(0.0); x.len()];
    let rows = RopeRows { x, dims: [1, heads, 1, d], st: [heads * d, d, heads * d], cos, sin, per_row: false };
    let out_ptr = crate::cpu::SendPtr(out.as_mut_ptr());
    parallel_ranges(heads, 16, |range| {
        // SAFETY: the range's heads of `out`, which outlives the call; ranges are disjoint.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(range.start * d), range.len() * d) };
        rope_range(rows, range, o);
    });
    out
}

/// Writes one position's rows (`heads` of `d`) into a (1, heads, capacity, d) buffer in place.
struct WriteRows<'a, T> {
    rows: &'a [T],
    heads: usize,
    d: usize,
    pos: usize,
}

impl<T: Elem> candle_core::InplaceOp1 for WriteRows<'_, T> {
    fn name(&self) -> &'static str {
        "lmx-step-kv-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (heads, d) = (self.heads, self.d);
        let cap = cache_capacity(layout, heads, d)?;
        if self.pos >= cap || self.rows.len() != heads * d {
            candle_core::bail!("decode step: {} values at position {} of a cache buffer {:?}", self.rows.len(), self.pos, layout.dims());
        }
        let buf = T::slice_mut(storage)?;
        let start = layout.start_offset();
        for (h, row) in self.rows.chunks_exact(d.max(1)).enumerate() {
            let at = start + (h * cap + self.pos) * d;
            buf[at..at + d].copy_from_slice(row);
        }
        Ok(())
    }
}

/// The capacity of a cache buffer for `heads` heads of `d`: it must be (1, heads, capacity, d)
/// and contiguous.
fn cache_capacity(layout: &Layout, heads: usize, d: usize) -> Result<usize> {
    match layout.dims() {
        &[1, h, cap, hd] if h == heads && hd == d && layout.is_contiguous() => Ok(cap),
        dims => candle_core::bail!("decode step: a cache buffer {dims:?} for {heads} key/value heads of {d}: not (1, {heads}, capacity, {d}) and contiguous"),
    }
}

/// The first `len` positions of a (1, heads, capacity, d) cache buffer, as attention reads them.
fn cache_rows<'a, T: Elem>(s: &'a CpuStorage, layout: &Layout, heads: usize, d: usize, len: usize) -> Result<KvRows<'a, T>> {
    let cap = cache_capacity(layout, heads, d)?;
    if len > cap {
        candle_core::bail!("decode step: {len} positions of a cache buffer of {cap}");
    }
    Ok(KvRows { data: s.as_slice::<T>()?, stride: [heads * cap * d, cap * d, d], start: layout.start_offset(), len })
}

fn run<T: Elem>(x: &Tensor, layers: &[StepLayer<'_>], pos: usize, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
    let hidden = x.elem_count();
    let mut s = Scratch::<T> { x: vec_of(&x.contiguous()?)?, h: None, normed: vec![T::of(0.0); hidden], products: Products::default() };
    let (cs, sn) = (vec_of::<T>(cos)?, vec_of::<T>(sin)?);
    for layer in layers {
        let (w, a) = (&layer.weights, &layer.weights.attn);
        let (d, nq, nkv) = (a.head_dim, a.heads * a.head_dim, a.kv_heads * a.head_dim);
        if cs.len() * 2 != d || a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
            candle_core::bail!("decode step: {} query and {} key/value heads of {d} rotated by {} angles", a.heads, a.kv_heads, cs.len());
        }
        s.add_norm(w.attn_norm)?;
        let mut qkv = s.products.run(&a.qkv, &s.normed)?;
        if qkv.len() != nq + 2 * nkv {
            candle_core::bail!("decode step: q, k and v of {} values for {} and {} heads of {d}", qkv.len(), a.heads, a.kv_heads);
        }
        if let Some(norm) = a.q_norm {
            norm_heads(&mut qkv[..nq], norm)?;
        }
        if let Some(norm) = a.k_norm {
            norm_heads(&mut qkv[nq..nq + nkv], norm)?;
        }
        let q = rotate(&qkv[..nq], a.heads, d, &cs, &sn);
        let k = rotate(&qkv[nq..nq + nkv], a.kv_heads, d, &cs, &sn);
        layer.keys.inplace_op1(&WriteRows { rows: &k, heads: a.kv_heads, d, pos })?;
        layer.values.inplace_op1(&WriteRows { rows: &qkv[nq + nkv..], heads: a.kv_heads, d, pos })?;
        let mut attended = vec![T::of(0.0); nq];
        {
            let (ks, kl) = layer.keys.storage_and_layout();
            let (vs, vl) = layer.values.storage_and_layout();
            let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&*ks, &*vs) else { candle_core::bail!("decode step: the cache is not on the CPU") };
            let (kr, vr) = (cache_rows::<T>(ks, kl, a.kv_heads, d, pos + 1)?, cache_rows::<T>(vs, vl, a.kv_heads, d, pos + 1)?);
            attend_all(&q, &kr, &vr, a.heads, a.heads / a.kv_heads, d, a.scale, &mut attended);
        }
        s.h = Some(s.products.run(&[a.o], &attended)?);
        s.add_norm(w.mlp_norm)?;
        let gate_up = s.products.run(&w.gate_up, &s.normed)?;
        let inter = w.gate_up[0].matrix.dims()?.0;
        let (gate, up) = gate_up.split_at(inter);
        if up.len() != inter {
            candle_core::bail!("decode step: a gate of {inter} features and an up projection of {}", up.len());
        }
        let mut act = vec![T::of(0.0); inter];
        let act_ptr = crate::cpu::SendPtr(act.as_mut_ptr());
        parallel_ranges(inter, 4096, |r| {
            // SAFETY: ranges are disjoint and inside `act`, which outlives the call.
            let o = unsafe { std::slice::from_raw_parts_mut(act_ptr.get().add(r.start), r.len()) };
            silu_mul_range(o, &gate[r.clone()], &up[r]);
        });
        s.h = Some(s.products.run(&[w.down], &act)?);
    }
    let shape = x.shape().clone();
    let h = s.h.take().expect("at least one layer");
    Ok((Tensor::from_vec(s.x, shape.clone(), x.device())?, Tensor::from_vec(h, shape, x.device())?))
}
