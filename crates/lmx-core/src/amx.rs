//! Intel AMX (Advanced Matrix Extensions) for bf16 products: tile registers of 16 rows x 64
//! bytes and `tdpbf16ps`, a 16 x 16 x 32 bf16 product into f32 in one instruction (16 times the
//! work of an AVX-512 `vdpbf16ps`). Linux hands the tile state to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`usable`] asks once. The operands' layouts are those
//! of `bf16_gemm`: x step by step (its `x_tiles`), W's panels as pair rows of 32 columns. AMX-INT8's
//! `tdpbusd` (16 x 16 x 64 unsigned-by-signed bytes into i32) serves the quantized prefill
//! product ([`int8_group`]).

/// A zeroed buffer of 32-bit words that starts on a 64-byte boundary, for the operands of tile
/// loads: a tile row that straddles two cache lines loads at a third of the speed (a
/// `block_32x32` step took 110 ns with rows 16 bytes off a line against 35 ns aligned, on
/// the Xeon measured; docs/BENCHMARKS.md, session 23). Strides must be multiples of 64
/// bytes too.
#[derive(Clone, Debug, Default)]
pub struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
struct Line([u32; 16]);

impl Aligned {
    /// `len` zero words.
    pub fn zeroed(len: usize) -> Self {
        Self { lines: vec![Line([0; 16]); len.div_ceil(16)], len }
    }

    /// `len` zero words, written by the decode pool's threads (a packed training operand of
    /// megabytes zeroed on one thread, page faults included, had taken ~2% of a QLoRA step
    /// while the pool's worker waited).
    pub fn zeroed_on_pool(len: usize) -> Self {
        let n = len.div_ceil(16);
        let mut lines: Vec<Line> = Vec::with_capacity(n);
        let dst = crate::cpu::SendPtr(lines.as_mut_ptr());
        // 1,024 lines (64 KiB) at least per thread.
        crate::cpu::parallel_ranges(n, 1024, |r| {
            // SAFETY: lines r of the n allocated belong to this range alone; all-zero bytes
            // are a valid Line.
            unsafe { std::ptr::write_bytes(dst.get().add(r.start), 0, r.len()) };
        });
        // SAFETY: the ranges above covered the n lines.
        unsafe { lines.set_len(n) };
        Self { lines, len }
    }

    /// The words.
    pub fn words(&self) -> &[u32] {
        // SAFETY: the lines hold at least len initialized words, contiguous (Line is 16 words
        // without padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u32, self.len) }
    }

    /// The words, writable.
    pub fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in words; borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, self.len) }
    }

    /// The words' bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in words_mut; any byte pattern is a valid u32.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, 4 * self.len) }
    }
}

/// True when this CPU has AMX-BF16, Linux granted this process the tile state, and
/// `LMX_AMX=0` is not set.
pub fn usable() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| !std::env::var("LMX_AMX").is_ok_and(|v| v == "0") && imp::request())
}

/// True when [`usable`] and the CPU also has AMX-INT8 (`tdpbusd`), and `LMX_AMX_INT8=0` is
/// not set.
pub fn int8_usable() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| usable() && !std::env::var("LMX_AMX_INT8").is_ok_and(|v| v == "0") && imp::has_int8())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    /// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24); then the permission for the
    /// tile data state (XFEATURE 18).
    pub(super) fn request() -> bool {
        // Leaf 7 only where the CPU reports it (the maximum leaf first).
        let leaf7 = std::arch::x86_64::__cpuid(0).eax >= 7 && (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 0b101 == 0b101;
        if !leaf7 {
            return false;
        }
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: the arch_prctl system call with an integer argument; it reads no memory.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL as isize => ret, in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    /// CPUID leaf 7, EDX bit 25: AMX-INT8 (leaf 7 was checked by [`request`]).
    pub(super) fn has_int8() -> bool {
        (std::arch::x86_64::__cpuid_count(7, 0).edx >> 25) & 1 == 1
    }

    /// The tile configuration every kernel here uses: palette 1, tiles 0-7 of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on this thread (before [`block_32x32`]).
    ///
    /// # Safety
    /// [`super::usable`] must be true.
    pub(crate) unsafe fn configure() {
        // SAFETY: the caller checked that AMX is usable; CONFIG is 64 aligned bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack, readonly)) };
    }

    /// Releases this thread's tiles (after the last [`block_32x32`]).
    ///
    /// # Safety
    /// [`super::usable`] must be true.
    pub(crate) unsafe fn release() {
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// c (32 x 32 f32, row-major) = x (32 rows of `steps` * 16 bf16 pairs) @ B (`steps` * 16
    /// pair rows of 32 columns, `b_stride` words apart). x is laid out step by step
    /// (`bf16_gemm`'s `x_tiles`): step s's 32 rows of 16 words are 512 contiguous words, rows 0-15
    /// one tile and rows 16-31 the next. Each tile is loaded as soon as the products before
    /// it have read the one it replaces (8% faster than loading the four first).
    ///
    /// # Safety
    /// [`configure`] ran on this thread; x holds `steps * 512` words; b holds `steps * 16`
    /// rows of 32 words at `b_stride`; both on 64-byte boundaries, b_stride a multiple of 16.
    pub(crate) unsafe fn block_32x32(x: *const u32, b: *const u32, b_stride: usize, steps: usize, c: &mut super::Block) {
        if steps == 0 {
            // An empty k: the first step's loads below would read nothing valid.
            c.0.fill(0.0);
            return;
        }
        let bs = 4 * b_stride;
        // SAFETY: the caller's guarantees; tiles 0-3 accumulate, 4-5 hold x, 6-7 hold B.
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            asm!(
                "tileloadd tmm4, [{a0} + {sixty_four} * 1]",
                "tileloadd tmm6, [{b0} + {bs} * 1]",
                "tileloadd tmm7, [{b1} + {bs} * 1]",
                "tileloadd tmm5, [{a1} + {sixty_four} * 1]",
                a0 = in(reg) x, a1 = in(reg) x.add(256), b0 = in(reg) b, b1 = in(reg) b.add(16), bs = in(reg) bs,
                sixty_four = in(reg) 64usize, options(nostack, readonly),
            );
            for s in 1..steps {
                let (a0, b0) = (x.add(512 * s), b.add(16 * b_stride * s));
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {sixty_four} * 1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{b0} + {bs} * 1]",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm7, [{b1} + {bs} * 1]",
                    "tileloadd tmm5, [{a1} + {sixty_four} * 1]",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(256), b0 = in(reg) b0, b1 = in(reg) b0.add(16), bs = in(reg) bs,
                    sixty_four = in(reg) 64usize, options(nostack, readonly),
                );
            }
            asm!("tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7", "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem),);
            let cp = c.0.as_mut_ptr();
            asm!(
                "tilestored [{c0} + {s} * 1], tmm0",
                "tilestored [{c1} + {s} * 1], tmm1",
                "tilestored [{c2} + {s} * 1], tmm2",
                "tilestored [{c3} + {s} * 1], tmm3",
                c0 = in(reg) cp, c1 = in(reg) cp.add(16), c2 = in(reg) cp.add(512), c3 = in(reg) cp.add(528), s = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    /// One quantization group of the int8 product for 32 matrix rows (two A tiles, `a` and
    /// `a + 16 * a_stride`) and 16 activation rows: c[0..256] (16 x 16 i32, row-major) = A0 @
    /// Bc, c[256..512] = A0 @ Bf, c[512..768] = A1 @ Bc, c[768..1024] = A1 @ Bf, over `steps`
    /// steps of 64 bytes along k. A is unsigned bytes (weights); Bc and Bf hold `steps` tiles
    /// of 1,024 signed bytes (activations: tile row t holds bytes 4t..4t + 4 of each of 16
    /// rows). Two A tiles against both B tiles make four products per four tile loads: a
    /// tile load costs about three `tdpbusd`s on the Xeon measured (docs/BENCHMARKS.md, session 23).
    ///
    /// # Safety
    /// [`configure`] ran on this thread and [`super::int8_usable`] is true; a holds 32 rows of
    /// `64 * steps` bytes at `a_stride`; bc and bf hold `1024 * steps` bytes; c 1,024 i32.
    #[inline]
    pub(crate) unsafe fn int8_group(a: *const u8, a_stride: usize, bc: *const u8, bf: *const u8, steps: usize, c: *mut i32) {
        // SAFETY: the caller's guarantees; tiles 0-3 accumulate, 4-5 hold A, 6-7 hold B.
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for s in 0..steps {
                asm!(
                    "tileloadd tmm4, [{a0} + {stride} * 1]",
                    "tileloadd tmm6, [{bc} + {sixty_four} * 1]",
                    "tileloadd tmm7, [{bf} + {sixty_four} * 1]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {stride} * 1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(64 * s), a1 = in(reg) a.add(16 * a_stride + 64 * s), stride = in(reg) a_stride,
                    bc = in(reg) bc.add(1024 * s), bf = in(reg) bf.add(1024 * s), sixty_four = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c0} + {sixty_four} * 1], tmm0",
                "tilestored [{c1} + {sixty_four} * 1], tmm1",
                "tilestored [{c2} + {sixty_four} * 1], tmm2",
                "tilestored [{c3} + {sixty_four} * 1], tmm3",
                c0 = in(reg) c, c1 = in(reg) c.add(256), c2 = in(reg) c.add(512), c3 = in(reg) c.add(768), sixty_four = in(reg) 64usize,
                options(nostack),
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub(super) fn request() -> bool {
        false
    }
    pub(super) fn has_int8() -> bool {
        false
    }
    pub(crate) unsafe fn int8_group(_: *const u8, _: usize, _: *const u8, _: *const u8, _: usize, _: *mut i32) {
        unreachable!("AMX is not usable off x86-64 Linux")
    }
    pub(crate) unsafe fn configure() {}
    pub(crate) unsafe fn release() {}
    pub(crate) unsafe fn block_32x32(_: *const u32, _: *const u32, _: usize, _: usize, _: &mut super::Block) {
        unreachable!("AMX is not usable off x86-64 Linux")
    }
}

pub(crate) use imp::{block_32x32, configure, int8_group, release};

/// A 32 x 32 f32 block of [`block_32x32`]'s results (row-major), on a 64-byte boundary for the
/// tile stores.
#[repr(C, align(64))]
pub(crate) struct Block(pub(crate) [f32; 1024]);
