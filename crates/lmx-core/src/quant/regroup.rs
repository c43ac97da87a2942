//! Matrices whose groups no MLX affine group of 32 holds (GGUF's groups of 16), requantized
//! to 8-bit groups of 32 for the devices and kernels that do not read them as they are.

use candle_core::{Device, Result, Tensor};

use super::QuantizedMatrix;

/// A (rows, cols) matrix, whose row `r` `row(r, out)` writes as f32, as 8-bit affine groups of
/// 32 with f16 scales and biases, each group's codes spanning its minimum to its maximum: the
/// bias is the minimum rounded down to an f16, the scale `(max - bias) / 255` rounded up to
/// one, so every value is within half a step (about `(max - min) / 510`) of its original;
/// MLX's quantizer, which makes 0 exact, can be a whole step off. f16 rather than f32 scales:
/// 1.125 bytes a weight instead of 1.25, a tenth less to read a token. Where a group's range
/// does not fit an f16 (beyond 65504), the matrix keeps f32 scales and biases. Rows go by
/// runs on several threads, one row's values at a time (no f32 copy of the matrix). Returns
/// words, scales, biases.
pub fn requantize8(rows: usize, cols: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Result<(Tensor, Tensor, Tensor)> {
    use half::f16;
    let groups = cols / 32;
    // `narrow` gives the grid scales and biases are held on: (down, up) roundings of a value.
    let quantize = |narrow: fn(f32) -> (f32, f32)| {
        let (mut words, mut scales, mut biases) = (vec![0u32; rows * cols / 4], vec![0f32; rows * groups], vec![0f32; rows * groups]);
        let threads = if rows * cols < (1 << 20) { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) };
        let per = rows.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let parts = words.chunks_mut(per * cols / 4).zip(scales.chunks_mut(per * groups)).zip(biases.chunks_mut(per * groups));
            for (i, ((words, scales), biases)) in parts.enumerate() {
                let row = &row;
                scope.spawn(move || {
                    let mut values = vec![0f32; cols];
                    let (words, scales, biases) = (words.chunks_exact_mut(cols / 4), scales.chunks_exact_mut(groups), biases.chunks_exact_mut(groups));
                    for (r, ((words, scales), biases)) in words.zip(scales).zip(biases).enumerate() {
                        row(i * per + r, &mut values);
                        for (((v, w), s), b) in values.chunks_exact(32).zip(words.chunks_exact_mut(8)).zip(scales.iter_mut()).zip(biases.iter_mut()) {
                            let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                            let bias = narrow(lo).0;
                            let scale = narrow((hi - bias) / 255.0).1;
                            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                            // Rounded to nearest by the magic number (1.5 * 2^23): codes 0..=255.
                            const MAGIC: f32 = 12_582_912.0;
                            let code = |x: f32| (((x - bias) * inv).clamp(0.0, 255.0) + MAGIC).to_bits() - MAGIC.to_bits();
                            for (o, x) in w.iter_mut().zip(v.chunks_exact(4)) {
                                *o = code(x[0]) | code(x[1]) << 8 | code(x[2]) << 16 | code(x[3]) << 24;
                            }
                            (*s, *b) = (scale, bias);
                        }
                    }
                });
            }
        });
        (words, scales, biases)
    };
    // The f16 next to `v` on each side (`v` itself when it is one).
    fn f16_around(v: f32) -> (f32, f32) {
        let h = f16::from_f32(v);
        let next = |h: f16, up: bool| {
            let bits = h.to_bits();
            let positive = bits & 0x8000 == 0;
            // Moving away from zero adds one to the magnitude's bits; towards zero, takes one.
            let away = up == positive;
            if bits & 0x7fff == 0 {
                f16::from_bits(if up { 1 } else { 0x8001 })
            } else {
                f16::from_bits(if away { bits + 1 } else { bits - 1 })
            }
        };
        let x = h.to_f32();
        match x.partial_cmp(&v) {
            Some(std::cmp::Ordering::Less) => (x, next(h, true).to_f32()),
            Some(std::cmp::Ordering::Greater) => (next(h, false).to_f32(), x),
            _ => (x, x),
        }
    }
    let shape = (rows, groups);
    let (words, scales, biases) = quantize(f16_around);
    let words = Tensor::from_vec(words, (rows, cols / 4), &Device::Cpu)?;
    if scales.iter().chain(&biases).all(|v| v.is_finite()) {
        let half = |v: Vec<f32>| Tensor::from_vec(v.into_iter().map(f16::from_f32).collect::<Vec<_>>(), shape, &Device::Cpu);
        return Ok((words, half(scales)?, half(biases)?));
    }
    let (words, scales, biases) = quantize(|v| (v, v));
    Ok((Tensor::from_vec(words, (rows, cols / 4), &Device::Cpu)?, Tensor::from_vec(scales, shape, &Device::Cpu)?, Tensor::from_vec(biases, shape, &Device::Cpu)?))
}

impl QuantizedMatrix {
    /// The same matrix as 8-bit groups of 32 ([`requantize8`]): for a matrix in groups of 16
    /// (GGUF's Q6_K, [`super::Q6K_FORM`]) on a device or CPU whose kernels do not read them.
    pub fn requantized8(&self) -> Result<Self> {
        let (words, scales, biases) = requantize8(self.rows, self.cols, |r, out| self.dequantize_row(r, out))?;
        let q = QuantizedMatrix::from_tensors(&words, &scales, &biases, 8, 32)?;
        Ok(Self { exact: self.exact, bf16_training: self.bf16_training, model_dtype: self.model_dtype, ..q })
    }
}
