//! Portable CPU kernels for packed weights: products with a block of dequantized rows fed to
//! gemm (prefill, backward), a row-at-a-time product for one token (decode, with int8
//! activations where the x86 kernel can use them), and group dequantization.

use super::{get_bits, GroupParams, QuantizedMatrix};
use crate::cpu::SendPtr;
use rayon::prelude::*;

/// Rows of W dequantized together for a multi-row product (fits in L2 at 4 KiB columns).
const BLOCK_ROWS: usize = 64;

/// y (m, rows) = x (m, cols) @ W^T.
pub fn qmatmul(q: &QuantizedMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * q.rows];
    if m == 1 {
        // sum_g b_g * sum(x_g) does not depend on the row: sum x per group once.
        let xsums: Vec<f32> = x.chunks(q.group_size).map(|g| g.iter().sum()).collect();
        let x_q8 = quantize_activations(q, x);
        y.par_chunks_mut(16).enumerate().for_each(|(c, ys)| {
            let groups = q.cols / q.group_size;
            let (mut s, mut b) = (vec![0f32; groups], vec![0f32; groups]);
            for (i, out) in ys.iter_mut().enumerate() {
                *out = row_dot(q, c * 16 + i, x, x_q8.as_ref(), &xsums, &mut s, &mut b);
            }
        });
        return y;
    }
    // Several rows of x: dequantize a block of W rows into a scratch buffer and hand it to
    // gemm; the full dequantized matrix never exists.
    let n_blocks = q.rows.div_ceil(BLOCK_ROWS);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n_blocks).into_par_iter().for_each(|blk| {
        let r0 = blk * BLOCK_ROWS;
        let nr = BLOCK_ROWS.min(q.rows - r0);
        let mut scratch = vec![0f32; nr * q.cols];
        for (i, row) in scratch.chunks_mut(q.cols).enumerate() {
            q.dequantize_row(r0 + i, row);
        }
        // SAFETY: each block writes only columns r0..r0 + nr of y (disjoint across tasks);
        // strides describe x (m, cols) row-major, scratch^T (cols, nr) and y (m, rows).
        unsafe {
            gemm::gemm(
                m,
                nr,
                q.cols,
                y_ptr.get().add(r0),
                1,
                q.rows as isize,
                false,
                x.as_ptr(),
                1,
                q.cols as isize,
                scratch.as_ptr(),
                q.cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    y
}

/// gx (m, cols) = g (m, rows) @ W. Tasks own disjoint column ranges (whole groups) of gx
/// and walk W's rows in blocks, dequantizing only their columns of each block.
pub fn qmatmul_t(q: &QuantizedMatrix, g: &[f32], m: usize) -> Vec<f32> {
    let mut gx = vec![0f32; m * q.cols];
    let n_groups = q.cols / q.group_size;
    let tasks = (4 * rayon::current_num_threads()).clamp(1, n_groups);
    let groups_per_task = n_groups.div_ceil(tasks);
    let gx_ptr = SendPtr(gx.as_mut_ptr());
    (0..n_groups.div_ceil(groups_per_task)).into_par_iter().for_each(|t| {
        let g0 = t * groups_per_task;
        let g1 = (g0 + groups_per_task).min(n_groups);
        let (c0, width) = (g0 * q.group_size, (g1 - g0) * q.group_size);
        let mut scratch = vec![0f32; BLOCK_ROWS * width];
        for r0 in (0..q.rows).step_by(BLOCK_ROWS) {
            let nr = BLOCK_ROWS.min(q.rows - r0);
            for (i, row) in scratch.chunks_mut(width).take(nr).enumerate() {
                q.dequantize_row_groups(r0 + i, g0..g1, row);
            }
            // SAFETY: this task alone writes columns c0..c0 + width of gx (m, cols);
            // g is (m, rows) row-major and scratch (nr, width) row-major.
            unsafe {
                gemm::gemm(
                    m,
                    width,
                    nr,
                    gx_ptr.get().add(c0),
                    1,
                    q.cols as isize,
                    r0 > 0,
                    g.as_ptr().add(r0),
                    1,
                    q.rows as isize,
                    scratch.as_ptr(),
                    1,
                    width as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    gx
}

/// True when the AVX-512 (F + BW) 4-bit kernel should run: the CPU has it and
/// `LMX_AVX512=1` asks for it. It is opt-in because on the Zen 4 development machine it
/// measured 0.63x the speed of the AVX2 kernel (docs/BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::env::var_os("LMX_AVX512").is_some_and(|v| v == "1"))
}

/// A 4-bit row against int8 activations, on the widest kernel that runs here.
#[cfg(target_arch = "x86_64")]
fn int8_row<S: super::Scale>(row: &[u32], group_size: usize, s: &[S], b: &[S], xsums: &[f32], xq: &Q8Activations) -> f32 {
    if avx512() {
        // SAFETY: AVX-512F/BW are available (checked); one scale, bias and x-sum per group.
        return unsafe { super::x86::row_dot_4bit_q8_avx512(row, group_size, s, b, xsums, &xq.codes, &xq.scales) };
    }
    // SAFETY: Q8Activations exist only where AVX2 and FMA are available; `row` holds one
    // 4-bit code per activation code.
    unsafe { super::x86::row_dot_4bit_q8(row, group_size, s, b, xsums, &xq.codes, &xq.scales) }
}

/// x quantized to int8 for the 4-bit AVX2 kernel, per block of 64 elements: a scale
/// `dx = max|x| / 127` and 64 codes ordered [even elements][odd elements], the order in
/// which a 32-byte block of 4-bit weights splits into low and high nibbles. This is
/// llama.cpp's trick (its Q8 activations): integer multiply-adds take 4 instructions per 32
/// weights where widening to f32 takes 12, which makes decode memory-bound instead of
/// compute-bound. The cost is one 8-bit rounding of each activation (relative error
/// ~0.4% of the block maximum); prefill keeps the exact f32 path.
pub struct Q8Activations {
    codes: Vec<i8>,
    scales: Vec<f32>,
}

/// (codes, scales) of [`quantize_activations`], for the kernel tests.
#[cfg(test)]
pub fn quantize_activations_for_test(q: &QuantizedMatrix, x: &[f32]) -> Option<(Vec<i8>, Vec<f32>)> {
    quantize_activations(q, x).map(|a| (a.codes, a.scales))
}

fn quantize_activations(q: &QuantizedMatrix, x: &[f32]) -> Option<Q8Activations> {
    #[cfg(target_arch = "x86_64")]
    if q.bits == 4 && q.group_size % 64 == 0 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let mut codes = Vec::with_capacity(x.len());
        let mut scales = Vec::with_capacity(x.len() / 64);
        for block in x.chunks_exact(64) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dx = amax / 127.0;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            let code = |v: &f32| (v * inv).round() as i8;
            codes.extend(block.iter().step_by(2).map(code));
            codes.extend(block.iter().skip(1).step_by(2).map(code));
            scales.push(dx);
        }
        return Some(Q8Activations { codes, scales });
    }
    let _ = (q, x);
    None
}

/// One output of a single-row product: sum over groups of scale * (x . q) + bias * sum(x).
/// `s`, `b` are scratch buffers of one f32 per group.
#[allow(clippy::too_many_arguments)]
fn row_dot(q: &QuantizedMatrix, r: usize, x: &[f32], x_q8: Option<&Q8Activations>, xsums: &[f32], s: &mut [f32], b: &mut [f32]) -> f32 {
    let words = q.cols * q.bits / 32;
    let row = &q.packed[r * words..(r + 1) * words];
    let groups = s.len();
    #[cfg(target_arch = "x86_64")]
    if let Some(xq) = x_q8 {
        let rg = r * groups..(r + 1) * groups;
        match (&q.scales, &q.biases) {
            (GroupParams::Bf16(sv), GroupParams::Bf16(bv)) => return int8_row(row, q.group_size, &sv[rg.clone()], &bv[rg], xsums, xq),
            (GroupParams::F16(sv), GroupParams::F16(bv)) => return int8_row(row, q.group_size, &sv[rg.clone()], &bv[rg], xsums, xq),
            (GroupParams::F32(sv), GroupParams::F32(bv)) => return int8_row(row, q.group_size, &sv[rg.clone()], &bv[rg], xsums, xq),
            // Scales and biases of different dtypes: the float path below.
            _ => {}
        }
    }
    q.scales.fill(r * groups, s);
    q.biases.fill(r * groups, b);
    let bias_part: f32 = b.iter().zip(xsums).map(|(b, xs)| b * xs).sum();
    #[cfg(target_arch = "x86_64")]
    if (q.bits == 4 || q.bits == 8) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked above); `row` holds `cols` codes.
        return unsafe { super::x86::row_dot(row, q.bits, q.group_size, s, x) } + bias_part;
    }
    let mut acc = 0f32;
    for (g, sg) in s.iter().enumerate() {
        let (dot, _) = scalar_group_dot(row, g * q.group_size, q.bits, &x[g * q.group_size..(g + 1) * q.group_size]);
        acc += sg * dot;
    }
    acc + bias_part
}

/// Portable reference for the SIMD group dot product: (sum x_i * q_i, sum x_i).
pub fn scalar_group_dot(row: &[u32], start: usize, bits: usize, x: &[f32]) -> (f32, f32) {
    let (mut dot, mut xsum) = (0f32, 0f32);
    for (i, xi) in x.iter().enumerate() {
        dot += xi * get_bits(row, (start + i) * bits, bits) as f32;
        xsum += xi;
    }
    (dot, xsum)
}

/// Dequantizes one group (`out.len()` elements from element `start`).
pub fn dequantize_group(row: &[u32], start: usize, bits: usize, scale: f32, bias: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if (bits == 4 || bits == 8) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked above); the group lies inside `row`.
        unsafe { super::x86::dequantize_group(row, start, bits, scale, bias, out) };
        return;
    }
    scalar_dequantize_group(row, start, bits, scale, bias, out);
}

/// Portable reference for [`dequantize_group`].
pub fn scalar_dequantize_group(row: &[u32], start: usize, bits: usize, scale: f32, bias: f32, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        // Fused multiply-add, as the SIMD path computes it.
        *o = (get_bits(row, (start + i) * bits, bits) as f32).mul_add(scale, bias);
    }
}
