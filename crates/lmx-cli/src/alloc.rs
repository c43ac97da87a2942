//! The process's allocator: glibc's, with transparent huge pages asked for on large blocks.
//!
//! Decoding reads every weight once per token. With 4 KiB pages an 80 MB model spans 20,000
//! pages and the page walks show up in the token time; most Linux systems enable huge pages
//! only where a program asks (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`).
//! Blocks of 2 MiB and more (weights, KV caches, prefill activations) are aligned to 2 MiB and
//! marked `MADV_HUGEPAGE` before they are first written. Measured on SmolLM2-135M 4-bit, one
//! thread (Zen 5): 139 -> 150 tok/s decode (docs/BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout, System};

/// Size from which a block gets huge pages (one huge page).
const HUGE: usize = 2 << 20;

/// [`System`] with huge pages for blocks of [`HUGE`] bytes and more.
pub struct HugePages;

/// The layout a large block is really allocated with.
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

// SAFETY: every block comes from System with the layout it is later freed with
// (`huge_layout` for large blocks, decided by size alone, which realloc keeps consistent).
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < HUGE {
            // SAFETY: forwarded.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: a non-zero size.
        let p = unsafe { System.alloc(huge_layout(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < HUGE {
            // SAFETY: forwarded.
            return unsafe { System.alloc_zeroed(layout) };
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
        let real = if layout.size() < HUGE { layout } else { huge_layout(layout) };
        // SAFETY: allocated above with `real`.
        unsafe { System.dealloc(ptr, real) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < HUGE && new_size < HUGE {
            // SAFETY: forwarded; both sizes keep the small-block layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
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
