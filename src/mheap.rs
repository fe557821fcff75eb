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
//! `alloc_span_with` first tries the calling thread's `HeapCache` (Go's page cache and
//! mspan cache, `pagecache.rs`): a span of fewer than 16 pages is carved from the
//! thread's 64-page block with its record from the thread's record cache, and steps 2
//! and 3 follow unchanged; no lock at all. The lock is taken only to refill the cache.
//! `free_span_with` returns the pages to that block when they lie in it, and the
//! records to the record cache, again without the lock.
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
//!
//! Lock order: the heap lock is a leaf. Nothing is locked while holding it, and it is
//! never taken by code that already holds it (no allocation happens under it: all
//! metadata comes from the OS layer or from pages the heap takes for itself).

use core::ptr::{self, NonNull};

use crate::arena::{ArenaHint, ArenaIndex, HeapArena, ARENA_SIZE};
use crate::fixalloc::{FixAlloc, RawFixAlloc};
#[cfg(not(spanheap_loom))]
use crate::mcache::MCache;
use crate::mcache::SharedCache;
use crate::mcentral::MCentral;
use crate::mspan::{
    place, rstate, MSpan, Purpose, SmallPrivate, SpanInfo, SpanState, RSTATE_OWNED,
};
use crate::os::{MemSource, OsError, PAGE_SHIFT, PAGE_SIZE};
use crate::pagealloc::{PageAlloc, ScavPolicy};
use crate::pagecache::{
    ChunkCache, GatedCache, HeapCache, PageCache, BITS_RECS, MAX_CACHED_SPAN_PAGES,
    MAX_CHUNK_SPAN_PAGES, SPAN_RECS,
};
use crate::scavenger::{Scavenger, BACKLOG_WAIT, BG_OWNED, PASS_BUDGET_NS, START_BYTES};
use crate::sizeclasses::NUM_CLASSES;
use crate::sizeclasses::{CLASS_TO_NOBJS, CLASS_TO_SIZE};
use crate::stats::{field, HeapDelta, HeapGauges, HeapSeq, HeapStats};
use crate::sync::init_atomics;
use crate::sync::{AtomicPtr, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};

/// The largest span, in bytes; larger requests fail with null (2^46 = 64 TiB, half of a
/// 47-bit user address space).
pub(crate) const MAX_SPAN_BYTES: usize = 1 << 46;
/// The largest alignment served; beyond it the address space cannot help.
pub(crate) const MAX_ALIGN: usize = 1 << 46;
/// Pages in one chunk of span records, bitmap records or thread-cache records (64 KiB,
/// allocated aligned to its size: see `fixalloc.rs`).
const SPAN_CHUNK_PAGES: usize = 8;
const _: () = assert!(SPAN_CHUNK_PAGES << PAGE_SHIFT == crate::fixalloc::CHUNK_BYTES);
/// Bitmap record sizes, in 64-bit words per bitmap (a record holds two bitmaps).
const BITS_WORDS: [usize; 5] = [1, 2, 4, 8, 16];
/// Bitmaps per record: remote-free and alloc bits, and in checked mode the live bits.
#[cfg(not(feature = "checked"))]
const BITS_MAPS: usize = 2;
#[cfg(feature = "checked")]
const BITS_MAPS: usize = 3;

/// Words per bitmap of a span of `nelems` objects (checked mode finds its live bits
/// at `2 * words` from the record's start).
#[cfg(feature = "checked")]
pub(crate) fn bits_words(nelems: usize) -> usize {
    BITS_WORDS[bits_bucket(nelems)]
}

/// The ordering of the `pages_in_use` increment that ends a span's publication. The
/// loom mutant `count_relaxed` weakens it to show that the models catch it.
#[cfg(not(spanheap_mutant = "count_relaxed"))]
const PUBLISH_COUNT: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "count_relaxed")]
const PUBLISH_COUNT: Ordering = Ordering::Relaxed;

/// Index into `BITS_WORDS` for a span of `nelems` objects.
#[inline]
fn bits_bucket(nelems: usize) -> usize {
    let w = nelems.div_ceil(64).max(1);
    (usize::BITS - (w - 1).leading_zeros()) as usize
}

/// Everything the heap lock protects.
pub(crate) struct Locked {
    /// Free/allocated state of every heap page.
    pages: PageAlloc,
    /// Span records.
    spanalloc: FixAlloc<MSpan>,
    /// Small-object bitmap records, one allocator per size in `BITS_WORDS`.
    bitsalloc: [RawFixAlloc; 5],
    /// Thread-cache records (the `GlobalAlloc` front end only).
    #[cfg(not(spanheap_loom))]
    cachealloc: FixAlloc<MCache>,
    /// Where the next arena reservation is tried first (just past the last one), so
    /// arenas stay contiguous.
    hint: usize,
    /// The record allocators' released bytes as last published to
    /// `Gauges::meta_released`.
    meta_released: usize,
}

impl Locked {
    const fn new() -> Self {
        Locked {
            pages: PageAlloc::new(),
            spanalloc: FixAlloc::new(),
            bitsalloc: [
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[0], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[1], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[2], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[3], 8),
                RawFixAlloc::new(BITS_MAPS * 8 * BITS_WORDS[4], 8),
            ],
            #[cfg(not(spanheap_loom))]
            cachealloc: FixAlloc::new(),
            hint: 0,
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
    /// One mcentral per size class (index 0 unused).
    pub(crate) central: [MCentral; NUM_CLASSES],
    /// Settings and pacing of the scavenger (`scavenger.rs`).
    pub(crate) scavenger: Scavenger,
    /// Every thread's gated heap cache ever registered (`register_cache`), linked
    /// through `GatedCache::next`: a lock-free stack that only grows (cache records are
    /// reused, never unmapped).
    caches: AtomicPtr<GatedCache>,
    /// The reclaim lock: one reclaimer at a time, and no claim held across `fork()`.
    /// Lock order: `lockrank::TABLE` (first of all).
    reclaim: Mutex<()>,
    /// The cache of threads without one (`mcache.rs`).
    pub(crate) shared: SharedCache,
}

/// The mcentrals, one per class, each with its class's lock rank.
#[cfg(not(spanheap_loom))]
const fn centrals() -> [MCentral; NUM_CLASSES] {
    let mut a = [const { MCentral::new(0) }; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        a[c] = MCentral::new(c);
        c += 1;
    }
    a
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
            central: centrals(),
            scavenger: Scavenger::new(false, crate::scavenger::NO_BACKGROUND),
            caches: AtomicPtr::new(ptr::null_mut()),
            reclaim: Mutex::new((), crate::lockrank::RECLAIM),
            shared: SharedCache::new(),
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
            central: core::array::from_fn(MCentral::new),
            scavenger: Scavenger::new(false, crate::scavenger::NO_BACKGROUND),
            caches: AtomicPtr::new(ptr::null_mut()),
            reclaim: Mutex::new((), crate::lockrank::RECLAIM),
            shared: SharedCache::new(),
        }
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

    /// `alloc_span` through the calling thread's heap cache `tc`: spans of fewer than
    /// `MAX_CACHED_SPAN_PAGES` pages with no alignment beyond a page come from the
    /// thread's page block and record caches, without the heap lock (the lock is taken
    /// only when the cache must be refilled). Anything else, or a cache that cannot
    /// help, goes through `alloc_span`.
    ///
    /// The heap lock must not be held.
    pub(crate) fn alloc_span_with(
        &self,
        npages: usize,
        purpose: Purpose,
        spanclass: u8,
        align: usize,
        tc: &mut HeapCache,
    ) -> Option<NonNull<MSpan>> {
        if npages == 0 || npages > MAX_CHUNK_SPAN_PAGES || align > PAGE_SIZE {
            return self.alloc_span(npages, purpose, spanclass, align);
        }
        if npages >= MAX_CACHED_SPAN_PAGES {
            return self.alloc_span_chunk(npages, purpose, spanclass, align, tc);
        }
        let bucket =
            (spanclass != 0).then(|| bits_bucket(CLASS_TO_NOBJS[spanclass as usize] as usize));
        let ready = |tc: &HeapCache| tc.nspans > 0 && bucket.map_or(true, |b| tc.nbits[b] > 0);
        if tc.pages.is_empty() || !ready(tc) {
            self.refill_heap_cache(tc, bucket);
            if !ready(tc) {
                return self.alloc_span(npages, purpose, spanclass, align);
            }
        }
        let Some((base, scav)) = tc.pages.alloc(npages) else {
            // The block has no run this long: leave it for smaller spans.
            return self.alloc_span(npages, purpose, spanclass, align);
        };
        tc.nspans -= 1;
        let s = tc.spans[tc.nspans];
        let bits = match bucket {
            Some(b) => {
                tc.nbits[b] -= 1;
                tc.bits[b][tc.nbits[b]]
            }
            None => ptr::null_mut(),
        };
        // SAFETY: cached records are free records of this heap (Dead), owned by the
        // cache; the pages were allocated to the cache.
        let s = unsafe { NonNull::new_unchecked(s) };
        // SAFETY: all three were private to the cache, now to this call.
        unsafe { self.finish_alloc(s, bits, base, npages, purpose, spanclass, scav, true) };
        Some(s)
    }

    /// `alloc_span_with` for spans of 16..=128 pages: from the thread's chunk cache,
    /// taking a new wholly free chunk under the lock when the current one has no run
    /// long enough. Falls back to `alloc_span` when no chunk can be had.
    fn alloc_span_chunk(
        &self,
        npages: usize,
        purpose: Purpose,
        spanclass: u8,
        align: usize,
        tc: &mut HeapCache,
    ) -> Option<NonNull<MSpan>> {
        if tc.nspans == 0 {
            self.refill_heap_cache(tc, None);
            if tc.nspans == 0 {
                return self.alloc_span(npages, purpose, spanclass, align);
            }
        }
        let got = match tc.chunk.alloc(npages).or_else(|| tc.prev.alloc(npages)) {
            Some(r) => Some(r),
            None => {
                self.refill_chunk_cache(tc);
                tc.chunk.alloc(npages)
            }
        };
        let Some((base, scav)) = got else {
            return self.alloc_span(npages, purpose, spanclass, align);
        };
        tc.nspans -= 1;
        // SAFETY: cached records are free records of this heap, owned by the cache.
        let s = unsafe { NonNull::new_unchecked(tc.spans[tc.nspans]) };
        let bits =
            if spanclass != 0 {
                // Small-object spans are under 16 pages; none comes here. Keep the general
                // path correct anyway: a bitmap record under the lock.
                match self.locked.lock().with(|h| {
                    self.bits_record_locked(h, CLASS_TO_NOBJS[spanclass as usize] as usize)
                }) {
                    Some(b) => b,
                    None => {
                        tc.nspans += 1;
                        if let Some(c) = tc.chunk_with(base, npages) {
                            c.free(base, npages);
                        }
                        return None;
                    }
                }
            } else {
                ptr::null_mut()
            };
        // SAFETY: the record, bitmap and pages are private to this call.
        unsafe { self.finish_alloc(s, bits, base, npages, purpose, spanclass, scav, true) };
        Some(s)
    }

    /// Takes a new chunk for the thread: the current one becomes the previous one, the
    /// previous one's free pages go back to the page allocator, and the first wholly
    /// free chunk is taken (growing the heap if there is none), under the heap lock.
    /// Leaves the current chunk empty if nothing can be had.
    #[cold]
    fn refill_chunk_cache(&self, tc: &mut HeapCache) {
        let old = core::mem::replace(&mut tc.prev, tc.chunk);
        let now = clock_ms();
        let (new, excess) = self.locked.lock().with(|h| {
            if old.base != 0 {
                h.pages.set_clock(now);
                h.pages
                    .free_from_chunk_cache(old.base, &old.free, &old.scav);
            }
            let new = h.pages.alloc_chunk_to_cache().or_else(|| {
                self.grow_locked(h, crate::pagecache::CHUNK_CACHE_PAGES, 1)
                    .ok()?;
                h.pages.alloc_chunk_to_cache()
            });
            (new, self.excess_locked(h))
        });
        self.freed(excess);
        let gave = old.count() as u64;
        tc.chunk = match new {
            Some((base, free, scav)) => ChunkCache { base, free, scav },
            None => ChunkCache::EMPTY,
        };
        let took = tc.chunk.count() as u64;
        if gave != took {
            self.stats_update(|d| {
                d.add(field::PAGE_CACHED, took * PAGE_SIZE as u64);
                d.sub(field::PAGE_CACHED, gave * PAGE_SIZE as u64);
            });
        }
        self.maybe_scavenge();
    }

    /// Refills `tc` under the heap lock: a new page block if the current one is empty
    /// (growing the heap if no page is free), span records up to half the cache, and
    /// bitmap records of `bucket` likewise. What cannot be had is left empty.
    #[cold]
    fn refill_heap_cache(&self, tc: &mut HeapCache, bucket: Option<usize>) {
        let mut took = 0u64;
        self.locked.lock().with(|h| {
            if tc.pages.is_empty() {
                let block = h.pages.alloc_to_cache().or_else(|| {
                    self.grow_locked(h, 1, 1).ok()?;
                    h.pages.alloc_to_cache()
                });
                if let Some((base, cache, scav)) = block {
                    tc.pages = PageCache { base, cache, scav };
                    took = u64::from(cache.count_ones());
                }
            }
            while tc.nspans < SPAN_RECS / 2 {
                let Some(s) = self.span_record_locked(h) else {
                    break;
                };
                tc.spans[tc.nspans] = s.as_ptr();
                tc.nspans += 1;
            }
            if let Some(b) = bucket {
                while tc.nbits[b] < BITS_RECS / 2 {
                    let Some(p) = self.bits_record_bucket_locked(h, b) else {
                        break;
                    };
                    tc.bits[b][tc.nbits[b]] = p;
                    tc.nbits[b] += 1;
                }
            }
        });
        if took != 0 {
            self.stats_update(|d| d.add(field::PAGE_CACHED, took * PAGE_SIZE as u64));
        }
        self.publish_heap_cache(tc);
    }

    /// Publishes `tc`'s reuses of cached large blocks (one allocation and one free
    /// each) to the statistics.
    pub(crate) fn publish_heap_cache(&self, tc: &mut HeapCache) {
        let (n, bytes) = (tc.large_reuse, tc.large_reuse_bytes);
        if n == 0 {
            return;
        }
        tc.large_reuse = 0;
        tc.large_reuse_bytes = 0;
        self.stats_update(|d| {
            d.add(field::LARGE_ALLOCS, n);
            d.add(field::LARGE_FREES, n);
            d.add(field::LARGE_ALLOC_BYTES, bytes);
            d.add(field::LARGE_FREE_BYTES, bytes);
        });
    }

    /// Gives everything `tc` holds back to the heap (thread exit, or an explicit flush).
    pub(crate) fn flush_heap_cache(&self, tc: &mut HeapCache) {
        self.flush_heap_cache_at(tc, clock_ms());
    }

    /// `flush_heap_cache`, the free pages stamped as freed at `freed_ms` (coarse clock):
    /// the time a reclaimer last saw an idle thread use the cache, so that its pages,
    /// unused since, are as old for the scavenger as they really are.
    pub(crate) fn flush_heap_cache_at(&self, tc: &mut HeapCache, freed_ms: u32) {
        self.publish_heap_cache(tc);
        // Cached large blocks and the kept big block are freed now: count them, then
        // free their spans (into the page block where they fit, which is flushed
        // below).
        let big = NonNull::new(core::mem::replace(&mut tc.big, ptr::null_mut()));
        tc.last_big = 0;
        // SAFETY: the kept big block is a live span the cache owns, unused.
        let big_bytes = big.map_or(0, |s| unsafe { s.as_ref() }.npages() * PAGE_SIZE);
        let n = tc.nlarge + usize::from(big.is_some());
        if n != 0 {
            let bytes = (tc.large_bytes + big_bytes) as u64;
            self.stats_update(|d| {
                d.add(field::LARGE_FREES, n as u64);
                d.add(field::LARGE_FREE_BYTES, bytes);
            });
            while tc.nlarge != 0 {
                tc.nlarge -= 1;
                let s = tc.large[tc.nlarge];
                // SAFETY: cached blocks are live spans the cache owns, unused.
                unsafe { self.free_span_with(NonNull::new_unchecked(s), tc) };
            }
            tc.large_bytes = 0;
            if let Some(s) = big {
                // SAFETY: as above.
                unsafe { self.free_span_with(s, tc) };
            }
        }
        let pages = u64::from(tc.pages.cache.count_ones())
            + tc.chunk.count() as u64
            + tc.prev.count() as u64;
        if pages == 0 && tc.nspans == 0 && tc.nbits.iter().all(|&n| n == 0) {
            tc.pages = PageCache::EMPTY;
            tc.chunk = ChunkCache::EMPTY;
            tc.prev = ChunkCache::EMPTY;
            return;
        }
        let excess = self.locked.lock().with(|h| {
            h.pages.set_clock(freed_ms);
            h.pages
                .free_from_cache(tc.pages.base, tc.pages.cache, tc.pages.scav);
            for c in [&tc.chunk, &tc.prev] {
                if c.base != 0 {
                    h.pages.free_from_chunk_cache(c.base, &c.free, &c.scav);
                }
            }
            for &s in &tc.spans[..tc.nspans] {
                // SAFETY: cached records are free records of this heap, unused.
                unsafe { h.spanalloc.free(s) };
            }
            for (b, recs) in tc.bits.iter().enumerate() {
                for &p in &recs[..tc.nbits[b]] {
                    // SAFETY: cached bitmap records of bucket `b`, unused.
                    unsafe { h.bitsalloc[b].free(p.cast()) };
                }
            }
            self.excess_locked(h)
        });
        self.freed(excess);
        tc.pages = PageCache::EMPTY;
        tc.chunk = ChunkCache::EMPTY;
        tc.prev = ChunkCache::EMPTY;
        tc.nspans = 0;
        tc.nbits = [0; crate::pagecache::BITS_BUCKETS];
        if pages != 0 {
            self.stats_update(|d| d.sub(field::PAGE_CACHED, pages * PAGE_SIZE as u64));
        }
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

    /// `free_span` through the calling thread's heap cache: pages that lie in the
    /// thread's page block go back to it, and the records to the record caches while
    /// they have room, without the lock; whatever remains is freed under it.
    ///
    /// # Safety
    /// As for `free_span`; `tc` is the calling thread's.
    pub(crate) unsafe fn free_span_with(&self, s: NonNull<MSpan>, tc: &mut HeapCache) {
        // SAFETY: the caller owns the live span.
        let (base, npages) = unsafe { (s.as_ref().base(), s.as_ref().npages()) };
        let to_block = tc.pages.contains(base, npages);
        let chunk = if to_block {
            None
        } else {
            tc.chunk_with(base, npages)
        };
        let to_cache = to_block || chunk.is_some();
        // SAFETY: forwarded.
        let (base, npages, mut bits) = unsafe { self.unpublish(s, to_cache) };
        if let Some(c) = chunk {
            c.free(base, npages);
        } else if to_block {
            tc.pages.free(base, npages);
        }
        let mut rec = Some(s);
        if tc.nspans < SPAN_RECS {
            tc.spans[tc.nspans] = s.as_ptr();
            tc.nspans += 1;
            rec = None;
        }
        if let Some((p, b)) = bits {
            if tc.nbits[b] < BITS_RECS {
                tc.bits[b][tc.nbits[b]] = p;
                tc.nbits[b] += 1;
                bits = None;
            }
        }
        if to_cache && rec.is_none() && bits.is_none() {
            return;
        }
        let now = clock_ms();
        let excess = self.locked.lock().with(|h| {
            if let Some((p, b)) = bits {
                // SAFETY: the bitmap record belonged to the span, which is dead.
                unsafe { h.bitsalloc[b].free(p.cast()) };
            }
            if let Some(s) = rec {
                // SAFETY: the span is dead and unreachable except for validating readers.
                unsafe { h.spanalloc.free(s.as_ptr()) };
            }
            if to_cache {
                return 0;
            }
            h.pages.set_clock(now);
            h.pages.free(base, npages);
            self.excess_locked(h)
        });
        self.freed(excess);
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
        self.account_free(info.purpose, npages << PAGE_SHIFT, cached);
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
        self.account_free(Purpose::Heap, n << PAGE_SHIFT, false);
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
            if h.pages.is_free(end, n) {
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
        self.account_alloc(Purpose::Heap, n << PAGE_SHIFT, scav, false);
        self.arenas.set_spans(end, n, s.as_ptr());
        span.npages.store(new_npages, Ordering::Relaxed);
        self.pages_in_use.fetch_add(n, Ordering::Release);
        true
    }

    /// `grow_span_in_place`, first from the calling thread's chunk cache when the pages
    /// after the span lie in its chunk (no lock: a block from the chunk cache grows
    /// into the cache's free pages); otherwise through the page allocator.
    ///
    /// # Safety
    /// As for [`shrink_span`](Self::shrink_span); `tc` is the calling thread's.
    pub(crate) unsafe fn grow_span_in_place_with(
        &self,
        s: NonNull<MSpan>,
        new_npages: usize,
        tc: Option<&mut HeapCache>,
    ) -> bool {
        // SAFETY: the caller owns the live span.
        let span = unsafe { s.as_ref() };
        let (base, old) = (span.base(), span.npages());
        let end = base + (old << PAGE_SHIFT);
        if let Some(tc) = tc {
            let n = new_npages.saturating_sub(old);
            if let Some(c) = tc.chunk_with(end, n).filter(|_| n > 0) {
                let Some(scav) = c.take_range(end, n) else {
                    // The next pages are the cache's but in use: nobody else has them.
                    return false;
                };
                self.commit_run(end, n, scav);
                let _ = self.arenas.needs_zero(end, n);
                self.account_alloc(Purpose::Heap, n << PAGE_SHIFT, scav, true);
                self.arenas.set_spans(end, n, s.as_ptr());
                span.npages.store(new_npages, Ordering::Relaxed);
                self.pages_in_use.fetch_add(n, Ordering::Release);
                return true;
            }
        }
        // SAFETY: forwarded.
        unsafe { self.grow_span_in_place(s, new_npages) }
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

    /// Gives every mcentral's spare spans back to the page heap (for `release_memory`).
    /// Takes each mcentral lock in turn; the heap lock must not be held.
    pub(crate) fn release_spares(&self) -> usize {
        self.central.iter().map(|c| c.release_spares(self)).sum()
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

    /// For the fork handlers (`fork.rs`): takes every lock of the heap in rank order
    /// (`lockrank::TABLE`) and holds them until [`fork_unlock_all`](Self::fork_unlock_all).
    pub(crate) fn fork_lock_all(&self) {
        self.reclaim.fork_lock();
        self.stats.fork_lock_reader();
        self.shared.fork_lock();
        for c in &self.central[1..NUM_CLASSES] {
            c.fork_lock();
        }
        self.locked.fork_lock();
        self.stats.fork_lock_nop();
    }

    /// Releases what [`fork_lock_all`](Self::fork_lock_all) took, in reverse order.
    ///
    /// # Safety
    /// The calling thread holds every lock of the heap, taken with `fork_lock_all` (in
    /// the child of a fork, the thread that forked).
    pub(crate) unsafe fn fork_unlock_all(&self) {
        // SAFETY: the calling thread holds each lock, taken by `fork_lock_all`.
        unsafe {
            self.stats.fork_unlock_nop();
            self.locked.fork_unlock();
            for c in self.central[1..NUM_CLASSES].iter().rev() {
                c.fork_unlock();
            }
            self.shared.fork_unlock();
            self.stats.fork_unlock_reader();
            self.reclaim.fork_unlock();
        }
    }

    // ----------------------------------------------------------------------------------
    // Taking back idle threads' heap caches.
    // ----------------------------------------------------------------------------------

    /// The reclaim lock, for a reclaimer of threads' caches (`reclaim_caches`, visits in
    /// `idle.rs`): waited for if `wait` (`release_memory`), else only tried, so that a
    /// paced pass skips the caches while another reclaimer is at work (it may be this
    /// thread: a visit's flush reaches a slow path).
    pub(crate) fn reclaim_lock(&self, wait: bool) -> Option<MutexGuard<'_, ()>> {
        if wait {
            Some(self.reclaim.lock())
        } else {
            self.reclaim.try_lock()
        }
    }

    /// Adds a thread's gated heap cache to the registry `reclaim_caches` walks. Once per
    /// cache (records are reused with their registration).
    pub(crate) fn register_cache(&self, g: &'static GatedCache) {
        // Release: the link is visible to a walker that finds `g` (Acquire).
        crate::sync::push_linked(
            &self.caches,
            g as *const GatedCache as *mut GatedCache,
            &g.next,
            Ordering::Release,
        );
    }

    /// Gives back to the page heap what other threads' heap caches hold, for caches
    /// whose owner is not using them: with `force`, every such cache
    /// (`release_memory`); otherwise those not used for `idle_ms` (coarse clock
    /// `now_ms`). Returns how many caches it took. Claims up to `BATCH` caches, passes
    /// one heavy barrier for all of them, then takes each whose owner is outside (the
    /// protocol in `GatedCache`). Does nothing if the OS has no heavy barrier.
    ///
    /// No allocator lock may be held (the reclaim lock, then the heap lock, are taken).
    pub(crate) fn reclaim_caches(&self, force: bool, now_ms: u32, idle_ms: u32) -> (usize, usize) {
        const BATCH: usize = 32;
        let (mut taken, mut pending) = (0, 0);
        // The loom mutant `shared_scavenge` waits for the lock as passes did before, so
        // that its pass under the shared cache's lock deadlocks against the fork handler
        // again.
        let Some(mut guard) = self.reclaim_lock(force || cfg!(spanheap_mutant = "shared_scavenge"))
        else {
            return (0, 0);
        };
        guard.with(|_| {
            // Acquire: pairs with `register_cache`'s Release.
            let mut cur = self.caches.load(Ordering::Acquire);
            while !cur.is_null() {
                let mut claimed = [ptr::null::<GatedCache>(); BATCH];
                let mut n = 0;
                while n < BATCH {
                    // SAFETY: registered caches live as long as the process.
                    let Some(g) = (unsafe { cur.as_ref() }) else {
                        break;
                    };
                    cur = g.next.load(Ordering::Acquire);
                    if !g.is_idle(force, now_ms, idle_ms) {
                        pending += usize::from(!g.is_reclaimed());
                    } else if g.try_claim() {
                        claimed[n] = g;
                        n += 1;
                    }
                }
                if n == 0 {
                    continue;
                }
                let barrier = crate::sync::heavy_barrier();
                for &g in &claimed[..n] {
                    // SAFETY: as above.
                    let g = unsafe { &*g };
                    if !barrier {
                        g.unclaim();
                        continue;
                    }
                    let stamp = if force { clock_ms() } else { g.idle_since_ms() };
                    if g.take(|tc| self.flush_heap_cache_at(tc, stamp)).is_some() {
                        g.mark_reclaimed();
                        taken += 1;
                    } else {
                        pending += 1;
                    }
                }
                if !barrier {
                    return;
                }
            }
        });
        (taken, pending)
    }

    // ----------------------------------------------------------------------------------
    // Scavenging (`scavenger.rs` has the policy).
    // ----------------------------------------------------------------------------------

    /// Returns free memory to the OS. `force`: every free page, now
    /// (`release_memory`). Otherwise a paced pass at coarse-clock time `now_ns`: pages
    /// free for at least the delay, outside dense chunks, beyond the retained headroom,
    /// stopping once `budget_ns` have passed. Returns the bytes released and whether
    /// the pass stopped with work left.
    ///
    /// At the first run the OS refuses to decommit, the pass stops: that run and the
    /// rest of the batch (not tried) are freed back dirty (still committed, perhaps with
    /// old contents, so allocation clears them) and stamped now, so a paced pass takes
    /// them again only after the delay. (A forced pass, which takes pages of any age,
    /// would otherwise take the same run again at once.)
    ///
    /// The heap lock must not be held. It is taken to pick runs (which become
    /// allocated, so nobody else takes them) and to give them back scavenged, never
    /// across the `madvise`.
    pub(crate) fn scavenge(&self, force: bool, now_ns: u64, budget_ns: u64) -> (usize, bool) {
        let (released, more) = self.scavenge_pages(force, now_ns, budget_ns);
        // Record chunks emptied with the pages (a burst's spans go together): checked
        // only by passes that found pages to return, so that an idle heap's passes cost
        // nothing more. Not counted in the returned bytes, which are arena pages.
        if released != 0 || force {
            self.release_free_records(force);
        }
        (released, more)
    }

    /// The pages part of [`scavenge`](Self::scavenge).
    fn scavenge_pages(&self, force: bool, now_ns: u64, budget_ns: u64) -> (usize, bool) {
        /// Runs and pages picked per visit under the lock (up to 64 MiB).
        const BATCH_RUNS: usize = 16;
        const BATCH_PAGES: usize = 8192;
        let policy = if force {
            ScavPolicy::ALL
        } else {
            match self.scavenger.delay_ms() {
                Some(delay) => ScavPolicy {
                    now: (now_ns / 1_000_000) as u32,
                    min_age: delay,
                    skip_dense: true,
                },
                None => return (0, false),
            }
        };
        let retain = if force {
            0
        } else {
            self.scavenger.retain_percent() as usize
        };
        let start = if force { 0 } else { crate::os::now_ns() };
        let mut released = 0;
        loop {
            let mut runs = [(0usize, 0usize); BATCH_RUNS];
            let (n, pages) = self.locked.lock().with(|h| {
                let p = &mut h.pages;
                let inuse = p.total_pages() - p.free_pages();
                let keep = inuse.saturating_mul(retain) / 100;
                let dirty = p.free_pages() - p.scavenged_pages();
                let goal = dirty.saturating_sub(keep).min(BATCH_PAGES);
                p.scavenge_take(policy, goal, &mut runs)
            });
            if n == 0 {
                return (released, false);
            }
            // Runs `[..ndone]` were decommitted; at the first refusal the rest are not
            // tried.
            let mut ndone = 0;
            for &(base, npages) in &runs[..n] {
                // SAFETY: the run is free heap memory that `scavenge_take` marked
                // allocated for us: nobody else reads or writes it until it is given
                // back below.
                let ok = unsafe {
                    self.mem.decommit(
                        NonNull::new_unchecked(base as *mut u8),
                        npages << PAGE_SHIFT,
                    )
                };
                if !ok {
                    break;
                }
                ndone += 1;
            }
            let now = clock_ms();
            self.locked.lock().with(|h| {
                for &(base, npages) in &runs[..ndone] {
                    if h.pages.scavenge_return(base, npages) {
                        self.drop_span_map_locked(base);
                    }
                }
                // Still committed: back as dirty, freed now (see above).
                h.pages.set_clock(now);
                for &(base, npages) in &runs[ndone..n] {
                    h.pages.free(base, npages);
                }
            });
            let kept: usize = runs[ndone..n].iter().map(|r| r.1).sum();
            let bytes = (pages - kept) << PAGE_SHIFT;
            add(&self.gauges.heap_released, bytes);
            self.stats_update(|d| {
                d.add(field::RELEASED, bytes as u64);
                d.sub(field::COMMITTED, bytes as u64);
                d.add(field::SCAV_BYTES, bytes as u64);
                d.add(field::SCAV_CALLS, ndone as u64);
            });
            if ndone != n {
                self.count_refused_decommit(runs[ndone].1 << PAGE_SHIFT);
            }
            released += bytes;
            if ndone != n {
                return (released, false);
            }
            if !force && crate::os::now_ns().wrapping_sub(start) >= budget_ns {
                return (released, true);
            }
        }
    }

    /// Publishes the record allocators' released bytes to the gauge if they changed:
    /// carving a record into a released page makes it resident again. Needs the heap
    /// lock (`h`). One compare when nothing was ever released.
    fn publish_meta_released(&self, h: &mut Locked) {
        if h.meta_released == 0 {
            return;
        }
        let now = h.spanalloc.slab().released()
            + h.bitsalloc.iter().map(RawFixAlloc::released).sum::<usize>();
        if now != h.meta_released {
            h.meta_released = now;
            self.gauges
                .meta_released
                .store(now as u64, Ordering::Relaxed);
        }
    }

    /// Returns to the OS the pages of record chunks (span records and bitmap records)
    /// in which every record past the first page is free: after a burst of large
    /// blocks, the records of the thousands of spans it freed. Called at the end of
    /// scavenger passes that released memory, and by `release_memory`. Takes the heap
    /// lock to withdraw a batch of chunks and to put them back, never across the
    /// `madvise` (see `fixalloc.rs`). Returns the bytes released.
    fn release_free_records(&self, force: bool) -> usize {
        #[cfg(not(spanheap_loom))]
        {
            use crate::fixalloc::RECORD_PAGE;
            const BATCH: usize = 16;
            // Chunks looked at per paced pass (all of them for `release_memory`).
            const LOOKS: usize = 256;
            let mut budget = if force { usize::MAX } else { LOOKS };
            let mut restart = force;
            if crate::os::os_page_size().map_or(true, |p| RECORD_PAGE % p != 0) {
                return 0;
            }
            let mut released = 0;
            loop {
                // (allocator: 0 for span records, 1 + b for bitmap bucket b; chunk
                // base; pages)
                let mut taken = [(0usize, 0usize, 0u16); BATCH];
                let n = self.locked.lock().with(|h| {
                    let mut got = [(0usize, 0u16); BATCH];
                    let mut n = 0;
                    for k in 0..=h.bitsalloc.len() {
                        let m = if k == 0 {
                            h.spanalloc
                                .slab()
                                .take_empty(&mut got[n..], &mut budget, restart)
                        } else {
                            h.bitsalloc[k - 1].take_empty(&mut got[n..], &mut budget, restart)
                        };
                        for (t, &(b, mask)) in taken[n..n + m].iter_mut().zip(&got[n..n + m]) {
                            *t = (k, b, mask);
                        }
                        n += m;
                    }
                    n
                });
                if n == 0 {
                    return released;
                }
                restart = false;
                let mut ok = [false; BATCH];
                for (o, &(_, base, mask)) in ok.iter_mut().zip(&taken[..n]) {
                    *o = true;
                    // Each run of consecutive pages in one call.
                    let mut m = mask;
                    while m != 0 {
                        let k = m.trailing_zeros() as usize;
                        let run = (m >> k).trailing_ones() as usize;
                        m &= !(((1u32 << run) - 1) << k) as u16;
                        // SAFETY: pages `take_empty` withdrew: no record in them is in
                        // use or on a free list until they are put back, and zero is a
                        // valid free record there (fixalloc.rs).
                        *o &= unsafe {
                            self.mem.decommit(
                                NonNull::new_unchecked((base + k * RECORD_PAGE) as *mut u8),
                                run * RECORD_PAGE,
                            )
                        };
                    }
                }
                self.locked.lock().with(|h| {
                    for (&(k, base, mask), &ok) in taken[..n].iter().zip(&ok[..n]) {
                        // SAFETY: withdrawn just above from the same allocator.
                        unsafe {
                            if k == 0 {
                                h.spanalloc.slab().put_back(base, mask, ok);
                            } else {
                                h.bitsalloc[k - 1].put_back(base, mask, ok);
                            }
                        }
                    }
                    // Publish unconditionally (the shortcut reads zero at first).
                    h.meta_released = usize::MAX;
                    self.publish_meta_released(h);
                });
                for (&(_, _, mask), &ok) in taken[..n].iter().zip(&ok[..n]) {
                    if ok {
                        released += mask.count_ones() as usize * RECORD_PAGE;
                    }
                }
                if n < BATCH || budget == 0 {
                    return released;
                }
            }
        }
        #[cfg(spanheap_loom)]
        {
            let _ = force;
            0
        }
    }

    /// Drops the resident page of span-map entries of the chunk holding `base`, which
    /// the caller (with the heap lock) has just seen become wholly free and returned to
    /// the OS: after a burst the span map would otherwise keep 1 MiB resident per GiB
    /// of peak heap for good (Go's does). One `madvise` of one OS page per 4 MiB chunk
    /// returned, made with the lock held because that is what keeps every allocator off
    /// the chunk's pages, and so off its entries, while the page is dropped (see
    /// [`ArenaIndex::chunk_span_map`]). If the OS refuses, the entries stay as they were.
    fn drop_span_map_locked(&self, base: usize) {
        #[cfg(not(spanheap_loom))]
        {
            let chunk = base & !(crate::pagealloc::CHUNK_SIZE - 1);
            let Ok(os_page) = crate::os::os_page_size() else {
                return;
            };
            if let Some((p, bytes)) = self.arenas.chunk_span_map(chunk, os_page) {
                // SAFETY: a whole OS page of span-map entries that nobody writes while
                // we hold the heap lock (every page of the chunk is free), and whose
                // zero value is valid for every reader.
                if unsafe { self.mem.decommit(p, bytes) } {
                    add(&self.gauges.span_map_drops, 1);
                }
            }
        }
        #[cfg(spanheap_loom)]
        let _ = base;
    }

    /// Runs a paced scavenger pass if one is due. Called from the allocator's slow
    /// paths with no lock held; costs a coarse-clock read and a load when none is due.
    #[inline]
    pub(crate) fn maybe_scavenge(&self) {
        #[cfg(not(spanheap_loom))]
        let now = crate::os::coarse_now_ns();
        // No clock under loom: passes are due (at time 0) only in a model that asks
        // (`__private::PageHeap::scavenge_soon`).
        #[cfg(spanheap_loom)]
        let now = 0;
        #[cfg(spanheap_loom)]
        if !self
            .scavenger
            .model_due
            .load(core::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if now >= self.scavenger.next_due.load(Ordering::Relaxed) {
            self.scavenge_due(now);
        }
    }

    /// Claims the due pass (one thread at a time), runs it, and sets when the next one
    /// is due: soon (`BACKLOG_WAIT` times the pass's time) if it left work, a quarter
    /// of the delay otherwise. With the background thread wanted, starts it instead
    /// once there is enough work for it (`START_BYTES`), and leaves the passes to it.
    ///
    /// No allocator lock may be held.
    #[cold]
    #[inline(never)]
    pub(crate) fn scavenge_due(&self, now: u64) {
        let sc = &self.scavenger;
        let due = sc.next_due.load(Ordering::Relaxed);
        if now < due
            || sc
                .next_due
                .compare_exchange(due, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // With the thread wanted but not worth starting yet, or if it could not be
        // started, the pass runs from here.
        if sc.background_wanted()
            && ((sc.bg.running)() || (self.excess_bytes() >= START_BYTES && (sc.bg.start)()))
        {
            // The thread does the passes; a free that finds it stopped (a fork child, a
            // setting turned off and on) makes the slow paths due again.
            sc.next_due.store(BG_OWNED, Ordering::Relaxed);
            return;
        }
        let next = match sc.delay_ms() {
            // Off: look at the settings again in a second.
            None => now + 1_000_000_000,
            Some(delay) => {
                let t0 = crate::os::now_ns();
                // Idle threads' caches first, so that their pages age in the page heap
                // (they were freed at least `delay` ago: the cache was not used since).
                let now_ms = (now / 1_000_000) as u32;
                (sc.bg.visit)(false, now_ms, delay);
                self.reclaim_caches(false, now_ms, delay);
                let (_, more) = self.scavenge(false, now, PASS_BUDGET_NS);
                let spent = crate::os::now_ns().wrapping_sub(t0);
                if more {
                    now + (spent * (BACKLOG_WAIT + 1)).max(1_000_000)
                } else {
                    now + (u64::from(delay) * 250_000).clamp(10_000_000, 1_000_000_000)
                }
            }
        };
        sc.next_due.store(next, Ordering::Relaxed);
    }

    /// Starts the background thread now if it is wanted and there is work for it
    /// (`set_scavenger_config`); returns false if it could not be started.
    ///
    /// No allocator lock may be held.
    pub(crate) fn start_background_if_due(&self) -> bool {
        let sc = &self.scavenger;
        if !sc.background_wanted() || (sc.bg.running)() || self.excess_bytes() < START_BYTES {
            return true;
        }
        (sc.bg.start)()
    }

    /// Free committed memory beyond the retained headroom, in bytes. Takes the heap
    /// lock.
    pub(crate) fn excess_bytes(&self) -> usize {
        self.locked.lock().with(|h| self.excess_locked(h)) << PAGE_SHIFT
    }

    /// Free pages beyond the retained headroom that are not returned yet. Heap lock.
    fn excess_locked(&self, h: &Locked) -> usize {
        let p = &h.pages;
        self.scavenger
            .excess_pages(p.total_pages(), p.free_pages(), p.scavenged_pages())
    }

    /// After the heap lock was released by a section that freed pages (and computed
    /// `excess` pages under it): tells the background thread.
    #[inline]
    fn freed(&self, excess: usize) {
        self.scavenger.note_excess(excess << PAGE_SHIFT);
    }

    /// One round of the background thread: idle threads' caches, then a paced pass of
    /// at most `PASS_BUDGET_NS` (coarse time `now`, delay `delay` ms); then, if the pass
    /// finished the work that was due, what comes next.
    ///
    /// No allocator lock may be held.
    #[cfg(not(spanheap_loom))]
    pub(crate) fn background_pass(&self, now: u64, delay: u32) -> BackgroundLook {
        let now_ms = (now / 1_000_000) as u32;
        let (vt, vp) = (self.scavenger.bg.visit)(false, now_ms, delay);
        let (taken, pending) = self.reclaim_caches(false, now_ms, delay);
        let (taken, pending) = (taken + vt, pending + vp);
        let (_, more) = self.scavenge(false, now, PASS_BUDGET_NS);
        let wait_ms = if more {
            None
        } else {
            self.scavenge_wait(now, delay)
        };
        BackgroundLook {
            more,
            taken,
            pending,
            wait_ms,
        }
    }

    /// In how many milliseconds a paced pass will find free pages to return (0: now),
    /// or `None` if it will find none until the program frees again. Takes the heap
    /// lock.
    pub(crate) fn scavenge_wait(&self, now: u64, delay: u32) -> Option<u32> {
        let policy = ScavPolicy {
            now: (now / 1_000_000) as u32,
            min_age: delay,
            skip_dense: true,
        };
        self.locked.lock().with(|h| {
            if self.excess_locked(h) == 0 {
                return None;
            }
            h.pages.scavenge_wait(policy)
        })
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
    fn grow_locked(
        &self,
        h: &mut Locked,
        npages: usize,
        align_pages: usize,
    ) -> Result<usize, OsError> {
        let bytes = npages << PAGE_SHIFT;
        let size = bytes.checked_add(ARENA_SIZE - 1).ok_or(OsError::TooLarge)? & !(ARENA_SIZE - 1);
        let align = (align_pages << PAGE_SHIFT).max(ARENA_SIZE);
        let region = self.mem.reserve(size, align, h.hint)?;
        let base = region.as_ptr() as usize;
        // Reserved -> Prepared. The page allocator then treats the whole region as free
        // and scavenged, and `alloc_span` commits what it hands out.
        // SAFETY: the range is the reservation we just made.
        if let Err(e) = unsafe { self.mem.map(region, size) } {
            // SAFETY: the whole, unused reservation.
            unsafe { self.mem.release(region, size) };
            return Err(e);
        }
        let mut meta = 0;
        let result = (|| {
            let mut a = base;
            while a < base + size {
                meta += self.arenas.ensure_l2_locked(&self.mem, a)?;
                // An address range can come back to us after a failed growth released
                // it; its record is still in the index and is reused.
                if self.arenas.arena_of(a).is_none() {
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

    /// A span record, refilling the fixalloc from the heap itself when it is empty.
    /// Needs the heap lock (`h`).
    ///
    /// Records live in manual spans of purpose `SpanRecords`. The span describing a new
    /// chunk of records is the chunk's own first record, so refilling needs no record
    /// from elsewhere. This rare path (once per 64 KiB chunk of records) initialises and publishes
    /// that span with the lock held.
    fn span_record_locked(&self, h: &mut Locked) -> Option<NonNull<MSpan>> {
        let s = self.span_record_refill_locked(h);
        self.publish_meta_released(h);
        s
    }

    /// `span_record_locked` but for the released-bytes gauge.
    fn span_record_refill_locked(&self, h: &mut Locked) -> Option<NonNull<MSpan>> {
        if let Some(s) = NonNull::new(h.spanalloc.alloc()) {
            return Some(s);
        }
        let (base, scav) = self.alloc_pages_locked(h, SPAN_CHUNK_PAGES, SPAN_CHUNK_PAGES)?;
        self.commit_run(base, SPAN_CHUNK_PAGES, scav);
        h.spanalloc.add_chunk(base, SPAN_CHUNK_PAGES << PAGE_SHIFT);
        let own = NonNull::new(h.spanalloc.alloc())?;
        // SAFETY: `own` is a fresh record in the chunk it describes; nobody else knows
        // it or the pages.
        unsafe {
            self.init_and_publish(
                own,
                base,
                SPAN_CHUNK_PAGES,
                Purpose::SpanRecords,
                0,
                scav,
                false,
            )
        };
        NonNull::new(h.spanalloc.alloc())
    }

    /// A chunk of `SPAN_CHUNK_PAGES` pages for a record allocator, as a manual span of
    /// `purpose`. Needs the heap lock (`h`). Like the span-record refill, this rare path
    /// initialises and publishes the chunk's span with the lock held.
    fn manual_chunk_locked(&self, h: &mut Locked, purpose: Purpose) -> Option<usize> {
        let s = self.span_record_locked(h)?;
        let Some((base, scav)) = self.alloc_pages_locked(h, SPAN_CHUNK_PAGES, SPAN_CHUNK_PAGES)
        else {
            // SAFETY: the record was just taken and never published.
            unsafe { h.spanalloc.free(s.as_ptr()) };
            return None;
        };
        self.commit_run(base, SPAN_CHUNK_PAGES, scav);
        // SAFETY: fresh record and pages, known to nobody else.
        unsafe { self.init_and_publish(s, base, SPAN_CHUNK_PAGES, purpose, 0, scav, false) };
        Some(base)
    }

    /// A bitmap record for a span of `nelems` objects. Needs the heap lock (`h`).
    fn bits_record_locked(&self, h: &mut Locked, nelems: usize) -> Option<*mut u64> {
        self.bits_record_bucket_locked(h, bits_bucket(nelems))
    }

    /// A bitmap record of size bucket `b`. Needs the heap lock (`h`).
    fn bits_record_bucket_locked(&self, h: &mut Locked, b: usize) -> Option<*mut u64> {
        let (mut p, mut fresh) = h.bitsalloc[b].alloc();
        if p.is_null() {
            let base = self.manual_chunk_locked(h, Purpose::SpanBitmaps)?;
            h.bitsalloc[b].add_chunk(base, SPAN_CHUNK_PAGES << PAGE_SHIFT);
            (p, fresh) = h.bitsalloc[b].alloc();
        }
        self.publish_meta_released(h);
        if fresh {
            // The remote-free words are atomics: construct them once, when carved.
            // SAFETY: a fresh record of 2 * BITS_WORDS[b] words; chunk memory may be
            // dirty, so zero it first.
            unsafe {
                ptr::write_bytes(p, 0, BITS_MAPS * 8 * BITS_WORDS[b]);
                init_atomics(p.cast::<crate::sync::AtomicU64>(), BITS_WORDS[b]);
                // Checked mode's live bits (after the remote and alloc bitmaps).
                #[cfg(feature = "checked")]
                init_atomics(
                    p.add(2 * BITS_WORDS[b]).cast::<crate::sync::AtomicU64>(),
                    BITS_WORDS[b],
                );
            }
        }
        Some(p.cast())
    }

    /// A thread-cache record (constructed empty), or null if memory is exhausted.
    #[cfg(not(spanheap_loom))]
    pub(crate) fn alloc_cache_record(&self) -> *mut MCache {
        self.locked.lock().with(|h| {
            let mut p = h.cachealloc.alloc();
            if p.is_null() {
                let Some(base) = self.manual_chunk_locked(h, Purpose::ThreadCaches) else {
                    return ptr::null_mut();
                };
                h.cachealloc.add_chunk(base, SPAN_CHUNK_PAGES << PAGE_SHIFT);
                p = h.cachealloc.alloc();
            }
            // A record's free stacks get their storage when it is first handed out and
            // keep it (records are reused, never unmapped): a mapping of its own, outside
            // the arenas (metadata, like the arena index), so that it does not split the
            // heap's free page runs. Lazily backed: pages are touched only as far as the
            // stacks grow.
            // SAFETY: the record is ours (just taken, in use by nobody).
            if !p.is_null() && !unsafe { (*p).has_stacks() } {
                let bytes = crate::mcache::STACK_MAP_BYTES;
                let Ok(base) = self.mem.alloc_meta(bytes) else {
                    // SAFETY: the record was just taken and is unused.
                    unsafe { h.cachealloc.free(p) };
                    return ptr::null_mut();
                };
                self.count_meta(bytes);
                // SAFETY: a fresh mapping of `bytes` >= STACK_BYTES, ours alone.
                unsafe { (*p).set_stacks(base.as_ptr().cast()) };
            }
            p
        })
    }

    /// Returns a thread-cache record.
    ///
    /// # Safety
    /// `p` came from `alloc_cache_record` and is not used any more.
    #[cfg(not(spanheap_loom))]
    pub(crate) unsafe fn free_cache_record(&self, p: *mut MCache) {
        // So that a dead thread's record holds no resident memory. Outside the lock:
        // the record is ours.
        // SAFETY: the record is ours, its stacks empty (caller's contract).
        unsafe { self.drop_stack_pages(p) };
        // SAFETY: forwarded.
        self.locked.lock().with(|h| unsafe { h.cachealloc.free(p) });
    }

    /// Counts `bytes` more of OS memory for metadata outside the arenas (the gauge and
    /// the consistent statistics).
    fn count_meta(&self, bytes: usize) {
        add(&self.gauges.meta_sys, bytes);
        self.stats_update(|d| d.add(field::META, bytes as u64));
    }

    /// Drops the resident pages of cache record `p`'s free-stack storage (the mapping
    /// stays). If the OS refuses, the pages stay resident and only the statistics say
    /// so: stack slots are written before they are read, so old contents do no harm.
    ///
    /// # Safety
    /// `p` is a cache record owned by the caller, with every free stack empty.
    #[cfg(not(spanheap_loom))]
    pub(crate) unsafe fn drop_stack_pages(&self, p: *mut MCache) {
        // SAFETY: the record is ours (caller's contract).
        if let Some(base) = NonNull::new(unsafe { (*p).stack_base() }) {
            let bytes = crate::mcache::STACK_MAP_BYTES;
            // SAFETY: the record's own stack mapping; no slot holds anything.
            if !unsafe { self.mem.decommit(base.cast(), bytes) } {
                self.count_refused_decommit(bytes);
            }
        }
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

        self.account_alloc(purpose, nbytes, scav, cached);

        // Publication. The span must be completely initialised before this point.
        // (1) Span map: Release pairs with the Acquire in `HeapArena::span_at`.
        self.arenas.set_spans(base, npages, s.as_ptr());
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
    fn account_alloc(&self, purpose: Purpose, nbytes: usize, scav: usize, cached: bool) {
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
            if cached {
                d.sub(field::PAGE_CACHED, n);
            }
        });
    }

    /// Counter updates for `nbytes` given back to idle memory by `purpose` (the one place
    /// for free); `cached`: the pages go to a thread's page cache.
    fn account_free(&self, purpose: Purpose, nbytes: usize, cached: bool) {
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
            if cached {
                d.add(field::PAGE_CACHED, n);
            }
        });
    }
}

/// What one round of the background thread found (`MHeap::background_pass`).
#[cfg(not(spanheap_loom))]
pub(crate) struct BackgroundLook {
    /// The pass stopped with work left (its budget ran out).
    pub(crate) more: bool,
    /// Idle threads' caches taken back.
    pub(crate) taken: usize,
    /// Caches left because they were used lately.
    pub(crate) pending: usize,
    /// When the pass finished: in how many ms the next free pages become old enough
    /// (`None`: none until the program frees again).
    pub(crate) wait_ms: Option<u32>,
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
mod tests {
    use super::*;
    use crate::os::{TestMem, PAGE_SIZE};

    fn new_heap() -> &'static MHeap<TestMem> {
        Box::leak(Box::new(MHeap::new(TestMem)))
    }

    /// Checks every counter invariant that holds when no span operation is in flight,
    /// against the page allocator's own view and a list of the live spans.
    fn check_counters(h: &MHeap<TestMem>, live: &[(NonNull<MSpan>, Purpose)]) {
        let c = h.counters();
        let (free_pages, scav_pages, records) = h.page_state();
        assert_eq!(
            c.heap_inuse,
            c.pages_in_use * PAGE_SIZE as u64,
            "heap_inuse is pages_in_use: {c:?}"
        );
        assert_eq!(
            c.heap_idle,
            (free_pages * PAGE_SIZE) as u64,
            "idle bytes == free pages: {c:?}"
        );
        assert_eq!(
            c.heap_released,
            (scav_pages * PAGE_SIZE) as u64,
            "released == scavenged pages: {c:?}"
        );
        assert!(c.heap_released <= c.heap_idle);
        let manual: u64 = Purpose::ALL
            .iter()
            .filter(|p| p.is_manual())
            .map(|&p| c.by_purpose[p as usize])
            .sum();
        assert_eq!(c.heap_sys + manual, c.arena_bytes, "{c:?}");
        let mut by_purpose = [0u64; Purpose::COUNT];
        let mut heap_pages = 0u64;
        for &(s, p) in live {
            let n = unsafe { s.as_ref() }.npages();
            by_purpose[p as usize] += (n * PAGE_SIZE) as u64;
            if !p.is_manual() {
                heap_pages += n as u64;
            }
        }
        assert_eq!(
            c.by_purpose[Purpose::Heap as usize],
            by_purpose[Purpose::Heap as usize]
        );
        assert_eq!(c.pages_in_use, heap_pages);
        // Besides the spans listed, SpanRecords bytes are whole record chunks, enough
        // for every record in use (one per listed span plus one per chunk).
        let chunk = SPAN_CHUNK_PAGES * PAGE_SIZE;
        let chunks_bytes = (c.by_purpose[Purpose::SpanRecords as usize]
            - by_purpose[Purpose::SpanRecords as usize]) as usize;
        assert_eq!(chunks_bytes % chunk, 0);
        // Chunks of other record kinds (bitmaps, thread caches) each hold a span record.
        let other_chunks: usize = [Purpose::SpanBitmaps, Purpose::ThreadCaches]
            .iter()
            .map(|&p| (c.by_purpose[p as usize] - by_purpose[p as usize]) as usize / chunk)
            .sum();
        assert_eq!(records, live.len() + chunks_bytes / chunk + other_chunks);
        assert!(chunks_bytes / core::mem::size_of::<MSpan>() >= records);
    }

    #[test]
    fn counters_stay_consistent_through_alloc_free_and_growth() {
        let h = new_heap();
        let mut live = Vec::new();
        let mut rng = 0x9E3779B97F4A7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..3000 {
            if live.len() > 50 && next() % 3 == 0 {
                let k = (next() as usize) % live.len();
                let (s, _) = live.swap_remove(k);
                unsafe { h.free_span(s) };
            } else {
                // Mostly small runs, some larger than an arena to force multi-arena growth.
                let n = match next() % 100 {
                    0 => 9000 + (next() % 3000) as usize,
                    1..=10 => 100 + (next() % 900) as usize,
                    _ => 1 + (next() % 16) as usize,
                };
                let align = if next() % 10 == 0 {
                    PAGE_SIZE << (next() % 8)
                } else {
                    1
                };
                let s = h
                    .alloc_span(n, Purpose::Heap, 0, align)
                    .expect("alloc_span");
                let span = unsafe { s.as_ref() };
                assert_eq!(span.base() % align.max(PAGE_SIZE), 0);
                assert_eq!(span.npages(), n);
                live.push((s, Purpose::Heap));
            }
            if i % 100 == 0 {
                check_counters(h, &live);
            }
        }
        check_counters(h, &live);
        for (s, _) in live.drain(..) {
            unsafe { h.free_span(s) };
        }
        check_counters(h, &live);
        let c = h.counters();
        assert_eq!(c.heap_inuse, 0);
        assert_eq!(c.pages_in_use, 0);
    }

    #[test]
    fn manual_spans_are_counted_by_purpose_and_leave_heap_sys() {
        let h = new_heap();
        let a = h.alloc_span(4, Purpose::Heap, 0, 1).unwrap();
        let c0 = h.counters();
        let m = h.alloc_span(3, Purpose::SpanRecords, 0, 1).unwrap();
        let c1 = h.counters();
        assert_eq!(
            c1.by_purpose[Purpose::SpanRecords as usize],
            c0.by_purpose[Purpose::SpanRecords as usize] + 3 * PAGE_SIZE as u64
        );
        assert_eq!(c1.heap_sys, c0.heap_sys - 3 * PAGE_SIZE as u64);
        assert_eq!(c1.heap_inuse, c0.heap_inuse);
        assert_eq!(
            c1.pages_in_use, c0.pages_in_use,
            "manual spans are not in pagesInUse"
        );
        assert_eq!(unsafe { m.as_ref() }.state(), SpanState::Manual);
        assert!(
            !h.page_marked_in_use(unsafe { m.as_ref() }.base()),
            "manual spans have no pageInUse bit"
        );
        check_counters(h, &[(a, Purpose::Heap), (m, Purpose::SpanRecords)]);
        unsafe { h.free_span(m) };
        let c2 = h.counters();
        assert_eq!(
            (c2.heap_sys, c2.heap_inuse, c2.heap_idle, c2.by_purpose),
            (c0.heap_sys, c0.heap_inuse, c0.heap_idle, c0.by_purpose)
        );
        // The manual span's pages were fresh (released); they come back dirty.
        assert_eq!(c2.heap_released, c0.heap_released - 3 * PAGE_SIZE as u64);
        unsafe { h.free_span(a) };
    }

    #[test]
    fn span_map_and_page_in_use_answer_for_every_page() {
        let h = new_heap();
        // Spans of several sizes, one crossing into a second arena.
        let sizes = [1usize, 2, 7, 64, 513, 9000];
        let spans: Vec<_> = sizes
            .iter()
            .map(|&n| h.alloc_span(n, Purpose::Heap, 0, 1).unwrap())
            .collect();
        // One arena memo for every lookup below: it moves between the two arenas and
        // must answer as the index does.
        let mut hint = crate::arena::NO_ARENA;
        for &s in &spans {
            let span = unsafe { s.as_ref() };
            let (base, n) = (span.base(), span.npages());
            assert!(h.page_marked_in_use(base));
            for p in 0..n {
                let page = base + p * PAGE_SIZE;
                assert!(
                    p == 0 || !h.page_marked_in_use(page),
                    "only the first page carries the bit"
                );
                // First byte, an interior byte and the last byte of every page.
                for addr in [page, page + 1234, page + PAGE_SIZE - 1] {
                    assert_eq!(h.span_of(addr), Some(s), "page {p} of a {n}-page span");
                    assert_eq!(h.span_of_unchecked(addr), s.as_ptr());
                    assert_eq!(h.span_of_hinted(addr, &mut hint), s.as_ptr());
                }
            }
        }
        // Foreign pointers: stack, static, the system allocator, null, high addresses.
        let local = 5u64;
        static STATIC: u64 = 7;
        let boxed = Box::new(9u64);
        for addr in [
            &local as *const u64 as usize,
            &STATIC as *const u64 as usize,
            &*boxed as *const u64 as usize,
            0,
            usize::MAX,
            1 << 48,
        ] {
            assert_eq!(h.span_of(addr), None, "{addr:#x} is not ours");
            assert!(h.span_of_hinted(addr, &mut hint).is_null());
            // A miss leaves the memo usable.
            let last = *spans.last().unwrap();
            let end = unsafe { last.as_ref().base() + (last.as_ref().npages() << PAGE_SHIFT) };
            assert_eq!(h.span_of_hinted(end - 1, &mut hint), last.as_ptr());
            assert_eq!(h.span_of_hinted(end - 1, &mut hint), last.as_ptr());
        }
        // A freed span's pages are no longer answered for, even though the map still
        // points at the dead record.
        let s = spans[2];
        let base = unsafe { s.as_ref() }.base();
        unsafe { h.free_span(s) };
        assert_eq!(h.span_of(base), None);
        assert!(!h.page_marked_in_use(base));
        for &s in &spans[..2] {
            unsafe { h.free_span(s) };
        }
        for &s in &spans[3..] {
            unsafe { h.free_span(s) };
        }
    }

    #[test]
    fn scavenged_pages_are_committed_and_accounted() {
        let h = new_heap();
        let s = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
        let span = unsafe { s.as_ref() };
        // Fresh from the OS: fully scavenged, zero, needs no clearing.
        assert!(!unsafe { span.info() }.needzero);
        let base = span.base();
        unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 16 * PAGE_SIZE) };
        let released_before = h.counters().heap_released;
        unsafe { h.free_span(s) };
        // The same pages come back dirty: not scavenged, so they need zeroing.
        let s2 = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
        let span2 = unsafe { s2.as_ref() };
        assert_eq!(span2.base(), base, "first fit reuses the lowest run");
        assert!(unsafe { span2.info() }.needzero);
        assert_eq!(
            h.counters().heap_released,
            released_before,
            "reusing dirty pages releases nothing"
        );
        unsafe { h.free_span(s2) };
    }

    /// The tests' memory source (`TestMem`), whose `decommit` fails while `refuse` is
    /// set (as under `mlockall`).
    struct Refusing {
        refuse: std::sync::atomic::AtomicBool,
    }

    // SAFETY: every call is forwarded to `TestMem` unchanged, or fails before it.
    unsafe impl MemSource for Refusing {
        fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError> {
            TestMem.reserve(size, align, hint)
        }
        unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.map(ptr, size) }
        }
        unsafe fn commit(&self, ptr: NonNull<u8>, size: usize) {
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.commit(ptr, size) }
        }
        unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
            // SAFETY: forwarded from our caller.
            !self.refuse.load(Ordering::Relaxed) && unsafe { TestMem.decommit(ptr, size) }
        }
        fn decommit_zeroes(&self) -> bool {
            TestMem.decommit_zeroes()
        }
        unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.release(ptr, size) }
        }
    }

    #[test]
    fn refused_decommit_keeps_pages_dirty_and_counted_as_committed() {
        let h: &MHeap<Refusing> = Box::leak(Box::new(MHeap::new(Refusing {
            refuse: std::sync::atomic::AtomicBool::new(true),
        })));
        let stats = || {
            let mut t = [0u64; crate::stats::field::N];
            h.stats.read(&mut t);
            let s = crate::stats::Stats::from_totals(&t, h.gauges());
            s.check().unwrap();
            s
        };
        let s = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
        let base = unsafe { s.as_ref() }.base();
        unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 16 * PAGE_SIZE) };
        unsafe { h.free_span(s) };
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (st0, scav0) = (stats(), h.page_state().1);
        // A forced pass sees the failure and stops (it would take the run again at once
        // otherwise); nothing is released.
        assert_eq!(h.scavenge(true, 0, u64::MAX), (0, false));
        let st1 = stats();
        assert_eq!(h.page_state().1, scav0, "no page became scavenged");
        assert_eq!(st1.released_bytes, st0.released_bytes);
        assert_eq!(st1.scavenged_bytes, st0.scavenged_bytes);
        assert!(st1.decommit_failures > st0.decommit_failures);
        assert!(st1.decommit_failed_bytes >= 16 * PAGE_SIZE as u64);
        assert_eq!(h.counters().heap_released, st1.released_bytes);
        // The run was freed 30 ms ago, but the failure stamped it afresh: a paced pass
        // with a 20 ms delay leaves it alone.
        h.scavenger.set_config(crate::ScavengerConfig {
            delay: Some(std::time::Duration::from_millis(20)),
            retain_percent: 0,
            background: false,
        });
        let now = crate::os::coarse_now_ns();
        assert_eq!(h.scavenge(false, now, u64::MAX), (0, false));
        assert_eq!(stats().decommit_failures, st1.decommit_failures);
        // The run is free again, dirty: reused, it must be cleared.
        let s2 = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
        assert_eq!(unsafe { s2.as_ref() }.base(), base);
        assert!(unsafe { s2.as_ref().info() }.needzero);
        unsafe { h.free_span(s2) };
        // Once the OS agrees, everything goes.
        h.mem.refuse.store(false, Ordering::Relaxed);
        assert!(h.scavenge(true, 0, u64::MAX).0 >= 16 * PAGE_SIZE);
        assert_eq!(stats().committed_bytes, stats().inuse_bytes);
    }

    #[test]
    fn resize_in_place_updates_pages_and_counters() {
        let h = new_heap();
        let s = h.alloc_span(10, Purpose::Heap, 0, 1).unwrap();
        let base = unsafe { s.as_ref() }.base();
        unsafe { h.shrink_span(s, 4) };
        assert_eq!(unsafe { s.as_ref() }.npages(), 4);
        assert_eq!(
            h.span_of(base + 5 * PAGE_SIZE),
            None,
            "the tail left the span"
        );
        assert_eq!(h.counters().pages_in_use, 4);
        assert!(unsafe { h.grow_span_in_place(s, 12) });
        assert_eq!(h.span_of(base + 11 * PAGE_SIZE), Some(s));
        assert_eq!(h.counters().pages_in_use, 12);
        // A neighbour blocks growth.
        let t = h.alloc_span(1, Purpose::Heap, 0, 1).unwrap();
        assert_eq!(unsafe { t.as_ref() }.base(), base + 12 * PAGE_SIZE);
        assert!(!unsafe { h.grow_span_in_place(s, 13) });
        check_counters(h, &[(s, Purpose::Heap), (t, Purpose::Heap)]);
        unsafe {
            h.free_span(s);
            h.free_span(t);
        }
    }

    #[test]
    fn impossible_requests_fail_cleanly() {
        let h = new_heap();
        assert!(h.alloc_span(0, Purpose::Heap, 0, 1).is_none());
        assert!(h.alloc_span(usize::MAX, Purpose::Heap, 0, 1).is_none());
        assert!(h
            .alloc_span((MAX_SPAN_BYTES >> PAGE_SHIFT) + 1, Purpose::Heap, 0, 1)
            .is_none());
        assert!(h.alloc_span(1, Purpose::Heap, 0, MAX_ALIGN * 2).is_none());
        // The heap is still usable and consistent afterwards.
        let s = h.alloc_span(1, Purpose::Heap, 0, 1).unwrap();
        check_counters(h, &[(s, Purpose::Heap)]);
        unsafe { h.free_span(s) };
    }

    #[test]
    fn four_threads_never_get_overlapping_pages() {
        use std::sync::Mutex as StdMutex;
        let h = new_heap();
        // Each page's owner tag is written into the page itself and checked before free:
        // an overlap would overwrite another thread's tag.
        let seen = StdMutex::new(0usize);
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let seen = &seen;
                sc.spawn(move || {
                    let mut rng =
                        0x1234_5678_9ABC_DEF0u64 ^ (t + 1).wrapping_mul(0x9E3779B97F4A7C15);
                    let mut live: Vec<(NonNull<MSpan>, u64)> = Vec::new();
                    for i in 0..20_000u64 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if live.len() > 64 || (rng % 2 == 0 && !live.is_empty()) {
                            let (s, tag) = live.swap_remove((rng >> 8) as usize % live.len());
                            let span = unsafe { s.as_ref() };
                            for p in 0..span.npages() {
                                let w = (span.base() + p * PAGE_SIZE) as *const u64;
                                assert_eq!(
                                    unsafe { w.read() },
                                    tag,
                                    "page overwritten by another span"
                                );
                            }
                            unsafe { h.free_span(s) };
                        } else {
                            let n = 1 + (rng >> 20) as usize % 20;
                            let s = h.alloc_span(n, Purpose::Heap, 0, 1).unwrap();
                            let span = unsafe { s.as_ref() };
                            let tag = (t << 56) | i;
                            for p in 0..n {
                                unsafe { ((span.base() + p * PAGE_SIZE) as *mut u64).write(tag) };
                            }
                            live.push((s, tag));
                        }
                    }
                    for (s, _) in live {
                        unsafe { h.free_span(s) };
                    }
                    *seen.lock().unwrap() += 1;
                });
            }
        });
        assert_eq!(*seen.lock().unwrap(), 4);
        check_counters(h, &[]);
        assert_eq!(h.counters().heap_inuse, 0);
    }

    /// The consistent statistics of `h`, checked.
    fn checked_stats(h: &MHeap<TestMem>) -> crate::stats::Stats {
        let mut t = [0u64; crate::stats::field::N];
        h.stats.read(&mut t);
        let s = crate::stats::Stats::from_totals(&t, h.gauges());
        s.check().unwrap();
        s
    }

    #[test]
    fn four_threads_with_page_caches_never_overlap_and_flush_everything() {
        use std::sync::Mutex as StdMutex;
        let h = new_heap();
        // Spans handed between threads, freed by whoever takes them.
        let pool: StdMutex<Vec<(usize, u64)>> = StdMutex::new(Vec::new());
        let (cached, total) = (StdMutex::new(0u64), StdMutex::new(0u64));
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (pool, cached, total) = (&pool, &cached, &total);
                sc.spawn(move || {
                    let mut tc = HeapCache::new();
                    let mut rng =
                        0x0F1E_2D3C_4B5A_6978u64 ^ (t + 1).wrapping_mul(0x9E3779B97F4A7C15);
                    let mut live: Vec<(NonNull<MSpan>, u64)> = Vec::new();
                    let free = |tc: &mut HeapCache, s: NonNull<MSpan>, tag: u64| {
                        let span = unsafe { s.as_ref() };
                        for p in 0..span.npages() {
                            let w = (span.base() + p * PAGE_SIZE) as *const u64;
                            assert_eq!(unsafe { w.read() }, tag, "page overwritten");
                        }
                        unsafe { h.free_span_with(s, tc) };
                    };
                    for i in 0..20_000u64 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if live.len() > 64 || (rng % 2 == 0 && !live.is_empty()) {
                            let (s, tag) = live.swap_remove((rng >> 8) as usize % live.len());
                            if rng % 8 == 1 {
                                pool.lock().unwrap().push((s.as_ptr() as usize, tag));
                            } else {
                                free(&mut tc, s, tag);
                            }
                        } else if rng % 16 == 3 {
                            // Someone else's span.
                            let got = pool.lock().unwrap().pop();
                            if let Some((s, tag)) = got {
                                free(&mut tc, NonNull::new(s as *mut MSpan).unwrap(), tag);
                            }
                        } else {
                            // Mostly small spans (some of them small-object spans, which
                            // need bitmap records too); some of 16..=128 pages, from the
                            // chunk cache, and a few larger, which bypass both caches.
                            let class = (rng >> 32) as usize % NUM_CLASSES;
                            let (n, sc) = if rng % 5 == 0 && class != 0 {
                                (
                                    crate::sizeclasses::CLASS_TO_NPAGES[class] as usize,
                                    class as u8,
                                )
                            } else if rng % 7 == 0 {
                                (16 + (rng >> 24) as usize % 125, 0)
                            } else {
                                (1 + (rng >> 20) as usize % 20, 0)
                            };
                            let s = h.alloc_span_with(n, Purpose::Heap, sc, 1, &mut tc).unwrap();
                            let span = unsafe { s.as_ref() };
                            assert_eq!(span.npages(), n);
                            let tag = (t << 56) | i;
                            for p in 0..n {
                                unsafe { ((span.base() + p * PAGE_SIZE) as *mut u64).write(tag) };
                            }
                            live.push((s, tag));
                            if i % 1000 == 0 {
                                checked_stats(h);
                            }
                        }
                    }
                    for (s, tag) in live {
                        free(&mut tc, s, tag);
                    }
                    *cached.lock().unwrap() +=
                        u64::from(tc.pages.cache.count_ones()) + tc.chunk.count() as u64;
                    h.flush_heap_cache(&mut tc);
                    assert!(tc.pages.is_empty() && tc.chunk.base == 0 && tc.nspans == 0);
                    *total.lock().unwrap() += 1;
                });
            }
        });
        let mut tc = HeapCache::new();
        for (s, tag) in pool.into_inner().unwrap() {
            let s = NonNull::new(s as *mut MSpan).unwrap();
            let span = unsafe { s.as_ref() };
            assert_eq!(unsafe { (span.base() as *const u64).read() }, tag);
            unsafe { h.free_span_with(s, &mut tc) };
        }
        h.flush_heap_cache(&mut tc);
        assert_eq!(*total.lock().unwrap(), 4);
        assert!(*cached.lock().unwrap() > 0, "the page caches were used");
        check_counters(h, &[]);
        assert_eq!(h.counters().heap_inuse, 0);
        let st = checked_stats(h);
        assert_eq!(
            (
                st.page_cache_bytes,
                st.inuse_bytes - st.span_record_bytes - st.span_bitmap_bytes
            ),
            (0, 0)
        );
    }

    const CHUNK_SIZE_BYTES: usize = 512 * PAGE_SIZE;

    #[test]
    fn blocks_of_the_previous_chunk_come_back_without_the_lock() {
        // 1 MiB spans until the thread takes a second chunk: the first becomes its
        // previous chunk. A block of it freed then goes back to that chunk's bitmap in
        // the thread's cache (it went to the page allocator under the lock, with a
        // summary update, when a thread kept one chunk), and serves a later allocation.
        let h = new_heap();
        let mut tc = HeapCache::new();
        let base_of = |s: NonNull<MSpan>| unsafe { s.as_ref() }.base();
        let mut spans = vec![h
            .alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
            .unwrap()];
        let first = tc.chunk.base;
        while tc.chunk.base == first {
            assert!(spans.len() < 8, "a chunk holds four 1 MiB spans");
            spans.push(
                h.alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
                    .unwrap(),
            );
        }
        assert_eq!(tc.prev.base, first);
        let i = spans
            .iter()
            .position(|&s| (first..first + CHUNK_SIZE_BYTES).contains(&base_of(s)))
            .unwrap();
        let x = spans.swap_remove(i);
        let (xbase, before) = (base_of(x), tc.prev.count());
        unsafe { h.free_span_with(x, &mut tc) };
        // In the thread's cache, so not in the page allocator: no lock was needed.
        assert_eq!(tc.prev.count(), before + 128, "back in the previous chunk");
        assert!(!h.page_marked_in_use(xbase));
        let st = checked_stats(h);
        let held = tc.chunk.count() + tc.prev.count() + tc.pages.cache.count_ones() as usize;
        assert_eq!(st.page_cache_bytes as usize, held * PAGE_SIZE);
        // The current chunk's runs first, then the previous chunk's.
        loop {
            let s = h
                .alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
                .unwrap();
            spans.push(s);
            if base_of(s) == xbase {
                break;
            }
            assert!(spans.len() < 16, "the freed run was not reused");
        }
        assert_eq!(tc.prev.base, first, "no chunk was replaced on the way");
        for &s in &spans {
            unsafe { h.free_span_with(s, &mut tc) };
        }
        h.flush_heap_cache(&mut tc);
        check_counters(h, &[]);
        assert_eq!(checked_stats(h).page_cache_bytes, 0);
        assert_eq!(h.counters().heap_inuse, 0);
    }

    #[test]
    fn chunk_cache_serves_medium_spans_without_the_lock() {
        let h = new_heap();
        let mut tc = HeapCache::new();
        let a = h.alloc_span_with(40, Purpose::Heap, 0, 1, &mut tc).unwrap();
        let base = unsafe { a.as_ref() }.base();
        assert!(tc.chunk.base != 0 && tc.chunk.contains(base, 40));
        let left = tc.chunk.count();
        assert!(left >= 100, "the chunk holds the rest of its free pages");
        unsafe { h.free_span_with(a, &mut tc) };
        assert_eq!(tc.chunk.count(), left + 40);
        // Hold the heap lock: a cached allocation must not need it.
        let mut g = h.locked.lock();
        let b = h
            .alloc_span_with(100, Purpose::Heap, 0, 1, &mut tc)
            .unwrap();
        let c = h.alloc_span_with(16, Purpose::Heap, 0, 1, &mut tc).unwrap();
        assert_eq!(unsafe { b.as_ref() }.base(), base, "first fit in the chunk");
        assert!(h.page_marked_in_use(base));
        unsafe {
            h.free_span_with(b, &mut tc);
            h.free_span_with(c, &mut tc);
        }
        g.with(|_| ());
        drop(g);
        // A block from the chunk grows in place into the cache's free pages, no lock.
        let gspan = h.alloc_span_with(20, Purpose::Heap, 0, 1, &mut tc).unwrap();
        assert_eq!(unsafe { gspan.as_ref() }.base(), base);
        let mut probe = tc.chunk;
        assert!(probe.take_range(base + 20 * PAGE_SIZE, 20).is_some());
        let mut g = h.locked.lock();
        assert!(unsafe { h.grow_span_in_place_with(gspan, 40, Some(&mut tc)) });
        g.with(|_| ());
        drop(g);
        assert_eq!(unsafe { gspan.as_ref() }.npages(), 40);
        assert!(h.span_of(base + 39 * PAGE_SIZE) == Some(gspan));
        unsafe { h.free_span_with(gspan, &mut tc) };
        let st = checked_stats(h);
        let held = tc.chunk.count() + tc.pages.cache.count_ones() as usize;
        assert_eq!(st.page_cache_bytes as usize, held * PAGE_SIZE);
        // A span too long for what is left takes a new chunk, the old one's pages go back.
        let spans: Vec<_> = (0..5)
            .map(|_| {
                h.alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
                    .unwrap()
            })
            .collect();
        let bases: Vec<usize> = spans.iter().map(|s| unsafe { s.as_ref() }.base()).collect();
        assert!(
            bases[4] >= base + CHUNK_SIZE_BYTES,
            "a fifth 1 MiB span needs a new chunk"
        );
        for s in spans {
            unsafe { h.free_span_with(s, &mut tc) };
        }
        h.flush_heap_cache(&mut tc);
        check_counters(h, &[]);
        let st = checked_stats(h);
        assert_eq!(st.page_cache_bytes, 0);
        assert_eq!(h.counters().heap_inuse, 0);
    }

    #[test]
    fn page_cache_reuses_a_freed_span_without_the_lock() {
        let h = new_heap();
        let mut tc = HeapCache::new();
        let a = h.alloc_span_with(8, Purpose::Heap, 0, 1, &mut tc).unwrap();
        let base = unsafe { a.as_ref() }.base();
        let before = tc.pages;
        assert!(!before.is_empty());
        unsafe { h.free_span_with(a, &mut tc) };
        assert_eq!(tc.pages.cache.count_ones(), before.cache.count_ones() + 8);
        // Hold the heap lock: a cached allocation must not need it.
        let mut g = h.locked.lock();
        let b = h.alloc_span_with(8, Purpose::Heap, 0, 1, &mut tc).unwrap();
        g.with(|_| ());
        drop(g);
        assert_eq!(
            unsafe { b.as_ref() }.base(),
            base,
            "the same pages come back"
        );
        assert!(h.span_of(base).is_some());
        unsafe { h.free_span_with(b, &mut tc) };
        h.flush_heap_cache(&mut tc);
        check_counters(h, &[]);
        assert_eq!(checked_stats(h).page_cache_bytes, 0);
    }
}
