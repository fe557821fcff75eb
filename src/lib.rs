//! spanheap: a Rust global allocator built on the Go runtime's span heap.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;
//! ```
//!
//! # Architecture
//!
//! Memory flows through these layers (one module each; `docs/design.md` has the full
//! design, the walk-through of an allocation and a free, and the table of shared fields):
//!
//! - [`os`]: reserve / map / commit / decommit / release address space (`mmap`,
//!   `madvise`), with Go's four memory states. Nothing else talks to the OS.
//! - `arena`: 64 MiB heap arenas, the two-level arena index, the per-arena span map
//!   and `pageInUse` bitmap. Address -> span is lock-free.
//! - `pagealloc`: Go's radix-tree page allocator: address-ordered first fit over
//!   per-chunk bitmaps, O(levels) search, scavenged bitmap.
//! - `fixalloc`: fixed-size records for the allocator's own metadata.
//! - `mspan`: the span record and span purposes.
//! - `mheap`: `alloc_span` / `free_span` under a lock held only to take pages, with
//!   lock-free initialisation and an atomic publication protocol.
//! - `sizeclasses`: the generated size-class table (67 classes up to 32 KiB).
//! - `mcache`: the thread-local front end for small objects: local free list and a
//!   64-object window per class, no lock and no atomic read-modify-write; remote frees.
//! - `mcentral`: per-class spans no cache owns: partial/full lists, announcements.
//! - `malloc`: `Layout` -> small object (size class) or large object (page span).
//! - `sync`: the single shim for atomics, cells and the lock (std or loom).
//!
//! The allocator never panics, never unwinds and never calls the global allocator.

#![deny(unsafe_op_in_unsafe_fn)]
// Under loom the `GlobalAlloc` front end (process-wide statics, thread caches) is
// compiled out and models drive the core directly, so much of the crate has no caller.
#![cfg_attr(spanheap_loom, allow(dead_code))]
#![warn(missing_debug_implementations)]

mod arena;
mod fixalloc;
mod malloc;
mod mcache;
mod mcentral;
mod mheap;
mod mspan;
pub mod os;
mod pagealloc;
mod sizeclasses;
mod sync;

// Classes serve alignments up to one heap page (spans are page aligned).
const _: () = assert!(sizeclasses::MAX_CLASS_ALIGN == os::PAGE_SIZE);

pub use mspan::Purpose;

#[cfg(not(spanheap_loom))]
mod global {
    use core::alloc::{GlobalAlloc, Layout};

    use crate::malloc;
    use crate::mheap::MHeap;
    use crate::os::OsMemory;

    /// The process-wide heap behind [`SpanHeap`].
    pub(crate) static HEAP: MHeap<OsMemory> = MHeap::new(OsMemory);

    /// The spanheap global allocator (zero-sized; all state is process-wide).
    ///
    /// ```no_run
    /// #[global_allocator]
    /// static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;
    /// ```
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SpanHeap;

    // SAFETY: blocks come from spans that the heap hands out once and takes back only in
    // `dealloc`/`realloc`; every block is at least `layout.size()` bytes (whole pages)
    // and aligned to `layout.align()`; failures return null; nothing panics.
    unsafe impl GlobalAlloc for SpanHeap {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            malloc::global::alloc(layout.size(), layout.align())
        }

        #[inline]
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            malloc::global::alloc_zeroed(layout.size(), layout.align())
        }

        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: GlobalAlloc's contract: `ptr` is a live block allocated with `layout`.
            unsafe { malloc::global::dealloc(ptr, layout.size(), layout.align()) }
        }

        #[inline]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: GlobalAlloc's contract: `ptr` is a live block allocated with `layout`.
            unsafe { malloc::global::realloc(ptr, layout.size(), layout.align(), new_size) }
        }
    }
}

#[cfg(not(spanheap_loom))]
pub use global::SpanHeap;

/// Internals for this workspace's tests, benchmarks and loom models. Not part of the
/// public API; no semver promise.
#[doc(hidden)]
pub mod __private {
    pub use crate::mheap::HeapCounters;
    use crate::mheap::MHeap;
    use crate::mspan::{MSpan, Purpose};
    use crate::os::{MemSource, OsMemory};
    use core::ptr::NonNull;

    /// The heap lock's implementation guarding a counter, for the loom model of the lock.
    #[derive(Debug)]
    pub struct LockedCounter(crate::sync::Mutex<u64>);
    impl LockedCounter {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            LockedCounter(crate::sync::Mutex::new(0))
        }
        /// A non-atomic read-modify-write under the lock.
        pub fn increment(&self) {
            self.0.lock().with(|v| *v += 1);
        }
        pub fn get(&self) -> u64 {
            self.0.lock().with(|v| *v)
        }
    }

    /// Per size class with anything in its mcentral: (class, partial, full, spare, free
    /// objects in listed spans). For tests and debugging.
    #[cfg(not(spanheap_loom))]
    pub fn central_census() -> [(usize, usize, usize, usize, usize); 68] {
        let mut out = [(0, 0, 0, 0, 0); 68];
        for (c, o) in out.iter_mut().enumerate().skip(1) {
            let (p, f, s, free) = crate::global::HEAP.central[c].census();
            *o = (c, p, f, s, free);
        }
        out
    }

    /// Whether the calling thread has a live thread cache.
    #[cfg(not(spanheap_loom))]
    pub fn thread_has_cache() -> bool {
        crate::mcache::has_cache()
    }

    /// Counters of the process-wide heap behind `SpanHeap`.
    #[cfg(not(spanheap_loom))]
    pub fn global_counters() -> HeapCounters {
        crate::global::HEAP.counters()
    }

    /// Whether `addr` lies in a live span of the process-wide heap, and that span's
    /// (base, pages).
    #[cfg(not(spanheap_loom))]
    pub fn global_span_of(addr: usize) -> Option<(usize, usize)> {
        crate::global::HEAP.span_of(addr).map(|s| {
            // SAFETY: span records are valid for the life of the process.
            let s = unsafe { s.as_ref() };
            (s.base(), s.npages())
        })
    }

    /// A private page heap (a separate `MHeap`), for exercising `alloc_span` /
    /// `free_span` directly (benches/alloc_span.rs). Its memory is never returned to the OS.
    #[derive(Debug)]
    pub struct PageHeap<M: MemSource + 'static = OsMemory> {
        heap: &'static MHeap<M>,
    }

    impl<M: MemSource> core::fmt::Debug for MHeap<M> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("MHeap").finish_non_exhaustive()
        }
    }

    /// A live span of a [`PageHeap`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SpanRef(NonNull<MSpan>);
    // SAFETY: a span handle may be freed from any thread.
    unsafe impl Send for SpanRef {}

    impl SpanRef {
        pub fn base(self) -> usize {
            // SAFETY: span records are never unmapped.
            unsafe { self.0.as_ref() }.base()
        }
        pub fn npages(self) -> usize {
            // SAFETY: as above.
            unsafe { self.0.as_ref() }.npages()
        }
    }

    impl<M: MemSource> PageHeap<M> {
        /// A new heap over `mem`. Leaked on purpose: spans must outlive any handle.
        pub fn new(mem: M) -> Self {
            PageHeap {
                heap: Box::leak(Box::new(MHeap::new(mem))),
            }
        }
        pub fn alloc_span(&self, npages: usize, purpose: Purpose, align: usize) -> Option<SpanRef> {
            self.heap.alloc_span(npages, purpose, 0, align).map(SpanRef)
        }
        /// # Safety
        /// `s` is a live span of this heap, freed once.
        pub unsafe fn free_span(&self, s: SpanRef) {
            // SAFETY: forwarded.
            unsafe { self.heap.free_span(s.0) }
        }

        // Lock-free readers (the loom models of span publication).

        /// The live span containing `addr` as a lock-free reader finds it (span map,
        /// then `state`, as `dealloc` validates a pointer), with the fields read after.
        ///
        /// # Safety
        /// No span of this heap may be freed while this runs (the span record found
        /// could be recycled, and its fields rewritten, under the reader).
        pub unsafe fn span_at(&self, addr: usize) -> Option<SpanView> {
            self.heap.span_of(addr).map(|s| {
                // SAFETY: span records are never unmapped.
                let span = unsafe { s.as_ref() };
                // SAFETY: `span_of` loaded a live state with Acquire, which pairs with
                // the Release that published the span's fields; nobody frees it now
                // (caller's contract), so nobody writes them.
                let info = unsafe { span.info() };
                SpanView {
                    base: span.base(),
                    npages: span.npages(),
                    purpose: info.purpose,
                    spanclass: info.spanclass,
                }
            })
        }
        /// Whether the `pageInUse` bit of the page at `addr` is set (Acquire).
        pub fn page_in_use(&self, addr: usize) -> bool {
            self.heap.arenas.is_marked_in_use(addr)
        }
        /// `pagesInUse`: pages in live heap spans (Acquire).
        pub fn pages_in_use(&self) -> usize {
            self.heap.pages_in_use()
        }
    }

    /// A span as [`PageHeap::span_at`] reads it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SpanView {
        pub base: usize,
        pub npages: usize,
        pub purpose: Purpose,
        pub spanclass: u8,
    }
}
