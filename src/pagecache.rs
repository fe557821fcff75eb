//! Per-thread caches of the page heap (Go's `mpagecache.go` and `mspancache`): what a
//! thread needs to allocate and free a small span without the heap lock.
//!
//! - [`PageCache`]: a 64-page aligned *block* of pages taken from the page allocator in
//!   one go, with a bitmap of the pages still free in it (and of those still
//!   scavenged). Spans of fewer than [`MAX_CACHED_SPAN_PAGES`] pages are carved from
//!   it with a few bit operations. Pages freed back into the block's range return to
//!   the bitmap, so a thread that repeatedly allocates and frees a small span (a
//!   64 KiB buffer, say) never takes the lock.
//! - span records and small-span bitmap records, a few of each, so that the span a
//!   cached run becomes needs no lock either;
//! - a few freed *large blocks* (spans of up to 64 pages, 1 MiB in all), kept whole and
//!   published, so that a thread that frees and reallocates a block of the same size
//!   (a 64 KiB buffer per request, say) touches no shared state at all. Like an
//!   object on a small-object free list, a cached block still counts as live in the
//!   statistics until it is reused (then one allocation and one free are counted, at
//!   the next publication) or flushed.
//!
//! From the page allocator's view every page of a cache is allocated, and from the
//! statistics' view it is free (idle, committed or released as its scavenged bit
//! says) and counted in `page_cache_bytes`. A cache is refilled, and given back at
//! thread exit, under the heap lock (`MHeap::refill_heap_cache`, `flush_heap_cache`).
//!
//! A `HeapCache` belongs to one thread cache (`MCache`) and is only touched by its
//! owner, or by a reclaimer while the owner is outside it (the hand-off is
//! [`GatedCache`]'s), so none of its fields are atomic.

use core::ptr::{self, NonNull};

use crate::mspan::MSpan;
use crate::os::PAGE_SIZE;
use crate::sync::{AtomicPtr, AtomicU32, AtomicU8, Ordering, UnsafeCell};

/// Pages in a page cache block (one bitmap word).
pub(crate) const CACHE_PAGES: usize = 64;
/// Spans of fewer pages than this come from the page cache (Go: a quarter of a block).
pub(crate) const MAX_CACHED_SPAN_PAGES: usize = CACHE_PAGES / 4;
/// Pages in a chunk-cache block: one page-allocator chunk (4 MiB).
pub(crate) const CHUNK_CACHE_PAGES: usize = 512;
/// Spans of `MAX_CACHED_SPAN_PAGES` up to this many pages (1 MiB) come from the chunk
/// cache.
pub(crate) const MAX_CHUNK_SPAN_PAGES: usize = 128;
/// Words of a chunk-cache bitmap.
const CHUNK_CACHE_WORDS: usize = CHUNK_CACHE_PAGES / 64;

/// Span records a cache holds at most (refilled to `SPAN_RECS_FILL` when empty).
pub(crate) const SPAN_RECS: usize = 16;
/// Span records a refill leaves in the cache: most of it, so that a thread whose spans
/// are retired by others (a producer: its records never come back to it) takes the
/// heap lock for records once per this many spans, with room left for records that
/// its own span frees bring back.
pub(crate) const SPAN_RECS_FILL: usize = SPAN_RECS * 3 / 4;
/// Bitmap records per size bucket a cache holds at most.
pub(crate) const BITS_RECS: usize = 8;
/// Bitmap records of a bucket a refill leaves in the cache (as `SPAN_RECS_FILL`).
pub(crate) const BITS_RECS_FILL: usize = BITS_RECS * 3 / 4;
/// Number of bitmap record sizes (`mheap::records::BITS_WORDS`).
pub(crate) const BITS_BUCKETS: usize = 5;
/// Largest span (pages) kept whole in the large-block cache (512 KiB).
pub(crate) const LARGE_MAX_PAGES: usize = 64;
/// Large blocks a cache keeps at most.
pub(crate) const LARGE_SLOTS: usize = 8;
/// Bytes of large blocks a cache keeps at most.
pub(crate) const LARGE_BYTES: usize = 1 << 20;
/// Largest span (pages) kept as the *big* block (16 MiB): a block over
/// `LARGE_MAX_PAGES` pages is kept, one at a time, only if the thread's previous big
/// allocation had the same page count (a buffer of one size taken and given back
/// again and again), and given back as soon as the thread allocates a big block of
/// another size.
pub(crate) const BIG_MAX_PAGES: usize = 2048;

/// The lowest index `i` such that bits `i..i + n` of `x` are all set, or 64 if there is
/// none (`1 <= n <= 64`).
#[inline]
pub(crate) fn find_set_run(mut x: u64, n: usize) -> usize {
    debug_assert!((1..=64).contains(&n));
    // Shrink every run of ones from its top by n - 1 bits: a run survives (as its low
    // bits) only if it was at least n long, and its lowest bit does not move. Shifting
    // by doubling amounts takes O(log n) steps.
    let mut left = n - 1;
    let mut step = 1;
    while left > 0 {
        let k = left.min(step);
        x &= x >> k;
        if x == 0 {
            return 64;
        }
        left -= k;
        step *= 2;
    }
    x.trailing_zeros() as usize
}

/// A block of up to 64 free pages owned by one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageCache {
    /// Address of the block (64-page aligned), or 0 if the cache never had one.
    pub(crate) base: usize,
    /// Bit `i` set: page `base + i` pages is free in this cache.
    pub(crate) cache: u64,
    /// Bit `i` set: that free page is scavenged (must be committed before use).
    pub(crate) scav: u64,
}

impl PageCache {
    pub(crate) const EMPTY: PageCache = PageCache {
        base: 0,
        cache: 0,
        scav: 0,
    };

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.cache == 0
    }

    /// Takes `npages` contiguous pages: `(address, scavenged bytes among them)`, or
    /// None if the block has no such run.
    #[inline]
    pub(crate) fn alloc(&mut self, npages: usize) -> Option<(usize, usize)> {
        if self.cache == 0 || npages == 0 || npages > CACHE_PAGES {
            return None;
        }
        let i = if npages == 1 {
            self.cache.trailing_zeros() as usize
        } else {
            find_set_run(self.cache, npages)
        };
        if i >= CACHE_PAGES {
            return None;
        }
        let mask = run_mask(i, npages);
        let scav = (self.scav & mask).count_ones() as usize;
        self.cache &= !mask;
        self.scav &= !mask;
        Some((self.base + i * PAGE_SIZE, scav * PAGE_SIZE))
    }

    /// Whether the run `[base, base + npages pages)` lies in this cache's block.
    #[inline]
    pub(crate) fn contains(&self, base: usize, npages: usize) -> bool {
        self.base != 0
            && base >= self.base
            && npages <= CACHE_PAGES
            && base + npages * PAGE_SIZE <= self.base + CACHE_PAGES * PAGE_SIZE
    }

    /// Takes back the run `[base, base + npages pages)` if it lies in this cache's block
    /// (it is allocated from the page allocator's view, so the cache may own it);
    /// returns whether it did. The pages are dirty, not scavenged.
    #[inline]
    pub(crate) fn free(&mut self, base: usize, npages: usize) -> bool {
        if !self.contains(base, npages) {
            return false;
        }
        let mask = run_mask((base - self.base) / PAGE_SIZE, npages);
        debug_assert!(self.cache & mask == 0, "page cache: double free");
        self.cache |= mask;
        true
    }
}

/// The free pages of one chunk (512 pages, 4 MiB, chunk aligned) owned by one thread,
/// for spans of 16 to 128 pages (128 KiB .. 1 MiB): the same idea as [`PageCache`],
/// one size up, so that a thread that allocates and frees such blocks takes the heap
/// lock once per chunk instead of twice per block. A wholly free chunk is taken (the
/// heap grows if there is none); when it cannot serve a request it becomes the
/// thread's previous chunk (`HeapCache::prev`) and a new one is taken, and the
/// previous one's free pages are given back then, or at thread exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkCache {
    /// Address of the chunk (4 MiB aligned), or 0 if the cache has none.
    pub(crate) base: usize,
    /// Bit `i` of word `i / 64` set: page `base + i` pages is free in this cache.
    pub(crate) free: [u64; CHUNK_CACHE_WORDS],
    /// Of those, the scavenged ones (must be committed before use).
    pub(crate) scav: [u64; CHUNK_CACHE_WORDS],
}

impl ChunkCache {
    pub(crate) const EMPTY: ChunkCache = ChunkCache {
        base: 0,
        free: [0; CHUNK_CACHE_WORDS],
        scav: [0; CHUNK_CACHE_WORDS],
    };

    /// Free pages held.
    pub(crate) fn count(&self) -> usize {
        self.free.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The lowest page `i` such that pages `i..i + n` are free in the cache.
    fn find(&self, n: usize) -> Option<usize> {
        debug_assert!((1..=CHUNK_CACHE_PAGES).contains(&n));
        // `run` free pages end at the current word's start, beginning at `start`.
        let (mut run, mut start) = (0usize, 0usize);
        for (w, &x) in self.free.iter().enumerate() {
            if x == !0 {
                if run == 0 {
                    start = w * 64;
                }
                run += 64;
                if run >= n {
                    return Some(start);
                }
                continue;
            }
            // The run from earlier words continues through this word's low ones.
            if run > 0 && run + x.trailing_ones() as usize >= n {
                return Some(start);
            }
            // A run inside this word.
            if n <= 64 {
                let i = find_set_run(x, n);
                if i < 64 {
                    return Some(w * 64 + i);
                }
            }
            // The run this word's high ones start.
            run = x.leading_ones() as usize;
            start = w * 64 + 64 - run;
        }
        None
    }

    /// Calls `f(word, mask)` for the words of pages `i..i + n`.
    fn words(i: usize, n: usize, mut f: impl FnMut(usize, u64)) {
        let mut p = i;
        while p < i + n {
            let w = p / 64;
            let lo = p % 64;
            let hi = (i + n - w * 64).min(64);
            let m = if hi - lo == 64 {
                !0
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(w, m);
            p = w * 64 + hi;
        }
    }

    /// Takes `npages` contiguous pages: `(address, scavenged bytes among them)`, or
    /// None if the chunk has no such run.
    pub(crate) fn alloc(&mut self, npages: usize) -> Option<(usize, usize)> {
        if self.base == 0 || npages == 0 || npages > CHUNK_CACHE_PAGES {
            return None;
        }
        let i = self.find(npages)?;
        let mut scav = 0;
        Self::words(i, npages, |w, m| {
            scav += (self.scav[w] & m).count_ones() as usize;
            self.free[w] &= !m;
            self.scav[w] &= !m;
        });
        Some((self.base + i * PAGE_SIZE, scav * PAGE_SIZE))
    }

    /// Takes exactly the run `[base, base + npages pages)` (inside the chunk) if all of
    /// it is free in the cache; returns its scavenged bytes.
    pub(crate) fn take_range(&mut self, base: usize, npages: usize) -> Option<usize> {
        if !self.contains(base, npages) || npages == 0 {
            return None;
        }
        let i = (base - self.base) / PAGE_SIZE;
        let mut all = true;
        Self::words(i, npages, |w, m| all &= self.free[w] & m == m);
        if !all {
            return None;
        }
        let mut scav = 0;
        Self::words(i, npages, |w, m| {
            scav += (self.scav[w] & m).count_ones() as usize;
            self.free[w] &= !m;
            self.scav[w] &= !m;
        });
        Some(scav * PAGE_SIZE)
    }

    /// Whether the run `[base, base + npages pages)` lies in this cache's chunk.
    #[inline]
    pub(crate) fn contains(&self, base: usize, npages: usize) -> bool {
        self.base != 0
            && base >= self.base
            && base + npages * PAGE_SIZE <= self.base + CHUNK_CACHE_PAGES * PAGE_SIZE
    }

    /// Takes back the run `[base, base + npages pages)`, which must lie in the chunk
    /// (dirty pages).
    pub(crate) fn free(&mut self, base: usize, npages: usize) {
        debug_assert!(self.contains(base, npages));
        Self::words((base - self.base) / PAGE_SIZE, npages, |w, m| {
            debug_assert!(self.free[w] & m == 0, "chunk cache: double free");
            self.free[w] |= m;
        });
    }
}

/// Bits `i..i + n` set.
#[inline]
fn run_mask(i: usize, n: usize) -> u64 {
    let ones = if n >= 64 { !0 } else { (1u64 << n) - 1 };
    ones << i
}

/// A thread's page cache, chunk caches, large-block caches and record caches. The
/// owner's, inside its `GatedCache`; a reclaimer's while it holds the gate's claim.
#[derive(Debug)]
pub(crate) struct HeapCache {
    pub(crate) pages: PageCache,
    /// A whole chunk for spans of 16..=128 pages.
    pub(crate) chunk: ChunkCache,
    /// The chunk before `chunk`: kept until the next replacement, so that blocks still
    /// live in it come back to the thread's cache, not to the page allocator under the
    /// lock (a thread whose blocks of this size outgrow one chunk otherwise gave each
    /// of them back under the lock with a summary update).
    pub(crate) prev: ChunkCache,
    pub(crate) spans: [*mut MSpan; SPAN_RECS],
    pub(crate) nspans: usize,
    pub(crate) bits: [[*mut u64; BITS_RECS]; BITS_BUCKETS],
    pub(crate) nbits: [usize; BITS_BUCKETS],
    /// Freed large blocks kept whole (live, published spans), most recent last.
    pub(crate) large: [*mut MSpan; LARGE_SLOTS],
    pub(crate) nlarge: usize,
    /// Bytes of the blocks in `large`.
    pub(crate) large_bytes: usize,
    /// Reuses of cached large blocks (and their bytes) not yet published to the
    /// statistics.
    pub(crate) large_reuse: u64,
    pub(crate) large_reuse_bytes: u64,
    /// A freed big block (over `LARGE_MAX_PAGES` pages) kept whole, or null.
    pub(crate) big: *mut MSpan,
    /// Pages of the thread's last big allocation (0: none yet).
    pub(crate) last_big: usize,
}

impl HeapCache {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            HeapCache {
                pages: PageCache::EMPTY,
                chunk: ChunkCache::EMPTY,
                prev: ChunkCache::EMPTY,
                spans: [ptr::null_mut(); SPAN_RECS],
                nspans: 0,
                bits: [[ptr::null_mut(); BITS_RECS]; BITS_BUCKETS],
                nbits: [0; BITS_BUCKETS],
                large: [ptr::null_mut(); LARGE_SLOTS],
                nlarge: 0,
                large_bytes: 0,
                large_reuse: 0,
                large_reuse_bytes: 0,
                big: ptr::null_mut(),
                last_big: 0,
            }
        }
    }

    /// The cached chunk (current or previous) that holds `[base, base + npages pages)`.
    #[inline]
    pub(crate) fn chunk_with(&mut self, base: usize, npages: usize) -> Option<&mut ChunkCache> {
        if self.chunk.contains(base, npages) {
            Some(&mut self.chunk)
        } else if self.prev.contains(base, npages) {
            Some(&mut self.prev)
        } else {
            None
        }
    }

    /// A cached large block of exactly `npages` pages (the most recent one), counted as
    /// a reuse; None if there is none.
    #[inline]
    pub(crate) fn take_large(&mut self, npages: usize) -> Option<NonNull<MSpan>> {
        for i in (0..self.nlarge).rev() {
            let s = self.large[i];
            // SAFETY: cached blocks are live spans this cache owns; records are never
            // unmapped.
            if unsafe { (*s).npages() } == npages {
                self.nlarge -= 1;
                self.large[i] = self.large[self.nlarge];
                self.large_bytes -= npages * PAGE_SIZE;
                self.large_reuse += 1;
                self.large_reuse_bytes += (npages * PAGE_SIZE) as u64;
                return NonNull::new(s);
            }
        }
        None
    }

    /// For an allocation of a big block of `npages` pages (over `LARGE_MAX_PAGES`):
    /// the kept big block if it has that size (counted as a reuse), else `Err` with the
    /// kept block of another size, if any, which the caller frees (the thread has moved
    /// on to another size). Records `npages` as the thread's last big size.
    #[inline]
    pub(crate) fn take_big(
        &mut self,
        npages: usize,
    ) -> Result<NonNull<MSpan>, Option<NonNull<MSpan>>> {
        self.last_big = npages;
        let Some(s) = NonNull::new(self.big) else {
            return Err(None);
        };
        self.big = ptr::null_mut();
        // SAFETY: the kept block is a live span this cache owns.
        if unsafe { s.as_ref() }.npages() == npages {
            self.large_reuse += 1;
            self.large_reuse_bytes += (npages * PAGE_SIZE) as u64;
            Ok(s)
        } else {
            Err(Some(s))
        }
    }

    /// Keeps the freed big block `s` of `npages` pages if the thread's last big
    /// allocation had this size and no big block is kept; returns whether it did.
    ///
    /// # Safety
    /// As for `keep_large`.
    #[inline]
    pub(crate) unsafe fn keep_big(&mut self, s: NonNull<MSpan>, npages: usize) -> bool {
        if cfg!(feature = "checked")
            || npages > BIG_MAX_PAGES
            || npages != self.last_big
            || !self.big.is_null()
        {
            return false;
        }
        // SAFETY: forwarded (the block was written: `alloc_zeroed` must clear it).
        unsafe { mark_needzero(s) };
        self.big = s.as_ptr();
        true
    }

    /// The oldest cached large block, removed (to make room for a newer one; the
    /// caller frees it).
    pub(crate) fn evict_oldest(&mut self) -> Option<NonNull<MSpan>> {
        if self.nlarge == 0 {
            return None;
        }
        let s = self.large[0];
        self.large.copy_within(1..self.nlarge, 0);
        self.nlarge -= 1;
        // SAFETY: cached blocks are live spans this cache owns.
        self.large_bytes -= unsafe { (*s).npages() } * PAGE_SIZE;
        NonNull::new(s)
    }

    /// Whether a freed large block of `npages` pages could be kept after evicting older
    /// ones (it is small enough).
    #[inline]
    pub(crate) fn cacheable(npages: usize) -> bool {
        // Checked mode keeps no freed block live, so a second free finds it dead.
        !cfg!(feature = "checked") && npages <= LARGE_MAX_PAGES && npages * PAGE_SIZE <= LARGE_BYTES
    }

    /// Keeps the freed large block `s` (a live heap span of `npages` pages, given up by
    /// its user) if there is room; returns whether it did.
    ///
    /// # Safety
    /// `s` is a live span holding one large block that nobody uses any more.
    #[inline]
    pub(crate) unsafe fn keep_large(&mut self, s: NonNull<MSpan>, npages: usize) -> bool {
        let bytes = npages * PAGE_SIZE;
        if npages > LARGE_MAX_PAGES
            || self.nlarge == LARGE_SLOTS
            || self.large_bytes + bytes > LARGE_BYTES
        {
            return false;
        }
        // SAFETY: the caller gives the span up to us.
        unsafe { mark_needzero(s) };
        self.large[self.nlarge] = s.as_ptr();
        self.nlarge += 1;
        self.large_bytes += bytes;
        true
    }
}

/// Records that a freed block kept whole was written: the next `alloc_zeroed` that
/// takes it must clear it.
///
/// # Safety
/// The caller was given the live span `s` (its private fields are the caller's).
unsafe fn mark_needzero(s: NonNull<MSpan>) {
    // SAFETY: per the contract.
    unsafe {
        let span = s.as_ref();
        let mut info = span.info();
        info.needzero = true;
        span.set_info(info);
    }
}

/// A `HeapCache` that another thread can take back while its owner is idle.
///
/// A thread that allocated blocks and then went quiet (a parked worker of a pool)
/// would otherwise keep its cache's free pages — up to two 4 MiB chunks, a 64-page
/// block and 1 MiB of large blocks — until it exits, out of the scavenger's reach. The
/// owner brackets every use of its cache with [`enter`](Self::enter) and
/// [`exit`](Self::exit) (a store, a compiler fence and a load, then a store: no atomic
/// read-modify-write and no fence instruction); a reclaimer claims the cache, passes a
/// heavy barrier, and takes the cache's contents only if the owner is not inside.
///
/// The hand-off is an asymmetric Dekker: the owner stores `busy`, passes
/// `light_barrier`, loads `claim`; the reclaimer stores `claim`, passes
/// `heavy_barrier`, loads `busy`. At least one of them sees the other's store. If the
/// reclaimer sees `busy` it gives up; if the owner sees `claim` it waits for the claim
/// to end (a reclaimer holds it for one `flush_heap_cache` at most, and never waits
/// for the owner). The owner's last use happens-before the reclaimer's (Release store
/// of `busy` = false, Acquire load), and the reclaimer's happens-before the owner's
/// next (Release store of `claim` = false, Acquire load).
///
/// `used` is set by the owner at every entry (a plain store) and cleared by the
/// reclaimer that looks at it; `idle_since` is the reclaimers' record (under the reclaim
/// lock) of when they first found it clear, from which they judge how long the cache
/// has been idle.
pub(crate) struct GatedCache {
    /// The owner is using `cache`. Written by the owner only.
    busy: AtomicU8,
    /// A reclaimer has claimed the cache. Set by a reclaimer's CAS, cleared by it.
    claim: AtomicU8,
    /// The owner entered since a reclaimer last looked. Set by the owner (store),
    /// cleared by a reclaimer (swap).
    used: AtomicU8,
    /// The coarse time (ms) since which reclaimers have found the cache unused
    /// (`RECLAIMED`: taken since, and not used). Reclaim lock.
    idle_since: AtomicU32,
    /// Next cache in the heap's registry (`MHeap::register_cache`); set once, before
    /// publication.
    pub(crate) next: AtomicPtr<GatedCache>,
    /// The cache: the owner's inside `enter`/`exit`, a claiming reclaimer's otherwise.
    cache: UnsafeCell<HeapCache>,
}

/// The ordering of the owner's first load of `claim` in `enter`. The loom mutant
/// `gate_claim_relaxed` weakens it to show that the reclaim model catches it.
#[cfg(not(spanheap_mutant = "gate_claim_relaxed"))]
const CLAIM_ACQUIRE: Ordering = Ordering::Acquire;
#[cfg(spanheap_mutant = "gate_claim_relaxed")]
const CLAIM_ACQUIRE: Ordering = Ordering::Relaxed;

/// `GatedCache::idle_since` of a cache taken back and not used since.
const RECLAIMED: u32 = u32::MAX;

// SAFETY: the cache is handed between the owner and reclaimers by the gate protocol
// above; the other fields are atomics.
unsafe impl Sync for GatedCache {}
// SAFETY: as above; the pointers inside are heap metadata, valid in any thread.
unsafe impl Send for GatedCache {}

impl GatedCache {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            GatedCache {
                busy: AtomicU8::new(0),
                claim: AtomicU8::new(0),
                used: AtomicU8::new(1),
                idle_since: AtomicU32::new(0),
                next: AtomicPtr::new(ptr::null_mut()),
                cache: UnsafeCell::new(HeapCache::new()),
            }
        }
    }

    /// Runs `f` on the cache as its owner (see the type's documentation).
    ///
    /// # Safety
    /// The calling thread owns the cache, holds no allocator lock, and is not already
    /// inside `with` on it.
    #[inline]
    pub(crate) unsafe fn with<R>(&self, f: impl FnOnce(&mut HeapCache) -> R) -> R {
        self.enter();
        // SAFETY: inside the gate the cache is the owner's alone (see `enter`).
        let r = self.cache.with_mut(|p| f(unsafe { &mut *p }));
        self.exit();
        r
    }

    #[inline]
    fn enter(&self) {
        self.busy.store(1, Ordering::Relaxed);
        crate::sync::light_barrier();
        // Acquire: a claim that ended before this load (its Release store of 0)
        // happens-before our use, so we see the cache as the reclaimer left it.
        if self.claim.load(CLAIM_ACQUIRE) != 0 {
            self.wait_for_claim();
        }
        // Relaxed: a hint for the reclaimers' idleness test only.
        self.used.store(1, Ordering::Relaxed);
    }

    /// A reclaimer claimed the cache: it either saw `busy` and will let go at once, or
    /// is taking the contents. Either way wait for the claim to end; `busy` stays set,
    /// so no later claim can start taking (its heavy barrier makes it see `busy`).
    #[cold]
    #[inline(never)]
    fn wait_for_claim(&self) {
        let mut w = crate::sync::SpinWait::new();
        // Acquire: as in `enter`.
        while self.claim.load(Ordering::Acquire) != 0 {
            w.spin();
        }
    }

    #[inline]
    fn exit(&self) {
        // Release: our use of the cache happens-before a reclaimer's that reads 0.
        self.busy.store(0, Ordering::Release);
    }

    /// Claims the cache for a reclaimer if nobody else has; the caller must then pass
    /// `heavy_barrier` and call `take` or `unclaim`. Reclaim lock.
    pub(crate) fn try_claim(&self) -> bool {
        // Relaxed: the claim only needs to reach the owner, which the heavy barrier
        // that follows guarantees; data is handed over by `busy` and the unclaim.
        self.claim
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// After `try_claim` and a heavy barrier: if the owner is not inside, runs `f` on
    /// the cache (which the owner will see when it next enters) and returns its
    /// result; `None` if the owner is inside. Ends the claim either way.
    pub(crate) fn take<R>(&self, f: impl FnOnce(&mut HeapCache) -> R) -> Option<R> {
        // Acquire: pairs with the owner's Release in `exit`.
        let r = if self.busy.load(Ordering::Acquire) == 0 {
            // SAFETY: claimed, and the owner is outside and will wait for the claim to
            // end before entering (the heavy barrier made our claim visible to it).
            Some(self.cache.with_mut(|p| f(unsafe { &mut *p })))
        } else {
            None
        };
        self.unclaim();
        r
    }

    /// Ends a claim. Release: pairs with the owner's Acquire in `enter`.
    pub(crate) fn unclaim(&self) {
        self.claim.store(0, Ordering::Release);
    }

    /// Whether a reclaimer should claim the cache: `force`, or not entered since
    /// looks that began at least `idle_ms` ago, and not taken since. Reclaim lock.
    pub(crate) fn is_idle(&self, force: bool, now_ms: u32, idle_ms: u32) -> bool {
        // Relaxed: a hint (see `enter`); the claim protocol decides what is safe.
        if self.used.swap(0, Ordering::Relaxed) != 0 {
            self.idle_since
                .store(now_ms.min(RECLAIMED - 1), Ordering::Relaxed);
            return force;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        force || (since != RECLAIMED && now_ms.wrapping_sub(since) >= idle_ms)
    }

    /// The coarse time (ms) of the last look that found the cache used (valid while
    /// it is idle and not taken). Reclaim lock.
    pub(crate) fn idle_since_ms(&self) -> u32 {
        self.idle_since.load(Ordering::Relaxed)
    }

    /// Whether the cache was taken back and not used since. Reclaim lock.
    pub(crate) fn is_reclaimed(&self) -> bool {
        self.idle_since.load(Ordering::Relaxed) == RECLAIMED
    }

    /// Records that the cache was taken back (and so needs no look until used again).
    /// Reclaim lock.
    pub(crate) fn mark_reclaimed(&self) {
        self.idle_since.store(RECLAIMED, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_find(x: u64, n: usize) -> usize {
        (0..=64 - n)
            .find(|&i| (i..i + n).all(|b| x >> b & 1 == 1))
            .unwrap_or(64)
    }

    #[test]
    fn chunk_cache_find_matches_a_naive_search() {
        let mut r = 0x1234_5678_9ABC_DEF1u64;
        for round in 0..4000 {
            let mut c = ChunkCache {
                base: 1 << 30,
                ..ChunkCache::EMPTY
            };
            for w in 0..CHUNK_CACHE_WORDS {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                // Mostly-full and mostly-empty words, and whole words either way.
                c.free[w] = match (r >> 60) % 4 {
                    0 => !0,
                    1 => 0,
                    2 => r | (r << 7),
                    _ => r & (r >> 3),
                };
            }
            let bit = |i: usize| c.free[i / 64] >> (i % 64) & 1 == 1;
            for n in [1, 2, 5, 16, 40, 63, 64, 65, 100, 128, 200, 512] {
                let naive = (0..=CHUNK_CACHE_PAGES - n).find(|&i| (i..i + n).all(bit));
                assert_eq!(c.find(n), naive, "round {round}, n {n}, {:x?}", c.free);
            }
        }
        let mut c = ChunkCache {
            base: 1 << 30,
            free: [!0; CHUNK_CACHE_WORDS],
            scav: [0; CHUNK_CACHE_WORDS],
        };
        c.scav[1] = !0;
        assert_eq!(c.alloc(100), Some((1 << 30, 36 * PAGE_SIZE)));
        assert_eq!(c.count(), 412);
        c.free((1 << 30) + 10 * PAGE_SIZE, 20);
        assert_eq!(c.alloc(20), Some(((1 << 30) + 10 * PAGE_SIZE, 0)));
        assert!(c.contains(1 << 30, 512) && !c.contains(1 << 30, 513));
    }

    #[test]
    fn find_set_run_matches_a_naive_search() {
        let mut r = 0x9E37_79B9_7F4A_7C15u64;
        let mut xs = vec![0, !0, 1, 1 << 63, 0xF0F0_F0F0_F0F0_F0F0, !0 >> 1, !0 << 1];
        for _ in 0..2000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            xs.push(r);
            xs.push(r | r >> 1 | r >> 2); // longer runs
            xs.push(r & r >> 3);
        }
        for &x in &xs {
            for n in 1..=64 {
                assert_eq!(find_set_run(x, n), naive_find(x, n), "x={x:#x} n={n}");
            }
        }
    }

    #[test]
    fn page_cache_allocates_runs_and_takes_frees_back() {
        let base = 1 << 30;
        // Pages 0..4 free and scavenged, 8..40 free, the rest used.
        let mut c = PageCache {
            base,
            cache: 0xF | (((1u64 << 32) - 1) << 8),
            scav: 0xF,
        };
        assert_eq!(c.alloc(1), Some((base, PAGE_SIZE)));
        assert_eq!(
            c.alloc(4),
            Some((base + 8 * PAGE_SIZE, 0)),
            "1..4 is only 3 long"
        );
        assert_eq!(c.alloc(3), Some((base + PAGE_SIZE, 3 * PAGE_SIZE)));
        assert_eq!(c.alloc(29), None);
        assert_eq!(c.alloc(28), Some((base + 12 * PAGE_SIZE, 0)));
        assert!(c.is_empty());
        assert_eq!(c.alloc(1), None);
        // Frees inside the block come back (any page of it: the allocator sees the
        // whole block as allocated); outside it, they do not.
        assert!(c.free(base + 8 * PAGE_SIZE, 4));
        assert!(c.free(base + 63 * PAGE_SIZE, 1));
        assert!(!c.free(base + 63 * PAGE_SIZE, 2));
        assert!(!c.free(base - PAGE_SIZE, 1));
        assert!(!PageCache::EMPTY.clone().free(base, 1));
        assert_eq!(c.alloc(4), Some((base + 8 * PAGE_SIZE, 0)));
        assert_eq!(c.alloc(1), Some((base + 63 * PAGE_SIZE, 0)));
        assert!(c.is_empty());
    }
}
