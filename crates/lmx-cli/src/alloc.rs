//! The process's allocator: glibc's, with transparent huge pages asked for on everything.
//!
//! Decoding reads every weight once per token. With 4 KiB pages an 80 MB model spans 20,000
//! pages and the page walks show up in the token time; most Linux systems enable huge pages
//! only where a program asks (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`).
//! With glibc nearly every block lives in its heap (one arena, `M_MMAP_THRESHOLD` 512 MiB: see
//! main.rs), and each extension of the heap is marked `MADV_HUGEPAGE` before anything is
//! written to it ([`heap_grown`]), so that small matrices share huge pages too. Blocks glibc
//! maps apart (512 MiB and more; elsewhere 2 MiB and more) are aligned to 2 MiB and marked
//! one by one. Measured on SmolLM2-135M, one thread (Zen 4): huge pages for the blocks of 2
//! MiB and more only (as before) left its bf16 matrices, 0.2 to 1.8 MB each, on 4 KiB pages:
//! 77-81 tok/s decode; the heap marked, 90-98 (docs/BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A huge page.
const HUGE: usize = 2 << 20;

/// Size from which glibc maps a block apart from its heap (`M_MMAP_THRESHOLD`, set by main);
/// such blocks are aligned to 2 MiB and marked one by one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub const APART: usize = 512 << 20;
/// Size from which a block is aligned to 2 MiB and marked for huge pages.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub const APART: usize = HUGE;

/// [`System`] with huge pages: the heap marked as it grows, blocks of [`APART`] bytes and
/// more aligned and marked.
pub struct HugePages;

/// The layout a block of [`APART`] bytes or more is really allocated with.
fn huge_layout(layout: Layout) -> Layout {
    // A 2 MiB alignment is a power of two and never smaller than the requested one; the size
    // was valid for the smaller alignment and stays under isize::MAX rounded to 2 MiB.
    Layout::from_size_align(layout.size(), layout.align().max(HUGE)).unwrap_or(layout)
}

fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !p.is_null() {
        // SAFETY: p is the start of a live block of `size` bytes, aligned to 2 MiB (so to a
        // page); madvise only sets a paging hint on it.
        unsafe { libc::madvise(p.cast(), size, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

/// The heap's end (`sbrk(0)`) up to which [`heap_grown`] has marked it; 0 before [`init`].
static HEAP_MARKED: AtomicUsize = AtomicUsize::new(0);

/// Starts marking the heap's growth (glibc): glibc is asked to extend the heap 64 MiB at a
/// time, so that nearly all of each extension is still untouched when it is marked (the 2 MiB
/// around glibc's own header of the new top stay on small pages).
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; sbrk(0) only reads the heap's end.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        HEAP_MARKED.store(libc::sbrk(0) as usize, Ordering::Relaxed);
    }
}

/// Marks `MADV_HUGEPAGE` what glibc added to the heap since the last call: called after
/// every allocation, before its caller writes the block.
fn heap_grown() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut marked = HEAP_MARKED.load(Ordering::Relaxed);
        while marked != 0 {
            // SAFETY: sbrk(0) only reads the heap's end.
            let end = unsafe { libc::sbrk(0) } as usize;
            if end <= marked {
                return;
            }
            // Another thread's extension marked meanwhile: mark on from where it stopped.
            if let Err(now) = HEAP_MARKED.compare_exchange(marked, end, Ordering::Relaxed, Ordering::Relaxed) {
                marked = now;
                continue;
            }
            let (lo, hi) = (marked.next_multiple_of(HUGE), end / HUGE * HUGE);
            if lo < hi {
                // SAFETY: [lo, hi) lies inside the heap, mapped up to `end` (main.rs keeps
                // glibc from trimming it); madvise only sets a paging hint on it.
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
            heap_grown();
            return p;
        }
        // SAFETY: a non-zero size.
        let p = unsafe { System.alloc(huge_layout(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < APART {
            // SAFETY: forwarded (calloc leaves memory new to the heap unwritten).
            let p = unsafe { System.alloc_zeroed(layout) };
            heap_grown();
            return p;
        }
        // Advise first, then zero: the first write faults in huge pages.
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
            heap_grown();
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
