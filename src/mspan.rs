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

use crate::sync::{AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering, UnsafeCell};

/// The ordering of [`MSpan::set_state`]. The loom mutant `state_relaxed` weakens it to
/// show that the publication model catches it.
#[cfg(not(spanheap_mutant = "state_relaxed"))]
const SET_STATE: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "state_relaxed")]
const SET_STATE: Ordering = Ordering::Relaxed;

/// Why a span was allocated (Go's `spanAllocType`, seed 004). Statistics are kept per
/// purpose, in one place for allocation and one for free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// User memory handed out through `GlobalAlloc`.
    Heap = 0,
    /// Chunks of span records (the span-record fixalloc's backing memory).
    SpanRecords = 1,
    /// Chunks of small-object span bitmaps (remote-free and alloc bits).
    SpanBitmaps = 2,
    /// Chunks of thread-cache records (`MCache`).
    ThreadCaches = 3,
}

impl Purpose {
    /// Number of purposes (for per-purpose counter arrays).
    pub const COUNT: usize = 4;
    /// Every purpose, in counter order.
    pub const ALL: [Purpose; Purpose::COUNT] = [
        Purpose::Heap,
        Purpose::SpanRecords,
        Purpose::SpanBitmaps,
        Purpose::ThreadCaches,
    ];

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
            Purpose::SpanBitmaps => "span-bitmaps",
            Purpose::ThreadCaches => "thread-caches",
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
    pub(crate) spanclass: u8,
    /// Whether the memory may hold non-zero bytes (so `alloc_zeroed` must clear it).
    pub(crate) needzero: bool,
    /// Small-object spans: the bitmap record (remote-free words first). Null otherwise.
    pub(crate) bits: *mut u64,
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
    /// Small-object state; meaningful only for spans with a size class.
    pub(crate) small: SmallSpan,
}

// Whole cache lines per record: records of different spans never share a line.
static_assertions::const_assert!(core::mem::size_of::<MSpan>() <= 192);

/// Value of the high half of [`SmallSpan::rstate`] while a thread cache owns the span.
pub(crate) const RSTATE_OWNED: u32 = u32::MAX;
/// Bias of the low half of [`SmallSpan::rstate`]: the count is stored as `BIAS + n`,
/// so the transient deficit of a merge that ran ahead of an increment (at most the
/// span's object count) never borrows from the high half, and increments never carry.
pub(crate) const RSTATE_BIAS: u32 = 1 << 31;

/// Packs a remote-free state word.
#[inline]
pub(crate) const fn rstate(high: u32, low: i64) -> u64 {
    ((high as u64) << 32) | (RSTATE_BIAS as i64 + low) as u32 as u64
}

/// Unpacks a remote-free state word into (high, signed low).
#[inline]
pub(crate) const fn rstate_parts(x: u64) -> (u32, i64) {
    ((x >> 32) as u32, (x as u32) as i64 - RSTATE_BIAS as i64)
}

/// Where a small-object span is (`SmallSpan::place`).
pub(crate) mod place {
    /// Owned by a thread cache (its current span for the class).
    pub(crate) const CACHED: u8 = 0;
    /// In its mcentral's partial list: has free objects.
    pub(crate) const PARTIAL: u8 = 1;
    /// In its mcentral's full list: no free object known.
    pub(crate) const FULL: u8 = 2;
    /// Pushed on its mcentral's pending stack by a remote free (still linked in the
    /// list it was in, unless `SmallPrivate::list` says otherwise).
    pub(crate) const PENDING: u8 = 3;
}

/// The part of a small-object span that threads other than its owner touch, plus the
/// owner's private state.
///
/// Protocol (see `docs/design.md`, "Walk-through: one small free"): a remote free sets the object's bit
/// in the remote bitmap (atomic OR, Release), then adds one to the low half of `rstate`
/// (SeqCst). While a cache owns the span the high half is [`RSTATE_OWNED`]; while the
/// span is in its mcentral, the high half is the number of live objects at the last
/// merge, so the free that makes the low half reach it freed the span's last object.
pub(crate) struct SmallSpan {
    /// High 32 bits: [`RSTATE_OWNED`], or live objects at the last merge while
    /// unowned. Low 32 bits: remote frees counted since the last merge, biased by
    /// [`RSTATE_BIAS`] (a merge subtracts the objects it merged). Atomic RMW by remote freers and by the
    /// span's owner (cache or mcentral lock holder).
    pub(crate) rstate: AtomicU64,
    /// Address of the cache that owns the span or owned it last (0 if none yet).
    /// Written only by a cache taking the span (never while the span is in an mcentral
    /// list). Read (Relaxed) by freeing threads: a thread seeing its own cache's address
    /// may keep the object on its local list; and by the mcentral lock holder, which
    /// files partial spans by last owner (`mcentral::bucket`).
    pub(crate) owner: AtomicUsize,
    /// One of [`place`]'s values. Transitions into and out of PENDING are CASes (remote
    /// freers race with the mcentral lock holder); the others happen under the lock.
    pub(crate) place: AtomicU8,
    /// Link in the mcentral's pending stack (Treiber push, take-all pop).
    pub(crate) pending_next: AtomicPtr<MSpan>,
    /// Owner-private state: accessed only by the owning cache's thread, or under the
    /// mcentral lock while the span is not cached (ownership passes under that lock).
    pub(crate) private: UnsafeCell<SmallPrivate>,
}

/// See [`SmallSpan::private`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct SmallPrivate {
    /// Bitmap record: `words` remote-free words (atomics), then `words` alloc words
    /// (bit set = allocated; bits at or past `nelems` are always set). Same as
    /// `SpanInfo::bits`.
    pub(crate) bits: *mut u64,
    pub(crate) words: u8,
    /// The next alloc word to load into a cache window.
    pub(crate) next_word: u8,
    pub(crate) nelems: u16,
    pub(crate) elemsize: u32,
    /// Doubly linked list of the mcentral (protected by its lock).
    pub(crate) prev: *mut MSpan,
    pub(crate) next: *mut MSpan,
    /// Which list the span is linked in: `place::PARTIAL`, `place::FULL`, or `NO_LIST`.
    pub(crate) list: u8,
    /// Whether objects have been freed and handed out again (then `alloc_zeroed` must
    /// clear them even if the span came zeroed from the OS).
    pub(crate) dirty: bool,
    /// Objects freed directly into the alloc bitmap by the running
    /// `MCentral::free_unowned` whose count the state word does not show yet, and the
    /// next span that call touched. Zero and null outside it (mcentral lock).
    pub(crate) flushed: u16,
    /// Free objects by the alloc bitmap while the span is in an mcentral list: set when
    /// it is placed, raised by direct frees (mcentral lock), so that a refill looking
    /// for a mostly free span reads one field of a record it walks anyway instead of
    /// the span's bitmap. Stale while the span is owned, pending or a spare.
    pub(crate) nfree: u16,
    pub(crate) flush_next: *mut MSpan,
}

/// `SmallPrivate::list` when the span is in no list.
pub(crate) const NO_LIST: u8 = 0xFF;

impl SmallPrivate {
    /// No bitmap, in no list: a record's state before `init_small`.
    pub(crate) const EMPTY: SmallPrivate = SmallPrivate {
        bits: core::ptr::null_mut(),
        words: 0,
        next_word: 0,
        nelems: 0,
        elemsize: 0,
        prev: core::ptr::null_mut(),
        next: core::ptr::null_mut(),
        list: NO_LIST,
        dirty: false,
        flushed: 0,
        nfree: 0,
        flush_next: core::ptr::null_mut(),
    };

    /// The remote-free word `w`.
    ///
    /// # Safety
    /// `bits` is a live bitmap record and `w < words`.
    #[inline]
    pub(crate) unsafe fn remote(&self, w: usize) -> &AtomicU64 {
        // SAFETY: the record starts with `words` atomics (constructed when carved).
        unsafe { &*(self.bits as *const AtomicU64).add(w) }
    }

    /// The alloc word `w`.
    ///
    /// # Safety
    /// As for `remote`, and the caller owns the span's private state.
    #[inline]
    pub(crate) unsafe fn alloc(&self, w: usize) -> *mut u64 {
        // SAFETY: alloc words follow the remote words inside the record.
        unsafe { self.bits.add(self.words as usize + w) }
    }
}

impl SmallSpan {
    crate::sync::const_fn! {
        fn new() -> Self {
            SmallSpan {
                rstate: AtomicU64::new(0),
                owner: AtomicUsize::new(0),
                place: AtomicU8::new(place::CACHED),
                pending_next: AtomicPtr::new(core::ptr::null_mut()),
                private: UnsafeCell::new(SmallPrivate::EMPTY),
            }
        }
    }

    /// The private state.
    ///
    /// # Safety
    /// The caller owns the span's private state (see [`SmallSpan::private`]) and holds
    /// no other reference obtained from this function.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn private_mut(&self) -> &mut SmallPrivate {
        // SAFETY: exclusive by the caller's contract.
        self.private.with_mut(|p| unsafe { &mut *p })
    }
}

impl MSpan {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            MSpan {
                state: AtomicU8::new(SpanState::Dead as u8),
                base: AtomicUsize::new(0),
                npages: AtomicUsize::new(0),
                info: UnsafeCell::new(SpanInfo {
                    purpose: Purpose::Heap,
                    spanclass: 0,
                    needzero: false,
                    bits: core::ptr::null_mut(),
                }),
                free_link: UnsafeCell::new(core::ptr::null_mut()),
                small: SmallSpan::new(),
            }
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
        self.state.store(st as u8, SET_STATE);
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
}

// SAFETY: the record is shared between threads by design; every field is an atomic or a
// cell whose accesses follow the protocols documented on the fields.
unsafe impl Sync for MSpan {}
// SAFETY: as above.
unsafe impl Send for MSpan {}
