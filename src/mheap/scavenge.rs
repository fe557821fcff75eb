//! Giving memory back (Go's `mgcscavenge.go`): taking back idle threads' heap caches
//! (the reclaim gate's driver), the scavenger passes that return free pages, emptied
//! record chunks and span-map pages to the OS, and the glue of the paced passes and of
//! the background thread. The policy, the settings and the thread itself are in
//! `scavenger.rs`.
//!
//! What protects what: the reclaim lock (`MHeap::reclaim`, first in
//! `lockrank::TABLE`) admits one reclaimer at a time to the registry of caches
//! (`MHeap::caches`, a lock-free stack that only grows), and each cache is taken through
//! its gate (`GatedCache`). Passes pick runs and record chunks under the heap lock and
//! `madvise` them without it; a chunk's span-map page is dropped with the heap lock
//! held. The pacing state (`Scavenger::next_due`) is atomic: one thread claims a due
//! pass with a compare-exchange. Gauges and statistics are atomic, as in `mod.rs`.

use core::ptr::{self, NonNull};

use super::{add, clock_ms, Locked, MHeap};
use crate::fixalloc::RawFixAlloc;
use crate::os::{MemSource, PAGE_SHIFT};
use crate::pagealloc::ScavPolicy;
use crate::pagecache::GatedCache;
use crate::scavenger::{quiet_wait_ns, BACKLOG_WAIT, BG_OWNED, PASS_BUDGET_NS, START_BYTES};
use crate::stats::field;
use crate::sync::{MutexGuard, Ordering};

// Batch sizes: how much one visit under a lock handles, so that no lock is held for
// long whatever the heap's size (the pacing itself is `scavenger.rs`'s).

/// Caches claimed per heavy barrier by `reclaim_caches`.
const RECLAIM_BATCH: usize = 32;
/// Runs, and pages in all (64 MiB), a pass picks per visit under the heap lock.
const BATCH_RUNS: usize = 16;
const BATCH_PAGES: usize = 8192;
/// Record chunks withdrawn per visit under the heap lock by `release_free_records`.
const RECORD_BATCH: usize = 16;
/// Record chunks a paced pass looks at (all of them for `release_memory`).
const RECORD_LOOKS: usize = 256;

impl<M: MemSource> MHeap<M> {
    // ----------------------------------------------------------------------------------
    // Taking back idle threads' heap caches.
    // ----------------------------------------------------------------------------------

    /// The reclaim lock, for a reclaimer of threads' caches (`reclaim_caches`, visits in
    /// `global/idle.rs`): waited for if `wait` (`release_memory`), else only tried, so that a
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
        const BATCH: usize = RECLAIM_BATCH;
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
                let keep = self.heap_pages_in_use().saturating_mul(retain) / 100;
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
    pub(super) fn publish_meta_released(&self, h: &mut Locked) {
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
            const BATCH: usize = RECORD_BATCH;
            let mut budget = if force { usize::MAX } else { RECORD_LOOKS };
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
                        // use or on a free list until they are put back, and zero bytes
                        // are a free record there once revived (fixalloc.rs).
                        let done = unsafe {
                            self.mem.decommit(
                                NonNull::new_unchecked((base + k * RECORD_PAGE) as *mut u8),
                                run * RECORD_PAGE,
                            )
                        };
                        if !done {
                            self.count_refused_decommit(run * RECORD_PAGE);
                        }
                        *o &= done;
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
    /// [`ArenaIndex::chunk_span_map`](crate::arena::ArenaIndex::chunk_span_map)). If the OS refuses, the entries stay as they were.
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
                } else {
                    self.count_refused_decommit(bytes);
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
        if due == crate::scavenger::NOT_STARTED {
            // The process's first slow path: nothing is due yet.
            let wait = sc.delay_ms().map_or(1_000_000_000, quiet_wait_ns);
            sc.next_due.store(now + wait, Ordering::Relaxed);
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
                    now + quiet_wait_ns(delay)
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
    pub(super) fn excess_locked(&self, h: &Locked) -> usize {
        let p = &h.pages;
        self.scavenger.excess_pages(
            self.heap_pages_in_use(),
            p.free_pages(),
            p.scavenged_pages(),
        )
    }

    /// Pages of heap spans in use, what the retained headroom is a share of: the
    /// program's heap, which may grow back, not the allocator's record chunks (after a
    /// burst, a megabyte of them, mostly returned) or threads' page caches. Relaxed: a
    /// heuristic's input.
    fn heap_pages_in_use(&self) -> usize {
        self.pages_in_use.load(Ordering::Relaxed)
    }

    /// After the heap lock was released by a section that freed pages (and computed
    /// `excess` pages under it): tells the background thread.
    #[inline]
    pub(super) fn freed(&self, excess: usize) {
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
