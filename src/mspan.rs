//! `MSpan`: the record describing one run of pages owned by the heap.
//!
//! A span is a run of whole 8 KiB pages handed out by the mheap for one purpose
//! ([`Purpose`]): user memory (`Heap`), or one of the allocator's own metadata kinds
//! (manual spans). Span records live in fixalloc chunks (never in memory from the global
//! allocator) and are recycled, never unmapped, so a pointer read from the span map
//! always points at *a* valid record — possibly of a dead or re-used span, which is why
//! readers of suspect pointers check `state` and the page range.
//!
//! Publication: a span's fields are written while only the allocating thread knows the
//! span; `state` is then stored with Release as the last of the span's own fields.
//! Readers load `state` with Acquire before trusting any other field.

use crate::sync::{AtomicU8, AtomicUsize, Ordering, UnsafeCell};

/// Why a span was allocated (Go's `spanAllocType`, seed 004). Statistics are kept per
/// purpose, in one place for allocation and one for free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// User memory handed out through `GlobalAlloc`.
    Heap = 0,
    /// Chunks of span records (the span-record fixalloc's backing memory).
    SpanRecords = 1,
}

impl Purpose {
    /// Number of purposes (for per-purpose counter arrays).
    pub const COUNT: usize = 2;
    /// Every purpose, in counter order.
    pub const ALL: [Purpose; Purpose::COUNT] = [Purpose::Heap, Purpose::SpanRecords];

    /// Whether the span is managed by the allocator itself rather than handed to users.
    /// Manual spans do not count toward `heap_sys` / `heap_inuse`.
    #[inline]
    pub const fn is_manual(self) -> bool {
        !matches!(self, Purpose::Heap)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Purpose::Heap => "heap",
            Purpose::SpanRecords => "span-records",
        }
    }
}

/// State of a span record (Go's `mSpanState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SpanState {
    /// Not a live span: free in the fixalloc, or being initialised.
    Dead = 0,
    /// A live heap span.
    InUse = 1,
    /// A live manual span.
    Manual = 2,
}

/// Fields written only while the span is private to one thread (before publication, or
/// by the block's owner), read by threads that reached the span through a
/// happens-before edge (the `state` Acquire, or the block pointer's own hand-over).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpanInfo {
    pub(crate) purpose: Purpose,
    /// Size class; 0 for a span holding one large block (or a manual span).
    #[allow(dead_code)] // read by the small-object path, which is being built next
    pub(crate) spanclass: u8,
    /// Whether the memory may hold non-zero bytes (so `alloc_zeroed` must clear it).
    pub(crate) needzero: bool,
}

/// One span. Field comments say what protects each field.
#[repr(C, align(64))]
pub(crate) struct MSpan {
    /// Lifecycle state; the publication barrier for the other fields. Stored with
    /// Release last when publishing, loaded with Acquire by readers.
    pub(crate) state: AtomicU8,
    /// First byte of the span. Written before publication; atomic (Relaxed) because
    /// readers of suspect pointers may race with a recycled record's re-initialisation.
    pub(crate) base: AtomicUsize,
    /// Length in pages. Written before publication, and by the owner of the block when
    /// a large block is resized in place; atomic (Relaxed) for the same reason as `base`.
    pub(crate) npages: AtomicUsize,
    /// See [`SpanInfo`].
    pub(crate) info: UnsafeCell<SpanInfo>,
    /// Link in the fixalloc free list while the record is free. Protected by the heap
    /// lock (the fixalloc lives under it).
    pub(crate) free_link: UnsafeCell<*mut MSpan>,
}

// One cache line per record: records of different spans never share a line.
static_assertions::const_assert_eq!(core::mem::size_of::<MSpan>(), 64);

impl MSpan {
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn new() -> Self {
        MSpan {
            state: AtomicU8::new(SpanState::Dead as u8),
            base: AtomicUsize::new(0),
            npages: AtomicUsize::new(0),
            info: UnsafeCell::new(SpanInfo {
                purpose: Purpose::Heap,
                spanclass: 0,
                needzero: false,
            }),
            free_link: UnsafeCell::new(core::ptr::null_mut()),
        }
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn new() -> Self {
        MSpan {
            state: AtomicU8::new(SpanState::Dead as u8),
            base: AtomicUsize::new(0),
            npages: AtomicUsize::new(0),
            info: UnsafeCell::new(SpanInfo {
                purpose: Purpose::Heap,
                spanclass: 0,
                needzero: false,
            }),
            free_link: UnsafeCell::new(core::ptr::null_mut()),
        }
    }

    /// The span's state (Acquire: pairs with the Release in [`MSpan::set_state`]).
    #[inline]
    pub(crate) fn state(&self) -> SpanState {
        match self.state.load(Ordering::Acquire) {
            1 => SpanState::InUse,
            2 => SpanState::Manual,
            _ => SpanState::Dead,
        }
    }

    /// Sets the state. Release: every write to the span made before this call is
    /// visible to a thread that loads the new state with Acquire.
    #[inline]
    pub(crate) fn set_state(&self, st: SpanState) {
        self.state.store(st as u8, Ordering::Release);
    }

    #[inline]
    pub(crate) fn base(&self) -> usize {
        self.base.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn npages(&self) -> usize {
        self.npages.load(Ordering::Relaxed)
    }

    /// Reads the private fields.
    ///
    /// # Safety
    /// The caller must have a happens-before edge from the last write of the fields
    /// (it published or owns the span, or observed its state with Acquire).
    #[inline]
    pub(crate) unsafe fn info(&self) -> SpanInfo {
        // SAFETY: per the caller's contract nobody writes concurrently.
        self.info.with(|p| unsafe { *p })
    }

    /// Writes the private fields.
    ///
    /// # Safety
    /// The caller must be the only thread that can reach the span's private fields
    /// (it is initialising an unpublished span, or owns the span).
    #[inline]
    pub(crate) unsafe fn set_info(&self, info: SpanInfo) {
        // SAFETY: per the caller's contract the access is exclusive.
        self.info.with_mut(|p| unsafe { *p = info })
    }

    /// Whether `addr` lies in the span's page range.
    #[inline]
    pub(crate) fn contains(&self, addr: usize) -> bool {
        let base = self.base();
        addr >= base && addr - base < self.npages() << crate::os::PAGE_SHIFT
    }
}

// SAFETY: the record is shared between threads by design; every field is an atomic or a
// cell whose accesses follow the protocols documented on the fields.
unsafe impl Sync for MSpan {}
// SAFETY: as above.
unsafe impl Send for MSpan {}
