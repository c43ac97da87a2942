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
            for m in [1usize, 3] {
                let x = rand(m, 256);
                let want = x.matmul(&dq.t()?)?;
                let got = q.matmul(&x)?;
                let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // 4-bit decode with group sizes of 64+ rounds activations to int8 (see
                // Q8Activations): error bounded by half a step of x times sum |w|.
                let int8_decode = bits == 4 && m == 1 && group % 64 == 0;
                let tol = if int8_decode { 0.5 * (4.5 / 127.0) * dq.abs()?.sum(1)?.max_all()?.to_scalar::<f32>()? } else { 1e-3 };
                assert!(d < tol, "bits {bits} group {group} m {m}: matmul differs by {d} (tolerance {tol})");
            }
            // Round trip through the checkpoint tensors.
            let (p, s, b) = q.to_tensors()?;
            let back = QuantizedMatrix::from_tensors(&p, &s, &b, bits, group)?;
            assert_eq!(back.packed, q.packed);
        }
    }
    Ok(())
}

#[test]
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
                assert!((a - c).abs() < 1e-3 && (b - d).abs() < 1e-4, "bits {bits}: {a} vs {c}");
                // The whole-row kernel over the second group with scale 2.
                let xs = [vec![0f32; 64], x.clone()].concat();
                // SAFETY: as above; the row holds 128 codes.
                let r2 = unsafe { x86::row_dot(row, bits, 64, &[0.0, 2.0], &xs) };
                assert!((r2 - 2.0 * a).abs() < 2e-3, "bits {bits}: row {r2} vs {}", 2.0 * a);
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

/// The AVX-512 and AVX2 4-bit decode kernels agree (odd and even block counts).
#[test]
#[cfg(target_arch = "x86_64")]
fn avx512_matches_avx2() -> Result<()> {
    if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx2")) {
        return Ok(());
    }
    for cols in [192usize, 256] {
        let w = rand(3, cols).to_dtype(DType::BF16)?;
        let q = QuantizedMatrix::quantize(&w, 4, 64)?;
        let x: Vec<f32> = rand(1, cols).flatten_all()?.to_vec1()?;
        let xq = kernels::quantize_activations_for_test(&q, &x).expect("avx2 machine");
        let xsums: Vec<f32> = x.chunks(64).map(|g| g.iter().sum()).collect();
        let (GroupParams::Bf16(sv), GroupParams::Bf16(bv)) = (&q.scales, &q.biases) else { panic!("bf16 scales") };
        let words = cols / 8;
        let groups = cols / 64;
        for r in 0..3 {
            let row = &q.packed[r * words..(r + 1) * words];
            let (sr, br) = (&sv[r * groups..(r + 1) * groups], &bv[r * groups..(r + 1) * groups]);
            // SAFETY: features checked above; sizes match.
            let (a, b) = unsafe { (x86::row_dot_4bit_q8(row, 64, sr, br, &xsums, &xq.0, &xq.1), x86::row_dot_4bit_q8_avx512(row, 64, sr, br, &xsums, &xq.0, &xq.1)) };
            assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "cols {cols} row {r}: avx2 {a} vs avx512 {b}");
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
