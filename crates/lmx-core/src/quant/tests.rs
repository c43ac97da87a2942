//! Tests of the format (byte-exact packing, the quantizer) and the kernels (SIMD against
//! scalar, products against dequantized matmuls).

use super::*;

fn rand(rows: usize, cols: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).expect("randn")
}

#[test]
fn bitstream_layout_is_lsb_first() {
    // 4-bit: element k of a word sits at bits 4k..4k+3, the first in the lowest nibble.
    let mut w = vec![0u32; 1];
    for (k, v) in [1u64, 2, 3, 4, 5, 6, 7, 8].iter().enumerate() {
        put_bits(&mut w, k * 4, 4, *v);
    }
    assert_eq!(w[0], 0x8765_4321);
    // 3-bit: out[2] = (w0 >> 6) | ((w1 & 1) << 2) for elements spanning a byte boundary.
    let mut w = vec![0u32; 3];
    for k in 0..32 {
        put_bits(&mut w, k * 3, 3, (k % 8) as u64);
    }
    for k in 0..32 {
        assert_eq!(get_bits(&w, k * 3, 3), (k % 8) as u32);
    }
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    // Elements 0..8 = 0,1,..,7 in 24 bits: 0b111_110_101_100_011_010_001_000.
    assert_eq!(u32::from(bytes[0]) | u32::from(bytes[1]) << 8 | u32::from(bytes[2]) << 16, 0b111_110_101_100_011_010_001_000);
}

#[test]
fn zero_is_exact_and_scales_may_be_negative() {
    let g: Vec<f32> = (0..64).map(|i| i as f32 / 10.0 - 1.0).collect();
    let (s, b) = affine_params(&g, 4);
    // |min| = 1.0 < |max| = 5.3: edge = max, negative scale.
    assert!(s < 0.0 && b == 5.3);
    let q0 = (0.0 - b) / s;
    assert!((q0 - q0.round()).abs() < 1e-4, "0.0 must sit on the grid, q = {q0}");
}

/// Every bit width: quantization error within half a step, kernels equal dequantize + matmul.
/// The backward of the quantized matmul is `grad @ W` with W the dequantized matrix, for
/// every bit width, for row counts that leave partial blocks, and by finite differences.
#[test]
fn quantized_matmul_backward() -> Result<()> {
    for (bits, group) in [(4usize, 64usize), (8, 32), (3, 128), (2, 32)] {
        // 70 rows: one full block of 64 and a partial one.
        let q = Arc::new(QuantizedMatrix::quantize(&rand(70, 256), bits, group)?);
        let dq = q.dequantize()?;
        let x = candle_core::Var::from_tensor(&rand(5, 256))?;
        let y = q.matmul(x.as_tensor())?;
        let r = rand(5, 70);
        let grads = (y * &r)?.sum_all()?.backward()?;
        let got = grads.get(x.as_tensor()).expect("gradient of x");
        let want = r.matmul(&dq)?;
        let d = crate::gradcheck::max_abs_diff(got, &want)?;
        assert!(d < 1e-4, "bits {bits} group {group}: backward differs by {d}");
    }
    let q = Arc::new(QuantizedMatrix::quantize(&rand(24, 64), 4, 32)?);
    crate::gradcheck::check_grad(|x| q.matmul(x), &rand(3, 64), 1e-2)
}

#[test]
fn quantize_dequantize_and_matmul_all_bits() -> Result<()> {
    for bits in [2usize, 3, 4, 5, 6, 8] {
        for group in [32usize, 64, 128] {
            let w = rand(40, 256);
            let q = Arc::new(QuantizedMatrix::quantize(&w, bits, group)?);
            let dq = q.dequantize()?;
            let step = (w.max_all()?.to_scalar::<f32>()? - w.min_all()?.to_scalar::<f32>()?) / ((1 << bits) - 1) as f32;
            let err = (&dq - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // Snapping the scale so 0.0 is exact can stretch a step and clamp an end value.
            assert!(err <= step + 1e-5, "bits {bits} group {group}: error {err} > one step {step}");
            for m in [1usize, 3, 20] {
                let x = rand(m, 256);
                let want = x.matmul(&dq.t()?)?;
                let got = q.matmul(&x)?;
                let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // 4- and 8-bit products off the tape round activations to int8 (see Q8Act),
                // decoded rows always, more with the int8 product: error bounded by half a
                // step of x times sum |w|.
                let int8 = (bits == 4 || bits == 8 || kernels::runs_narrow(bits)) && (m <= 8 || kernels::q8_gemm_applies(&[&q]));
                let tol = if int8 { 0.5 * (4.5 / 127.0) * dq.abs()?.sum(1)?.max_all()?.to_scalar::<f32>()? } else { 1e-3 };
                assert!(d < tol, "bits {bits} group {group} m {m}: matmul differs by {d} (tolerance {tol})");
            }
            // Round trip through the checkpoint tensors.
            let (p, s, b) = q.to_tensors()?;
            let back = QuantizedMatrix::from_tensors(&p, &s, &b, bits, group)?;
            assert_eq!(back.packed, q.packed);
            // Widened for the integer kernels: 4 or 8 bits, every value the same.
            let wide = back.widened();
            assert_eq!(wide.bits, if bits <= 4 { 4 } else { 8 }, "bits {bits}");
            let same = wide.dequantize()?.flatten_all()?.to_vec1::<f32>()? == dq.flatten_all()?.to_vec1::<f32>()?;
            assert!(same, "bits {bits} group {group}: widened codes dequantize to other values");
        }
    }
    Ok(())
}

/// A batch of decoded tokens (one row per sequence), and a few tokens of one sequence, give
/// each row the bits it has alone, for every width, alone and with matrices sharing x.
#[test]
fn decoded_rows_equal_each_row_alone() -> Result<()> {
    for bits in [3usize, 4, 8] {
        for group in [32usize, 64, 128] {
            // 1,100 rows of 1,024 columns: several blocks of the batched walk per thread.
            let (a, b) = (Arc::new(QuantizedMatrix::quantize(&rand(1100, 1024), bits, group)?), Arc::new(QuantizedMatrix::quantize(&rand(36, 1024), bits, group)?));
            let x = rand(5, 1024);
            for dims in [(5, 1), (1, 5)] {
                let xb = x.reshape((dims.0, dims.1, 1024))?;
                let many = super::matmul_many(&[a.clone(), b.clone()], &xb)?;
                let single = a.matmul(&xb)?.reshape((5, 1100))?;
                for i in 0..5 {
                    let xi = x.narrow(0, i, 1)?.reshape((1, 1, 1024))?;
                    let alone = super::matmul_many(&[a.clone(), b.clone()], &xi)?;
                    for (got, want) in many.iter().zip(&alone) {
                        let got: Vec<f32> = got.reshape(((), got.dim(2)?))?.get(i)?.to_vec1()?;
                        assert_eq!(got, want.flatten_all()?.to_vec1::<f32>()?, "bits {bits} group {group} dims {dims:?}: row {i} in a batch differs from alone");
                    }
                    assert_eq!(single.get(i)?.to_vec1::<f32>()?, alone[0].flatten_all()?.to_vec1::<f32>()?, "bits {bits} group {group}: one matrix, row {i}");
                }
            }
        }
    }
    Ok(())
}

#[test]
#[cfg(target_arch = "x86_64")]
fn simd_group_dot_matches_scalar() -> Result<()> {
    let w = rand(4, 128);
    for bits in [4usize, 8] {
        let q = QuantizedMatrix::quantize(&w, bits, 64)?;
        let x: Vec<f32> = rand(1, 64).flatten_all()?.to_vec1()?;
        let words = 128 * bits / 32;
        for r in 0..4 {
            let row = &q.packed[r * words..(r + 1) * words];
            let (a, b) = kernels::scalar_group_dot(row, 64, bits, &x);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: features checked; the group lies inside the row.
                let (c, d) = unsafe { x86::group_dot(row, 64, bits, &x) };
                // f32 sums in another order: absolute and relative slack (8-bit codes reach
                // thousands).
                let close = |x: f32, y: f32, abs: f32| (x - y).abs() < abs + 1e-5 * y.abs();
                assert!(close(c, a, 1e-3) && close(d, b, 1e-4), "bits {bits}: {a} vs {c}");
                // The whole-row kernel over the second group with scale 2.
                let xs = [vec![0f32; 64], x.clone()].concat();
                // SAFETY: as above; the row holds 128 codes.
                let r2 = unsafe { x86::row_dot(row, bits, 64, &[0.0, 2.0], &xs) };
                assert!(close(r2, 2.0 * a, 2e-3), "bits {bits}: row {r2} vs {}", 2.0 * a);
            }
        }
    }
    Ok(())
}

#[test]
fn simd_dequantize_matches_scalar() -> Result<()> {
    let w = rand(2, 128);
    for bits in [4usize, 8] {
        let q = QuantizedMatrix::quantize(&w, bits, 64)?;
        let row = &q.packed[..128 * bits / 32];
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        kernels::scalar_dequantize_group(row, 64, bits, 0.37, -1.5, &mut a);
        kernels::dequantize_group(row, 64, bits, 0.37, -1.5, &mut b);
        assert_eq!(a, b, "bits {bits}");
    }
    Ok(())
}

/// The integer decode kernels of every instruction set this CPU has agree with the scalar
/// reference, for 4 and 8 bits, every group size, every scale dtype, and row lengths whose
/// group count is not a multiple of 8 or 16 (the kernels take 8 or 16 groups per step).
#[test]
fn int8_decode_kernels_match_scalar() -> Result<()> {
    use kernels::Level;
    let mut levels = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            levels.push(Level::Avx2);
        }
        if has!("avx2") && has!("fma") && has!("f16c") && has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
            levels.push(Level::Vnni);
            if has!("avx512bw") {
                levels.push(Level::Vnni512);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        levels.push(Level::Neon);
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            levels.push(Level::NeonDot);
        }
    }
    eprintln!("kernel levels compared with the scalar reference: {levels:?}");
    // 5 and 6 bits where this CPU reads them as stored (AVX-512 VBMI): the 512-bit
    // kernel against the scalar one (the other levels fall back to the scalar one).
    let narrow: Vec<usize> = [2usize, 3, 5, 6].into_iter().filter(|&b| kernels::runs_narrow(b)).collect();
    eprintln!("widths read as stored beside 4 and 8 bits: {narrow:?}");
    for bits in [4usize, 8].into_iter().chain(narrow) {
        for group in [32usize, 64, 128] {
            // 608 = 19 groups of 32: a last 8-bit (or narrower) run of 32 elements; 576
            // (SmolLM2's width): a last 4-bit run of 64 outside the 128-element spans of the
            // 512-bit kernel; 4224 = 33 groups of 128: steps of 16 groups and a last one of 1.
            for cols in [640usize, 1152, 608, 576, 4224] {
                if (cols == 608 && (bits == 4 || group != 32)) || cols % group != 0 {
                    continue;
                }
                for dtype in [DType::BF16, DType::F16, DType::F32] {
                    let q = QuantizedMatrix::quantize(&rand(7, cols).to_dtype(dtype)?, bits, group)?;
                    let x: Vec<f32> = rand(1, cols).flatten_all()?.to_vec1()?;
                    let act = kernels::Q8Act::new(&q, &x).expect("these rows take the integer kernels");
                    // 7 rows: the 4-row kernels, then one at a time.
                    let rows = 7;
                    let got: Vec<Vec<f32>> = levels
                        .iter()
                        .map(|&l| {
                            let mut out = vec![0f32; rows];
                            match (&q.scales, &q.biases) {
                                (GroupParams::Bf16(s), GroupParams::Bf16(b)) => kernels::rows_q8(l, &q.packed, bits, group, s, b, &act, &mut out),
                                (GroupParams::F16(s), GroupParams::F16(b)) => kernels::rows_q8(l, &q.packed, bits, group, s, b, &act, &mut out),
                                (GroupParams::F32(s), GroupParams::F32(b)) => kernels::rows_q8(l, &q.packed, bits, group, s, b, &act, &mut out),
                                _ => unreachable!("quantize gives scales and biases one dtype"),
                            }
                            out
                        })
                        .collect();
                    for (l, v) in levels.iter().zip(&got) {
                        for r in 0..rows {
                            assert!((v[r] - got[0][r]).abs() <= 1e-4 * (1.0 + got[0][r].abs()), "{bits}-bit g{group} cols {cols} {dtype:?} row {r}: {l:?} {} vs scalar {}", v[r], got[0][r]);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The two levels of int8 activations reconstruct x to within max|x| / 64516 per group,
/// also for a group holding an outlier 1000 times its other values (one level would zero
/// them), and the AVX-512 or AVX2 version (whichever this CPU takes) gives the scalar
/// reference's codes.
#[test]
fn two_level_activations_reconstruct_x() -> Result<()> {
    for bits in [4usize, 8] {
        for group in [32usize, 64, 128] {
            let cols = 640;
            let q = QuantizedMatrix::quantize(&rand(2, cols), bits, group)?;
            let mut x: Vec<f32> = rand(1, cols).flatten_all()?.to_vec1()?;
            x[5] = 1000.0;
            let a = kernels::Q8Act::new(&q, &x).expect("int8 activations");
            let mut scalar = kernels::Q8Act::new(&q, &x).expect("int8 activations");
            scalar.quantize_scalar(&x, group, bits);
            for (e, v) in x.iter().enumerate() {
                let g = e / group;
                let amax = x[g * group..(g + 1) * group].iter().fold(0f32, |m, v| m.max(v.abs()));
                let at = kernels::Q8Act::position(e, bits);
                for act in [&a, &scalar] {
                    let back = act.dx[g] * (f32::from(act.codes[at]) + f32::from(act.fine[at]) / kernels::FINE);
                    assert!((back - v).abs() <= amax / 64516.0 * 1.01 + 1e-7, "{bits}-bit g{group} element {e}: {v} came back as {back}");
                }
                // Ties may round either way after a fused multiply: codes agree to one step.
                assert!((i32::from(a.codes[at]) - i32::from(scalar.codes[at])).abs() <= 1 && (i32::from(a.fine[at]) - i32::from(scalar.fine[at])).abs() <= 1, "{bits}-bit g{group} element {e}");
            }
            for g in 0..cols / group {
                assert!((a.xsums[g] - scalar.xsums[g]).abs() <= 1e-3 * (1.0 + scalar.xsums[g].abs()));
                assert_eq!((a.code_sums[g], a.fine_sums[g]), (scalar.code_sums[g], scalar.fine_sums[g]), "{bits}-bit g{group} group {g}");
            }
        }
    }
    Ok(())
}

/// The int8 product of several rows (prefill) equals the scalar reference row by row, on
/// AVX-512 VNNI and (where the CPU has AMX-INT8) on AMX tiles: every bit width, group size
/// and scale dtype, matrix rows that leave a partial block of 16, rows of x that leave a
/// partial block of 8 or 16, and two matrices sharing their activations.
#[test]
fn int8_prefill_product_matches_scalar() -> Result<()> {
    let narrow = [2usize, 3, 5, 6].into_iter().filter(|&b| kernels::runs_narrow(b));
    for bits in [4usize, 8].into_iter().chain(narrow) {
        for group in [32usize, 64, 128] {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let cols = 640;
                let a = QuantizedMatrix::quantize(&rand(37, cols).to_dtype(dtype)?, bits, group)?;
                let b = QuantizedMatrix::quantize(&rand(20, cols).to_dtype(dtype)?, bits, group)?;
                if !kernels::q8_gemm_applies(&[&a, &b]) {
                    eprintln!("skipped: no AVX-512 VNNI on this CPU");
                    return Ok(());
                }
                for (m, amx) in [2usize, 9, 17, 33].into_iter().flat_map(|m| [(m, false), (m, true)]) {
                    let x: Vec<f32> = rand(m, cols).flatten_all()?.to_vec1()?;
                    let Some(y) = kernels::qmatmul_many_q8_with(amx, &[&a, &b], &x, m) else {
                        continue; // no AMX-INT8 here, or groups of 32
                    };
                    assert_eq!(y.iter().map(Vec::len).collect::<Vec<_>>(), [m * 37, m * 20]);
                    for i in 0..m {
                        let act = kernels::Q8Act::new(&a, &x[i * cols..(i + 1) * cols]).expect("int8 activations");
                        for (j, (q, r)) in (0..37).map(|r| (&a, r)).chain((0..20).map(|r| (&b, r))).enumerate() {
                            let (words, groups) = (cols * bits / 32, cols / group);
                            let row = &q.packed[r * words..(r + 1) * words];
                            let want = match (&q.scales, &q.biases) {
                                (GroupParams::Bf16(s), GroupParams::Bf16(bb)) => kernels::scalar_row_q8(row, bits, group, &s[r * groups..], &bb[r * groups..], &act),
                                (GroupParams::F16(s), GroupParams::F16(bb)) => kernels::scalar_row_q8(row, bits, group, &s[r * groups..], &bb[r * groups..], &act),
                                (GroupParams::F32(s), GroupParams::F32(bb)) => kernels::scalar_row_q8(row, bits, group, &s[r * groups..], &bb[r * groups..], &act),
                                _ => unreachable!("quantize gives scales and biases one dtype"),
                            };
                            let got = if j < 37 { y[0][i * 37 + j] } else { y[1][i * 20 + j - 37] };
                            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{bits}-bit g{group} {dtype:?} m {m} amx {amx} x row {i} out {j}: {got} vs scalar {want}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn shape_mismatch_names_both_shapes() -> Result<()> {
    let q = QuantizedMatrix::quantize(&rand(8, 64), 4, 64)?;
    let (p, s, b) = q.to_tensors()?;
    let err = QuantizedMatrix::from_tensors(&p, &s, &b, 4, 32).expect_err("wrong group size").to_string();
    assert!(err.contains("[8, 2]") && err.contains("[8, 1]"), "{err}");
    Ok(())
}

/// Decode kernel throughput on one thread (`cargo test --release -p lmx-core kernel_speed --
/// --ignored --nocapture`): GB/s of packed weights read, per kernel level, for SmolLM2's
/// and a 1B model's matrix shapes. A measurement, not a check.
#[test]
#[ignore]
fn kernel_speed() -> Result<()> {
    use kernels::Level;
    // Groups of 32: GGUF's Q4_0/Q4_1/Q8_0 blocks (the default model's file), kept as affine groups.
    for (rows, cols, bits, gs) in [
        (1536usize, 576usize, 4usize, 64usize),
        (1536, 576, 4, 32),
        (49152, 576, 4, 64),
        (49152, 576, 4, 32),
        (1536, 576, 8, 64),
        (1536, 576, 8, 32),
        (49152, 576, 8, 64),
        (8192, 2048, 4, 64),
        (8192, 2048, 4, 32),
        (2048, 8192, 4, 64),
        (2048, 8192, 4, 32),
        (8192, 2048, 8, 64),
        (262144, 576, 4, 64),
        (16384, 8192, 4, 64),
        (16384, 8192, 4, 32),
        (2048, 8192, 8, 64),
        (16384, 8192, 8, 64),
        (8192, 2048, 6, 64),
        (2048, 8192, 6, 64),
        (16384, 8192, 6, 64),
        (16384, 8192, 5, 64),
        (49152, 576, 6, 64),
    ] {
        if !matches!(bits, 4 | 8) && !kernels::runs_narrow(bits) {
            continue;
        }
        let q = QuantizedMatrix::quantize(&rand(rows, cols).to_dtype(DType::BF16)?, bits, gs)?;
        if !matches!(bits, 4 | 8) {
            // The same matrix widened to 4 or 8 bits (what CPUs without VBMI run), beside.
            let wide = q.clone().widened();
            let (gbs, us) = kernel_rate(&wide, Level::Vnni512)?;
            println!("{rows}x{cols} {bits}-bit g{gs} widened to {}: {gbs:.1} GB/s, {us:.0} us", wide.bits);
        }
        let best = kernels::level();
        let levels = [Level::Scalar, Level::Avx2, Level::Vnni, Level::Vnni512];
        // Levels up to this CPU's best (the ones above it would not run here).
        for level in levels.into_iter().take(levels.iter().position(|&l| l == best).map_or(1, |i| i + 1)) {
            // Scalar for large matrices, and levels that run other widths than 4 and 8 bits
            // through the scalar kernel: too slow to measure.
            if (level == Level::Scalar && rows > 2000) || (level != Level::Vnni512 && !matches!(bits, 4 | 8)) {
                continue;
            }
            let (gbs, us) = kernel_rate(&q, level)?;
            println!("{rows}x{cols} {bits}-bit g{gs} {level:?}: {gbs:.1} GB/s, {us:.0} us");
        }
    }
    Ok(())
}

/// [`kernel_speed`]'s measure of one matrix (bf16 scales) through `level`'s decode kernel,
/// repeated over ~2 GB of reads: (GB/s of codes and scales, microseconds a pass).
fn kernel_rate(q: &QuantizedMatrix, level: kernels::Level) -> Result<(f64, f64)> {
    let x: Vec<f32> = rand(1, q.cols).flatten_all()?.to_vec1()?;
    let act = kernels::Q8Act::new(q, &x).expect("int8 path");
    let (GroupParams::Bf16(s), GroupParams::Bf16(b)) = (&q.scales, &q.biases) else { unreachable!("kernel_speed quantizes bf16") };
    let bytes = (q.packed.len() * 4 + s.len() * 4) as f64;
    let reps = (2e9 / bytes) as usize + 1;
    let mut out = vec![0f32; q.rows];
    let t = std::time::Instant::now();
    for _ in 0..reps {
        kernels::rows_q8(level, &q.packed, q.bits, q.group_size, s, b, &act, &mut out);
    }
    let dt = t.elapsed().as_secs_f64();
    Ok((bytes * reps as f64 / dt / 1e9, dt / reps as f64 * 1e6))
}

/// Matrices sharing one input in one step (`matmul_many`) give each matrix's own product,
/// also when their bit widths or group sizes differ (mixed-precision layers): a decoded token,
/// and a prompt's rows (the int8 product writing each matrix's own output), in bf16 and f32.
#[test]
fn shared_input_products_equal_separate_ones() -> Result<()> {
    let all: Vec<Arc<QuantizedMatrix>> = [(40usize, 4usize, 64usize), (24, 4, 64), (17, 8, 32), (9, 3, 64)]
        .iter()
        .map(|&(rows, bits, g)| QuantizedMatrix::quantize(&rand(rows, 256).to_dtype(DType::BF16)?, bits, g).map(Arc::new))
        .collect::<Result<_>>()?;
    // Without the 3-bit matrix every one fits the int8 product, so a prompt takes it together.
    for qs in [&all[..], &all[..3]] {
        for (tokens, dtype) in [(1usize, DType::BF16), (12, DType::BF16), (12, DType::F32), (19, DType::BF16)] {
            let x = rand(tokens, 256).to_dtype(dtype)?.reshape((1, tokens, 256))?;
            let together = matmul_many(qs, &x)?;
            assert_eq!(together.len(), qs.len());
            for (q, y) in qs.iter().zip(&together) {
                let alone = q.matmul(&x)?;
                assert_eq!((y.dims(), y.dtype()), (alone.dims(), dtype));
                assert!(y.is_contiguous());
                let d = (y.to_dtype(DType::F32)? - alone.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "{}-bit rows differ by {d} ({tokens} tokens, {dtype:?}, {} matrices)", q.bits, qs.len());
            }
        }
    }
    Ok(())
}

/// Decode activations kept between products ([`kernels::Q8Act::recycle`]) give the same
/// products as fresh ones: each matrix's decoded token is computed first with nothing kept,
/// then again after products of other shapes with the same column count (other group sizes,
/// 4-bit activations paired and 8-bit ones not) and of other inputs have left their
/// activations on this thread.
#[test]
fn reused_decode_activations_equal_fresh_ones() -> Result<()> {
    let shapes = [(48usize, 512usize, 4usize, 64usize), (32, 512, 4, 128), (40, 512, 8, 64), (24, 576, 4, 64), (16, 512, 8, 128)];
    let qs: Vec<QuantizedMatrix> = shapes.iter().map(|&(rows, cols, bits, g)| QuantizedMatrix::quantize(&rand(rows, cols), bits, g)).collect::<Result<_>>()?;
    let inputs: Vec<Vec<f32>> = qs.iter().map(|q| rand(1, q.cols).flatten_all()?.to_vec1::<f32>()).collect::<Result<_>>()?;
    let first: Vec<Vec<f32>> = qs.iter().zip(&inputs).map(|(q, x)| kernels::qmatvec_many(&[q], x, 1)).collect();
    for round in 0..3 {
        for (i, (q, x)) in qs.iter().zip(&inputs).enumerate().rev() {
            // A different input of the same shape in between: its codes must not linger.
            let other: Vec<f32> = x.iter().map(|v| -2.0 * v + 0.5).collect();
            kernels::qmatvec_many(&[q], &other, 1);
            assert_eq!(kernels::qmatvec_many(&[q], x, 1), first[i], "round {round}, shape {:?}", shapes[i]);
        }
    }
    Ok(())
}

/// MXFP4 words and scales as `mx.quantize(w, group_size=32, bits=4, mode="mxfp4")` (MLX 0.32)
/// writes them give back MLX's values exactly, through the 8-bit affine form they are held in.
#[test]
fn mxfp4_gives_mlx_values_exactly() -> Result<()> {
    // MLX: [0.5, -1, 6, 3, 0...] -> word 0x57a1, scale 127; [.., .., .., 100, 0...] -> 0x5000,
    // scale 132 (3 * 2^5 = 96). Every code at the smallest and a large exponent; 255 is NaN.
    let mut words = vec![0u32; 4 * 4];
    words[0] = 0x57a1;
    words[4] = 0x5000;
    words[8] = 0xfedc_ba98;
    words[9] = 0x7654_3210;
    words[12] = 0x1;
    let packed = Tensor::from_vec(words, (4, 4), &Device::Cpu)?;
    let scales = Tensor::new(&[[127u8], [132], [0], [255]], &Device::Cpu)?;
    let m = QuantizedMatrix::from_mxfp4(&packed, &scales, DType::F32)?;
    let d = m.dequantize()?.to_vec2::<f32>()?;
    assert_eq!(&d[0][..5], &[0.5, -1.0, 6.0, 3.0, 0.0]);
    assert_eq!(&d[1][..4], &[0.0, 0.0, 0.0, 96.0]);
    let tiny = 2f32.powi(-127);
    let want: Vec<f32> = [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0].iter().map(|v| v * tiny).collect();
    assert_eq!(&d[2][..16], want.as_slice());
    assert!(d[2][16..].iter().all(|v| *v == 0.0));
    assert!(d[3][0].is_nan(), "scale 255 is NaN");
    // Products on the packed form agree with the dequantized matmul. The int8 activations
    // (see Q8Act) carry an error proportional to scale * sum of codes, which this affine form's
    // offset codes (12 for a zero) make large against the outputs; integer x with a 127 in
    // each row is coded exactly, so any difference is the conversion's (random x failed
    // about one run in twenty).
    let x: Vec<f32> = (0..3 * 32).map(|i| if i % 32 == 0 { 127.0 } else { ((i * 37) % 255) as f32 - 127.0 }).collect();
    let x = Tensor::from_vec(x, (3, 32), &Device::Cpu)?;
    let dense = m.dequantize()?.narrow(0, 0, 2)?;
    let got = Arc::new(m).matmul(&x)?.narrow(1, 0, 2)?;
    let want = x.matmul(&dense.t()?)?;
    let largest = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff <= 1e-6 * largest, "product differs by {diff} (largest {largest})");
    Ok(())
}

/// On the GPU, a matrix whose scales and biases are bf16 (held there as two bf16 in a word)
/// gives exactly what the same values held as f32 pairs give, in every product (integer
/// decode kernels, a shared input, dequantize + cuBLAS, rows, the transposed product), and the
/// CPU's result within the int8 activations' error. Skipped without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn bf16_pairs_on_the_gpu_equal_f32_pairs() -> Result<()> {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no GPU: skipped");
        return Ok(());
    };
    let widen = |p: &GroupParams| match p {
        GroupParams::Bf16(v) => GroupParams::F32(v.iter().map(|x| x.to_f32()).collect()),
        other => other.clone(),
    };
    let host = |t: Tensor| -> Result<Tensor> { t.to_device(&Device::Cpu)?.to_dtype(DType::F32) };
    for (bits, group) in [(4usize, 64usize), (8, 32), (3, 64)] {
        let half = Arc::new(QuantizedMatrix::quantize(&rand(72, 512).to_dtype(DType::BF16)?, bits, group)?);
        assert!(matches!(half.scales, GroupParams::Bf16(_)));
        let mut wide = (*half).clone();
        (wide.scales, wide.biases) = (widen(&half.scales), widen(&half.biases));
        let wide = Arc::new(wide);
        let other = Arc::new(QuantizedMatrix::quantize(&rand(40, 512).to_dtype(DType::BF16)?, bits, group)?);
        // The bf16 format is in use (else both sides would run the f32 kernels).
        assert!(half.device_copy(&gpu)?.pairs16() != (std::env::var("LMX_CUDA_SB16").as_deref() == Ok("0")));
        assert!(!wide.device_copy(&gpu)?.pairs16());
        for m in [1usize, 3, 16] {
            let x = rand(m, 512).to_dtype(DType::BF16)?;
            let xg = x.to_device(&gpu)?;
            let (a, b) = (host(half.matmul(&xg)?)?, host(wide.matmul(&xg)?)?);
            let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{bits}-bit, {m} rows: bf16 and f32 pairs differ by {d}");
            let cpu = host(half.matmul(&x)?)?;
            let scale = cpu.abs()?.max_all()?.to_scalar::<f32>()?;
            let e = (&a - &cpu)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(e <= 0.02 * scale, "{bits}-bit, {m} rows: GPU and CPU differ by {e} (largest {scale})");
            let many = matmul_many(&[half.clone(), other.clone()], &xg)?;
            assert_eq!((&host(many[0].clone())? - &a)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{bits}-bit shared input");
            // Pair formats mixed in one shared input: each matrix still gives its own product.
            let mixed = matmul_many(&[half.clone(), wide.clone()], &xg)?;
            assert_eq!((&host(mixed[0].clone())? - &a)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{bits}-bit mixed formats");
            assert_eq!((&host(mixed[1].clone())? - &b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{bits}-bit mixed formats");
            let g = rand(m, 72).to_dtype(DType::BF16)?.to_device(&gpu)?;
            let (ta, tb) = (host(half.matmul_t(&g)?)?, host(wide.matmul_t(&g)?)?);
            assert_eq!((&ta - &tb)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{bits}-bit transposed product");
        }
        let ids = Tensor::new(&[5u32, 0, 71], &gpu)?;
        // Rows come in the matrix's dtype (its scales'): the f32 one's rounded as the bf16
        // one's kernel rounds.
        let (ra, rb) = (host(half.rows_of(&ids)?)?, host(wide.rows_of(&ids)?.to_dtype(DType::BF16)?)?);
        assert_eq!((&ra - &rb)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{bits}-bit rows");
    }
    Ok(())
}

/// Prefill product throughput (`cargo test --release -p lmx-core prefill_product_speed --
/// --ignored --nocapture`): multiply-adds a second of the int8 product of 128 activation rows,
/// AVX-512 VNNI against AMX tiles, for SmolLM2's and a 1B model's matrix shapes, on the
/// decode pool's threads (`RAYON_NUM_THREADS`). A measurement, not a check.
#[test]
#[ignore]
fn prefill_product_speed() -> Result<()> {
    for (rows, cols, bits, m) in [(1536usize, 576usize, 4usize, 128usize), (1536, 576, 4, 4), (1536, 576, 4, 16), (576, 1536, 4, 128), (1536, 576, 8, 128), (8192, 2048, 4, 128), (2048, 8192, 4, 128)]
    {
        let q = QuantizedMatrix::quantize(&rand(rows, cols).to_dtype(DType::BF16)?, bits, 64)?;
        let x: Vec<f32> = rand(m, cols).flatten_all()?.to_vec1()?;
        let macs = (m * rows * cols) as f64;
        let reps = (4e9 / macs) as usize + 1;
        for amx in [false, true] {
            if kernels::qmatmul_many_q8_with(amx, &[&q], &x, m).is_none() {
                continue;
            }
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(kernels::qmatmul_many_q8_with(amx, &[&q], &x, m));
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!("{rows}x{cols} {bits}-bit m {m} amx {amx}: {:.1} GMAC/s, {:.0} us", macs / dt / 1e9, dt * 1e6);
        }
    }
    Ok(())
}
