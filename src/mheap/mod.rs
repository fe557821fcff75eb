//! The page heap (Go's `mheap`): hands out spans of whole pages.
//!
//! `alloc_span(npages, purpose, spanclass, align)` follows seed 003:
//!
//! 1. **Under the heap lock**, and only there: take a page run from the page allocator
//!    (growing the heap by whole arenas if none fits) and take a span record from the
//!    span-record fixalloc. Nothing else happens with the lock held.
//! 2. **Without the lock**: re-commit any scavenged pages in the run, decide whether the
//!    memory needs zeroing, fill in the span's fields, update the counters (one place
//!    per direction, seed 004).
//! 3. **Publish** without the lock, in this order (the publication protocol):
//!    - the span map entries of every page (Release; readers Acquire);
//!    - the span `state` (Release), the last of the span's own fields to be written;
//!    - the `pageInUse` bit of the first page (atomic OR, Release; heap spans only);
//!    - `pages_in_use` (atomic add, Release; heap spans only).
//!
//!    It is imperative that the span be completely initialised before the first of
//!    these stores: from then on other threads can find it. A reader that loads a
//!    pageInUse bit or `pages_in_use` with Acquire and then follows the span map sees
//!    the span fully initialised and in state InUse.
//!
//! `free_span` mirrors it: unpublish (`pages_in_use`, `pageInUse`, `state` = Dead),
//! update the counters, and under the lock give the pages back to the page allocator
//! and the record back to the fixalloc. Span map entries are left pointing at the dead
//! record; lock-free readers check `state`.
//!
//! Shared fields and what protects them:
//!
//! | field            | protection                                                         |
//! |------------------|--------------------------------------------------------------------|
//! | `locked`         | the heap lock (a futex lock that never allocates): page allocator, span-record fixalloc, growth hint |
//! | `arenas`         | lock-free reads; new arenas inserted under the heap lock            |
//! | `pages_in_use`   | atomic (seed 001); written by span publication/release              |
//! | `gauges.*`       | atomic (seed 000); written at growth, scavenging and manual-span alloc/free (heap spans only move `pages_in_use`) |
//! | `stats`          | consistent statistics (seed 002, `stats.rs`): write sections at span alloc/free/grow/resize |
//! | `caches`, `reclaim` | registry of threads' heap caches (a lock-free stack that only grows) and the reclaim lock: see `scavenge.rs` |
//!
//! Lock order: the heap lock is a leaf. Nothing is locked while holding it, and it is
//! never taken by code that already holds it (no allocation happens under it: all
//! metadata comes from the OS layer or from pages the heap takes for itself).
//!
//! The code is split as Go splits it; each file adds methods to `MHeap`:
//!
//! - this file (Go's `mheap.go`): the heap's state (`Locked`, `Gauges`, `MHeap`) and
//!   constructors; the lock path of span allocation and free (`alloc_span`,
//!   `free_span`, shrinking and growing in place); span lookup (`span_of*`); growth
//!   (`alloc_pages_locked`, `grow_locked`); the publication protocol
//!   (`init_and_publish`, `unpublish`); the counters and the statistics glue; the
//!   fork handlers' access to the reclaim and heap locks (`fork_lock_reclaim`,
//!   `fork_lock_heap`), which `mcache::Heap::fork_lock_all` interleaves with the locks
//!   of the level above in rank order.
//! - `heapcache.rs` (Go's `mpagecache.go`): allocation and free through a thread's heap
//!   cache (page block, chunk cache, record caches, large blocks), refills and flushes.
//! - `scavenge.rs` (Go's `mgcscavenge.go`): taking back idle threads' caches (the
//!   reclaim gate's driver), the scavenger passes, metadata release and the background
//!   thread's glue. The policy, the settings and the thread are in `scavenger.rs`.
//! - `records.rs` (the users of Go's `mfixalloc.go`): span and bitmap records carved
//!   from manual spans, record chunks and metadata mappings lent to the level above
//!   (thread-cache records), and metadata accounting.
//!
//! The page heap knows nothing of the mcentrals or the thread caches: `mcache::Heap`
//! owns it together with them (see `docs/design.md`, "Layers").
//! - `tests.rs`: unit tests.

use core::ptr::{self, NonNull};

use crate::arena::{ArenaHint, ArenaIndex, HeapArena, ARENA_SIZE, PAGES_PER_ARENA};
use crate::fixalloc::{FixAlloc, RawFixAlloc};
use crate::mspan::{
    place, rstate, MSpan, Purpose, SmallPrivate, SpanInfo, SpanState, RSTATE_OWNED,
};
use crate::os::{MemSource, OsError, PAGE_SHIFT};
use crate::pagealloc::PageAlloc;
#[cfg(not(spanheap_loom))]
use crate::pagealloc::{FixedSummary, ROOT_REGION_SHIFT};
use crate::pagecache::GatedCache;
use crate::scavenger::Scavenger;
use crate::sizeclasses::{CLASS_TO_NOBJS, CLASS_TO_SIZE};
use crate::stats::{field, HeapDelta, HeapGauges, HeapSeq, HeapStats, LockStats, LOCK_KINDS};
use crate::sync::{AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering};

use records::{bits_bucket, BITS_MAPS, BITS_WORDS};

#[cfg(feature = "checked")]
pub(crate) use records::bits_words;

mod heapcache;
mod records;
mod scavenge;

/// The largest span, in bytes; larger requests fail with null (2^46 = 64 TiB, half of a
/// 47-bit user address space).
pub(crate) const MAX_SPAN_BYTES: usize = 1 << 46;
/// Where the first arena is reserved if that range is free (Go's arena hints do the
/// same, from 0x00c0 << 32). The page allocator hands out the lowest free pages first,
/// so it reuses the pages of older arenas before it touches a newer one only if newer
/// arenas lie above older ones. Left to the kernel, which places mappings top-down, the
/// first arena ends right below the libraries and thread stacks, the range above it is
/// taken, and every later arena lands below the last: the newest pages then came
/// first, and a program whose heap grew once kept its old arena's freed pages
/// committed and unused while it faulted in new ones (`examples/footprint.rs
/// pipeline`, docs/benchmarks.md). 640 GiB: far above the brk heap of a non-PIE
/// binary, below where the kernel puts mappings and PIE binaries, away from Go's
/// hints (a Go program with C code may preload spanheap), and inside
/// ThreadSanitizer's low application range; where the range is taken or refused (an
/// AddressSanitizer shadow gap), the kernel's choice is taken instead.
const FIRST_ARENA_HINT: usize = 0x00a0 << 32;
/// The end of a range of address space right below the first arena that no arena
/// takes (arenas grow up from `FIRST_ARENA_HINT`, or land where the kernel puts them,
/// far above): the heap profile keeps its sampled small objects there
/// (`profile/blocks.rs`), and the thread caches' wide mode takes every address but
/// this range (`mcache::set_span`).
pub(crate) const SAMPLED_BLOCKS_END: usize = FIRST_ARENA_HINT;
/// The size of that range.
pub(crate) const SAMPLED_BLOCKS_SIZE: usize = 384 << 20;
/// Spans `free_spans` frees per hold of the heap lock (a bound on the hold).
const FREE_BATCH: usize = 16;
/// The largest alignment served; beyond it the address space cannot help.
pub(crate) const MAX_ALIGN: usize = 1 << 46;

/// The ordering of the `pages_in_use` increment that ends a span's publication. The
/// loom mutant `count_relaxed` weakens it to show that the models catch it.
#[cfg(not(spanheap_mutant = "count_relaxed"))]
const PUBLISH_COUNT: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "count_relaxed")]
const PUBLISH_COUNT: Ordering = Ordering::Relaxed;

/// Everything the heap lock protects.
pub(crate) struct Locked {
    /// Free/allocated state of every heap page.
    pages: PageAlloc,
    /// Span records.
    spanalloc: FixAlloc<MSpan>,
    /// Small-object bitmap records, one allocator per size in `BITS_WORDS`.
    bitsalloc: [RawFixAlloc; 5],
    /// Where the next arena reservation is tried first: `FIRST_ARENA_HINT`, then just
    /// past the last one, so that arenas stay contiguous and in ascending order.
    hint: usize,
    /// The record allocators' released bytes as last published to
    /// `Gauges::meta_released`.
    meta_released: usize,
}

impl Locked {
    const fn new() -> Self {
        Self::with_pages(PageAlloc::new())
    }

    const fn with_pages(pages: PageAlloc) -> Self {
        Locked {
            pages,
            spanalloc: FixAlloc::new(),
            bitsalloc: [
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[0], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[1], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[2], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[3], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[4], 8),
            ],
            hint: FIRST_ARENA_HINT,
            meta_released: 0,
        }
    }
}

/// Heap counters (seed 000): atomics, updated outside the heap lock, in
/// [`MHeap::account_alloc`] / [`MHeap::account_free`] / growth / scavenging. Each is
/// exact on its own; the consistent statistics (`MHeap::stats`) are updated in the same
/// places.
///
/// Go's `heap_inuse` and `heap_idle` are not kept separately: heap spans already move
/// `pages_in_use` (the publication counter), so `heap_inuse` is `pages_in_use` pages and
/// `heap_idle` is `heap_sys - heap_inuse` (see [`MHeap::counters`]). A heap span
/// allocated or freed therefore touches no gauge, only the counter it must publish
/// with anyway; manual spans (metadata, rare) move `heap_sys` and their purpose's bytes.
///
/// Invariants once no span operation is in flight (`counters`):
/// `heap_idle ==` free pages (page allocator and page caches), `heap_released <= heap_idle`,
/// `heap_sys + Σ manual purposes == arena bytes mapped`.
pub(crate) struct Gauges {
    /// Bytes of arena memory obtained from the OS, less bytes lent to manual spans.
    heap_sys: AtomicU64,
    /// Idle bytes returned to the OS (Prepared pages in free runs).
    heap_released: AtomicU64,
    /// Bytes in live manual spans, per purpose (`by_purpose[Heap]` is unused: see above).
    by_purpose: [AtomicU64; Purpose::COUNT],
    /// Bytes of OS memory used for metadata outside the arenas (arena records, index,
    /// thread caches' free stacks).
    meta_sys: AtomicU64,
    /// Arena memory mapped, in bytes.
    arena_bytes: AtomicU64,
    /// Bytes of record chunks (span records, bitmap records) that the scavenger has
    /// returned to the OS and no record has been carved in since.
    meta_released: AtomicU64,
    /// Span-map pages (one per 4 MiB chunk) the scavenger has dropped, in all.
    span_map_drops: AtomicU64,
}

impl Gauges {
    #[cfg(not(spanheap_loom))]
    const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const Z: AtomicU64 = AtomicU64::new(0);
        Gauges {
            heap_sys: Z,
            heap_released: Z,
            by_purpose: [Z; Purpose::COUNT],
            meta_sys: Z,
            arena_bytes: Z,
            meta_released: Z,
            span_map_drops: Z,
        }
    }
    #[cfg(spanheap_loom)]
    fn new() -> Self {
        Gauges {
            heap_sys: AtomicU64::new(0),
            heap_released: AtomicU64::new(0),
            by_purpose: core::array::from_fn(|_| AtomicU64::new(0)),
            meta_sys: AtomicU64::new(0),
            arena_bytes: AtomicU64::new(0),
            meta_released: AtomicU64::new(0),
            span_map_drops: AtomicU64::new(0),
        }
    }
}

// Statistics are plain event counters: Relaxed everywhere, nothing is ordered by them.
#[inline]
fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}
#[inline]
fn sub(c: &AtomicU64, n: usize) {
    c.fetch_sub(n as u64, Ordering::Relaxed);
}

/// A snapshot of the heap counters (not consistent while span operations are in flight).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapCounters {
    pub heap_sys: u64,
    pub heap_inuse: u64,
    pub heap_idle: u64,
    pub heap_released: u64,
    /// Bytes in live spans per [`Purpose`] (index `Purpose as usize`).
    pub by_purpose: [u64; Purpose::COUNT],
    pub meta_sys: u64,
    pub arena_bytes: u64,
    /// Pages in live heap spans (Go's `pagesInUse`).
    pub pages_in_use: u64,
    /// Bytes of record chunks returned to the OS (see `Gauges::meta_released`).
    pub meta_released: u64,
    /// Span-map pages dropped by the scavenger, in all.
    pub span_map_drops: u64,
}

pub(crate) struct MHeap<M: MemSource> {
    /// Source of address space and memory-state transitions.
    mem: M,
    /// The heap lock and the state it protects.
    locked: Mutex<Locked>,
    /// Address -> arena record; lock-free reads.
    pub(crate) arenas: ArenaIndex,
    /// Pages in live heap spans (Go's `pagesInUse`). Atomic; updated after the pageInUse
    /// bit on publication (Release) and before clearing it on release.
    pages_in_use: AtomicUsize,
    /// Heap counters, atomic (seed 000).
    gauges: Gauges,
    /// Consistent statistics (seed 002).
    pub(crate) stats: HeapStats,
    /// The calling thread's statistics sequence counter, if it has a registered one
    /// (a thread cache); `None` makes write sections take the statistics' leaf lock.
    writer: fn() -> Option<&'static HeapSeq>,
    /// Settings and pacing of the scavenger (`scavenger.rs`).
    pub(crate) scavenger: Scavenger,
    /// Every thread's gated heap cache ever registered (`register_cache`), linked
    /// through `GatedCache::next`: a lock-free stack that only grows (cache records are
    /// reused, never unmapped).
    caches: AtomicPtr<GatedCache>,
    /// The reclaim lock: one reclaimer at a time, and no claim held across `fork()`.
    /// Lock order: `lockrank::TABLE` (first of all).
    reclaim: Mutex<()>,
}

impl<M: MemSource> MHeap<M> {
    crate::sync::const_fn! {
        /// A heap whose statistics writers all take the leaf lock (no thread caches).
        pub(crate) fn new(mem: M) -> Self {
            Self::with_writer(mem, no_writer)
        }
    }

    /// A heap whose statistics write sections use the counter `writer` returns for the
    /// calling thread (the process-wide heap: the thread cache's).
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn with_writer(mem: M, writer: fn() -> Option<&'static HeapSeq>) -> Self {
        MHeap {
            mem,
            locked: Mutex::new(Locked::new(), crate::lockrank::HEAP),
            arenas: ArenaIndex::new(),
            pages_in_use: AtomicUsize::new(0),
            gauges: Gauges::new(),
            stats: HeapStats::new(),
            writer,
            scavenger: Scavenger::new(false, crate::scavenger::NO_BACKGROUND),
            caches: AtomicPtr::new(ptr::null_mut()),
            reclaim: Mutex::new((), crate::lockrank::RECLAIM),
        }
    }

    /// The process-wide heap: like `with_writer`, and its scavenger reads the
    /// `SPANHEAP_*` environment variables and has a background thread (`bg`).
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn global(
        mem: M,
        writer: fn() -> Option<&'static HeapSeq>,
        bg: crate::scavenger::Background,
    ) -> Self {
        let mut h = Self::with_writer(mem, writer);
        h.scavenger = Scavenger::new(true, bg);
        // The page allocator's root summaries, region table and the summary block of
        // the first arenas' region are in `.bss`: no `mmap` for them at start-up.
        static FIXED_SUMMARY: FixedSummary = FixedSummary::new();
        // SAFETY: zero-initialised and static; this function builds the process-wide
        // heap, once (the `HEAP` static), so no other page allocator uses the storage.
        let pages =
            unsafe { PageAlloc::with_fixed(&FIXED_SUMMARY, FIRST_ARENA_HINT >> ROOT_REGION_SHIFT) };
        h.locked = Mutex::new(Locked::with_pages(pages), crate::lockrank::HEAP);
        h
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn with_writer(mem: M, writer: fn() -> Option<&'static HeapSeq>) -> Self {
        MHeap {
            mem,
            locked: Mutex::new(Locked::new(), crate::lockrank::HEAP),
            arenas: ArenaIndex::new(),
            pages_in_use: AtomicUsize::new(0),
            gauges: Gauges::new(),
            stats: HeapStats::new(),
            writer,
            scavenger: Scavenger::new(false, crate::scavenger::NO_BACKGROUND),
            caches: AtomicPtr::new(ptr::null_mut()),
            reclaim: Mutex::new((), crate::lockrank::RECLAIM),
        }
    }

    /// Adds the use of the page heap's own locks (reclaim, statistics, heap) to `t`, per
    /// kind (`mcache::Heap::lock_stats` adds the rest).
    #[cfg_attr(spanheap_loom, allow(dead_code))]
    pub(crate) fn add_lock_stats(&self, t: &mut [LockStats; LOCK_KINDS]) {
        LockStats::add(t, self.reclaim.counts());
        for c in self.stats.lock_counts() {
            LockStats::add(t, c);
        }
        LockStats::add(t, self.locked.counts());
    }

    /// Allocates a span of `npages` pages for `purpose`, its base aligned to
    /// `max(align, PAGE_SIZE)` (`align` a power of two). Returns a fully initialised,
    /// published span, or `None` if the request is impossible or memory is exhausted.
    ///
    /// The heap lock must not be held.
    pub(crate) fn alloc_span(
        &self,
        npages: usize,
        purpose: Purpose,
        spanclass: u8,
        align: usize,
    ) -> Option<NonNull<MSpan>> {
        if npages == 0 || npages > MAX_SPAN_BYTES >> PAGE_SHIFT || align > MAX_ALIGN {
            return None;
        }
        let align_pages = (align >> PAGE_SHIFT).max(1);

        // Step 1, under the lock: a span record and pages, nothing else. The record
        // comes first so that a refill of the record chunk lands below the run rather
        // than right after it, where it would block the run from growing in place.
        let (base, scav, s, bits) = self.locked.lock().with(|h| {
            let s = self.span_record_locked(h)?;
            // Small-object spans also need a bitmap record.
            let bits = if spanclass != 0 {
                match self.bits_record_locked(h, CLASS_TO_NOBJS[spanclass as usize] as usize) {
                    Some(b) => b,
                    None => {
                        // SAFETY: the record was just taken and never published.
                        unsafe { h.spanalloc.free(s.as_ptr()) };
                        return None;
                    }
                }
            } else {
                ptr::null_mut()
            };
            match self.alloc_pages_locked(h, npages, align_pages) {
                Some((base, scav)) => Some((base, scav, s, bits)),
                None => {
                    // SAFETY: the records were just taken and never published.
                    unsafe {
                        h.spanalloc.free(s.as_ptr());
                        if !bits.is_null() {
                            let n = CLASS_TO_NOBJS[spanclass as usize] as usize;
                            h.bitsalloc[bits_bucket(n)].free(bits.cast());
                        }
                    }
                    None
                }
            }
        })?;
        // SAFETY: the record, bitmap record and pages were just taken by this thread.
        unsafe { self.finish_alloc(s, bits, base, npages, purpose, spanclass, scav, false) };
        Some(s)
    }

    /// Steps 2 and 3 of `alloc_span`, without the lock: commit, initialise, publish.
    ///
    /// # Safety
    /// `s`, `bits` (null for a span that is not a small-object span) and the pages are
    /// private to this thread, just taken; `cached` says the pages came from its page
    /// cache.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn finish_alloc(
        &self,
        s: NonNull<MSpan>,
        bits: *mut u64,
        base: usize,
        npages: usize,
        purpose: Purpose,
        spanclass: u8,
        scav: usize,
        cached: bool,
    ) {
        if spanclass != 0 {
            // SAFETY: the span is private to this thread until published below.
            unsafe { init_small(s, spanclass, bits) };
        }
        self.commit_run(base, npages, scav);
        // SAFETY: `s` is a record nobody else can reach yet, and the pages are ours.
        unsafe { self.init_and_publish(s, base, npages, purpose, spanclass, scav, cached) };
    }

    /// Frees a span allocated by [`alloc_span`](Self::alloc_span).
    ///
    /// The heap lock must not be held.
    ///
    /// # Safety
    /// `s` is a live span of this heap, and nobody uses its memory any more.
    pub(crate) unsafe fn free_span(&self, s: NonNull<MSpan>) {
        // SAFETY: forwarded.
        let (base, npages, bits) = unsafe { self.unpublish(s, false) };
        // Under the lock: give back the pages and the records.
        let now = clock_ms();
        let excess = self.locked.lock().with(|h| {
            if let Some((p, b)) = bits {
                // SAFETY: the bitmap record belonged to the span, which is dead.
                unsafe { h.bitsalloc[b].free(p.cast()) };
            }
            h.pages.set_clock(now);
            h.pages.free(base, npages);
            // SAFETY: the span is dead and unreachable except for validating readers.
            unsafe { h.spanalloc.free(s.as_ptr()) };
            self.excess_locked(h)
        });
        self.freed(excess);
    }

    /// Frees spans allocated by [`alloc_span`](Self::alloc_span) in one hold of the
    /// heap lock (an mcentral retiring the spans one drain emptied).
    ///
    /// The heap lock must not be held.
    ///
    /// # Safety
    /// As for `free_span`, for each span.
    pub(crate) unsafe fn free_spans(&self, spans: &[NonNull<MSpan>]) {
        for chunk in spans.chunks(FREE_BATCH) {
            if let [s] = chunk {
                // SAFETY: forwarded.
                unsafe { self.free_span(*s) };
                continue;
            }
            let mut dead = [(0usize, 0usize, None); FREE_BATCH];
            for (d, s) in dead.iter_mut().zip(chunk) {
                // SAFETY: forwarded.
                *d = unsafe { self.unpublish(*s, false) };
            }
            let now = clock_ms();
            let excess = self.locked.lock().with(|h| {
                h.pages.set_clock(now);
                for (&(base, npages, bits), s) in dead.iter().zip(chunk) {
                    if let Some((p, b)) = bits {
                        // SAFETY: the bitmap record belonged to the span, which is dead.
                        unsafe { h.bitsalloc[b].free(p.cast()) };
                    }
                    h.pages.free(base, npages);
                    // SAFETY: the span is dead and unreachable except for validating
                    // readers.
                    unsafe { h.spanalloc.free(s.as_ptr()) };
                }
                self.excess_locked(h)
            });
            self.freed(excess);
        }
    }

    /// The lock-free half of freeing a span: unpublish it (the mirror of
    /// `init_and_publish`) and update the counters (`cached`: its pages go to the
    /// calling thread's page cache). Returns its base, pages and bitmap record (with its
    /// bucket) for the caller to give back.
    ///
    /// # Safety
    /// As for `free_span`.
    unsafe fn unpublish(
        &self,
        s: NonNull<MSpan>,
        cached: bool,
    ) -> (usize, usize, Option<(*mut u64, usize)>) {
        // SAFETY: the caller owns the live span, so its fields are stable and visible.
        let span = unsafe { s.as_ref() };
        let (base, npages) = (span.base(), span.npages());
        // SAFETY: as above.
        let info = unsafe { span.info() };
        debug_assert_eq!(
            span.state(),
            if info.purpose.is_manual() {
                SpanState::Manual
            } else {
                SpanState::InUse
            }
        );

        // Unpublish, mirroring the publication order.
        if !info.purpose.is_manual() {
            // Release: pairs with readers' Acquire; see `init_and_publish`.
            self.pages_in_use.fetch_sub(npages, Ordering::Release);
            self.arenas.clear_in_use(base);
        }
        span.set_state(SpanState::Dead);
        self.account_free(info.purpose, info.spanclass, npages << PAGE_SHIFT, cached);
        let bits = if info.spanclass != 0 {
            // SAFETY: the caller owns the dead span.
            let p = unsafe { span.small.private_mut() };
            Some((p.bits, bits_bucket(p.nelems as usize)))
        } else {
            None
        };
        (base, npages, bits)
    }

    /// Shrinks a live heap span in place to `new_npages` (>= 1) pages, freeing the tail.
    ///
    /// # Safety
    /// `s` is a live heap span whose memory past `new_npages` pages nobody uses, and the
    /// caller owns it (no concurrent resize or free).
    pub(crate) unsafe fn shrink_span(&self, s: NonNull<MSpan>, new_npages: usize) {
        // SAFETY: the caller owns the live span.
        let span = unsafe { s.as_ref() };
        let (base, old) = (span.base(), span.npages());
        debug_assert!(new_npages >= 1 && new_npages < old);
        let n = old - new_npages;
        // The record stops covering the tail before the tail's pages become free.
        span.npages.store(new_npages, Ordering::Relaxed);
        self.pages_in_use.fetch_sub(n, Ordering::Release);
        self.account_free(Purpose::Heap, 0, n << PAGE_SHIFT, false);
        let now = clock_ms();
        let excess = self.locked.lock().with(|h| {
            h.pages.set_clock(now);
            h.pages.free(base + (new_npages << PAGE_SHIFT), n);
            self.excess_locked(h)
        });
        self.freed(excess);
    }

    /// Grows a live heap span in place to `new_npages` pages if the pages after it are
    /// free. Returns whether it did.
    ///
    /// # Safety
    /// As for [`shrink_span`](Self::shrink_span).
    pub(crate) unsafe fn grow_span_in_place(&self, s: NonNull<MSpan>, new_npages: usize) -> bool {
        // SAFETY: the caller owns the live span.
        let span = unsafe { s.as_ref() };
        let (base, old) = (span.base(), span.npages());
        debug_assert!(new_npages > old);
        if new_npages > MAX_SPAN_BYTES >> PAGE_SHIFT {
            return false;
        }
        let n = new_npages - old;
        let end = base + (old << PAGE_SHIFT);
        let scav = self.locked.lock().with(|h| {
            if h.pages.is_free(end, n) || self.grow_at_top_locked(h, end, n) {
                Some(h.pages.alloc_range(end, n))
            } else {
                None
            }
        });
        let Some(scav) = scav else { return false };
        self.commit_run(end, n, scav);
        // Record that these pages are being handed out (their contents do not matter:
        // realloc makes no promise about the new bytes).
        let _ = self.arenas.needs_zero(end, n);
        self.account_alloc(Purpose::Heap, 0, n << PAGE_SHIFT, scav, false);
        self.arenas.set_spans(end, n, s.as_ptr(), 0);
        span.npages.store(new_npages, Ordering::Relaxed);
        self.pages_in_use.fetch_add(n, Ordering::Release);
        true
    }

    /// For a block ending at `end` that needs `n` more pages where the heap ends: if
    /// every page from `end` to the end of the heap is free and the next arena is to be
    /// reserved right there (arenas ascend, `FIRST_ARENA_HINT`), grows the heap by what
    /// is missing, so that the block can grow in place instead of being copied (a
    /// buffer grown by `realloc` ends up at the top of the heap and stays there).
    /// Returns whether `[end, end + n pages)` is free now (the growth may land
    /// elsewhere: then the heap grew for nothing the block can use, and its pages stay
    /// free for others). Needs the heap lock (`h`).
    fn grow_at_top_locked(&self, h: &mut Locked, end: usize, n: usize) -> bool {
        let top = h.hint;
        let Some(want) = end.checked_add(n << PAGE_SHIFT) else {
            return false;
        };
        if end > top || want <= top {
            return false;
        }
        let have = (top - end) >> PAGE_SHIFT;
        if have > 0 && !h.pages.is_free(end, have) {
            return false;
        }
        self.grow_locked(h, n - have, 1).is_ok() && h.pages.is_free(end, n)
    }

    /// The span-map entry for `addr`, without validation: for pointers the caller knows
    /// are live blocks of this heap. Null if `addr` is outside the heap. Lock-free.
    #[inline]
    pub(crate) fn span_of_unchecked(&self, addr: usize) -> *mut MSpan {
        match self.arenas.arena_of(addr) {
            Some(a) => a.span_at(addr),
            None => ptr::null_mut(),
        }
    }

    /// `span_of_unchecked` through the caller's arena memo (`ArenaIndex::arena_of_hinted`).
    #[inline(always)]
    pub(crate) fn span_of_hinted(&self, addr: usize, hint: &mut ArenaHint) -> *mut MSpan {
        match self.arenas.arena_of_hinted(addr, hint) {
            Some(a) => a.span_at(addr),
            None => ptr::null_mut(),
        }
    }

    /// The live span containing `addr`, or `None` if `addr` is not in a live span of this
    /// heap ("not ours"). Lock-free; safe for any address, including foreign ones. For an
    /// address whose span is being freed concurrently the answer is either.
    pub(crate) fn span_of(&self, addr: usize) -> Option<NonNull<MSpan>> {
        self.span_and_offset_of(addr).map(|(s, _)| s)
    }

    /// `span_of`, with the offset of `addr` from the span's base (read once, with the
    /// range test).
    #[inline]
    pub(crate) fn span_and_offset_of(&self, addr: usize) -> Option<(NonNull<MSpan>, usize)> {
        let s = NonNull::new(self.span_of_unchecked(addr))?;
        // SAFETY: span-map entries always point to valid (possibly dead) records; span
        // records are never unmapped.
        let span = unsafe { s.as_ref() };
        // Acquire (inside `state`) pairs with the Release in `init_and_publish`:
        // base/npages read afterwards are those of the published span.
        if span.state() == SpanState::Dead {
            return None;
        }
        let off = addr.wrapping_sub(span.base());
        if off < span.npages() << PAGE_SHIFT {
            Some((s, off))
        } else {
            None
        }
    }

    /// Whether the pageInUse bit is set for the page at `addr`.
    #[cfg(test)]
    pub(crate) fn page_marked_in_use(&self, addr: usize) -> bool {
        self.arenas.is_marked_in_use(addr)
    }

    /// Pages in live heap spans (Acquire: pairs with the Release of publication, so the
    /// spans counted are visible). Lock-free.
    pub(crate) fn pages_in_use(&self) -> usize {
        self.pages_in_use.load(Ordering::Acquire)
    }

    /// The OS memory source.
    pub(crate) fn mem(&self) -> &M {
        &self.mem
    }

    /// A snapshot of the counters.
    pub(crate) fn counters(&self) -> HeapCounters {
        let st = &self.gauges;
        let pages_in_use = self.pages_in_use.load(Ordering::Acquire) as u64;
        let heap_inuse = pages_in_use << PAGE_SHIFT;
        let mut by_purpose = [0u64; Purpose::COUNT];
        for (d, c) in by_purpose.iter_mut().zip(st.by_purpose.iter()) {
            *d = c.load(Ordering::Relaxed);
        }
        by_purpose[Purpose::Heap as usize] = heap_inuse;
        let heap_sys = st.heap_sys.load(Ordering::Relaxed);
        HeapCounters {
            heap_sys,
            heap_inuse,
            // Derived (see `Gauges`); while spans are in flight the two loads may
            // disagree, so never below zero.
            heap_idle: heap_sys.saturating_sub(heap_inuse),
            heap_released: st.heap_released.load(Ordering::Relaxed),
            by_purpose,
            meta_sys: st.meta_sys.load(Ordering::Relaxed),
            arena_bytes: st.arena_bytes.load(Ordering::Relaxed),
            pages_in_use,
            meta_released: st.meta_released.load(Ordering::Relaxed),
            span_map_drops: st.span_map_drops.load(Ordering::Relaxed),
        }
    }

    /// The atomic counters as the public [`HeapGauges`].
    pub(crate) fn gauges(&self) -> HeapGauges {
        let c = self.counters();
        HeapGauges {
            heap_sys: c.heap_sys,
            heap_inuse: c.heap_inuse,
            heap_idle: c.heap_idle,
            heap_released: c.heap_released,
            pages_in_use: c.pages_in_use,
        }
    }

    /// Runs a statistics write section for the calling thread (see `stats.rs`): `f` only
    /// adds deltas. Sections never nest.
    #[inline]
    pub(crate) fn stats_update(&self, f: impl FnOnce(&HeapDelta)) {
        self.stats.update((self.writer)(), f);
    }

    /// Page-allocator view, for tests: (free pages, scavenged free pages, span records in use).
    #[cfg(test)]
    pub(crate) fn page_state(&self) -> (usize, usize, usize) {
        self.locked.lock().with(|h| {
            (
                h.pages.free_pages(),
                h.pages.scavenged_pages(),
                h.spanalloc.inuse(),
            )
        })
    }

    /// For the fork handlers (`mcache::Heap::fork_lock_all`, which interleaves these
    /// with the locks it owns, in rank order): the reclaim lock, first of all.
    pub(crate) fn fork_lock_reclaim(&self) {
        self.reclaim.fork_lock();
    }

    /// For the fork handlers: the heap lock.
    pub(crate) fn fork_lock_heap(&self) {
        self.locked.fork_lock();
    }

    /// Releases the heap lock taken by `fork_lock_heap`.
    ///
    /// # Safety
    /// The calling thread holds it (in the child of a fork, the thread that forked).
    pub(crate) unsafe fn fork_unlock_heap(&self) {
        // SAFETY: forwarded.
        unsafe { self.locked.fork_unlock() };
    }

    /// Releases the reclaim lock taken by `fork_lock_reclaim`.
    ///
    /// # Safety
    /// As for `fork_unlock_heap`.
    pub(crate) unsafe fn fork_unlock_reclaim(&self) {
        // SAFETY: forwarded.
        unsafe { self.reclaim.fork_unlock() };
    }

    // ----------------------------------------------------------------------------------
    // Internals.
    // ----------------------------------------------------------------------------------

    /// Takes `npages` pages aligned to `align_pages` pages, growing the heap if needed.
    /// Needs the heap lock (`h`).
    fn alloc_pages_locked(
        &self,
        h: &mut Locked,
        npages: usize,
        align_pages: usize,
    ) -> Option<(usize, usize)> {
        let found = if align_pages > 1 {
            h.pages.alloc_aligned(npages, align_pages)
        } else {
            h.pages.alloc(npages)
        };
        if found.is_some() {
            return found;
        }
        let region = self.grow_locked(h, npages, align_pages).ok()?;
        if align_pages > 1 {
            // The new region was reserved with the alignment asked for, so its first
            // `npages` pages are an aligned free run. Take them directly: a first-fit
            // search for an aligned run would need `npages + align_pages - 1` free pages.
            debug_assert!(region % (align_pages << PAGE_SHIFT) == 0);
            Some((region, h.pages.alloc_range(region, npages)))
        } else {
            h.pages.alloc(npages)
        }
    }

    /// Grows the heap by whole arenas so that `npages` pages aligned to `align_pages`
    /// fit. Returns the base of the new region. Needs the heap lock (`h`).
    ///
    /// If the OS refuses (`OsError::NoMemory`: address space or memory exhausted,
    /// `RLIMIT_AS`), the arenas whose every page is free are given back to it
    /// ([`release_free_arenas_locked`](Self::release_free_arenas_locked)) and, if there
    /// were any, the growth is tried once more: a heap that is all free can then serve
    /// a request longer than any of its free runs, in the address space it gave back.
    fn grow_locked(
        &self,
        h: &mut Locked,
        npages: usize,
        align_pages: usize,
    ) -> Result<usize, OsError> {
        match self.grow_once_locked(h, npages, align_pages) {
            Err(OsError::NoMemory(e)) => {
                if self.release_free_arenas_locked(h) == 0 {
                    return Err(OsError::NoMemory(e));
                }
                self.grow_once_locked(h, npages, align_pages)
            }
            r => r,
        }
    }

    /// Gives every arena whose pages are all free in the page allocator back to the OS
    /// (`MemSource::release`, `munmap`), under the heap lock (`h`). Returns the bytes
    /// released.
    ///
    /// Free pages held anywhere else (threads' page and chunk caches, kept large
    /// blocks, mcentral spares, a scavenger pass's runs) are allocated in the page
    /// allocator, so an arena holding one is not taken; nor is one with a record chunk
    /// or any live span. Each arena taken is first removed from the page allocator
    /// (`PageAlloc::shrink`: no search, cache refill or scavenger pass finds its pages
    /// again), then its record forgets its pages (span map emptied, `zeroed_base` 0:
    /// `ArenaIndex::forget_pages_locked`), then it is unmapped. The record stays in the
    /// index: if the OS hands the range back to a later growth, `grow_once_locked`
    /// reuses it and `PageAlloc::grow` takes the chunks in again.
    ///
    /// Accounting: the arena leaves `arena_bytes` and `heap_sys` (it was idle, so
    /// `heap_idle` drops by as much); its scavenged pages leave `heap_released` and the
    /// released bytes of the statistics, its dirty free pages (which `munmap` drops as
    /// well) the committed bytes; `Stats::unmapped_bytes` counts the arena. The page
    /// allocator's free and scavenged counts drop with it, so the scavenger's view (its
    /// excess, its dirty marks) stays the page allocator's.
    fn release_free_arenas_locked(&self, h: &mut Locked) -> usize {
        let (mut bytes, mut scav_bytes) = (0usize, 0usize);
        let mut from = 0;
        while let Some(base) = h.pages.free_region(from, ARENA_SIZE) {
            from = base + ARENA_SIZE;
            let Some(scav) = h.pages.shrink(base, ARENA_SIZE) else {
                debug_assert!(false, "a free region could not be taken out");
                continue;
            };
            if !self.arenas.forget_pages_locked(&self.mem, base) {
                self.count_refused_decommit(core::mem::size_of::<*mut MSpan>() * PAGES_PER_ARENA);
            }
            // SAFETY: an arena of this heap (a page-aligned part of one of its
            // reservations) that the page allocator no longer hands out and whose pages
            // nobody uses: every one was free, and we hold the heap lock.
            unsafe {
                self.mem
                    .release(NonNull::new_unchecked(base as *mut u8), ARENA_SIZE)
            };
            bytes += ARENA_SIZE;
            scav_bytes += scav << PAGE_SHIFT;
        }
        if bytes == 0 {
            return 0;
        }
        sub(&self.gauges.arena_bytes, bytes);
        sub(&self.gauges.heap_sys, bytes);
        sub(&self.gauges.heap_released, scav_bytes);
        self.stats_update(|d| {
            d.sub(field::ARENA, bytes as u64);
            d.sub(field::RELEASED, scav_bytes as u64);
            d.sub(field::COMMITTED, (bytes - scav_bytes) as u64);
            d.add(field::UNMAPPED, bytes as u64);
        });
        bytes
    }

    /// One try of [`grow_locked`](Self::grow_locked).
    fn grow_once_locked(
        &self,
        h: &mut Locked,
        npages: usize,
        align_pages: usize,
    ) -> Result<usize, OsError> {
        let bytes = npages << PAGE_SHIFT;
        let size = bytes.checked_add(ARENA_SIZE - 1).ok_or(OsError::TooLarge)? & !(ARENA_SIZE - 1);
        let align = (align_pages << PAGE_SHIFT).max(ARENA_SIZE);
        // None -> Prepared (one `mmap` where the hint is free). The page allocator then
        // treats the whole region as free and scavenged, and `alloc_span` commits what
        // it hands out.
        let region = self.mem.reserve_mapped(size, align, h.hint)?;
        let base = region.as_ptr() as usize;
        let mut meta = 0;
        let result = (|| {
            let mut a = base;
            while a < base + size {
                let fresh_l2 = self.arenas.ensure_l2_locked(&self.mem, a)?;
                meta += fresh_l2;
                // An address range can come back to us after a failed growth released
                // it; its record is still in the index and is reused. (A fresh L2 array
                // has no record yet: not reading it saves a page fault at start-up.)
                if fresh_l2 != 0 || self.arenas.arena_of(a).is_none() {
                    let (rec, n) = HeapArena::new_in(&self.mem)?;
                    meta += n;
                    self.arenas.insert_locked(a, rec);
                }
                a += ARENA_SIZE;
            }
            h.pages.grow(&self.mem, base, size)
        })();
        self.count_meta(meta);
        if let Err(e) = result {
            // Arena records already inserted stay (harmless: their span maps are empty
            // and the page allocator never hands out their pages).
            // SAFETY: the whole reservation; nothing in it was handed out.
            unsafe { self.mem.release(region, size) };
            return Err(e);
        }
        add(&self.gauges.arena_bytes, size);
        add(&self.gauges.heap_sys, size);
        add(&self.gauges.heap_released, size);
        // A new arena is mapped but untouched: released until pages are handed out.
        self.stats_update(|d| {
            d.add(field::ARENA, size as u64);
            d.add(field::RELEASED, size as u64);
        });
        h.hint = base + size;
        Ok(base)
    }

    /// Counts one `decommit` of `bytes` that the OS refused.
    fn count_refused_decommit(&self, bytes: usize) {
        self.stats_update(|d| {
            d.add(field::DECOMMIT_FAILURES, 1);
            d.add(field::DECOMMIT_FAILED_BYTES, bytes as u64);
        });
    }

    /// Prepared -> Ready for a run that contained `scav` scavenged bytes.
    fn commit_run(&self, base: usize, npages: usize, scav: usize) {
        if scav != 0 {
            // SAFETY: the run was just taken from the page allocator, so it is heap
            // memory of ours in the Prepared or Ready state, and nobody else uses it.
            unsafe {
                self.mem.commit(
                    NonNull::new_unchecked(base as *mut u8),
                    npages << PAGE_SHIFT,
                )
            };
        }
    }

    /// Fills in an unpublished span and publishes it (the protocol in the module docs).
    ///
    /// # Safety
    /// `s` is a record only this thread can reach, and `[base, base + npages pages)` was
    /// just taken from the page allocator by this thread.
    // The arguments are the span's fields and how its pages were had; a struct for them
    // would be built and taken apart again at its three callers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn init_and_publish(
        &self,
        s: NonNull<MSpan>,
        base: usize,
        npages: usize,
        purpose: Purpose,
        spanclass: u8,
        scav: usize,
        cached: bool,
    ) {
        let nbytes = npages << PAGE_SHIFT;
        // Fresh-from-OS memory (beyond the arena's zeroed_base) and fully scavenged runs
        // (MADV_DONTNEED reads back as zero) need no clearing. Always ask `needs_zero`: it
        // also records that this range has now been handed out.
        let fresh = !self.arenas.needs_zero(base, npages);
        let needzero = !(fresh || (scav == nbytes && self.mem.decommit_zeroes()));

        // SAFETY: the record is private to this thread (caller's contract).
        let span = unsafe { s.as_ref() };
        span.base.store(base, Ordering::Relaxed);
        span.npages.store(npages, Ordering::Relaxed);
        // Keep the bitmap record `init_small` attached (null for other spans).
        let bits = if spanclass != 0 {
            // SAFETY: the span is private; `init_small` ran on this thread.
            unsafe { span.small.private_mut() }.bits
        } else {
            ptr::null_mut()
        };
        // SAFETY: as above, the span is not published yet.
        unsafe {
            span.set_info(SpanInfo {
                purpose,
                spanclass,
                needzero,
                bits,
            })
        };

        self.account_alloc(purpose, spanclass, nbytes, scav, cached);

        // Publication. The span must be completely initialised before this point.
        // (1) Span map: Release pairs with the Acquire in `HeapArena::span_at`.
        self.arenas.set_spans(base, npages, s.as_ptr(), spanclass);
        // (2) State, last of the span's own fields: Release pairs with the Acquire in
        //     `MSpan::state`; from here a validating reader accepts the span.
        span.set_state(if purpose.is_manual() {
            SpanState::Manual
        } else {
            SpanState::InUse
        });
        if !purpose.is_manual() {
            // (3) pageInUse: publishes the span to lock-free walkers of the bitmap.
            self.arenas.mark_in_use(base);
            // (4) pagesInUse, last: a reader that sees the new count (Acquire) also
            //     sees the bit and the span.
            self.pages_in_use.fetch_add(npages, PUBLISH_COUNT);
        }
    }

    /// Counter updates for `nbytes` taken from idle memory for `purpose`, of which `scav`
    /// bytes had been released (seed 004: the one place for allocation); `cached`: the
    /// pages came from a thread's page cache.
    fn account_alloc(
        &self,
        purpose: Purpose,
        spanclass: u8,
        nbytes: usize,
        scav: usize,
        cached: bool,
    ) {
        let st = &self.gauges;
        if scav != 0 {
            sub(&st.heap_released, scav);
        }
        if purpose.is_manual() {
            // Manual spans are lent out of the heap: they leave heap_sys. (Heap spans
            // are counted by `pages_in_use` alone: see `Gauges`.)
            add(&st.by_purpose[purpose as usize], nbytes);
            sub(&st.heap_sys, nbytes);
        }
        let (n, scav) = (nbytes as u64, scav as u64);
        self.stats_update(|d| {
            if scav != 0 {
                d.sub(field::RELEASED, scav);
                d.add(field::COMMITTED, scav);
                d.add(field::REUSED_RELEASED, scav);
            }
            d.add(field::INUSE, n);
            d.add(field::PURPOSE + purpose as usize, n);
            if !purpose.is_manual() {
                d.add(field::PAGES_IN_USE, n >> PAGE_SHIFT);
            }
            if spanclass != 0 {
                d.add(field::SMALL_SPANS + usize::from(spanclass), 1);
            }
            if cached {
                d.sub(field::PAGE_CACHED, n);
            }
        });
    }

    /// Counter updates for `nbytes` given back to idle memory by `purpose` (the one place
    /// for free); `cached`: the pages go to a thread's page cache.
    fn account_free(&self, purpose: Purpose, spanclass: u8, nbytes: usize, cached: bool) {
        let st = &self.gauges;
        if purpose.is_manual() {
            sub(&st.by_purpose[purpose as usize], nbytes);
            add(&st.heap_sys, nbytes);
        }
        let n = nbytes as u64;
        self.stats_update(|d| {
            d.sub(field::INUSE, n);
            d.sub(field::PURPOSE + purpose as usize, n);
            if !purpose.is_manual() {
                d.sub(field::PAGES_IN_USE, n >> PAGE_SHIFT);
            }
            if spanclass != 0 {
                d.sub(field::SMALL_SPANS + usize::from(spanclass), 1);
            }
            if cached {
                d.add(field::PAGE_CACHED, n);
            }
        });
    }
}

/// The clock that frees stamp on page-allocator chunks, in milliseconds (wrapping).
/// Loom models run no scavenger and use a constant.
#[inline]
fn clock_ms() -> u32 {
    #[cfg(not(spanheap_loom))]
    {
        (crate::os::coarse_now_ns() / 1_000_000) as u32
    }
    #[cfg(spanheap_loom)]
    {
        0
    }
}

/// The statistics writer of heaps without thread caches: every section takes the lock.
fn no_writer() -> Option<&'static HeapSeq> {
    None
}

/// Initialises the small-object state of an unpublished span of class `spanclass`:
/// every object free, owned by nobody yet (the mcentral hands it to a cache).
///
/// # Safety
/// The span is private to the caller, and `bits` is a bitmap record large enough for
/// the class.
unsafe fn init_small(s: NonNull<MSpan>, spanclass: u8, bits: *mut u64) {
    let nelems = CLASS_TO_NOBJS[spanclass as usize] as usize;
    let words = BITS_WORDS[bits_bucket(nelems)];
    // SAFETY: the span is private (caller's contract).
    let small = unsafe { &s.as_ref().small };
    // SAFETY: as above.
    let p = unsafe { small.private_mut() };
    *p = SmallPrivate {
        bits,
        words: words as u8,
        next_word: 0,
        nelems: nelems as u16,
        elemsize: CLASS_TO_SIZE[spanclass as usize] as u32,
        ..SmallPrivate::EMPTY
    };
    for w in 0..words {
        // Bits at or past nelems are permanently "allocated".
        let valid = nelems.saturating_sub(w * 64).min(64);
        let invalid = if valid == 64 { 0 } else { !0u64 << valid };
        // SAFETY: w < words; the record is private with the span.
        unsafe {
            *p.alloc(w) = invalid;
            // Relaxed: the span is not published yet; publication orders it.
            p.remote(w).store(0, Ordering::Relaxed);
            // Checked mode: no object of the new span is live.
            #[cfg(feature = "checked")]
            (*bits.cast::<crate::sync::AtomicU64>().add(2 * words + w)).store(0, Ordering::Relaxed);
        }
    }
    small.owner.store(0, Ordering::Relaxed);
    small
        .rstate
        .store(rstate(RSTATE_OWNED, 0), Ordering::Relaxed);
    small.place.store(place::CACHED, Ordering::Relaxed);
}

#[cfg(test)]
mod tests;
