//! Span allocation and free through the calling thread's heap cache (Go's
//! `mpagecache.go`, with the mspan cache of `mheap.go`): the page block, chunk cache,
//! record caches and large-block cache of `pagecache.rs`, and refilling and flushing
//! them.
//!
//! `alloc_span_with` first tries the calling thread's `HeapCache` (Go's page cache and
//! mspan cache, `pagecache.rs`): a span of fewer than 16 pages is carved from the
//! thread's 64-page block with its record from the thread's record cache, and steps 2
//! and 3 follow unchanged; no lock at all. The lock is taken only to refill the cache.
//! `free_span_with` returns the pages to that block when they lie in it, and the
//! records to the record cache, again without the lock.
//!
//! (Steps 2 and 3, and the publication protocol, are in `mod.rs`: `finish_alloc`,
//! `unpublish`.)
//!
//! What protects what: a `HeapCache` belongs to its thread, which passes it here as
//! `&mut` (another thread reaches it only through its `GatedCache` gate, while the
//! owner is outside: see `scavenge.rs`), so the cache's pages and records are used
//! without any lock. Refills, flushes and whatever the cache cannot hold take the heap
//! lock (`Locked`: page allocator, record allocators); counters and statistics are
//! atomic, as in `mod.rs`.

use core::ptr::{self, NonNull};

use super::{bits_bucket, clock_ms, Locked, MHeap};
use crate::mspan::{MSpan, Purpose};
use crate::os::{MemSource, PAGE_SHIFT, PAGE_SIZE};
use crate::pagecache::{
    ChunkCache, HeapCache, PageCache, BITS_RECS, BITS_RECS_FILL, LARGE_MAX_PAGES,
    MAX_CACHED_SPAN_PAGES, MAX_CHUNK_SPAN_PAGES, SPAN_RECS, SPAN_RECS_FILL,
};
use crate::sizeclasses::CLASS_TO_NOBJS;
use crate::stats::field;
use crate::sync::Ordering;

impl<M: MemSource> MHeap<M> {
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
            self.refill_heap_cache(tc, bucket, true);
            if !ready(tc) {
                return self.alloc_span(npages, purpose, spanclass, align);
            }
        }
        let Some((base, scav)) = tc.pages.alloc(npages).or_else(|| {
            // The block has free pages but no run this long. For a small-object span,
            // trade it for one that has such a run (`replace_page_block`). Not for a
            // large block: a thread whose large blocks other threads free then kept
            // moving to new blocks, and the old ones' scattered pages stayed resident
            // unused (`examples/footprint.rs pipeline`: peak RSS +5 MiB, 8%).
            if spanclass == 0 {
                return None;
            }
            self.replace_page_block(tc, npages);
            tc.pages.alloc(npages)
        }) else {
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
            // Records only: this span's pages come from a chunk, and a page block taken
            // now would be carved from the lowest free run, which may be the one a
            // large block freed earlier left for the next (a heap whose blocks were
            // freed could then not serve as many of the same size again).
            self.refill_heap_cache(tc, None, false);
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
        let excess = self.locked.lock().with(|h| {
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
            tc.chunk = match new {
                Some((base, free, scav)) => ChunkCache { base, free, scav },
                None => ChunkCache::EMPTY,
            };
            self.count_traded_pages_locked(h, old.count(), tc.chunk.count());
            self.excess_locked(h)
        });
        self.freed(excess);
        self.maybe_scavenge();
    }

    /// Gives the free pages of `tc`'s page block back to the page allocator and takes
    /// the block that holds the heap's first free run of `npages` pages instead, in one
    /// hold of the heap lock. Leaves the cache empty if there is no such block (the
    /// caller then allocates outside the cache, under the lock, as before; its next
    /// span refills the cache).
    ///
    /// Without this, a block whose free pages are too scattered for the spans a thread
    /// asks for (a few pages left between spans of other lengths) stayed the thread's
    /// block, and each of those spans took the heap lock: a producer whose spans other
    /// threads free never gets pages back into its block to fill the gaps.
    #[cold]
    fn replace_page_block(&self, tc: &mut HeapCache, npages: usize) {
        let old = core::mem::replace(&mut tc.pages, PageCache::EMPTY);
        let now = clock_ms();
        let excess = self.locked.lock().with(|h| {
            h.pages.set_clock(now);
            h.pages.free_from_cache(old.base, old.cache, old.scav);
            // (No growth here: if the heap has no such run, the caller's `alloc_span`
            // grows it, and the next replacement finds the new pages.)
            if let Some((base, cache, scav)) = h.pages.alloc_to_cache_with_run(npages) {
                tc.pages = PageCache { base, cache, scav };
            }
            let (gave, took) = (old.cache.count_ones(), tc.pages.cache.count_ones());
            self.count_traded_pages_locked(h, gave as usize, took as usize);
            self.excess_locked(h)
        });
        self.freed(excess);
    }

    /// Counts a cache that gave `gave` pages back to the page allocator and took `took`
    /// in the same hold of the heap lock (`h`) in `page_cache_bytes`. Under the lock,
    /// with the page allocator's change: an arena the given-back pages free may be
    /// unmapped by the next holder, and no snapshot may see the arena gone and the
    /// pages still cached.
    fn count_traded_pages_locked(&self, _h: &mut Locked, gave: usize, took: usize) {
        if gave != took {
            self.stats_update(|d| {
                d.add(field::PAGE_CACHED, (took * PAGE_SIZE) as u64);
                d.sub(field::PAGE_CACHED, (gave * PAGE_SIZE) as u64);
            });
        }
    }

    /// Refills `tc` under the heap lock: if `pages`, a new page block if the current
    /// one is empty (growing the heap if no page is free); span records up to
    /// `SPAN_RECS_FILL`, and bitmap records of `bucket` likewise. What cannot be had is
    /// left empty.
    #[cold]
    fn refill_heap_cache(&self, tc: &mut HeapCache, bucket: Option<usize>, pages: bool) {
        let mut took = 0u64;
        self.locked.lock().with(|h| {
            if pages && tc.pages.is_empty() {
                let block = h.pages.alloc_to_cache().or_else(|| {
                    self.grow_locked(h, 1, 1).ok()?;
                    h.pages.alloc_to_cache()
                });
                if let Some((base, cache, scav)) = block {
                    tc.pages = PageCache { base, cache, scav };
                    took = u64::from(cache.count_ones());
                }
            }
            while tc.nspans < SPAN_RECS_FILL {
                let Some(s) = self.span_record_locked(h) else {
                    break;
                };
                tc.spans[tc.nspans] = s.as_ptr();
                tc.nspans += 1;
            }
            if let Some(b) = bucket {
                while tc.nbits[b] < BITS_RECS_FILL {
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
        // below), their pages as old as the cache's other free pages (`freed_ms`: a
        // reclaimed idle cache's kept block has been unused as long as the cache).
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
                unsafe { self.free_span_with_at(NonNull::new_unchecked(s), tc, Some(freed_ms)) };
            }
            tc.large_bytes = 0;
            if let Some(s) = big {
                // SAFETY: as above.
                unsafe { self.free_span_with_at(s, tc, Some(freed_ms)) };
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
            if pages != 0 {
                // Under the lock, with the page allocator's change (see
                // `refill_chunk_cache`).
                self.stats_update(|d| d.sub(field::PAGE_CACHED, pages * PAGE_SIZE as u64));
            }
            self.excess_locked(h)
        });
        self.freed(excess);
        tc.pages = PageCache::EMPTY;
        tc.chunk = ChunkCache::EMPTY;
        tc.prev = ChunkCache::EMPTY;
        tc.nspans = 0;
        tc.nbits = [0; crate::pagecache::BITS_BUCKETS];
    }

    /// `free_span` through the calling thread's heap cache: pages that lie in the
    /// thread's page block go back to it, and the records to the record caches while
    /// they have room, without the lock; whatever remains is freed under it.
    ///
    /// # Safety
    /// As for `free_span`; `tc` is the calling thread's.
    pub(crate) unsafe fn free_span_with(&self, s: NonNull<MSpan>, tc: &mut HeapCache) {
        // SAFETY: forwarded.
        unsafe { self.free_span_with_at(s, tc, None) }
    }

    /// `free_span_with`, pages that go to the page allocator stamped as freed at
    /// `stamp` (coarse ms; None: now): for blocks a cache kept unused since then.
    ///
    /// # Safety
    /// As for `free_span_with`.
    unsafe fn free_span_with_at(&self, s: NonNull<MSpan>, tc: &mut HeapCache, stamp: Option<u32>) {
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
        let now = stamp.unwrap_or_else(clock_ms);
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
                self.account_alloc(Purpose::Heap, 0, n << PAGE_SHIFT, scav, true);
                self.arenas.set_spans(end, n, s.as_ptr(), 0);
                span.npages.store(new_npages, Ordering::Relaxed);
                self.pages_in_use.fetch_add(n, Ordering::Release);
                return true;
            }
        }
        // SAFETY: forwarded.
        unsafe { self.grow_span_in_place(s, new_npages) }
    }

    /// Counts large objects: `freed` pages given up and `allocated` pages taken, in one
    /// statistics section (a resize in place is one free and one allocation). Taken after
    /// the span has the pages and before it gives them back, so a snapshot never counts a
    /// live large object outside the in-use heap bytes.
    ///
    /// Out of line (as is `free_large`) so that the small-object paths of the callers stay
    /// free of the register saves a statistics section needs.
    #[inline(never)]
    pub(crate) fn count_large(&self, freed: usize, allocated: usize) {
        self.stats_update(|d| {
            if freed != 0 {
                d.add(field::LARGE_FREES, 1);
                d.add(field::LARGE_FREE_BYTES, (freed << PAGE_SHIFT) as u64);
            }
            if allocated != 0 {
                d.add(field::LARGE_ALLOCS, 1);
                d.add(field::LARGE_ALLOC_BYTES, (allocated << PAGE_SHIFT) as u64);
            }
        });
    }

    /// Frees a large block (or a sampled object of the heap profile, which is one):
    /// kept in the thread's heap cache `tc` when it takes it, else its span goes back to
    /// the heap. Pointers that are not live blocks of this heap are ignored (never a
    /// panic in a free).
    ///
    /// # Safety
    /// `p` is a live block of this heap (or foreign, see above), not used afterwards.
    #[inline(never)]
    pub(crate) unsafe fn free_large(&self, p: *mut u8, tc: Option<&mut HeapCache>) {
        let heap = self;
        let Some(s) = NonNull::new(heap.span_of_unchecked(p as usize)) else {
            return;
        };
        // SAFETY: `p` is a live block, so `s` is its live span and the caller gives it up.
        let npages = unsafe { s.as_ref() }.npages();
        match tc {
            Some(tc) => {
                // A big block of the size the thread keeps taking: keep it for the next.
                // SAFETY: as above: the block is given up whole.
                if npages > LARGE_MAX_PAGES && unsafe { tc.keep_big(s, npages) } {
                    return;
                }
                // Keep it for the next allocation of its size, evicting the oldest cached
                // blocks if there is no room (recent sizes are the likely ones).
                if HeapCache::cacheable(npages) {
                    loop {
                        // SAFETY: as above: the block is given up whole.
                        if unsafe { tc.keep_large(s, npages) } {
                            return;
                        }
                        let Some(old) = tc.evict_oldest() else { break };
                        // SAFETY: an evicted block is a live span nobody uses.
                        let old_pages = unsafe { old.as_ref() }.npages();
                        heap.count_large(old_pages, 0);
                        // SAFETY: as above.
                        unsafe { heap.free_span_with(old, tc) };
                    }
                }
                heap.count_large(npages, 0);
                // SAFETY: as above.
                unsafe { heap.free_span_with(s, tc) }
            }
            None => {
                heap.count_large(npages, 0);
                // SAFETY: as above.
                unsafe { heap.free_span(s) }
            }
        }
        // The block went back to the heap: a slow path, where a due scavenger pass may
        // run. (Blocks kept in the thread's large-block cache return above.)
        heap.maybe_scavenge();
    }
}
