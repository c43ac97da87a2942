//! The process's allocator: glibc's, with transparent huge pages asked for on its heap.
//!
//! Decoding reads every weight once per token. With 4 KiB pages an 80 MB model spans 20,000
//! pages and the page walks show up in the token time; most Linux systems enable huge pages
//! only where a program asks (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`).
//! With glibc nearly every block lives in its heap (one arena, `M_MMAP_THRESHOLD` 512 MiB:
//! [`init`]), and each extension of the heap is marked `MADV_HUGEPAGE` as soon as glibc
//! makes it ([`heap_grown`]), so that small matrices share huge pages too. Blocks glibc maps
//! apart (512 MiB and more; elsewhere 2 MiB and more) are aligned to 2 MiB and marked one by
//! one. Measured on SmolLM2-135M bf16, one thread (Zen 4): with huge pages for blocks of 2 MiB
//! and more only, its matrices (0.2 to 1.8 MB each) were all on 4 KiB pages, 77-81 tok/s
//! decode; with the heap marked, 84-90 (docs/BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout, System};
#[cfg(all(target_os = "linux", target_env = "gnu"))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A huge page.
const HUGE: usize = 2 << 20;

/// Size from which glibc maps a block apart from its heap (`M_MMAP_THRESHOLD`, set by
/// [`init`]); such blocks are aligned to 2 MiB and marked one by one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub const APART: usize = 512 << 20;
/// Size from which a block is aligned to 2 MiB and marked for huge pages.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub const APART: usize = HUGE;

/// The largest alignment glibc's `calloc` honours itself (std's `System` zeroes blocks of a
/// larger one by hand, before [`heap_grown`] could mark their pages).
const CALLOC_ALIGN: usize = 16;

/// [`System`] with huge pages: the heap marked as it grows, blocks of [`APART`] bytes and
/// more aligned and marked.
pub struct HugePages;

/// The layout a block of [`APART`] bytes or more is really allocated with.
fn huge_layout(layout: Layout) -> Layout {
    // A 2 MiB alignment is a power of two and never smaller than the requested one; the size
    // was valid for the smaller alignment and stays under isize::MAX rounded to 2 MiB.
    Layout::from_size_align(layout.size(), layout.align().max(HUGE)).unwrap_or(layout)
}

/// Marks the whole huge pages inside `size` bytes at `p` (a live block) `MADV_HUGEPAGE`.
fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !p.is_null() {
        let (lo, hi) = ((p as usize).next_multiple_of(HUGE), (p as usize + size) / HUGE * HUGE);
        if lo < hi {
            // SAFETY: [lo, hi) lies inside the live block at p (page-aligned ends); madvise
            // only sets a paging hint on it.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

/// The heap's end (`sbrk(0)`) up to which [`heap_grown`] has marked it; 0 while off.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static HEAP_MARKED: AtomicUsize = AtomicUsize::new(0);
/// The first huge page boundary of the heap when [`init`] ran: nothing below is marked.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static HEAP_FLOOR: AtomicUsize = AtomicUsize::new(0);
/// Whether glibc took the 512 MiB `M_MMAP_THRESHOLD` (glibc before 2.35 refuses more than 32
/// MiB): if not, blocks of 2 MiB and more are mapped apart and marked one by one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static HEAP_HOLDS_ALL: AtomicBool = AtomicBool::new(false);

/// Tunes glibc's allocator; call first in main, before any other thread exists.
///
/// glibc returns large freed blocks to the kernel, so every prefill's multi-megabyte
/// activations came back as fresh pages the kernel must zero (15% of prefill time): blocks
/// under 512 MiB stay in the heap for reuse, which is never trimmed (no extra peak memory).
/// One arena for all threads: tensors are allocated on one thread and freed on another
/// (rayon workers, candle's pool), and with per-thread arenas each arena grew and shrank on
/// its own; a training step spent 23% of its time in page faults and peaked 1 GB higher
/// (docs/BENCHMARKS.md). With `mark_heap`, glibc extends the heap 64 MiB at a time and each
/// extension is marked for huge pages while nearly all of it is untouched.
pub fn init(mark_heap: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; sbrk(0) only reads the heap's end.
    unsafe {
        HEAP_HOLDS_ALL.store(libc::mallopt(libc::M_MMAP_THRESHOLD, APART as i32) == 1, Ordering::Relaxed);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
        let end = libc::sbrk(0) as usize;
        if mark_heap && end != usize::MAX {
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            HEAP_FLOOR.store(end.next_multiple_of(HUGE), Ordering::Relaxed);
            HEAP_MARKED.store(end, Ordering::Relaxed);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = mark_heap;
}

/// After a block under [`APART`] bytes came from glibc: the heap's new memory marked
/// ([`heap_grown`]), and where glibc maps blocks of 2 MiB and more apart, this one's huge pages.
fn plain_block(p: *mut u8, size: usize) {
    heap_grown();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if size >= HUGE && !HEAP_HOLDS_ALL.load(Ordering::Relaxed) {
        advise(p, size);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (p, size);
}

/// Marks `MADV_HUGEPAGE` what glibc added to the heap since the last call, from the huge page
/// the old end lay in. Called after every allocation: the block that grew the heap is
/// usually still unwritten (not when glibc's realloc copied into it, or `MALLOC_PERTURB_` is
/// set: those pages stay small).
fn heap_grown() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut marked = HEAP_MARKED.load(Ordering::Relaxed);
        while marked != 0 {
            // SAFETY: sbrk(0) only reads the heap's end.
            let end = unsafe { libc::sbrk(0) } as usize;
            if end == marked || end == usize::MAX {
                return;
            }
            // Another thread moved the mark meanwhile: go on from where it left it.
            if let Err(now) = HEAP_MARKED.compare_exchange(marked, end, Ordering::Relaxed, Ordering::Relaxed) {
                marked = now;
                continue;
            }
            // A heap that shrank (glibc still trims a free top of about 2 GiB, and
            // malloc_trim does) only moves the mark down, so that regrowth is marked again.
            let (lo, hi) = ((marked / HUGE * HUGE).max(HEAP_FLOOR.load(Ordering::Relaxed)), end / HUGE * HUGE);
            if lo < hi {
                // SAFETY: [lo, hi) lies inside the heap as it was when sbrk(0) was read;
                // madvise only sets a paging hint (ENOMEM, nothing else, on a part unmapped
                // since).
                unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
            }
            return;
        }
    }
}

// SAFETY: every block comes from System with the layout it is later freed with
// (`huge_layout` for blocks of APART bytes or more, decided by size alone, which realloc
// keeps consistent).
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < APART {
            // SAFETY: forwarded.
            let p = unsafe { System.alloc(layout) };
            plain_block(p, layout.size());
            return p;
        }
        // SAFETY: a non-zero size.
        let p = unsafe { System.alloc(huge_layout(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < APART && layout.align() <= CALLOC_ALIGN {
            // SAFETY: forwarded (calloc leaves memory new to the heap unwritten).
            let p = unsafe { System.alloc_zeroed(layout) };
            plain_block(p, layout.size());
            return p;
        }
        // Marked first, then zeroed: the first write faults in huge pages.
        // SAFETY: as in alloc.
        let p = unsafe { self.alloc(layout) };
        if !p.is_null() {
            // SAFETY: p holds layout.size() writable bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let real = if layout.size() < APART { layout } else { huge_layout(layout) };
        // SAFETY: allocated above with `real`.
        unsafe { System.dealloc(ptr, real) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < APART && new_size < APART {
            // SAFETY: forwarded; both sizes keep the plain layout.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            plain_block(p, new_size);
            return p;
        }
        // SAFETY: the new layout is valid (GlobalAlloc's realloc contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in alloc; the copy covers bytes both blocks hold.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}
