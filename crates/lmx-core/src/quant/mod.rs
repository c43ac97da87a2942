//! MLX's affine quantization, byte for byte: the quantizer of `mlx/backend/cpu/quantized.cpp`
//! (float32 statistics, round-half-to-even, the scale snapped so 0.0 is exact, possibly
//! negative scales), the LSB-first bitstream packing, and kernels that multiply by the packed
//! weights without ever materializing the whole dequantized matrix.
//!
//! This file is the format (packing, the quantizer, dequantization); `op.rs` is the candle op
//! (forward and backward) that picks a kernel for the input's device; `kernels.rs` holds the
//! portable CPU kernels, `x86.rs` their AVX2 / AVX-512 VNNI versions and `arm.rs` the NEON
//! ones. A GPU kernel is a sibling file that `op.rs` dispatches to.
//!
//! A quantized (rows, cols) matrix is `packed` (rows, cols * bits / 32) u32, and `scales`,
//! `biases` (rows, cols / group_size) in the model dtype; `w = scale * q + bias`.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Bit widths MLX's affine mode supports.
pub const SUPPORTED_BITS: &[usize] = &[2, 3, 4, 5, 6, 8];
/// Group sizes MLX's affine mode supports.
pub const SUPPORTED_GROUP_SIZES: &[usize] = &[32, 64, 128];

/// A scale or bias element, widened to f32 by the kernels.
pub trait Scale: Copy {
    /// The value as f32.
    fn f32(self) -> f32;

    /// 8 values from `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX2 and F16C must be available; 8 values must be readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The values of `p`'s first 16 whose bits in `keep` are set, as f32 lanes (the others
    /// zero, and not read).
    ///
    /// # Safety
    /// AVX-512F/BW/VL must be available; the kept values must be readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const Self, keep: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512;
}

impl Scale for f32 {
    #[inline]
    fn f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load8_f32(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, keep: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load16_f32(p, keep) }
    }
}

impl Scale for bf16 {
    #[inline]
    fn f32(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load8_bf16(p as *const u16) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, keep: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load16_bf16(p as *const u16, keep) }
    }
}

impl Scale for f16 {
    #[inline]
    fn f32(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load8_f16(p as *const u16) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load16_masked(p: *const Self, keep: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { x86::load16_f16(p as *const u16, keep) }
    }
}

/// Per-group scales or biases, kept in the checkpoint's dtype.
#[derive(Debug, Clone)]
pub enum GroupParams {
    /// float32.
    F32(Vec<f32>),
    /// bfloat16.
    Bf16(Vec<bf16>),
    /// float16.
    F16(Vec<f16>),
}

impl GroupParams {
    /// Copies `out.len()` values from index `start` into `out` as f32 (one match per row,
    /// a loop the compiler vectorizes).
    #[inline]
    fn fill(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            GroupParams::F32(v) => out.copy_from_slice(&v[start..start + n]),
            GroupParams::Bf16(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = x.to_f32()),
            GroupParams::F16(v) => out.iter_mut().zip(&v[start..start + n]).for_each(|(o, x)| *o = x.to_f32()),
        }
    }

    fn from_f32(values: Vec<f32>, dtype: DType) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => GroupParams::F32(values),
            DType::BF16 => GroupParams::Bf16(values.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => GroupParams::F16(values.into_iter().map(f16::from_f32).collect()),
            other => candle_core::bail!("quantization scales must be float32, float16 or bfloat16, not {other:?}"),
        })
    }

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::F32 => GroupParams::F32(t.to_vec1()?),
            DType::BF16 => GroupParams::Bf16(t.to_vec1()?),
            DType::F16 => GroupParams::F16(t.to_vec1()?),
            other => candle_core::bail!("quantization scales must be float32, float16 or bfloat16, not {other:?}"),
        })
    }

    fn to_tensor(&self, shape: (usize, usize)) -> Result<Tensor> {
        match self {
            GroupParams::F32(v) => Tensor::from_vec(v.clone(), shape, &Device::Cpu),
            GroupParams::Bf16(v) => Tensor::from_vec(v.clone(), shape, &Device::Cpu),
            GroupParams::F16(v) => Tensor::from_vec(v.clone(), shape, &Device::Cpu),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            GroupParams::F32(_) => DType::F32,
            GroupParams::Bf16(_) => DType::BF16,
            GroupParams::F16(_) => DType::F16,
        }
    }
}

/// A matrix in MLX's affine quantized format.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// Output features (rows of W).
    pub rows: usize,
    /// Input features (columns of W).
    pub cols: usize,
    /// Bits per element.
    pub bits: usize,
    /// Elements sharing one scale and bias.
    pub group_size: usize,
    packed: Vec<u32>,
    scales: GroupParams,
    biases: GroupParams,
    /// Products always take float activations (set for models built for training, whose
    /// forward must be the one MLX computes; see [`QuantizedMatrix::matmul`]).
    pub(crate) exact: bool,
    /// Training products in bf16 (set for training on a checkpoint whose scales are bf16;
    /// see [`QuantizedMatrix::with_bf16_training`]).
    bf16_training: bool,
    /// The dtype of the model it belongs to, that of its dequantized rows: the scales' unless
    /// set ([`QuantizedMatrix::with_model_dtype`]).
    model_dtype: DType,
    /// The matrix on the CUDA device of its first product there.
    #[cfg(feature = "cuda")]
    on_device: std::sync::OnceLock<cuda::DeviceCopy>,
}

/// Checks bits and group size against MLX's affine mode.
/// The error is (what is unsupported, what to use instead).
pub fn check_spec(bits: usize, group_size: usize) -> std::result::Result<(), (String, &'static str)> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err((format!("{bits}-bit quantization"), "affine mode supports 2, 3, 4, 5, 6 and 8 bits"));
    }
    if !SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Err((format!("group size {group_size}"), "use 32, 64 or 128"));
    }
    Ok(())
}

fn spec_error((what, hint): (String, &'static str)) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what} is not supported ({hint})"))
}

impl QuantizedMatrix {
    /// Quantizes a 2-D float tensor exactly as MLX's CPU kernel does. Scales and biases take
    /// the tensor's dtype.
    pub fn quantize(w: &Tensor, bits: usize, group_size: usize) -> Result<Self> {
        check_spec(bits, group_size).map_err(spec_error)?;
        let (rows, cols) = w.dims2()?;
        if cols % group_size != 0 {
            candle_core::bail!("a row of {cols} elements is not divisible by the group size {group_size}");
        }
        let dtype = w.dtype();
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let n_groups = rows * cols / group_size;
        let words_per_row = cols * bits / 32;
        let quantize_row = |row: &[f32]| {
            let mut words = vec![0u32; words_per_row];
            let mut scales = Vec::with_capacity(cols / group_size);
            let mut biases = Vec::with_capacity(cols / group_size);
            for (g, group) in row.chunks(group_size).enumerate() {
                let (scale, bias) = affine_params(group, bits);
                let n_bins = ((1u32 << bits) - 1) as f32;
                for (j, w) in group.iter().enumerate() {
                    let q = ((w - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u64;
                    put_bits(&mut words, (g * group_size + j) * bits, bits, q);
                }
                scales.push(scale);
                biases.push(bias);
            }
            (words, scales, biases)
        };
        // Small inputs (a KV cache's new keys, every step) stay on this thread: a rayon
        // dispatch costs more than the work, and its workers compete with the decode pool's.
        let results: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = if values.len() < 1 << 16 { values.chunks(cols).map(quantize_row).collect() } else { values.par_chunks(cols).map(quantize_row).collect() };
        let mut packed = Vec::with_capacity(rows * words_per_row);
        let (mut scales, mut biases) = (Vec::with_capacity(n_groups), Vec::with_capacity(n_groups));
        for (w, s, b) in results {
            packed.extend(w);
            scales.extend(s);
            biases.extend(b);
        }
        Ok(Self {
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales: GroupParams::from_f32(scales, dtype)?,
            biases: GroupParams::from_f32(biases, dtype)?,
            exact: false,
            bf16_training: false,
            model_dtype: dtype,
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        })
    }

    /// Wraps checkpoint tensors (`weight` u32, `scales`, `biases`), checking their shapes.
    pub fn from_tensors(packed: &Tensor, scales: &Tensor, biases: &Tensor, bits: usize, group_size: usize) -> Result<Self> {
        check_spec(bits, group_size).map_err(spec_error)?;
        let (rows, words) = packed.dims2()?;
        if packed.dtype() != DType::U32 {
            candle_core::bail!("a quantized weight must be uint32, found {:?}", packed.dtype());
        }
        let cols = words * 32 / bits;
        let groups = cols / group_size;
        if scales.dims() != [rows, groups] || biases.dims() != [rows, groups] || cols % group_size != 0 {
            candle_core::bail!(
                "with bits={bits} and group_size={group_size}, a weight of shape {:?} needs scales and biases of shape [{rows}, {groups}], found {:?} and {:?}; the quantization block in config.json does not match these tensors",
                packed.dims(), scales.dims(), biases.dims()
            );
        }
        Ok(Self {
            rows,
            cols,
            bits,
            group_size,
            packed: packed.flatten_all()?.to_vec1()?,
            scales: GroupParams::from_tensor(scales)?,
            biases: GroupParams::from_tensor(biases)?,
            exact: false,
            bf16_training: false,
            model_dtype: scales.dtype(),
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        })
    }

    /// A matrix stored in MXFP4 (MLX's `mxfp4` mode; OpenAI's gpt-oss `*_blocks` / `*_scales`):
    /// groups of 32 elements, each a 4-bit E2M1 code (8 per u32 word, the first element in the
    /// low bits) times its group's power of two `2^(s - 127)` (an E8M0 byte `s`; 255 is NaN).
    /// Held in memory, exactly, in the 8-bit affine format the products already take: twice an
    /// E2M1 value is an integer in [-12, 12], so element = (code8 - 12) * 2^(s - 128) with
    /// code8 = 2 * value + 12, scale `2^(s - 128)` and bias `-12 * scale` (twice MXFP4's bytes;
    /// powers of two are exact in f32 and bf16). Scales and biases are made in `dtype`.
    pub fn from_mxfp4(packed: &Tensor, scales: &Tensor, dtype: DType) -> Result<Self> {
        /// Twice each E2M1 code's value.
        const TWICE: [i32; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
        let (rows, words) = packed.dims2()?;
        let cols = words * 8;
        if packed.dtype() != DType::U32 || scales.dtype() != DType::U8 || scales.dims() != [rows, cols / 32] || cols % 32 != 0 {
            candle_core::bail!(
                "an MXFP4 weight needs uint32 words (rows, cols / 8) and uint8 scales (rows, cols / 32); found {:?} {:?} and {:?} {:?}",
                packed.dtype(),
                packed.dims(),
                scales.dtype(),
                scales.dims()
            );
        }
        let words4 = packed.flatten_all()?.to_vec1::<u32>()?;
        let exps = scales.flatten_all()?.to_vec1::<u8>()?;
        let mut words8 = vec![0u32; rows * cols / 4];
        for (i, w) in words4.iter().enumerate() {
            for j in 0..8 {
                let code = (TWICE[((w >> (4 * j)) & 15) as usize] + 12) as u32;
                words8[2 * i + j / 4] |= code << (8 * (j % 4));
            }
        }
        let step: Vec<f32> = exps.iter().map(|&e| if e == 255 { f32::NAN } else { 2f64.powi(i32::from(e) - 128) as f32 }).collect();
        let bias: Vec<f32> = step.iter().map(|s| -12.0 * s).collect();
        let groups = (rows, cols / 32);
        let scales = Tensor::from_vec(step, groups, &Device::Cpu)?.to_dtype(dtype)?;
        let biases = Tensor::from_vec(bias, groups, &Device::Cpu)?.to_dtype(dtype)?;
        Self::from_tensors(&Tensor::from_vec(words8, (rows, cols / 4), &Device::Cpu)?, &scales, &biases, 8, 32)
    }

    /// The checkpoint tensors: (`weight` u32, `scales`, `biases`).
    pub fn to_tensors(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let groups = (self.rows, self.cols / self.group_size);
        Ok((Tensor::from_vec(self.packed.clone(), (self.rows, self.cols * self.bits / 32), &Device::Cpu)?, self.scales.to_tensor(groups)?, self.biases.to_tensor(groups)?))
    }

    /// The dtype of the model it belongs to (of dequantized rows; by default that of its
    /// scales and biases).
    pub fn dtype(&self) -> DType {
        self.model_dtype
    }

    /// Belongs to a model computing in `dtype` while its scales and biases keep theirs (a
    /// GGUF's f16 scales in an f32 model: a sixth fewer bytes a weight to read than as f32).
    /// Products are the same either way: the kernels widen scales to f32.
    pub fn with_model_dtype(mut self, dtype: DType) -> Self {
        self.model_dtype = dtype;
        self
    }

    /// Dequantizes rows `ids` into a (ids.len(), cols) tensor of the model dtype (embeddings).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &r) in out.chunks_mut(self.cols).zip(ids) {
            if r as usize >= self.rows {
                candle_core::bail!("row {r} is out of range for a quantized matrix of {} rows", self.rows);
            }
            self.dequantize_row(r as usize, o);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?.to_dtype(self.dtype())
    }

    /// Dequantizes the rows whose ids the u32 tensor `ids` holds into an (n, cols) tensor of
    /// the model dtype on `ids`' device (embeddings). On a GPU the ids never leave it: the
    /// rows are gathered and dequantized there (a captured decode step reads its token there).
    pub fn rows_of(&self, ids: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if ids.device().is_cuda() {
            return self.device_copy(ids.device())?.rows(self, &ids.flatten_all()?, self.dtype());
        }
        self.dequantize_rows(&ids.flatten_all()?.to_vec1::<u32>()?)?.to_device(ids.device())
    }

    /// The whole matrix, dequantized (conversion and tests; inference never calls this).
    pub fn dequantize(&self) -> Result<Tensor> {
        let ids: Vec<u32> = (0..self.rows as u32).collect();
        self.dequantize_rows(&ids)
    }

    /// Writes row `r` dequantized into `out` (length cols), in f32.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_groups(r, 0..self.cols / self.group_size, out);
    }

    /// Writes groups `groups` of row `r` dequantized into `out` (length groups.len() * group_size).
    fn dequantize_row_groups(&self, r: usize, groups: std::ops::Range<usize>, out: &mut [f32]) {
        let words = self.cols * self.bits / 32;
        let row = &self.packed[r * words..(r + 1) * words];
        let n_groups = self.cols / self.group_size;
        // Scales and biases 64 groups at a time on the stack: two small heap vectors a row had
        // taken a seventh of a QLoRA step (malloc, free and the arenas' trimming, rows
        // dequantized on both threads).
        const CHUNK: usize = 64;
        let (mut s, mut b) = ([0f32; CHUNK], [0f32; CHUNK]);
        for (c, outs) in out.chunks_mut(CHUNK * self.group_size).enumerate() {
            let g0 = groups.start + c * CHUNK;
            let n = outs.len() / self.group_size;
            self.scales.fill(r * n_groups + g0, &mut s[..n]);
            self.biases.fill(r * n_groups + g0, &mut b[..n]);
            for (i, o) in outs.chunks_mut(self.group_size).enumerate() {
                kernels::dequantize_group(row, (g0 + i) * self.group_size, self.bits, s[i], b[i], o);
            }
        }
    }

    /// The same values with 2- and 3-bit codes held in 4-bit slots and 5- and 6-bit codes in
    /// 8-bit ones (scales, biases and every dequantized value unchanged), so that the integer
    /// kernels, which read 4 and 8 bits everywhere (5 and 6 only with AVX-512 VBMI:
    /// [`for_integer_kernels`](Self::for_integer_kernels)), multiply them: the float kernels that read the other
    /// widths decoded 6-bit SmolLM2 at 6.4 tok/s on 1 Zen 4 thread, where 8 bits ran at 139.
    /// The cost is memory, and bytes to read a token: 1.33x for 3 and 6 bits, 1.6x for 5, 2x
    /// for 2. For models that run on the CPU; checkpoints are written from their own tensors,
    /// never from a widened matrix.
    pub fn widened(self) -> Self {
        let (from, to) = match self.bits {
            2 | 3 => (self.bits, 4),
            5 | 6 => (self.bits, 8),
            _ => return self,
        };
        // Every 32 elements fill `from` words of the bitstream and `to` words widened (rows
        // hold whole runs of 32: the group size is at least 32).
        let blocks = self.packed.len() / from;
        let mut packed = vec![0u32; blocks * to];
        let mask = (1u64 << from) - 1;
        const PER_TASK: usize = 4096;
        packed.par_chunks_mut(to * PER_TASK).zip(self.packed.par_chunks(from * PER_TASK)).for_each(|(out, src)| {
            for (o, s) in out.chunks_exact_mut(to).zip(src.chunks_exact(from)) {
                for k in 0..32 {
                    let (w, shift) = (k * from / 32, k * from % 32);
                    let two = u64::from(s[w]) | s.get(w + 1).map_or(0, |&v| u64::from(v) << 32);
                    o[k * to / 32] |= (((two >> shift) & mask) as u32) << (k * to % 32);
                }
            }
        });
        Self { bits: to, packed, ..self }
    }

    /// The matrix as this CPU's integer kernels read it: as stored where they read its width
    /// ([`kernels::runs_narrow`]: 5 and 6 bits with AVX-512 VBMI, 4 and 8 bits
    /// everywhere), else [`widened`](Self::widened).
    pub fn for_integer_kernels(self) -> Self {
        if matches!(self.bits, 4 | 8) || kernels::runs_narrow(self.bits) {
            self
        } else {
            self.widened()
        }
    }

    /// Products of this matrix always take float activations when `yes` (models built for
    /// training: their forward is the one MLX computes, also where the input is not on the
    /// gradient tape, as in the first layers).
    pub fn with_exact_products(mut self, yes: bool) -> Self {
        self.exact = yes;
        self
    }

    /// In training (see [`with_exact_products`](Self::with_exact_products)), multiply as a
    /// bf16 base does when `yes`: dequantized rows and activations rounded to bf16 at the
    /// product, f32 sums, on CPUs with AVX512-BF16 (QLoRA as PyTorch + bitsandbytes computes
    /// it, at twice the f32 rate). For checkpoints whose scales are bf16, which MLX runs in
    /// bf16.
    pub fn with_bf16_training(mut self, yes: bool) -> Self {
        self.bf16_training = yes;
        self
    }

    /// `x @ W^T` with x (.., cols) in f32/bf16/f16; the result has x's dtype. When x is on
    /// the gradient tape the op records a backward pass, `grad_x = grad_y @ W`, computed from
    /// the packed weights block by block (QLoRA: no dequantized copy of W is kept), and the
    /// forward is exact (float activations), as it is for a matrix built
    /// [`with_exact_products`](Self::with_exact_products); otherwise 4- and 8-bit products
    /// take two-level int8 activations where the CPU has the integer kernels
    /// ([`kernels::Q8Act`]).
    pub fn matmul(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return self.device_copy(x.device())?.matmul(self, x);
        }
        let x = x.contiguous()?;
        let op = op::QMatMul { q: self.clone(), transpose: false, exact: self.exact || x.track_op() };
        if x.track_op() {
            x.apply_op1(op)
        } else {
            x.apply_op1_no_bwd(&op)
        }
    }

    /// `g @ W` for g (.., rows): the input's gradient of [`QuantizedMatrix::matmul`] (exact
    /// float products; on a GPU through the weight dequantized again).
    pub fn matmul_t(self: &Arc<Self>, g: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            return self.device_copy(g.device())?.matmul_t(self, g);
        }
        g.contiguous()?.apply_op1_no_bwd(&op::QMatMul { q: self.clone(), transpose: true, exact: true })
    }
}

#[cfg(feature = "cuda")]
impl QuantizedMatrix {
    /// The matrix's copy on `device` (a CUDA device), made at its first product there.
    fn device_copy(&self, device: &candle_core::Device) -> Result<&cuda::DeviceCopy> {
        Ok(match self.on_device.get() {
            Some(c) => c,
            None => {
                let c = cuda::DeviceCopy::new(self, device)?;
                self.on_device.get_or_init(|| c)
            }
        })
    }
}

/// Where a producer of activations (a norm, the SiLU product) writes its output also coded as
/// the next integer products read it ([`QuantizedMatrix::code_spec`]): a one-row buffer of its
/// own, reused every decode step (a recorded step replays into the same buffer), offered to the
/// product that takes that very tensor next, so that no coding launch sits between them. Only
/// CUDA decode steps use it; elsewhere it is inert. The buffer belongs to the thread that made
/// it (a model's clones share it): forwards of the same model on other threads code as before
/// rather than race for it.
#[derive(Debug, Clone)]
pub struct CodeTarget {
    bits: usize,
    group_size: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    buf: Arc<std::sync::OnceLock<(std::thread::ThreadId, Tensor)>>,
}

impl CodeTarget {
    /// A target for products of `bits`-bit weights in groups of `group_size` (a spec from
    /// [`QuantizedMatrix::code_spec`]).
    pub fn new((bits, group_size): (usize, usize)) -> Self {
        Self { bits, group_size, buf: Arc::new(std::sync::OnceLock::new()) }
    }

    /// (bits, group size).
    pub fn spec(&self) -> (usize, usize) {
        (self.bits, self.group_size)
    }

    /// The buffer for one row of `cols` values on `device`, made at its first use outside a
    /// recorded step; None while recording before it exists, or off CUDA.
    #[cfg(feature = "cuda")]
    pub(crate) fn buffer(&self, cols: usize, device: &candle_core::Device) -> Result<Option<&Tensor>> {
        let me = std::thread::current().id();
        if let Some((owner, b)) = self.buf.get() {
            return Ok(Some(b).filter(|b| *owner == me && b.device().same_device(device) && b.elem_count() == cuda::act_stride(cols, self.group_size)));
        }
        if !device.is_cuda() || crate::graph::capturing(device) || cols % self.group_size != 0 || cols % 8 != 0 {
            return Ok(None);
        }
        let b = Tensor::zeros(cuda::act_stride(cols, self.group_size), candle_core::DType::U32, device)?;
        let (owner, b) = self.buf.get_or_init(|| (me, b));
        Ok(Some(b).filter(|_| *owner == me))
    }
}

impl QuantizedMatrix {
    /// (bits, group size) when this matrix's one-row products on CUDA read int8-coded
    /// activations that a [`CodeTarget`] can supply; None otherwise (and without CUDA).
    pub fn code_spec(&self) -> Option<(usize, usize)> {
        #[cfg(feature = "cuda")]
        if cuda::integer_products(self) && self.group_size <= 256 && self.cols % 8 == 0 {
            return Some((self.bits, self.group_size));
        }
        None
    }
}

/// Passes the codes a producer offered for `from` on to `to`, a view of the same values
/// (attention's heads reshaped into the output projection's row), if they are the last offer.
pub fn follow_codes(from: &Tensor, to: &Tensor) {
    #[cfg(feature = "cuda")]
    cuda::follow_codes(from, to);
    let _ = (from, to);
}

/// Forgets the codes a producer last offered on this thread (the end of a forward: the
/// buffer, and with it the device, are not kept alive by the offer).
pub fn clear_offered_codes() {
    #[cfg(feature = "cuda")]
    cuda::clear_offered_codes();
}

/// `[x @ W_0^T, x @ W_1^T, ...]` for matrices sharing the input x (a layer's q/k/v or
/// gate/up projections). On the CPU, decoded tokens ([`op::decode_rows`]), or a prompt where
/// the int8 product applies, take them in one step (x rounded to int8 once, one parallel round); on CUDA, a
/// decode step codes x once for all of them; anything else, one product each.
pub fn matmul_many(qs: &[Arc<QuantizedMatrix>], x: &Tensor) -> Result<Vec<Tensor>> {
    let refs: Vec<&QuantizedMatrix> = qs.iter().map(|q| &**q).collect();
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && !qs.is_empty() {
        if let Some(ys) = cuda::matmul_many(&refs, x)? {
            return Ok(ys);
        }
    }
    let shared = op::decode_rows(x.dims()) || kernels::q8_gemm_applies(&refs);
    if qs.len() < 2 || !shared || qs.iter().any(|q| q.exact) || !x.device().is_cpu() || x.track_op() || qs.iter().any(|q| q.cols != qs[0].cols) {
        return qs.iter().map(|q| q.matmul(x)).collect();
    }
    if !op::decode_rows(x.dims()) {
        return op::q8_many(&refs, x);
    }
    let y = x.contiguous()?.apply_op1_no_bwd(&op::QMatMulMany { qs: qs.to_vec() })?;
    let last = y.rank() - 1;
    let mut start = 0;
    qs.iter()
        .map(|q| {
            let part = y.narrow(last, start, q.rows)?.contiguous();
            start += q.rows;
            part
        })
        .collect()
}

/// MLX's per-group scale and bias (float32), `mlx/backend/cpu/quantized.cpp::quantize`.
fn affine_params(group: &[f32], bits: usize) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let (mut w_min, mut w_max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &w in group {
        w_max = w_max.max(w);
        w_min = w_min.min(w);
    }
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (scale, 0.0)
    }
}

/// Writes `value` (`bits` wide) at bit `offset` of an LSB-first little-endian bitstream.
fn put_bits(words: &mut [u32], offset: usize, bits: usize, value: u64) {
    let (w, shift) = (offset / 32, offset % 32);
    let v = value << shift;
    words[w] |= v as u32;
    if shift + bits > 32 {
        words[w + 1] |= (v >> 32) as u32;
    }
}

/// Reads `bits` bits at bit `offset` of an LSB-first bitstream.
#[inline]
fn get_bits(words: &[u32], offset: usize, bits: usize) -> u32 {
    let (w, shift) = (offset / 32, offset % 32);
    let lo = u64::from(words[w]) >> shift;
    let v = if shift + bits > 32 { lo | (u64::from(words[w + 1]) << (32 - shift)) } else { lo };
    (v & ((1u64 << bits) - 1)) as u32
}

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod kernels;
mod op;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;
