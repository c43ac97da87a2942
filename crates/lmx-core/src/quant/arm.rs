//! NEON versions of the integer decode kernels (aarch64; NEON is part of the base ISA, the
//! `sdot` dot-product instruction is detected at run time). The arithmetic is that of
//! `kernels::scalar_row_q8`: per group, the integer sum of codes times int8 activation codes,
//! then `scale * dx * sum + bias * sum(x)` in f32.

use std::arch::aarch64::*;

use super::kernels::Q8Act;
use super::Scale;

/// How 16 codes meet 16 activation codes: i32 partial sums in 4 lanes (only their total
/// matters).
trait Dot {
    unsafe fn dot16(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
}

/// Widening multiplies and pairwise adds (any aarch64).
struct Plain;

impl Dot for Plain {
    #[inline]
    unsafe fn dot16(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is part of every aarch64 CPU; register-only arithmetic.
        unsafe {
            let lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
            let hi = vmull_high_s8(w, x);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// `sdot` (ARMv8.2 dot product; its intrinsic is not stable Rust yet, the instruction is).
struct DotProd;

impl Dot for DotProd {
    #[inline]
    #[target_feature(enable = "dotprod")]
    unsafe fn dot16(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only arithmetic; the caller guarantees the CPU has `dotprod`.
        unsafe { std::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) w, in(vreg) x, options(pure, nomem, nostack)) };
        acc
    }
}

/// The integer sum of group `g` of a 4- or 8-bit row.
///
/// # Safety
/// The group lies inside `row` and the activation codes; for 4 bits the row length is a
/// multiple of 64.
#[inline]
unsafe fn group_sum<D: Dot>(row: *const u8, x: *const i8, bits: usize, group_size: usize, g: usize) -> i32 {
    // SAFETY: every load below reads 16 bytes inside the group's codes.
    unsafe {
        let mut acc = vdupq_n_s32(0);
        if bits == 4 {
            let mask = vdupq_n_u8(0x0F);
            // A 64-element run is 32 bytes: low nibbles the even elements, high nibbles the
            // odd ones; its activation codes are [32 even][32 odd]. A group of 32 is half a run.
            let start = g * group_size;
            for e in (start..start + group_size).step_by(32) {
                let (run, half) = (e / 64 * 64, (e % 64) / 32);
                let w = vld1q_u8(row.add(run / 2 + 16 * half));
                let lo = vreinterpretq_s8_u8(vandq_u8(w, mask));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
                acc = D::dot16(acc, lo, vld1q_s8(x.add(run + 16 * half)));
                acc = D::dot16(acc, hi, vld1q_s8(x.add(run + 32 + 16 * half)));
            }
        } else {
            // Codes 0..=255 as codes - 128 (an i8); 128 * sum(x codes) is added back.
            let offset = vdupq_n_u8(0x80);
            let start = g * group_size;
            for e in (start..start + group_size).step_by(16) {
                let w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(row.add(e)), offset));
                acc = D::dot16(acc, w, vld1q_s8(x.add(e)));
            }
        }
        vaddvq_s32(acc)
    }
}

/// One output of a 4- or 8-bit row against int8 activations.
///
/// # Safety
/// `row` holds the codes of one row of `act.codes.len()` elements; `s` and `b` start at the
/// row's first group; for 4 bits the row length is a multiple of 64.
#[inline]
unsafe fn row<S: Scale, D: Dot>(row: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &Q8Act) -> f32 {
    let (w, x, xf) = (row.as_ptr() as *const u8, act.codes.as_ptr(), act.fine.as_ptr());
    let groups = act.codes.len() / group_size;
    let mut total = 0f32;
    for g in 0..groups {
        // SAFETY: forwarded from the caller.
        let (mut isum, mut fsum) = unsafe { (group_sum::<D>(w, x, bits, group_size, g), group_sum::<D>(w, xf, bits, group_size, g)) };
        if bits == 8 {
            isum += 128 * act.code_sums[g];
            fsum += 128 * act.fine_sums[g];
        }
        let isum = isum as f32 + fsum as f32 * (1.0 / super::kernels::FINE);
        total += s[g].f32() * act.dx[g] * isum + b[g].f32() * act.xsums[g];
    }
    total
}

/// `out.len()` consecutive outputs; `dotprod` says whether the CPU has `sdot`.
///
/// # Safety
/// `rows` holds `out.len()` rows of `act.codes.len()` codes; `s` and `b` start at the first
/// row's first group and hold every group of those rows; for 4 bits the row length is a
/// multiple of 64; with `dotprod`, the CPU has the dot-product extension.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_q8<S: Scale>(dotprod: bool, rows: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &Q8Act, out: &mut [f32]) {
    let (words, groups) = (act.codes.len() * bits / 32, act.codes.len() / group_size);
    for (r, o) in out.iter_mut().enumerate() {
        let (rw, rs, rb) = (&rows[r * words..(r + 1) * words], &s[r * groups..], &b[r * groups..]);
        // SAFETY: forwarded from the caller.
        *o = unsafe {
            if dotprod {
                row_dot(rw, bits, group_size, rs, rb, act)
            } else {
                row::<S, Plain>(rw, bits, group_size, rs, rb, act)
            }
        };
    }
}

/// [`row`] compiled with the dot-product extension.
///
/// # Safety
/// The CPU has `dotprod`; otherwise as [`row`].
#[target_feature(enable = "dotprod")]
unsafe fn row_dot<S: Scale>(rw: &[u32], bits: usize, group_size: usize, s: &[S], b: &[S], act: &Q8Act) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe { row::<S, DotProd>(rw, bits, group_size, s, b, act) }
}
