//! The scavenger's index of chunks and its methods on [`PageAlloc`] (the scavenge index
//! and `scavengeOne` of Go's `mgcscavenge.go`).
//!
//! Free pages start dirty (Ready: they may hold RAM). Each L2 array of the chunk map
//! keeps a *dirty* bitmap of the chunks that may hold free, unscavenged pages, set
//! whenever pages are freed into a chunk, and the time of that last free. The
//! scavenger ([`scavenge_take`](PageAlloc::scavenge_take)) walks the dirty chunks from
//! the top of the heap down, skips those freed into too recently or too dense, and
//! takes their free unscavenged runs (marking them allocated); the heap returns them
//! to the OS without the lock and gives them back with
//! [`scavenge_return`](PageAlloc::scavenge_return), free and scavenged.
//!
//! This file has both sides of that index: the marking (`note_freed`, which every
//! path that frees dirty pages calls, and the clock it stamps, set with
//! [`set_clock`](PageAlloc::set_clock)), and the scan (`prev_dirty`, `scavenge_take`,
//! `scavenge_wait`, `scavenge_return`, and `mark_scavenged` for tests), with the
//! choice of chunks ([`ScavPolicy`], [`DENSE_PAGES`]). The index's storage (the
//! `dirty` and `freed_at` arrays of each L2 array, and `PageAlloc`'s `clock` and
//! `scav_cursor`) is declared with the rest of the struct in `mod.rs`; the bit
//! operations it uses are in `bits.rs`.
//!
//! # Locking
//!
//! All of it is part of one `PageAlloc`, so it is guarded by the heap lock like the
//! rest: every method here takes `&self` or `&mut self`. The runs that
//! `scavenge_take` hands out are returned to the OS after the lock is dropped; what
//! keeps allocations away from them meanwhile is that they are marked allocated until
//! `scavenge_return` (the loom model `scavenge` checks this, and its mutant
//! `scavenge_no_take` removes the marking).

use super::bits::{for_each_word, highest_run};
use super::{
    page_span, ChunkSpans, PageAlloc, CHUNK_PAGES, CHUNK_WORDS, L2_BITS, L2_ENTRIES,
    LOG_CHUNK_PAGES, LOG_CHUNK_SIZE,
};
use crate::os::{ADDR_LIMIT, PAGE_SIZE};

impl PageAlloc {
    // -- the index: dirty marks and free stamps ---------------------------------------

    /// Sets the clock (milliseconds, wrapping) that the next frees stamp on the chunks
    /// they free into. The scavenger compares these stamps with its own clock.
    pub(crate) fn set_clock(&mut self, ms: u32) {
        self.clock = ms;
    }

    /// Records that `npages` dirty pages were just freed into chunk `ci`: it is dirty,
    /// and stamped with the clock. A chunk already dirty keeps its stamp if that is
    /// later (the clock may lie in the past for pages that sat unused in an idle
    /// thread's cache), and also if the pages freed now are fewer than an eighth of its
    /// free dirty pages: a few late frees into a chunk of old free memory (a thread's
    /// trimmed free stack emptying a span) do not make all of it young again. (Such
    /// pages may be returned before the delay; freeing them again costs a refault.)
    pub(super) fn note_freed(&mut self, ci: usize, npages: usize) {
        let Some(&p) = self.l1.get(ci >> L2_BITS) else {
            return;
        };
        // SAFETY: as in `chunk_mut`: a non-null L1 entry is our L2 array, and `&mut
        // self` makes this the only reference into it.
        if let Some(l2) = unsafe { p.as_mut() } {
            let k = ci & (L2_ENTRIES - 1);
            let was_dirty = l2.dirty[k / 64] & (1 << (k % 64)) != 0;
            // Wrapping milliseconds: the clock is later if the difference is positive.
            let later = (self.clock.wrapping_sub(l2.freed_at[k]) as i32) > 0;
            let restamp = !was_dirty
                || (later && {
                    let ch = &l2.chunks[k];
                    let dirty: u32 = (0..CHUNK_WORDS)
                        .map(|w| (!ch.alloc[w] & !ch.scav[w]).count_ones())
                        .sum();
                    npages * 8 >= dirty as usize
                });
            if restamp {
                l2.freed_at[k] = self.clock;
            }
            l2.dirty[k / 64] |= 1 << (k % 64);
        }
    }

    // -- scavenging -------------------------------------------------------------------

    /// For the scavenger: sets the scavenged bit of every free page in
    /// `[base, base + npages pages)` (the caller has just decommitted them); allocated
    /// pages and pages outside the heap are left alone. Returns how many pages changed
    /// from unscavenged to scavenged.
    #[allow(dead_code)] // Tests set up scavenged pages with it; the heap uses `scavenge_take`.
    pub(crate) fn mark_scavenged(&mut self, base: usize, npages: usize) -> usize {
        // Pages past the end of the address space are outside the heap too.
        let npages = npages.min(ADDR_LIMIT.saturating_sub(base) / PAGE_SIZE);
        let Some((p0, p1)) = page_span(base, npages) else {
            return 0;
        };
        let mut changed = 0;
        for (ci, s, e) in (ChunkSpans { p: p0, end: p1 }) {
            if let Some(ch) = self.chunk_mut(ci) {
                changed += ch.set_scav(s, e);
            }
        }
        self.scav += changed;
        changed
    }

    /// The highest grown chunk index below `end` whose dirty bit is set.
    pub(super) fn prev_dirty(&self, end: usize) -> Option<usize> {
        let mut c = end.min(self.end_chunk);
        while c > self.first_chunk {
            let j = (c - 1) >> L2_BITS;
            let lo = j << L2_BITS;
            // SAFETY: as in `l2`.
            if let Some(l2) = unsafe { self.l1[j].as_ref() } {
                let mut k = c - 1 - lo;
                loop {
                    let w = k / 64;
                    // Bits 0..=k%64 of word w.
                    let bits = l2.dirty[w] & (!0u64 >> (63 - k % 64));
                    if bits != 0 {
                        let ci = lo + w * 64 + 63 - bits.leading_zeros() as usize;
                        return (ci >= self.first_chunk).then_some(ci);
                    }
                    if w == 0 {
                        break;
                    }
                    k = w * 64 - 1;
                }
            }
            c = lo;
        }
        None
    }

    /// For the scavenger (Go's `scavengeOne`, under the heap lock): finds free pages that
    /// are not scavenged in the chunks `policy` allows, from the highest address down
    /// (first-fit allocation reuses low addresses first, so high ones are the least
    /// likely to be wanted soon), and marks them allocated so that nobody takes them
    /// while the caller returns them to the OS without the lock. Fills `runs` with
    /// `(base, npages)` runs, each inside one chunk, at most `max_pages` pages in all.
    /// Returns how many runs and pages were taken; every run must be given back with
    /// [`scavenge_return`](Self::scavenge_return).
    ///
    /// The scan resumes below where the previous one stopped and wraps to the top once,
    /// so successive calls spread over the heap. Only chunks marked dirty are visited;
    /// a visited chunk with nothing left to scavenge loses its mark.
    pub(crate) fn scavenge_take(
        &mut self,
        policy: ScavPolicy,
        max_pages: usize,
        runs: &mut [(usize, usize)],
    ) -> (usize, usize) {
        let (mut n, mut pages) = (0, 0);
        if max_pages == 0 || runs.is_empty() || self.end_chunk == 0 {
            return (0, 0);
        }
        let top = self.end_chunk;
        let start = if self.scav_cursor == 0 || self.scav_cursor > top {
            top
        } else {
            self.scav_cursor
        };
        // First the chunks below `start`, then (second) those from `start` to the top.
        let (mut end, mut second) = (start, false);
        loop {
            let ci = match self.prev_dirty(end) {
                Some(ci) if !second || ci >= start => ci,
                _ => {
                    if second || start == top {
                        self.scav_cursor = 0;
                        return (n, pages);
                    }
                    second = true;
                    end = top;
                    continue;
                }
            };
            end = ci;
            let k = ci & (L2_ENTRIES - 1);
            // SAFETY: `prev_dirty` only returns chunks of allocated L2 arrays; `&mut
            // self` makes this the only reference into the array.
            let l2 = unsafe { &mut *self.l1[ci >> L2_BITS] };
            let ch = &mut l2.chunks[k];
            let mut avail: [u64; CHUNK_WORDS] =
                core::array::from_fn(|w| !ch.alloc[w] & !ch.scav[w]);
            let used: usize = ch.alloc.iter().map(|w| w.count_ones() as usize).sum();
            if avail.iter().all(|&w| w == 0) {
                l2.dirty[k / 64] &= !(1 << (k % 64));
                continue;
            }
            let young = policy.now.wrapping_sub(l2.freed_at[k]) < policy.min_age;
            if young || (policy.skip_dense && used >= DENSE_PAGES) {
                continue;
            }
            let mut took = 0;
            while n < runs.len() && pages < max_pages {
                let Some((s, e)) = highest_run(&avail) else {
                    break;
                };
                let s = s.max(e - (max_pages - pages).min(e));
                // Marking the run allocated is what keeps every allocation away from
                // it while the heap returns it to the OS without the lock. (The loom
                // mutant `scavenge_no_take` skips it; the `scavenge` model must fail.)
                #[cfg(not(spanheap_mutant = "scavenge_no_take"))]
                let (newly, sc) = ch.set_alloc(s, e);
                #[cfg(spanheap_mutant = "scavenge_no_take")]
                let (newly, sc) = (e - s, 0);
                debug_assert!(newly == e - s && sc == 0);
                for_each_word(s, e, |w, m| avail[w] &= !m);
                runs[n] = ((ci << LOG_CHUNK_SIZE) + s * PAGE_SIZE, e - s);
                n += 1;
                pages += e - s;
                took += e - s;
            }
            if avail.iter().all(|&w| w == 0) {
                l2.dirty[k / 64] &= !(1 << (k % 64));
            }
            if took != 0 {
                #[cfg(not(spanheap_mutant = "scavenge_no_take"))]
                {
                    self.free -= took;
                }
                self.update(ci, ci + 1, None);
            }
            if n == runs.len() || pages >= max_pages {
                self.scav_cursor = ci + 1;
                return (n, pages);
            }
        }
    }

    /// For a scavenger that has nothing to take now: in how many milliseconds the first
    /// chunk that `policy` skips only for its age (it has free pages that are not
    /// scavenged, and is not dense) becomes old enough; `None` if there is no such chunk,
    /// so that no paced pass finds anything until the program frees again. Walks the
    /// dirty chunks (those with free pages not scavenged).
    pub(crate) fn scavenge_wait(&self, policy: ScavPolicy) -> Option<u32> {
        let mut soonest: Option<u32> = None;
        let mut end = self.end_chunk;
        while let Some(ci) = self.prev_dirty(end) {
            end = ci;
            let k = ci & (L2_ENTRIES - 1);
            // SAFETY: `prev_dirty` only returns chunks of allocated L2 arrays.
            let l2 = unsafe { &*self.l1[ci >> L2_BITS] };
            let ch = &l2.chunks[k];
            if (0..CHUNK_WORDS).all(|w| !ch.alloc[w] & !ch.scav[w] == 0) {
                continue;
            }
            let used: usize = ch.alloc.iter().map(|w| w.count_ones() as usize).sum();
            if policy.skip_dense && used >= DENSE_PAGES {
                continue;
            }
            let age = policy.now.wrapping_sub(l2.freed_at[k]);
            let wait = policy.min_age.saturating_sub(age);
            soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
            if wait == 0 {
                break;
            }
        }
        soonest
    }

    /// Gives back a run taken by [`scavenge_take`](Self::scavenge_take) once it has been
    /// returned to the OS: its pages become free and scavenged. The chunk's dirty mark
    /// and free stamp are left as they are (this is not a free by the program). Returns
    /// whether this made the whole chunk free and scavenged (the heap then drops the
    /// chunk's span-map page too).
    pub(crate) fn scavenge_return(&mut self, base: usize, npages: usize) -> bool {
        let Some((p0, p1)) = page_span(base, npages) else {
            debug_assert!(false, "scavenge_return({base:#x}, {npages}): bad range");
            return false;
        };
        let ci = p0 >> LOG_CHUNK_PAGES;
        debug_assert_eq!(
            (p1 - 1) >> LOG_CHUNK_PAGES,
            ci,
            "a scavenged run spans chunks"
        );
        let first = ci << LOG_CHUNK_PAGES;
        let (s, e) = (p0 - first, (p1 - first).min(CHUNK_PAGES));
        let Some(ch) = self.chunk_mut(ci) else {
            debug_assert!(false, "scavenge_return outside the heap");
            return false;
        };
        let freed = ch.clear_alloc(s, e);
        let sc = ch.set_scav(s, e);
        let clean = ch.alloc.iter().all(|&w| w == 0) && ch.scav.iter().all(|&w| w == !0);
        #[cfg(not(spanheap_mutant = "scavenge_no_take"))]
        debug_assert!(freed == npages && sc == npages, "scavenged run not taken");
        self.free += freed;
        self.scav += sc;
        if base < self.search_addr {
            self.search_addr = base;
        }
        self.update(ci, ci + 1, None);
        clean
    }
}

/// A chunk with at least this many of its 512 pages in use is *dense*: the paced
/// scavenger leaves its few free pages alone, because returning them would break up
/// the transparent huge pages backing the chunk for little gain (Go's
/// `scavChunkHiOccFrac`, 31/32). [`ScavPolicy::ALL`] ignores density.
pub(crate) const DENSE_PAGES: usize = CHUNK_PAGES - CHUNK_PAGES / 32;

/// Which chunks [`PageAlloc::scavenge_take`] may take pages from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScavPolicy {
    /// The clock now (milliseconds, wrapping; the clock given to `set_clock`).
    pub(crate) now: u32,
    /// Only chunks whose last free is at least this many milliseconds old.
    pub(crate) min_age: u32,
    /// Leave dense chunks (see [`DENSE_PAGES`]) alone.
    pub(crate) skip_dense: bool,
}

impl ScavPolicy {
    /// Every free page, however recent, in every chunk (`release_memory`).
    pub(crate) const ALL: ScavPolicy = ScavPolicy {
        now: 0,
        min_age: 0,
        skip_dense: false,
    };
}
