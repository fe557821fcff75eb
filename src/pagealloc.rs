//! The page allocator: which heap pages are free, and address-ordered first-fit search
//! for runs of free pages (the design of Go's `mpagealloc.go`, proposal 35112,
//! "scaling the page allocator").
//!
//! # Locking
//!
//! A [`PageAlloc`] is plain, unsynchronised memory. It is always used under the heap
//! lock: its owner keeps it inside a mutex, and every method that changes it takes
//! `&mut self`, which is the proof that the lock is held. No atomics are needed.
//!
//! # Design
//!
//! * **Chunks.** The address space is cut into 4 MiB chunks of [`CHUNK_PAGES`] = 512
//!   heap pages. Each chunk that belongs to the heap ("grown") has two 512-bit bitmaps:
//!   `alloc` (bit set = page in use) and `scav` (bit set = the page is free *and*
//!   scavenged: returned to the OS, or fresh from it, i.e. Prepared rather than Ready).
//!   Chunk records live in a two-level sparse array over the 2^26 chunks of the 48-bit
//!   address space: a fixed L1 array of 2^13 pointers (a field of the struct) to L2
//!   arrays of 2^13 chunk records, each L2 array obtained with
//!   [`MemSource::alloc_meta`] the first time a chunk it covers is grown, never freed.
//!   An L2 array also holds a bitmap of which of its chunks are grown.
//!
//! * **Summaries.** A radix tree of five levels (radix bits 14, 3, 3, 3, 3, as Go uses
//!   on 64-bit) sits over the chunks. Each entry summarises a power-of-two region of
//!   address space with three numbers packed into a `u64`: `start` (free pages at the
//!   beginning of the region), `max` (the longest run of free pages inside it) and
//!   `end` (free pages at its end). A leaf entry covers one chunk; a root entry covers
//!   16 GiB = 2^21 pages. Each level is one flat array indexed by address, so the
//!   children of entry `i` are entries `8i .. 8i+8` of the next level, 64 bytes in one
//!   cache line. The five arrays (585 MiB of address space in all, mostly for the leaf
//!   level) are reserved once, on the first [`grow`](PageAlloc::grow), and only the OS
//!   pages that hold entries covering grown address space are mapped; a bitmap of
//!   mapped 8 KiB units records which, because mapping a unit a second time would
//!   replace it with zeros. The whole root level (128 KiB) is mapped at once, so a
//!   search may read any root entry.
//!
//! * **Packing.** `start`, `max` and `end` get 21 bits each. A value of 2^21 (all pages
//!   of a root entry free) does not fit, and only arises when the root entry is
//!   entirely free, so that one case is stored as a lone flag bit (bit 63), as in Go.
//!
//! * **Search.** [`alloc`](PageAlloc::alloc) first tries the chunk the search hint
//!   points into; otherwise it walks down the tree: at each level it scans one block of
//!   entries (8 below the root; at the root, the entries from the hint up to the end
//!   of the heap), tracking a run that crosses entry boundaries from one entry's `end`
//!   through wholly free entries into the next entry's `start`. (At the root, a bitmap
//!   of the nonzero root entries lets the scan jump over empty ones.) A run that fits
//!   across entries is returned at once; otherwise the search descends into the first
//!   entry whose `max` fits, and at the leaf scans that chunk's bitmap. Cost: at most 8
//!   summary reads per level below the root, the nonzero root entries from the hint on
//!   (each covers 16 GiB, so a heap has few of them; at most 2^14 word-skipped bits),
//!   and one chunk bitmap: independent of the heap size.
//!
//! * **Search hint.** `search_addr` is a lower bound of the first free page: every heap
//!   page below it is allocated. Searches start there; each search raises it to the
//!   first nonzero summary it met (or the exact first free page when it reached it);
//!   frees and growth below it lower it.
//!
//! * **Scavenging.** Free pages start dirty (Ready: they may hold RAM). Each L2 array
//!   keeps a *dirty* bitmap of the chunks that may hold free, unscavenged pages, set
//!   whenever pages are freed into a chunk, and the time of that last free. The
//!   scavenger ([`scavenge_take`](PageAlloc::scavenge_take)) walks the dirty chunks from
//!   the top of the heap down, skips those freed into too recently or too dense, and
//!   takes their free unscavenged runs (marking them allocated); the heap returns them
//!   to the OS without the lock and gives them back with
//!   [`scavenge_return`](PageAlloc::scavenge_return), free and scavenged.
//!
//! * **Updates.** After the bitmaps of a run change, only the leaf summaries of the
//!   chunks the run touches are recomputed (the chunks wholly inside the run are known
//!   to be all free or all used without looking), then each level above is recomputed
//!   from its 8 children for the affected entries only, stopping as soon as a level
//!   does not change.
//!
//! # Invariants (checked by the tests' `check_invariants` after random operations)
//!
//! 1. A grown chunk's leaf summary equals `summarize(its alloc bitmap)`; the leaf
//!    summary of a chunk outside the heap is zero.
//! 2. Every summary above the leaves is the merge of its 8 children (the root entries
//!    have no parent); hence an entry with no grown chunk under it is zero.
//! 3. `search_addr <= address of the first free page` of the heap.
//! 4. A scavenged bit is only set on a free page of a grown chunk.
//! 5. `free` and `scav` equal the number of free pages and of scavenged pages.
//! 6. Every summary entry that covers a grown chunk lies in a mapped unit, as does the
//!    whole root level; a unit is mapped at most once.
//! 7. A chunk with free pages that are not scavenged has its dirty mark set.

use core::ptr::{self, NonNull};

use crate::os::{MemSource, OsError, ADDR_LIMIT, MAX_OS_PAGE_SIZE, PAGE_SHIFT, PAGE_SIZE};

/// log2 of the pages in a chunk.
const LOG_CHUNK_PAGES: u32 = 9;
/// Heap pages in a chunk: one bit per page in each of the chunk's bitmaps.
pub(crate) const CHUNK_PAGES: usize = 1 << LOG_CHUNK_PAGES;
/// log2 of the bytes in a chunk.
const LOG_CHUNK_SIZE: u32 = LOG_CHUNK_PAGES + PAGE_SHIFT;
/// Bytes of address space one chunk covers (4 MiB). The heap grows in multiples of it.
pub(crate) const CHUNK_SIZE: usize = 1 << LOG_CHUNK_SIZE;
/// `u64` words in one chunk bitmap.
const CHUNK_WORDS: usize = CHUNK_PAGES / 64;
/// Chunks in the 48-bit address space.
const CHUNK_COUNT: usize = ADDR_LIMIT >> LOG_CHUNK_SIZE;

/// log2 of the chunk records in one L2 array.
const L2_BITS: u32 = 13;
/// Chunk records in one L2 array (1 MiB of records).
const L2_ENTRIES: usize = 1 << L2_BITS;
/// Pointers in the L1 array.
const L1_ENTRIES: usize = CHUNK_COUNT >> L2_BITS;

/// Levels of the summary tree; level 0 is the root, [`LEAF`] has one entry per chunk.
const LEVELS: usize = 5;
/// The leaf level.
const LEAF: usize = LEVELS - 1;
/// Radix bits of each level: the root level has 2^14 entries, and every other entry
/// has 2^3 = 8 children.
const LEVEL_BITS: [u32; LEVELS] = [14, 3, 3, 3, 3];
/// log2 of the bytes of address space one entry of each level covers:
/// [34, 31, 28, 25, 22].
const LEVEL_SHIFT: [u32; LEVELS] = level_shifts();
/// Entries in each level's array.
const LEVEL_ENTRIES: [usize; LEVELS] = level_entries();
/// Byte offset of each level's array inside the summary reservation.
const LEVEL_OFFSET: [usize; LEVELS] = level_offsets();
/// Bytes of the whole summary reservation (585 MiB).
const SUMMARY_BYTES: usize = LEVEL_OFFSET[LEAF] + LEVEL_ENTRIES[LEAF] * 8;
/// Granularity at which summary memory is mapped and tracked. A multiple of every
/// supported OS page size.
const MAP_UNIT: usize = MAX_OS_PAGE_SIZE;
/// Units in the summary reservation.
const MAP_UNITS: usize = SUMMARY_BYTES / MAP_UNIT;
/// Words of the bitmap of mapped units.
const MAP_WORDS: usize = MAP_UNITS.div_ceil(64);
/// Words of the bitmap of nonzero root entries.
const ROOT_WORDS: usize = LEVEL_ENTRIES[0] / 64;

const fn level_shifts() -> [u32; LEVELS] {
    let mut s = [0; LEVELS];
    s[LEAF] = LOG_CHUNK_SIZE;
    let mut l = LEAF;
    while l > 0 {
        s[l - 1] = s[l] + LEVEL_BITS[l];
        l -= 1;
    }
    s
}

const fn level_entries() -> [usize; LEVELS] {
    let mut e = [0; LEVELS];
    let mut l = 0;
    while l < LEVELS {
        e[l] = ADDR_LIMIT >> LEVEL_SHIFT[l];
        l += 1;
    }
    e
}

const fn level_offsets() -> [usize; LEVELS] {
    let mut o = [0; LEVELS];
    let mut l = 1;
    while l < LEVELS {
        o[l] = o[l - 1] + LEVEL_ENTRIES[l - 1] * 8;
        l += 1;
    }
    o
}

const _: () = {
    assert!(LEVEL_SHIFT[0] + LEVEL_BITS[0] == 48 && ADDR_LIMIT == 1 << 48);
    assert!(LEVEL_ENTRIES[0] == 1 << LEVEL_BITS[0] && LEVEL_ENTRIES[LEAF] == CHUNK_COUNT);
    // Every level below the root has 8 children per parent (`merge` takes 8).
    assert!(LEVEL_BITS[1] == 3 && LEVEL_BITS[2] == 3 && LEVEL_BITS[3] == 3);
    assert!(LEVEL_BITS[4] == 3);
    // Units never straddle two levels, and a block of 8 sibling entries (64 bytes)
    // never straddles two units.
    assert!(LEVEL_OFFSET[1] % MAP_UNIT == 0 && LEVEL_OFFSET[2] % MAP_UNIT == 0);
    assert!(LEVEL_OFFSET[3] % MAP_UNIT == 0 && LEVEL_OFFSET[4] % MAP_UNIT == 0);
    assert!(SUMMARY_BYTES % MAP_UNIT == 0 && MAP_UNIT % 64 == 0);
    assert!(CHUNK_PAGES == 64 * CHUNK_WORDS);
};

// ---------------------------------------------------------------------------------
// Packed summaries
// ---------------------------------------------------------------------------------

/// Bits per packed field: enough for every count below the pages of a root entry.
const LOG_MAX_PACKED: u32 = LEVEL_SHIFT[0] - PAGE_SHIFT;
/// The largest count a summary holds: all pages of a root entry (2^21).
const MAX_PACKED: usize = 1 << LOG_MAX_PACKED;
/// Mask of one packed field.
const FIELD_MASK: u64 = (MAX_PACKED - 1) as u64;
/// The encoding of `(MAX_PACKED, MAX_PACKED, MAX_PACKED)`: a root entry all free.
const ALL_FREE_FLAG: u64 = 1 << 63;
const _: () = assert!(3 * LOG_MAX_PACKED <= 63 && LOG_MAX_PACKED == 21);

/// A packed `(start, max, end)` summary of a region of address space: free pages at
/// its start, longest free run in it, free pages at its end. Zero means "no free page"
/// (fully allocated, or not part of the heap).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
struct Sum(u64);

impl Sum {
    /// The summary of a chunk whose pages are all free.
    const FREE_CHUNK: Sum = Sum::pack(CHUNK_PAGES, CHUNK_PAGES, CHUNK_PAGES);
    /// The summary of a region without free pages.
    const EMPTY: Sum = Sum(0);

    /// Packs the three counts. Each is at most [`MAX_PACKED`], and `max` equals
    /// `MAX_PACKED` only when the region (a root entry) is entirely free.
    const fn pack(start: usize, max: usize, end: usize) -> Sum {
        debug_assert!(start <= max && end <= max && max <= MAX_PACKED);
        if max >= MAX_PACKED {
            debug_assert!(start == MAX_PACKED && end == MAX_PACKED);
            return Sum(ALL_FREE_FLAG);
        }
        Sum((start as u64 & FIELD_MASK)
            | ((max as u64 & FIELD_MASK) << LOG_MAX_PACKED)
            | ((end as u64 & FIELD_MASK) << (2 * LOG_MAX_PACKED)))
    }

    #[inline]
    fn field(self, shift: u32) -> usize {
        if self.0 & ALL_FREE_FLAG != 0 {
            MAX_PACKED
        } else {
            ((self.0 >> shift) & FIELD_MASK) as usize
        }
    }

    /// Free pages at the start of the region.
    #[inline]
    fn start(self) -> usize {
        self.field(0)
    }

    /// The longest run of free pages in the region.
    #[inline]
    fn max(self) -> usize {
        self.field(LOG_MAX_PACKED)
    }

    /// Free pages at the end of the region.
    #[inline]
    fn end(self) -> usize {
        self.field(2 * LOG_MAX_PACKED)
    }

    #[inline]
    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The summary of 8 adjacent regions of `1 << log_child_pages` pages each, from their
/// summaries in address order.
fn merge(kids: &[Sum; 8], log_child_pages: u32) -> Sum {
    let child_pages = 1usize << log_child_pages;
    let mut start = kids[0].start();
    let mut max = kids[0].max();
    let mut end = kids[0].end();
    for (k, kid) in kids.iter().enumerate().skip(1) {
        let (s, m, e) = (kid.start(), kid.max(), kid.end());
        // The free prefix continues only while every earlier child was all free.
        if start == k * child_pages {
            start += s;
        }
        // The run ending at the previous child's end may continue into this child.
        max = max.max(end + s).max(m);
        // The free suffix grows through an all-free child; otherwise it restarts.
        end = if e == child_pages {
            end + child_pages
        } else {
            e
        };
    }
    Sum::pack(start, max, end)
}

// ---------------------------------------------------------------------------------
// Chunk bitmaps
// ---------------------------------------------------------------------------------

/// The bitmaps of one chunk. Page `p` of the chunk is bit `p % 64` of word `p / 64`.
#[repr(C)]
struct Chunk {
    /// Bit set: the page is allocated.
    alloc: [u64; CHUNK_WORDS],
    /// Bit set: the page is free and scavenged (Prepared). Never set on allocated pages.
    scav: [u64; CHUNK_WORDS],
}

/// One second-level array of the chunk map: the chunks of 32 GiB of address space.
#[repr(C)]
struct L2 {
    /// The chunk records; meaningful only for grown chunks.
    chunks: [Chunk; L2_ENTRIES],
    /// Bit `k` set: chunk `k` of this array has been grown into the heap.
    grown: [u64; L2_ENTRIES / 64],
    /// Bit `k` set: chunk `k` may hold free pages that are not scavenged (set when
    /// pages are freed into it, cleared by the scavenger when it finds none): the
    /// scavenger's index, so that a pass visits only chunks with work (Go's
    /// `scavengeIndex`).
    dirty: [u64; L2_ENTRIES / 64],
    /// Clock (milliseconds, wrapping) of the last free into chunk `k`: the scavenger
    /// leaves chunks alone until their pages have stayed free for its delay.
    freed_at: [u32; L2_ENTRIES],
}

/// Calls `f(word, mask)` for each word that the page range `[s, e)` of a chunk touches,
/// with the mask of the range's bits in that word. `s < e <= CHUNK_PAGES`.
#[inline]
fn for_each_word(s: usize, e: usize, mut f: impl FnMut(usize, u64)) {
    debug_assert!(s < e && e <= CHUNK_PAGES);
    let mut p = s;
    while p < e {
        let w = p / 64;
        let lo = p % 64;
        let hi = (e - w * 64).min(64);
        f(w, (!0u64 >> (64 - (hi - lo))) << lo);
        p = w * 64 + hi;
    }
}

/// The first page at or after `from` whose bit in `bits` equals `set`, or
/// `CHUNK_PAGES` if there is none.
#[inline]
fn next_bit(bits: &[u64; CHUNK_WORDS], from: usize, set: bool) -> usize {
    let mut w = from / 64;
    if w >= CHUNK_WORDS {
        return CHUNK_PAGES;
    }
    let flip = if set { 0 } else { !0u64 };
    let mut x = (bits[w] ^ flip) & (!0u64 << (from % 64));
    loop {
        if x != 0 {
            return w * 64 + x.trailing_zeros() as usize;
        }
        w += 1;
        if w == CHUNK_WORDS {
            return CHUNK_PAGES;
        }
        x = bits[w] ^ flip;
    }
}

/// The lowest bit index at which `x` has `n` (1..=64) consecutive zero bits, or 64.
///
/// Go's `findBitRange64`: in `c = !x`, every run of ones is shortened from the top by
/// `n - 1` bits, doubling the shift each round, so that only the starts of runs of at
/// least `n` ones survive; the lowest survivor is the answer. O(log n) word operations.
#[inline]
fn find_zero_run(x: u64, n: usize) -> usize {
    debug_assert!((1..=64).contains(&n));
    let mut c = !x;
    let mut p = n - 1; // ones still to strip from the top of each run
    let mut k = 1; // every surviving run is at least k long
    while p > 0 {
        if p <= k {
            c &= c >> p;
            break;
        }
        c &= c >> k;
        if c == 0 {
            return 64;
        }
        p -= k;
        k *= 2;
    }
    c.trailing_zeros() as usize
}

/// The longest run of zero bits in `x`, in O(log 64) word operations.
#[inline]
fn longest_zero_run(x: u64) -> usize {
    // Invariant: bit i of `c` is set iff bits i..i+len of `!x` are all set, so
    // `c & (c >> k)` keeps exactly the starts of runs at least `len + k` long.
    let mut c = !x;
    if c == 0 {
        return 0;
    }
    let mut len = 1;
    // Double the step while runs that long exist...
    let mut k = 1;
    while k < 64 {
        let t = c & (c >> k);
        if t == 0 {
            break;
        }
        c = t;
        len += k;
        k *= 2;
    }
    // ...then the longest run is shorter than `len + k`: binary-search the rest.
    k /= 2;
    while k >= 1 {
        let t = c & (c >> k);
        if t != 0 {
            c = t;
            len += k;
        }
        k /= 2;
    }
    len
}

impl Chunk {
    /// The summary of the alloc bitmap.
    fn summarize(&self) -> Sum {
        let a = &self.alloc;
        let Some(first_used) = a.iter().position(|&w| w != 0) else {
            return Sum::FREE_CHUNK;
        };
        let start = first_used * 64 + a[first_used].trailing_zeros() as usize;
        let mut max = start;
        // `run`: the free pages just before the current word.
        let mut run = 0;
        for &w in a {
            if w == 0 {
                run += 64;
                continue;
            }
            max = max.max(run + w.trailing_zeros() as usize);
            // A run strictly inside the word can only win if the word has more free
            // pages than the best run so far.
            if w.count_zeros() as usize > max {
                max = max.max(longest_zero_run(w));
            }
            run = w.leading_zeros() as usize;
        }
        let end = run;
        Sum::pack(start, max.max(end), end)
    }

    /// The first page `p >= from` such that pages `[p, p + npages)` are all free and
    /// inside the chunk, and the first free page at or after `from` (`CHUNK_PAGES` if
    /// none).
    fn find(&self, npages: usize, from: usize) -> (Option<usize>, usize) {
        let first_free = next_bit(&self.alloc, from, false);
        let pos = if first_free >= CHUNK_PAGES || npages > CHUNK_PAGES - first_free {
            None
        } else if npages == 1 {
            Some(first_free)
        } else if npages <= 64 {
            self.find_small(npages, first_free)
        } else {
            self.find_large(npages, first_free)
        };
        (pos, first_free)
    }

    /// The alloc word `i`, with the pages below `from` counted as used.
    #[inline]
    fn word_from(&self, i: usize, from: usize) -> u64 {
        let w = self.alloc[i];
        if i == from / 64 {
            w | ((1u64 << (from % 64)) - 1)
        } else {
            w
        }
    }

    /// First fit of `2..=64` pages at or after `from`, a word at a time (Go's
    /// `findSmallN`): a run either continues the free top of the previous word into the
    /// bottom of this one, or lies inside one word.
    fn find_small(&self, npages: usize, from: usize) -> Option<usize> {
        // Free pages at the top of the previous word.
        let mut end = 0;
        for i in from / 64..CHUNK_WORDS {
            let w = self.word_from(i, from);
            if w == !0 {
                end = 0;
                continue;
            }
            if end + w.trailing_zeros() as usize >= npages {
                return Some(i * 64 - end);
            }
            let j = find_zero_run(w, npages);
            if j < 64 {
                return Some(i * 64 + j);
            }
            end = w.leading_zeros() as usize;
        }
        None
    }

    /// First fit of more than 64 pages at or after `from` (Go's `findLargeN`): such a
    /// run starts at the free top of a word (or at a word boundary) and continues
    /// through whole free words into the free bottom of a later word.
    fn find_large(&self, npages: usize, from: usize) -> Option<usize> {
        let (mut size, mut start) = (0usize, 0usize);
        for i in from / 64..CHUNK_WORDS {
            let w = self.word_from(i, from);
            if w == 0 {
                if size == 0 {
                    start = i * 64;
                }
                size += 64;
                if size >= npages {
                    return Some(start);
                }
                continue;
            }
            if size + w.trailing_zeros() as usize >= npages {
                return Some(start);
            }
            size = w.leading_zeros() as usize;
            start = i * 64 + 64 - size;
        }
        None
    }

    /// Marks pages `[s, e)` allocated and clears their scavenged bits. Returns how many
    /// pages were newly allocated and how many scavenged bits were cleared.
    fn set_alloc(&mut self, s: usize, e: usize) -> (usize, usize) {
        let (mut newly, mut scav) = (0, 0);
        for_each_word(s, e, |w, m| {
            newly += (m & !self.alloc[w]).count_ones() as usize;
            scav += (m & self.scav[w]).count_ones() as usize;
            self.alloc[w] |= m;
            self.scav[w] &= !m;
        });
        (newly, scav)
    }

    /// Marks pages `[s, e)` free; returns how many were allocated before.
    fn clear_alloc(&mut self, s: usize, e: usize) -> usize {
        let mut freed = 0;
        for_each_word(s, e, |w, m| {
            freed += (m & self.alloc[w]).count_ones() as usize;
            self.alloc[w] &= !m;
        });
        freed
    }

    /// Sets the scavenged bit of the free pages in `[s, e)`; returns how many changed.
    fn set_scav(&mut self, s: usize, e: usize) -> usize {
        let mut changed = 0;
        for_each_word(s, e, |w, m| {
            let new = m & !self.alloc[w] & !self.scav[w];
            changed += new.count_ones() as usize;
            self.scav[w] |= new;
        });
        changed
    }

    /// Whether pages `[s, e)` are all free.
    fn range_free(&self, s: usize, e: usize) -> bool {
        let mut free = true;
        for_each_word(s, e, |w, m| free &= self.alloc[w] & m == 0);
        free
    }
}

/// Splits an absolute page range `[p, end)` at chunk boundaries, yielding
/// `(chunk index, first page in chunk, end page in chunk)`.
struct ChunkSpans {
    /// Next absolute page number to yield.
    p: usize,
    /// End (exclusive) of the absolute page range.
    end: usize,
}

impl Iterator for ChunkSpans {
    type Item = (usize, usize, usize);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.p >= self.end {
            return None;
        }
        let ci = self.p >> LOG_CHUNK_PAGES;
        let first = ci << LOG_CHUNK_PAGES;
        let s = self.p - first;
        let e = (self.end - first).min(CHUNK_PAGES);
        self.p = first + e;
        Some((ci, s, e))
    }
}

/// The absolute page range `[first, end)` of `npages` pages at `base`, if `base` is
/// page aligned, `npages >= 1` and the range ends inside the address space.
#[inline]
fn page_span(base: usize, npages: usize) -> Option<(usize, usize)> {
    if base % PAGE_SIZE != 0 || npages == 0 {
        return None;
    }
    let end = base.checked_add(npages.checked_mul(PAGE_SIZE)?)?;
    if end > ADDR_LIMIT {
        return None;
    }
    Some((base >> PAGE_SHIFT, end >> PAGE_SHIFT))
}

// ---------------------------------------------------------------------------------
// The page allocator
// ---------------------------------------------------------------------------------

/// Free/used state of every heap page, with summaries for first-fit search. See the
/// module documentation for the design and invariants.
pub(crate) struct PageAlloc {
    /// The chunk map's first level: L2 arrays by `chunk index >> L2_BITS`; null where
    /// no chunk of that 32 GiB has been grown.
    l1: [*mut L2; L1_ENTRIES],
    /// Start of the summary reservation, holding the level arrays at [`LEVEL_OFFSET`];
    /// null before the first grow.
    sums: *mut u64,
    /// Bit `u` set: unit `u` (of [`MAP_UNIT`] bytes) of the summary reservation is
    /// mapped (readable, writable, zero where never written).
    mapped: [u64; MAP_WORDS],
    /// Bit `i` set: root entry `i` is nonzero (has a free page). Lets a search skip
    /// the empty root entries in a few word operations.
    root_free: [u64; ROOT_WORDS],
    /// Search hint: every heap page below this address is allocated. [`ADDR_LIMIT`]
    /// while nothing was ever grown.
    search_addr: usize,
    /// One past the highest grown chunk index (0 before the first grow). Bounds the
    /// scan of the root level.
    end_chunk: usize,
    /// Free pages in the heap.
    free: usize,
    /// Free pages whose scavenged bit is set.
    scav: usize,
    /// Pages of all grown chunks.
    total: usize,
    /// Lowest grown chunk index (`usize::MAX` before the first grow).
    first_chunk: usize,
    /// The clock (milliseconds, wrapping) that frees stamp on chunks; set by the owner
    /// before it frees ([`set_clock`](Self::set_clock)).
    clock: u32,
    /// Where the next scavenger scan starts: it looks at chunks below this index,
    /// downwards, then wraps to the top. 0: start at the top.
    scav_cursor: usize,
}

// SAFETY: the raw pointers lead to metadata memory (L2 arrays, summary arrays) that
// this `PageAlloc` alone owns and never frees; nothing else holds them. Moving the
// struct to another thread moves that ownership with it.
unsafe impl Send for PageAlloc {}

impl PageAlloc {
    /// An empty page allocator; no memory is obtained until the first [`grow`](Self::grow).
    pub(crate) const fn new() -> Self {
        PageAlloc {
            l1: [ptr::null_mut(); L1_ENTRIES],
            sums: ptr::null_mut(),
            mapped: [0; MAP_WORDS],
            root_free: [0; ROOT_WORDS],
            search_addr: ADDR_LIMIT,
            end_chunk: 0,
            free: 0,
            scav: 0,
            total: 0,
            first_chunk: usize::MAX,
            clock: 0,
            scav_cursor: 0,
        }
    }

    /// Pages of the heap, free or not.
    pub(crate) fn total_pages(&self) -> usize {
        self.total
    }

    /// Sets the clock (milliseconds, wrapping) that the next frees stamp on the chunks
    /// they free into. The scavenger compares these stamps with its own clock.
    pub(crate) fn set_clock(&mut self, ms: u32) {
        self.clock = ms;
    }

    /// Free pages in the heap.
    pub(crate) fn free_pages(&self) -> usize {
        self.free
    }

    /// Free pages that are scavenged (Prepared: reading as zero, holding no RAM).
    pub(crate) fn scavenged_pages(&self) -> usize {
        self.scav
    }

    // -- metadata access ------------------------------------------------------------

    /// The L2 array of chunk `ci`, if one was allocated.
    #[inline]
    fn l2(&self, ci: usize) -> Option<&L2> {
        let p = *self.l1.get(ci >> L2_BITS)?;
        // SAFETY: a non-null L1 entry points to an L2 array obtained from
        // `alloc_meta` (readable, writable, suitably aligned, zero-initialised, never
        // freed) and owned by `self`; the shared borrow of `self` keeps it unchanged.
        unsafe { p.as_ref() }
    }

    /// Whether chunk `ci` is part of the heap.
    #[inline]
    fn is_grown(&self, ci: usize) -> bool {
        let k = ci & (L2_ENTRIES - 1);
        self.l2(ci)
            .is_some_and(|l2| l2.grown[k / 64] >> (k % 64) & 1 != 0)
    }

    /// The bitmaps of chunk `ci`, if it is part of the heap.
    #[inline]
    fn chunk(&self, ci: usize) -> Option<&Chunk> {
        let l2 = self.l2(ci)?;
        let k = ci & (L2_ENTRIES - 1);
        if l2.grown[k / 64] >> (k % 64) & 1 == 0 {
            return None;
        }
        Some(&l2.chunks[k])
    }

    /// The bitmaps of chunk `ci`, writable, if it is part of the heap.
    #[inline]
    fn chunk_mut(&mut self, ci: usize) -> Option<&mut Chunk> {
        let p = *self.l1.get(ci >> L2_BITS)?;
        // SAFETY: as in `l2`; the exclusive borrow of `self` makes this the only
        // reference into the L2 array.
        let l2 = unsafe { p.as_mut() }?;
        let k = ci & (L2_ENTRIES - 1);
        if l2.grown[k / 64] >> (k % 64) & 1 == 0 {
            return None;
        }
        Some(&mut l2.chunks[k])
    }

    /// The unit of the summary reservation holding entry `i` of level `l`.
    #[inline]
    fn unit_of(l: usize, i: usize) -> usize {
        (LEVEL_OFFSET[l] + i * 8) / MAP_UNIT
    }

    #[inline]
    fn unit_mapped(&self, u: usize) -> bool {
        self.mapped[u / 64] >> (u % 64) & 1 != 0
    }

    /// A pointer to entry `i` of level `l` if that entry exists and is mapped.
    #[inline]
    fn sum_ptr(&self, l: usize, i: usize) -> Option<*mut u64> {
        if self.sums.is_null() || i >= LEVEL_ENTRIES[l] || !self.unit_mapped(Self::unit_of(l, i)) {
            return None;
        }
        // SAFETY: `LEVEL_OFFSET[l] / 8 + i` is inside the `SUMMARY_BYTES` reservation
        // that `sums` starts (i < LEVEL_ENTRIES[l]).
        Some(unsafe { self.sums.add(LEVEL_OFFSET[l] / 8 + i) })
    }

    /// Entry `i` of level `l`. Only mapped entries are ever read (invariant 6); an
    /// unmapped one reads as "no free pages".
    #[inline]
    fn sum(&self, l: usize, i: usize) -> Sum {
        match self.sum_ptr(l, i) {
            // SAFETY: the entry is in a mapped unit of our reservation, 8-aligned
            // (the reservation is unit aligned), and only accessed under `&self`.
            Some(p) => Sum(unsafe { p.read() }),
            None => {
                debug_assert!(false, "read of an unmapped summary ({l}, {i})");
                Sum::EMPTY
            }
        }
    }

    /// The 8 sibling entries `first..first + 8` of level `l` (`first` a multiple of 8),
    /// with one mapping check: a block of siblings is 64 bytes and never straddles a
    /// mapping unit. An unmapped block reads as "no free pages".
    #[inline]
    fn sum_block(&self, l: usize, first: usize) -> [Sum; 8] {
        debug_assert!(first % 8 == 0);
        match self.sum_ptr(l, first) {
            // SAFETY: the block lies in the same mapped unit as its first entry (units
            // are multiples of 64 bytes and blocks are 64-byte aligned), inside the
            // level (level sizes are multiples of 8 entries), and `&self` excludes
            // writers.
            Some(p) => unsafe { p.cast::<[u64; 8]>().read() }.map(Sum),
            None => {
                debug_assert!(false, "read of an unmapped summary block ({l}, {first})");
                [Sum::EMPTY; 8]
            }
        }
    }

    /// Writes entry `i` of level `l` (which must be mapped; otherwise nothing happens).
    #[inline]
    fn set_sum(&mut self, l: usize, i: usize, s: Sum) {
        match self.sum_ptr(l, i) {
            // SAFETY: as in `sum`; `&mut self` makes this the only access.
            Some(p) => unsafe { p.write(s.0) },
            None => {
                debug_assert!(false, "write of an unmapped summary ({l}, {i})");
                return;
            }
        }
        if l == 0 {
            let bit = 1u64 << (i % 64);
            if s.is_empty() {
                self.root_free[i / 64] &= !bit;
            } else {
                self.root_free[i / 64] |= bit;
            }
        }
    }

    /// The first root entry in `[j, hi)` with a free page, or `hi`.
    #[inline]
    fn next_free_root(&self, j: usize, hi: usize) -> usize {
        let mut w = j / 64;
        let mut x = self.root_free[w] & (!0u64 << (j % 64));
        loop {
            if x != 0 {
                return (w * 64 + x.trailing_zeros() as usize).min(hi);
            }
            w += 1;
            if w * 64 >= hi {
                return hi;
            }
            x = self.root_free[w];
        }
    }

    // -- growth ---------------------------------------------------------------------

    /// Adds `[base, base + size)` to the heap. `base` must be chunk aligned and `size` a
    /// multiple of [`CHUNK_SIZE`]; the range must lie below [`ADDR_LIMIT`] and not be
    /// part of the heap yet. The new pages are free and scavenged (fresh OS memory is
    /// Prepared).
    ///
    /// Fails only if metadata memory cannot be obtained (or, as a fallback for a
    /// caller bug caught by `debug_assert` in debug builds, with
    /// [`OsError::TooLarge`] for a misaligned or out-of-range request); the heap is
    /// then unchanged. Metadata obtained before the failure is kept for the next try.
    pub(crate) fn grow(
        &mut self,
        mem: &dyn MemSource,
        base: usize,
        size: usize,
    ) -> Result<(), OsError> {
        if size == 0 {
            return Ok(());
        }
        let aligned = base % CHUNK_SIZE == 0 && size % CHUNK_SIZE == 0;
        debug_assert!(aligned, "grow({base:#x}, {size:#x}) is not chunk aligned");
        let limit = match base.checked_add(size) {
            Some(l) if aligned && l <= ADDR_LIMIT => l,
            _ => return Err(OsError::TooLarge),
        };
        let (c0, c1) = (base >> LOG_CHUNK_SIZE, limit >> LOG_CHUNK_SIZE);

        // 1. All metadata memory, before any state changes.
        if self.sums.is_null() {
            let p = mem.reserve(SUMMARY_BYTES, MAP_UNIT, 0)?;
            self.sums = p.as_ptr().cast();
        }
        // The whole root level, so that searches may read any root entry.
        self.map_summaries(mem, 0, 0, LEVEL_ENTRIES[0])?;
        for (l, &shift) in LEVEL_SHIFT.iter().enumerate().skip(1) {
            self.map_summaries(mem, l, base >> shift, ((limit - 1) >> shift) + 1)?;
        }
        for j in (c0 >> L2_BITS)..=((c1 - 1) >> L2_BITS) {
            if self.l1[j].is_null() {
                let p = mem.alloc_meta(core::mem::size_of::<L2>())?;
                self.l1[j] = p.as_ptr().cast();
            }
        }

        // 2. The new chunks: free and scavenged.
        let mut added = 0;
        for ci in c0..c1 {
            let p = self.l1[ci >> L2_BITS];
            // SAFETY: allocated in step 1 (non-null), owned by `self`, and `&mut self`
            // makes this the only reference.
            let Some(l2) = (unsafe { p.as_mut() }) else {
                debug_assert!(false, "L2 array missing after allocation");
                continue;
            };
            let k = ci & (L2_ENTRIES - 1);
            if l2.grown[k / 64] >> (k % 64) & 1 != 0 {
                debug_assert!(false, "chunk {ci:#x} grown twice");
                continue;
            }
            l2.grown[k / 64] |= 1 << (k % 64);
            l2.chunks[k] = Chunk {
                alloc: [0; CHUNK_WORDS],
                scav: [!0; CHUNK_WORDS],
            };
            added += CHUNK_PAGES;
        }
        self.free += added;
        self.scav += added;
        self.total += added;
        self.end_chunk = self.end_chunk.max(c1);
        self.first_chunk = self.first_chunk.min(c0);
        if base < self.search_addr {
            self.search_addr = base;
        }
        self.update(c0, c1, None);
        Ok(())
    }

    /// Maps the units of the summary reservation holding entries `[lo, hi)` of level
    /// `l` that are not mapped yet. Each unit is mapped at most once.
    fn map_summaries(
        &mut self,
        mem: &dyn MemSource,
        l: usize,
        lo: usize,
        hi: usize,
    ) -> Result<(), OsError> {
        debug_assert!(lo < hi && hi <= LEVEL_ENTRIES[l] && !self.sums.is_null());
        let first = Self::unit_of(l, lo);
        let end = (LEVEL_OFFSET[l] + hi * 8).div_ceil(MAP_UNIT);
        let mut u = first;
        while u < end {
            if self.unit_mapped(u) {
                u += 1;
                continue;
            }
            let mut v = u + 1;
            while v < end && !self.unit_mapped(v) {
                v += 1;
            }
            // The units [u, v) are unmapped: map them in one call.
            let addr = self.sums as usize + u * MAP_UNIT;
            // SAFETY: `sums` is non-null, so `addr` (inside the reservation) is too.
            let p = unsafe { NonNull::new_unchecked(addr as *mut u8) };
            // SAFETY: [addr, addr + (v-u) units) lies inside our summary reservation
            // (v <= MAP_UNITS), is unit (hence OS page) aligned, and is still only
            // Reserved: no unit in it was mapped before, so nothing is overwritten.
            unsafe { mem.map(p, (v - u) * MAP_UNIT)? };
            for w in u..v {
                self.mapped[w / 64] |= 1 << (w % 64);
            }
            u = v;
        }
        Ok(())
    }

    // -- summary maintenance ----------------------------------------------------------

    /// Recomputes the leaf summaries of chunks `[c0, c1)` after their bitmaps changed,
    /// then their ancestors. If `middle` is given, the chunks strictly inside the
    /// range are known to have that summary (they were wholly allocated or freed).
    fn update(&mut self, c0: usize, c1: usize, middle: Option<Sum>) {
        debug_assert!(c0 < c1 && c1 <= CHUNK_COUNT);
        let mut changed = false;
        for ci in c0..c1 {
            let new = match middle {
                Some(m) if ci > c0 && ci + 1 < c1 && self.is_grown(ci) => m,
                _ => match self.chunk(ci) {
                    Some(ch) => ch.summarize(),
                    None => continue,
                },
            };
            if self.sum(LEAF, ci) != new {
                self.set_sum(LEAF, ci, new);
                changed = true;
            }
        }
        // Each level from its children, as long as the level below changed.
        let mut l = LEAF;
        while changed && l > 0 {
            l -= 1;
            changed = false;
            let shift = LEVEL_SHIFT[l] - LOG_CHUNK_SIZE;
            let log_child_pages = LEVEL_SHIFT[l + 1] - PAGE_SHIFT;
            for i in (c0 >> shift)..=((c1 - 1) >> shift) {
                let kids = self.sum_block(l + 1, i << LEVEL_BITS[l + 1]);
                let new = merge(&kids, log_child_pages);
                if self.sum(l, i) != new {
                    self.set_sum(l, i, new);
                    changed = true;
                }
            }
        }
    }

    // -- search -----------------------------------------------------------------------

    /// Finds the first (lowest-address) run of `npages` free pages. Returns its address
    /// (None if there is none) and a new lower bound for the first free page, at least
    /// `search_addr`. Does not change anything.
    fn find(&self, npages: usize) -> (Option<usize>, usize) {
        let hint = self.search_addr;
        if npages == 0 || hint >= self.end_chunk << LOG_CHUNK_SIZE {
            return (None, hint);
        }

        // Fast path: the run fits in the hint's chunk. All pages before the hint are
        // allocated, so the chunk's first fit after the hint is the first fit overall
        // (a run crossing into the next chunk would start after any run inside it).
        let hc = hint >> LOG_CHUNK_SIZE;
        let hp = (hint >> PAGE_SHIFT) & (CHUNK_PAGES - 1);
        if npages <= CHUNK_PAGES - hp {
            if let Some(ch) = self.chunk(hc) {
                if self.sum(LEAF, hc).max() >= npages {
                    let base = hc << LOG_CHUNK_SIZE;
                    let (pos, first) = ch.find(npages, hp);
                    if let Some(p) = pos {
                        return (Some(base + p * PAGE_SIZE), base + first * PAGE_SIZE);
                    }
                    debug_assert!(false, "leaf summary of chunk {hc:#x} promises a run");
                }
            }
        }

        // Walk down the tree. `lb` is the lower bound of the first free page found so
        // far; while `refining`, the block being scanned is the one that holds the
        // first free page, so its first nonzero entry raises `lb`.
        let mut lb = hint;
        let mut refining = true;
        // The entry chosen at the previous level (the root block is the whole level).
        let mut parent = 0;
        for l in 0..LEVELS {
            let shift = LEVEL_SHIFT[l];
            let entry_pages = 1usize << (shift - PAGE_SHIFT);
            let (lo, hi) = if l == 0 {
                (0, ((self.end_chunk - 1) >> (shift - LOG_CHUNK_SIZE)) + 1)
            } else {
                (parent << LEVEL_BITS[l], (parent + 1) << LEVEL_BITS[l])
            };
            // Entries before the hint's entry hold no free page.
            let h = hint >> shift;
            let mut j = if h >= lo && h < hi { h } else { lo };
            debug_assert!(
                h < hi,
                "the search hint lies beyond the block being scanned"
            );
            let mut first_nonzero = None;
            // A run of free pages reaching the current entry: its length and address.
            let (mut run, mut run_base) = (0usize, 0usize);
            let mut descend = None;
            while j < hi {
                if l == 0 {
                    // Skip the root entries without free pages at once; skipping any
                    // breaks the run.
                    let next = self.next_free_root(j, hi);
                    if next != j {
                        run = 0;
                        j = next;
                        if j == hi {
                            break;
                        }
                    }
                }
                let s = self.sum(l, j);
                if s.is_empty() {
                    run = 0;
                    j += 1;
                    continue;
                }
                if first_nonzero.is_none() {
                    first_nonzero = Some(j);
                    if refining {
                        lb = lb.max(j << shift);
                    }
                }
                let start = s.start();
                if run + start >= npages {
                    // The run (possibly starting at this entry) fits.
                    let addr = if run == 0 { j << shift } else { run_base };
                    return (Some(addr), lb);
                }
                if s.max() >= npages {
                    // The first fit lies inside this entry: any run crossing out of
                    // it starts at its free suffix, after every run inside it.
                    descend = Some(j);
                    break;
                }
                if run == 0 || start < entry_pages {
                    // The run cannot go on through this entry; a new one starts at
                    // its free suffix.
                    run = s.end();
                    run_base = ((j + 1) << shift) - run * PAGE_SIZE;
                } else {
                    // The whole entry is free: the run continues through it.
                    run += entry_pages;
                }
                j += 1;
            }
            match descend {
                Some(d) => {
                    refining &= first_nonzero == Some(d);
                    parent = d;
                }
                None => {
                    // At the root this is a plain miss; below it the parent's summary
                    // promised a run, so the tree is inconsistent.
                    debug_assert!(l == 0, "summary at level {} promises a run", l - 1);
                    return (None, lb);
                }
            }
        }

        // `parent` is now a chunk whose summary says the run fits inside it.
        let ci = parent;
        let base = ci << LOG_CHUNK_SIZE;
        let from = if hc == ci { hp } else { 0 };
        let Some(ch) = self.chunk(ci) else {
            debug_assert!(false, "nonzero summary for chunk {ci:#x} outside the heap");
            return (None, lb);
        };
        let (pos, first) = ch.find(npages, from);
        if refining {
            lb = lb.max(base + first * PAGE_SIZE);
        }
        debug_assert!(
            pos.is_some(),
            "leaf summary of chunk {ci:#x} promises a run"
        );
        (pos.map(|p| base + p * PAGE_SIZE), lb)
    }

    /// `find`, and raises the search hint to what the search learnt.
    fn find_and_learn(&mut self, npages: usize) -> Option<usize> {
        if npages == 0 || npages > self.free {
            debug_assert!(npages != 0, "allocation of zero pages");
            return None;
        }
        let (found, lb) = self.find(npages);
        if lb > self.search_addr {
            self.search_addr = lb;
        }
        found
    }

    /// Allocates the free run found at `addr`, and moves the hint past it when the
    /// run started at the hint.
    fn take(&mut self, addr: usize, npages: usize) -> usize {
        let scav = self.alloc_range(addr, npages);
        if self.search_addr == addr {
            // Every page below `addr` was allocated, and now the run is too.
            self.search_addr = addr + npages * PAGE_SIZE;
        }
        scav
    }

    // -- the interface ----------------------------------------------------------------

    /// Allocates the first (lowest-address) run of `npages >= 1` free pages. Returns its
    /// address and how many of its bytes were scavenged (those pages must be committed
    /// before use); their scavenged bits are cleared. None if no run is long enough:
    /// the caller then grows the heap and retries.
    pub(crate) fn alloc(&mut self, npages: usize) -> Option<(usize, usize)> {
        let addr = self.find_and_learn(npages)?;
        Some((addr, self.take(addr, npages)))
    }

    /// Like [`alloc`](Self::alloc), but the run's address is a multiple of
    /// `align_pages * PAGE_SIZE` (`align_pages` a power of two; 0 and 1 mean no
    /// alignment).
    ///
    /// The result is exactly:
    /// 1. `a = align_up(F)` where `F` is the first fit of `npages`, if `[a, a + npages)`
    ///    is free: then `a` is the lowest aligned run of all (every aligned fit is a fit,
    ///    so lies at or above `F`);
    /// 2. otherwise `align_up(P)`, where `P` is the first fit of
    ///    `npages + align_pages - 1` pages, which always holds an aligned run (Go's
    ///    method).
    ///
    /// Step 2 can miss an aligned run inside a free region shorter than the padded
    /// length that lies beyond `F`'s region; it then returns a higher run, or None. A
    /// None therefore means "no free region of `npages + align_pages - 1` pages", and
    /// growing the heap by that much makes the retry succeed. Cost: at most two
    /// searches plus a check of `npages` bits.
    pub(crate) fn alloc_aligned(
        &mut self,
        npages: usize,
        align_pages: usize,
    ) -> Option<(usize, usize)> {
        if align_pages <= 1 {
            return self.alloc(npages);
        }
        if !align_pages.is_power_of_two() || align_pages > ADDR_LIMIT >> PAGE_SHIFT {
            debug_assert!(
                align_pages.is_power_of_two(),
                "alignment {align_pages} is not a power of two"
            );
            return None;
        }
        let mask = (align_pages << PAGE_SHIFT) - 1;
        let f = self.find_and_learn(npages)?;
        let a = (f + mask) & !mask;
        if self.is_free(a, npages) {
            return Some((a, self.take(a, npages)));
        }
        let p = self.find_and_learn(npages.checked_add(align_pages - 1)?)?;
        let a = (p + mask) & !mask;
        Some((a, self.take(a, npages)))
    }

    /// Whether all of `[base, base + npages pages)` is inside the heap and free.
    pub(crate) fn is_free(&self, base: usize, npages: usize) -> bool {
        let Some((p0, p1)) = page_span(base, npages) else {
            return false;
        };
        ChunkSpans { p: p0, end: p1 }
            .all(|(ci, s, e)| self.chunk(ci).is_some_and(|ch| ch.range_free(s, e)))
    }

    /// Marks `[base, base + npages pages)` allocated. All of it must be free heap pages
    /// (checked with `debug_assert`). Returns how many of its bytes were scavenged, and
    /// clears their scavenged bits. Does not move the search hint (it stays a lower
    /// bound).
    pub(crate) fn alloc_range(&mut self, base: usize, npages: usize) -> usize {
        debug_assert!(
            self.is_free(base, npages),
            "alloc_range({base:#x}, {npages}) of non-free pages"
        );
        let Some((p0, p1)) = page_span(base, npages) else {
            return 0;
        };
        let (mut newly, mut scav) = (0, 0);
        for (ci, s, e) in (ChunkSpans { p: p0, end: p1 }) {
            match self.chunk_mut(ci) {
                Some(ch) => {
                    let (n, sc) = ch.set_alloc(s, e);
                    newly += n;
                    scav += sc;
                }
                None => debug_assert!(false, "alloc_range outside the heap"),
            }
        }
        self.free -= newly;
        self.scav -= scav;
        let (c0, c1) = (p0 >> LOG_CHUNK_PAGES, ((p1 - 1) >> LOG_CHUNK_PAGES) + 1);
        self.update(c0, c1, Some(Sum::EMPTY));
        scav * PAGE_SIZE
    }

    /// Marks the run `[base, base + npages pages)` free. Its scavenged bits stay clear:
    /// freed memory is dirty (Ready) until the scavenger returns it.
    pub(crate) fn free(&mut self, base: usize, npages: usize) {
        let Some((p0, p1)) = page_span(base, npages) else {
            debug_assert!(false, "free({base:#x}, {npages}): bad range");
            return;
        };
        let mut freed = 0;
        for (ci, s, e) in (ChunkSpans { p: p0, end: p1 }) {
            match self.chunk_mut(ci) {
                Some(ch) => freed += ch.clear_alloc(s, e),
                None => debug_assert!(false, "free outside the heap"),
            }
            self.note_freed(ci, e - s);
        }
        debug_assert_eq!(
            freed, npages,
            "free({base:#x}, {npages}) of pages not allocated"
        );
        self.free += freed;
        if base < self.search_addr {
            self.search_addr = base;
        }
        let (c0, c1) = (p0 >> LOG_CHUNK_PAGES, ((p1 - 1) >> LOG_CHUNK_PAGES) + 1);
        self.update(c0, c1, Some(Sum::FREE_CHUNK));
    }

    /// Records that `npages` dirty pages were just freed into chunk `ci`: it is dirty,
    /// and stamped with the clock. A chunk already dirty keeps its stamp if that is
    /// later (the clock may lie in the past for pages that sat unused in an idle
    /// thread's cache), and also if the pages freed now are fewer than an eighth of its
    /// free dirty pages: a few late frees into a chunk of old free memory (a thread's
    /// trimmed free stack emptying a span) do not make all of it young again. (Such
    /// pages may be returned before the delay; freeing them again costs a refault.)
    fn note_freed(&mut self, ci: usize, npages: usize) {
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

    /// For a thread's page cache (Go's `allocToCache`): takes every free page of the
    /// 64-page aligned block that holds the first free page of the heap. Returns the
    /// block's base, the bitmap of the pages taken (bit `i` = page `base + i` pages)
    /// and the bitmap of those that were scavenged (their scavenged bits are cleared
    /// here; the cache remembers them). None if no page is free.
    pub(crate) fn alloc_to_cache(&mut self) -> Option<(usize, u64, u64)> {
        let first = self.find_and_learn(1)?;
        let base = first & !(64 * PAGE_SIZE - 1);
        let ci = base >> LOG_CHUNK_SIZE;
        let w = (base & (CHUNK_SIZE - 1)) / PAGE_SIZE / 64;
        let ch = self.chunk_mut(ci)?;
        let pages = !ch.alloc[w];
        let scav = ch.scav[w] & pages;
        ch.alloc[w] = !0;
        ch.scav[w] &= !pages;
        self.free -= pages.count_ones() as usize;
        self.scav -= scav.count_ones() as usize;
        // `first` was the lowest free page, and the whole block is now allocated.
        self.search_addr = self.search_addr.max(base + 64 * PAGE_SIZE);
        self.update(ci, ci + 1, None);
        Some((base, pages, scav))
    }

    /// Gives back pages of a thread's page cache (Go's `pageCache.flush`): bit `i` of
    /// `pages` set = page `base + i` pages is free again, `scav` (a subset) the ones
    /// still scavenged. `base` is a block returned by
    /// [`alloc_to_cache`](Self::alloc_to_cache), and the pages are allocated here.
    pub(crate) fn free_from_cache(&mut self, base: usize, pages: u64, scav: u64) {
        debug_assert!(scav & !pages == 0 && base % (64 * PAGE_SIZE) == 0);
        if pages == 0 {
            return;
        }
        let ci = base >> LOG_CHUNK_SIZE;
        let w = (base & (CHUNK_SIZE - 1)) / PAGE_SIZE / 64;
        let Some(ch) = self.chunk_mut(ci) else {
            debug_assert!(false, "free_from_cache outside the heap");
            return;
        };
        debug_assert!(ch.alloc[w] & pages == pages, "cache pages not allocated");
        ch.alloc[w] &= !pages;
        ch.scav[w] |= scav;
        self.free += pages.count_ones() as usize;
        self.scav += scav.count_ones() as usize;
        if pages & !scav != 0 {
            self.note_freed(ci, (pages & !scav).count_ones() as usize);
        }
        let lowest = base + pages.trailing_zeros() as usize * PAGE_SIZE;
        if lowest < self.search_addr {
            self.search_addr = lowest;
        }
        self.update(ci, ci + 1, None);
    }

    /// For a thread's chunk cache (the page cache's idea, one chunk wide): takes the
    /// first wholly free chunk. Returns its address, the bitmap of the pages taken (all
    /// of them) and the bitmap of those that were scavenged (their bits are cleared
    /// here; the cache remembers them). None if no chunk is wholly free: the caller
    /// grows the heap rather than take a fragment, which would run out after a block
    /// or two and send the thread back to the lock.
    pub(crate) fn alloc_chunk_to_cache(
        &mut self,
    ) -> Option<(usize, [u64; CHUNK_WORDS], [u64; CHUNK_WORDS])> {
        // A run of 1023 free pages holds an aligned chunk.
        let p = self.find_and_learn(2 * CHUNK_PAGES - 1)?;
        let first = (p + CHUNK_SIZE - 1) & !(CHUNK_SIZE - 1);
        if !self.is_free(first, CHUNK_PAGES) {
            return None;
        }
        let ci = first >> LOG_CHUNK_SIZE;
        let ch = self.chunk_mut(ci)?;
        let (mut pages, mut scav) = ([0u64; CHUNK_WORDS], [0u64; CHUNK_WORDS]);
        let (mut nfree, mut nscav) = (0, 0);
        for w in 0..CHUNK_WORDS {
            pages[w] = !ch.alloc[w];
            scav[w] = ch.scav[w] & pages[w];
            ch.alloc[w] = !0;
            ch.scav[w] &= !pages[w];
            nfree += pages[w].count_ones() as usize;
            nscav += scav[w].count_ones() as usize;
        }
        self.free -= nfree;
        self.scav -= nscav;
        // The search hint stays a lower bound: pages were only taken.
        self.update(ci, ci + 1, None);
        Some((ci << LOG_CHUNK_SIZE, pages, scav))
    }

    /// Gives back the free pages of a thread's chunk cache: bit `i` of word `i / 64` of
    /// `pages` set = page `base + i` pages is free again; `scav` (a subset) the ones
    /// still scavenged. `base` came from
    /// [`alloc_chunk_to_cache`](Self::alloc_chunk_to_cache) and those pages are
    /// allocated here.
    pub(crate) fn free_from_chunk_cache(
        &mut self,
        base: usize,
        pages: &[u64; CHUNK_WORDS],
        scav: &[u64; CHUNK_WORDS],
    ) {
        if pages.iter().all(|&w| w == 0) {
            return;
        }
        let ci = base >> LOG_CHUNK_SIZE;
        let Some(ch) = self.chunk_mut(ci) else {
            debug_assert!(false, "free_from_chunk_cache outside the heap");
            return;
        };
        let (mut freed, mut sc, mut dirty) = (0, 0, 0usize);
        for w in 0..CHUNK_WORDS {
            debug_assert!(
                ch.alloc[w] & pages[w] == pages[w],
                "cache pages not allocated"
            );
            debug_assert!(scav[w] & !pages[w] == 0);
            ch.alloc[w] &= !pages[w];
            ch.scav[w] |= scav[w];
            freed += pages[w].count_ones() as usize;
            sc += scav[w].count_ones() as usize;
            dirty += (pages[w] & !scav[w]).count_ones() as usize;
        }
        self.free += freed;
        self.scav += sc;
        if dirty != 0 {
            self.note_freed(ci, dirty);
        }
        let first = (0..CHUNK_WORDS).find(|&w| pages[w] != 0).unwrap_or(0);
        let lowest = base + (first * 64 + pages[first].trailing_zeros() as usize) * PAGE_SIZE;
        if lowest < self.search_addr {
            self.search_addr = lowest;
        }
        self.update(ci, ci + 1, None);
    }

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

    // -- scavenging -------------------------------------------------------------------

    /// The highest grown chunk index below `end` whose dirty bit is set.
    fn prev_dirty(&self, end: usize) -> Option<usize> {
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

/// The highest run of set bits in a chunk bitmap, as a page range `[s, e)`.
fn highest_run(b: &[u64; CHUNK_WORDS]) -> Option<(usize, usize)> {
    let mut w = CHUNK_WORDS;
    let (hw, hb) = loop {
        if w == 0 {
            return None;
        }
        w -= 1;
        if b[w] != 0 {
            break (w, 63 - b[w].leading_zeros() as usize);
        }
    };
    let e = hw * 64 + hb + 1;
    // The run goes down to just above the highest clear bit below `e`.
    let mut mask = if hb == 63 { !0 } else { (1u64 << (hb + 1)) - 1 };
    let mut w = hw;
    loop {
        let clear = !b[w] & mask;
        if clear != 0 {
            return Some((w * 64 + 64 - clear.leading_zeros() as usize, e));
        }
        if w == 0 {
            return Some((0, e));
        }
        w -= 1;
        mask = !0;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::os::TestMem;
    use std::boxed::Box;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::vec::Vec;

    /// Chunk index of the tests' main region (4 TiB): aligned to every level's block.
    const BASE: usize = 0x10_0000;

    fn addr(ci: usize, page: usize) -> usize {
        ci * CHUNK_SIZE + page * PAGE_SIZE
    }

    fn new_pa() -> Box<PageAlloc> {
        Box::new(PageAlloc::new())
    }

    // -- test-only inspection -----------------------------------------------------------

    impl PageAlloc {
        /// Indices of all grown chunks, ascending.
        fn grown_chunks(&self) -> Vec<usize> {
            let mut v = Vec::new();
            for (j, &p) in self.l1.iter().enumerate() {
                // SAFETY: non-null L1 entries point to live L2 arrays owned by `self`.
                let Some(l2) = (unsafe { p.as_ref() }) else {
                    continue;
                };
                for (w, &bits) in l2.grown.iter().enumerate() {
                    let mut b = bits;
                    while b != 0 {
                        v.push((j << L2_BITS) | (w * 64 + b.trailing_zeros() as usize));
                        b &= b - 1;
                    }
                }
            }
            v
        }

        fn mapped_units(&self) -> usize {
            self.mapped.iter().map(|w| w.count_ones() as usize).sum()
        }

        /// Recomputes everything derivable and compares: invariants 1-6 of the module doc.
        fn check_invariants(&self) {
            let grown = self.grown_chunks();
            let (mut free, mut scav) = (0, 0);
            let mut first_free = None;
            for &ci in &grown {
                let ch = self.chunk(ci).unwrap();
                for w in 0..CHUNK_WORDS {
                    assert_eq!(
                        ch.scav[w] & ch.alloc[w],
                        0,
                        "chunk {ci:#x}: scavenged bit on a used page"
                    );
                    free += ch.alloc[w].count_zeros() as usize;
                    scav += ch.scav[w].count_ones() as usize;
                }
                let dirty_work = (0..CHUNK_WORDS).any(|w| !ch.alloc[w] & !ch.scav[w] != 0);
                if dirty_work {
                    let l2 = self.l2(ci).unwrap();
                    let k = ci & (L2_ENTRIES - 1);
                    assert!(
                        l2.dirty[k / 64] >> (k % 64) & 1 != 0,
                        "chunk {ci:#x} has free unscavenged pages but no dirty mark"
                    );
                }
                let ff = next_bit(&ch.alloc, 0, false);
                if first_free.is_none() && ff < CHUNK_PAGES {
                    first_free = Some(addr(ci, ff));
                }
                assert_eq!(
                    self.sum(LEAF, ci),
                    ch.summarize(),
                    "leaf summary of chunk {ci:#x}"
                );
            }
            assert_eq!(free, self.free, "free page counter");
            assert_eq!(scav, self.scav, "scavenged page counter");
            assert_eq!(grown.len() * CHUNK_PAGES, self.total, "total page counter");
            if let Some(ff) = first_free {
                assert!(
                    self.search_addr <= ff,
                    "search_addr {:#x} above first free page {ff:#x}",
                    self.search_addr
                );
            }
            assert_eq!(self.end_chunk, grown.last().map_or(0, |&c| c + 1));
            if grown.is_empty() {
                return;
            }
            for u in 0..Self::unit_of(1, 0) {
                assert!(self.unit_mapped(u), "root level unit {u} unmapped");
            }
            for i in 0..LEVEL_ENTRIES[0] {
                let bit = self.root_free[i / 64] >> (i % 64) & 1 != 0;
                assert_eq!(bit, !self.sum(0, i).is_empty(), "root_free bit {i}");
            }
            for l in 0..LEVELS {
                let shift = LEVEL_SHIFT[l] - LOG_CHUNK_SIZE;
                let mut anc: Vec<usize> = grown.iter().map(|&c| c >> shift).collect();
                anc.dedup();
                let mut is_anc = std::vec![false; LEVEL_ENTRIES[0]];
                if l == 0 {
                    anc.iter().for_each(|&a| is_anc[a] = true);
                }
                // The entries to look at: all root entries, or the sibling blocks of
                // the ancestors.
                let mut idx: Vec<usize> = if l == 0 {
                    (0..LEVEL_ENTRIES[0]).collect()
                } else {
                    anc.iter().flat_map(|&a| (a & !7)..(a & !7) + 8).collect()
                };
                idx.dedup();
                for i in idx {
                    assert!(
                        self.unit_mapped(Self::unit_of(l, i)),
                        "summary ({l}, {i:#x}) unmapped"
                    );
                    let s = self.sum(l, i);
                    let ancestor = if l == 0 {
                        is_anc[i]
                    } else {
                        anc.binary_search(&i).is_ok()
                    };
                    if !ancestor {
                        assert_eq!(
                            s,
                            Sum::EMPTY,
                            "summary ({l}, {i:#x}) covers no heap but is nonzero"
                        );
                    } else if l < LEAF {
                        let mut kids = [Sum::EMPTY; 8];
                        for (k, kid) in kids.iter_mut().enumerate() {
                            *kid = self.sum(l + 1, i * 8 + k);
                        }
                        let m = merge(&kids, LEVEL_SHIFT[l + 1] - PAGE_SHIFT);
                        assert_eq!(
                            s, m,
                            "summary ({l}, {i:#x}) is not the merge of its children"
                        );
                    }
                }
            }
        }

        fn chunk_bits(&self, ci: usize) -> Option<([u64; CHUNK_WORDS], [u64; CHUNK_WORDS])> {
            self.chunk(ci).map(|c| (c.alloc, c.scav))
        }
    }

    // -- a MemSource that records and can fail ---------------------------------------

    /// Forwards to `TestMem`, panics if a range is mapped twice, and makes the call
    /// numbered `fail_at` (counting reserve and map calls from 0) fail.
    struct TrackingMem {
        maps: Mutex<Vec<(usize, usize)>>,
        calls: AtomicUsize,
        fail_at: AtomicUsize,
    }

    impl TrackingMem {
        fn new() -> Self {
            Self::failing_at(usize::MAX)
        }
        fn failing_at(k: usize) -> Self {
            TrackingMem {
                maps: Mutex::new(Vec::new()),
                calls: AtomicUsize::new(0),
                fail_at: AtomicUsize::new(k),
            }
        }
        fn fail_in(&self, k: usize) {
            self.fail_at
                .store(self.calls.load(Ordering::Relaxed) + k, Ordering::Relaxed);
        }
        fn tick(&self) -> Result<(), OsError> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            if n == self.fail_at.load(Ordering::Relaxed) {
                Err(OsError::NoMemory(12))
            } else {
                Ok(())
            }
        }
    }

    // SAFETY: every call is forwarded to `TestMem` unchanged (or fails before it).
    unsafe impl MemSource for TrackingMem {
        fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError> {
            self.tick()?;
            TestMem.reserve(size, align, hint)
        }
        unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
            self.tick()?;
            let (a, e) = (ptr.as_ptr() as usize, ptr.as_ptr() as usize + size);
            let mut maps = self.maps.lock().unwrap();
            for &(b, f) in maps.iter() {
                assert!(
                    e <= b || f <= a,
                    "[{a:#x}, {e:#x}) mapped again (overlaps [{b:#x}, {f:#x}))"
                );
            }
            maps.push((a, e));
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.map(ptr, size) }
        }
        unsafe fn commit(&self, ptr: NonNull<u8>, size: usize) {
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.commit(ptr, size) }
        }
        unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.decommit(ptr, size) }
        }
        fn decommit_zeroes(&self) -> bool {
            TestMem.decommit_zeroes()
        }
        unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
            let a = ptr.as_ptr() as usize;
            self.maps
                .lock()
                .unwrap()
                .retain(|&(b, f)| f <= a || b >= a + size);
            // SAFETY: forwarded from our caller.
            unsafe { TestMem.release(ptr, size) }
        }
    }

    // -- packing and merging ----------------------------------------------------------

    #[test]
    fn pack_round_trips_at_the_extremes() {
        let m = MAX_PACKED;
        for &(s, x, e) in &[
            (0, 0, 0),
            (0, 1, 1),
            (1, 1, 0),
            (m - 1, m - 1, m - 1),
            (m - 1, m - 1, 0),
            (0, m - 1, m - 1),
            (3, m - 1, 5),
            (CHUNK_PAGES, CHUNK_PAGES, CHUNK_PAGES),
        ] {
            let p = Sum::pack(s, x, e);
            assert_eq!(
                (p.start(), p.max(), p.end()),
                (s, x, e),
                "pack({s}, {x}, {e})"
            );
            assert_eq!(p.0 & ALL_FREE_FLAG, 0);
        }
        let all = Sum::pack(m, m, m);
        assert_eq!(all, Sum(ALL_FREE_FLAG));
        assert_eq!((all.start(), all.max(), all.end()), (m, m, m));
        assert!(Sum::pack(0, 0, 0).is_empty() && !all.is_empty());
        // A root entry merged from 8 wholly free level-1 entries is the flag value; one
        // page short of that is packed normally.
        let l1_pages = 1 << (LEVEL_SHIFT[1] - PAGE_SHIFT);
        let free = Sum::pack(l1_pages, l1_pages, l1_pages);
        assert_eq!(merge(&[free; 8], LEVEL_SHIFT[1] - PAGE_SHIFT), all);
        let mut kids = [free; 8];
        kids[7] = Sum::pack(l1_pages - 1, l1_pages - 1, 0);
        let s = merge(&kids, LEVEL_SHIFT[1] - PAGE_SHIFT);
        assert_eq!((s.start(), s.max(), s.end()), (m - 1, m - 1, 0));
        kids[7] = free;
        kids[0] = Sum::pack(0, l1_pages - 1, l1_pages - 1);
        let s = merge(&kids, LEVEL_SHIFT[1] - PAGE_SHIFT);
        assert_eq!((s.start(), s.max(), s.end()), (0, m - 1, m - 1));
    }

    #[test]
    fn merge_joins_runs_across_children() {
        let p = CHUNK_PAGES;
        let full = Sum::FREE_CHUNK;
        let none = Sum::EMPTY;
        let s = |a, b, c| Sum::pack(a, b, c);
        type Case = ([Sum; 8], (usize, usize, usize));
        let cases: &[Case] = &[
            ([none; 8], (0, 0, 0)),
            ([full; 8], (8 * p, 8 * p, 8 * p)),
            (
                [full, full, s(3, 10, 4), none, none, none, none, full],
                (2 * p + 3, 2 * p + 3, p),
            ),
            (
                [
                    s(0, 7, 7),
                    full,
                    full,
                    s(9, 9, 0),
                    none,
                    s(0, 20, 0),
                    none,
                    s(1, 1, 1),
                ],
                (0, 7 + 2 * p + 9, 1),
            ),
            (
                [
                    none,
                    s(0, 0, 0),
                    s(0, 100, 100),
                    s(50, 60, 0),
                    none,
                    none,
                    none,
                    none,
                ],
                (0, 150, 0),
            ),
        ];
        for (kids, want) in cases {
            let m = merge(kids, LOG_CHUNK_PAGES);
            assert_eq!((m.start(), m.max(), m.end()), *want, "{kids:?}");
        }
    }

    // -- chunk bitmaps against naive versions -------------------------------------------

    fn naive_used(bits: &[u64; CHUNK_WORDS], p: usize) -> bool {
        bits[p / 64] >> (p % 64) & 1 != 0
    }

    fn naive_summary(bits: &[u64; CHUNK_WORDS]) -> (usize, usize, usize) {
        let start = (0..CHUNK_PAGES)
            .take_while(|&p| !naive_used(bits, p))
            .count();
        let end = (0..CHUNK_PAGES)
            .rev()
            .take_while(|&p| !naive_used(bits, p))
            .count();
        let (mut max, mut run) = (0, 0);
        for p in 0..CHUNK_PAGES {
            run = if naive_used(bits, p) { 0 } else { run + 1 };
            max = max.max(run);
        }
        (start, max, end)
    }

    fn naive_find(bits: &[u64; CHUNK_WORDS], n: usize, from: usize) -> (Option<usize>, usize) {
        let first = (from..CHUNK_PAGES)
            .find(|&p| !naive_used(bits, p))
            .unwrap_or(CHUNK_PAGES);
        let pos = (from..=CHUNK_PAGES.saturating_sub(n))
            .find(|&p| p + n <= CHUNK_PAGES && (p..p + n).all(|q| !naive_used(bits, q)));
        (pos, first)
    }

    #[test]
    fn chunk_summarize_and_find_match_naive() {
        let mut rng = Rng(7);
        for round in 0..3000 {
            // Bitmaps of random runs with varied densities and run lengths.
            let mut ch = Chunk {
                alloc: [0; CHUNK_WORDS],
                scav: [0; CHUNK_WORDS],
            };
            let mut p = 0;
            let maxrun = [1, 3, 8, 40, 200, 600][round % 6];
            let mut used = rng.below(2) == 0;
            while p < CHUNK_PAGES {
                let n = (1 + rng.below(maxrun)).min(CHUNK_PAGES - p);
                if used {
                    ch.set_alloc(p, p + n);
                }
                used = !used;
                p += n;
            }
            let s = ch.summarize();
            assert_eq!(
                (s.start(), s.max(), s.end()),
                naive_summary(&ch.alloc),
                "{:x?}",
                ch.alloc
            );
            for _ in 0..8 {
                let lim = if rng.below(2) == 0 { 64 } else { CHUNK_PAGES };
                let n = 1 + rng.below(lim);
                let from = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(CHUNK_PAGES)
                };
                assert_eq!(
                    ch.find(n, from),
                    naive_find(&ch.alloc, n, from),
                    "n {n} from {from} {:x?}",
                    ch.alloc
                );
            }
        }
        let empty = Chunk {
            alloc: [0; CHUNK_WORDS],
            scav: [0; CHUNK_WORDS],
        };
        assert_eq!(empty.summarize(), Sum::FREE_CHUNK);
        assert_eq!(empty.find(CHUNK_PAGES, 0), (Some(0), 0));
        assert_eq!(empty.find(CHUNK_PAGES, 1), (None, 1));
        let full = Chunk {
            alloc: [!0; CHUNK_WORDS],
            scav: [0; CHUNK_WORDS],
        };
        assert_eq!(full.summarize(), Sum::EMPTY);
        assert_eq!(full.find(1, 0), (None, CHUNK_PAGES));
    }

    // -- table-driven cases -------------------------------------------------------------

    /// A chunk of a test heap: index relative to `BASE`, allocated `(page, npages)`
    /// ranges, scavenged `(page, npages)` ranges. Other free pages are dirty.
    type ChunkInit = (usize, &'static [(usize, usize)], &'static [(usize, usize)]);

    /// Expected result: `(chunk relative to BASE, page, scavenged pages)`.
    type Want = Option<(usize, usize, usize)>;

    #[derive(Debug)]
    enum Op {
        Alloc(usize, Want),
        /// npages, align_pages
        Aligned(usize, usize, Want),
        /// chunk relative to BASE, page, npages
        Free(usize, usize, usize),
        /// free pages, scavenged pages
        Counts(usize, usize),
    }
    use Op::*;

    fn setup(chunks: &[ChunkInit]) -> Box<PageAlloc> {
        let mut pa = new_pa();
        for &(rel, _, _) in chunks {
            pa.grow(&TestMem, addr(BASE + rel, 0), CHUNK_SIZE).unwrap();
        }
        for &(rel, used, scav) in chunks {
            let base = addr(BASE + rel, 0);
            // All free and dirty first; then the table's state.
            assert_eq!(pa.alloc_range(base, CHUNK_PAGES), CHUNK_SIZE);
            pa.free(base, CHUNK_PAGES);
            for &(p, n) in scav {
                assert_eq!(pa.mark_scavenged(addr(BASE + rel, p), n), n);
            }
            for &(p, n) in used {
                pa.alloc_range(addr(BASE + rel, p), n);
            }
        }
        pa.check_invariants();
        pa
    }

    fn run_case(name: &str, chunks: &[ChunkInit], ops: &[Op]) {
        let mut pa = setup(chunks);
        let want = |w: &Want| w.map(|(c, p, s)| (addr(BASE + c, p), s * PAGE_SIZE));
        for (k, op) in ops.iter().enumerate() {
            match op {
                Alloc(n, w) => assert_eq!(pa.alloc(*n), want(w), "{name}: op {k} {op:?}"),
                Aligned(n, a, w) => {
                    let got = pa.alloc_aligned(*n, *a);
                    assert_eq!(got, want(w), "{name}: op {k} {op:?}");
                    if let Some((b, _)) = got {
                        assert_eq!(b % (a * PAGE_SIZE), 0);
                    }
                }
                Free(c, p, n) => pa.free(addr(BASE + c, *p), *n),
                Counts(f, s) => {
                    assert_eq!(
                        (pa.free_pages(), pa.scavenged_pages()),
                        (*f, *s),
                        "{name}: op {k}"
                    )
                }
            }
            pa.check_invariants();
        }
    }

    const ALL: &[(usize, usize)] = &[(0, CHUNK_PAGES)];
    const NONE: &[(usize, usize)] = &[];

    #[test]
    fn table_empty_and_full() {
        run_case(
            "empty heap",
            &[],
            &[Alloc(1, None), Aligned(1, 8, None), Counts(0, 0)],
        );
        run_case(
            "one fresh chunk",
            &[(0, NONE, ALL)],
            &[
                Counts(512, 512),
                Alloc(1, Some((0, 0, 1))),
                Alloc(2, Some((0, 1, 2))),
                Alloc(513, None),
                Alloc(509, Some((0, 3, 509))),
                Alloc(1, None),
                Counts(0, 0),
            ],
        );
        run_case(
            "full heap",
            &[(0, ALL, NONE), (1, ALL, NONE)],
            &[
                Alloc(1, None),
                Aligned(1, 2, None),
                Counts(0, 0),
                Free(1, 7, 3),
                Alloc(3, Some((1, 7, 0))),
            ],
        );
    }

    #[test]
    fn table_fragmented() {
        run_case(
            "holes in one chunk",
            &[(0, &[(0, 10), (12, 8), (30, 482)], NONE), (1, NONE, NONE)],
            &[
                Alloc(3, Some((0, 20, 0))),
                Alloc(2, Some((0, 10, 0))),
                Alloc(8, Some((1, 0, 0))),
                Alloc(7, Some((0, 23, 0))),
                Alloc(1, Some((1, 8, 0))),
                Counts(503, 0),
            ],
        );
        run_case(
            "a crossing run beats a later run inside a chunk",
            &[(0, &[(0, 500)], NONE), (1, &[(20, 20)], NONE)],
            &[
                Alloc(30, Some((0, 500, 0))),
                Alloc(25, Some((1, 40, 0))),
                Alloc(3, Some((1, 65, 0))),
                Alloc(2, Some((1, 18, 0))),
            ],
        );
    }

    #[test]
    fn table_chunk_crossing() {
        run_case(
            "388 pages across a boundary",
            &[
                (0, &[(0, 212)], NONE),
                (1, &[(88, 424)], NONE),
                (2, ALL, NONE),
            ],
            &[
                Alloc(389, None),
                Alloc(388, Some((0, 212, 0))),
                Counts(0, 0),
            ],
        );
        run_case(
            "300 pages: end of chunk 0 + start of chunk 1, after a smaller hole",
            &[(0, &[(0, 100), (200, 162)], NONE), (1, &[(150, 362)], NONE)],
            &[
                Alloc(300, Some((0, 362, 0))),
                Alloc(100, Some((0, 100, 0))),
                Alloc(1, None),
            ],
        );
        run_case(
            "runs of 512, 513, 1023",
            &[
                (0, &[(0, 256)], NONE),
                (1, &[(256, 256)], NONE),
                (2, NONE, ALL),
                (3, NONE, NONE),
                (4, NONE, NONE),
            ],
            &[
                Alloc(512, Some((0, 256, 0))),
                Alloc(513, Some((2, 0, 512))),
                Alloc(1024, None),
                Alloc(1023, Some((3, 1, 0))),
                Counts(0, 0),
            ],
        );
        run_case(
            "4095 pages over 8 chunks",
            &[
                (0, &[(0, 1)], NONE),
                (1, NONE, NONE),
                (2, NONE, NONE),
                (3, NONE, NONE),
                (4, NONE, NONE),
                (5, NONE, NONE),
                (6, NONE, NONE),
                (7, NONE, NONE),
            ],
            &[
                Alloc(4096, None),
                Alloc(4095, Some((0, 1, 0))),
                Free(0, 1, 2000),
                Alloc(2001, None),
                Alloc(2000, Some((0, 1, 0))),
            ],
        );
        // Chunks 60..68 cross a leaf block (8 chunks) and a level-3 block (64 chunks).
        run_case(
            "across level blocks",
            &[
                (59, ALL, NONE),
                (60, &[(0, 1)], NONE),
                (61, NONE, NONE),
                (62, NONE, NONE),
                (63, NONE, NONE),
                (64, NONE, NONE),
                (65, NONE, NONE),
                (66, NONE, NONE),
                (67, NONE, ALL),
                (68, &[(1, 511)], NONE),
            ],
            &[
                Alloc(8 * 512 + 1, None),
                Alloc(8 * 512, Some((60, 1, 512))),
                Counts(0, 0),
            ],
        );
    }

    #[test]
    fn table_noncontiguous() {
        run_case(
            "a run never bridges a gap",
            &[(0, &[(0, 412)], NONE), (2, &[(100, 412)], NONE)],
            &[
                Alloc(150, None),
                Alloc(100, Some((0, 412, 0))),
                Alloc(100, Some((2, 0, 0))),
                Alloc(1, None),
            ],
        );
        run_case(
            "two free chunks with a gap",
            &[(0, NONE, NONE), (2, NONE, NONE)],
            &[
                Alloc(513, None),
                Alloc(512, Some((0, 0, 0))),
                Alloc(512, Some((2, 0, 0))),
            ],
        );
    }

    #[test]
    fn table_aligned() {
        let rest: Vec<ChunkInit> = core::iter::once((0, &[(0usize, 1usize)][..], NONE))
            .chain((1..16).map(|c| (c, NONE, NONE)))
            .collect();
        run_case(
            "alignments 2..4096",
            &rest,
            &[
                Aligned(1, 2, Some((0, 2, 0))),
                Aligned(4, 8, Some((0, 8, 0))),
                Aligned(64, 64, Some((0, 64, 0))),
                Aligned(1, 512, Some((1, 0, 0))),
                Aligned(1, 4096, Some((8, 0, 0))),
                Aligned(2, 2, Some((0, 4, 0))),
                Aligned(1, 1, Some((0, 1, 0))),
                Aligned(512, 512, Some((2, 0, 0))),
            ],
        );
        run_case(
            "exact-size aligned holes are used (Go's padded search would skip them)",
            &[(0, &[(0, 8), (16, 16), (40, 472)], NONE), (1, NONE, NONE)],
            &[
                Aligned(8, 8, Some((0, 8, 0))),
                Aligned(8, 8, Some((0, 32, 0))),
                Aligned(8, 8, Some((1, 0, 0))),
            ],
        );
        run_case(
            "the padded fallback may skip a small aligned hole",
            &[(0, &[(0, 3), (10, 6), (24, 16), (100, 412)], NONE)],
            &[
                Aligned(4, 8, Some((0, 40, 0))),
                Aligned(8, 8, Some((0, 16, 0))),
                Aligned(60, 8, None),
                Aligned(52, 8, Some((0, 48, 0))),
            ],
        );
    }

    #[test]
    fn table_scavenged_accounting() {
        run_case(
            "scavenged bytes",
            &[(0, NONE, &[(0, 10), (20, 10)]), (1, NONE, ALL)],
            &[
                Counts(1024, 532),
                Alloc(25, Some((0, 0, 15))),
                Counts(999, 517),
                Alloc(5, Some((0, 25, 5))),
                Counts(994, 512),
                Free(0, 0, 25),
                Counts(1019, 512),
                Alloc(25, Some((0, 0, 0))),
                Alloc(600, Some((0, 30, 118))),
                Counts(394, 394),
            ],
        );
    }

    #[test]
    fn table_search_hint() {
        run_case(
            "freed low runs are found again",
            &[(0, NONE, NONE), (1, NONE, NONE)],
            &[
                Alloc(100, Some((0, 0, 0))),
                Alloc(100, Some((0, 100, 0))),
                Alloc(100, Some((0, 200, 0))),
                Free(0, 100, 100),
                Alloc(50, Some((0, 100, 0))),
                Alloc(60, Some((0, 300, 0))),
                Alloc(50, Some((0, 150, 0))),
                Free(0, 0, 10),
                Alloc(10, Some((0, 0, 0))),
                Alloc(1, Some((0, 360, 0))),
                Alloc(663, Some((0, 361, 0))),
                Alloc(1, None),
                Free(1, 500, 2),
                Free(0, 7, 1),
                Alloc(1, Some((0, 7, 0))),
                Alloc(1, Some((1, 500, 0))),
                Alloc(1, Some((1, 501, 0))),
                Alloc(1, None),
            ],
        );
    }

    #[test]
    fn search_hint_moves_and_stays_a_lower_bound() {
        let mut pa = setup(&[(0, NONE, NONE), (1, NONE, NONE), (3, NONE, NONE)]);
        assert_eq!(pa.search_addr, addr(BASE, 0));
        assert_eq!(pa.alloc(512), Some((addr(BASE, 0), 0)));
        assert_eq!(
            pa.search_addr,
            addr(BASE + 1, 0),
            "an allocation at the hint moves it past the run"
        );
        pa.alloc_range(addr(BASE + 1, 0), CHUNK_PAGES);
        // The slow path learns that chunks 0 and 1 are full.
        assert_eq!(pa.alloc(3), Some((addr(BASE + 3, 0), 0)));
        assert!(pa.search_addr >= addr(BASE + 3, 0));
        pa.check_invariants();
        pa.free(addr(BASE + 1, 9), 2);
        assert_eq!(pa.search_addr, addr(BASE + 1, 9));
        assert_eq!(pa.alloc(2), Some((addr(BASE + 1, 9), 0)));
        // Growth below the hint lowers it.
        pa.grow(&TestMem, addr(BASE - 5, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.search_addr, addr(BASE - 5, 0));
        assert_eq!(pa.alloc(1), Some((addr(BASE - 5, 0), PAGE_SIZE)));
        pa.check_invariants();
    }

    #[test]
    fn is_free_alloc_range_and_mark_scavenged() {
        let mut pa = new_pa();
        assert!(
            !pa.is_free(addr(BASE, 0), 1),
            "nothing is free before the first grow"
        );
        assert_eq!(pa.alloc(1), None);
        assert_eq!(pa.free_pages(), 0);
        pa.grow(&TestMem, addr(BASE, 0), 2 * CHUNK_SIZE).unwrap();
        pa.grow(&TestMem, addr(BASE + 3, 0), CHUNK_SIZE).unwrap();
        assert!(pa.is_free(addr(BASE, 0), 1024));
        assert!(
            !pa.is_free(addr(BASE, 0), 1025),
            "chunk BASE+2 is not in the heap"
        );
        assert!(!pa.is_free(addr(BASE + 2, 0), 1));
        assert!(!pa.is_free(addr(BASE, 0) + 1, 1), "unaligned");
        assert!(!pa.is_free(addr(BASE, 0), 0));
        assert!(!pa.is_free(ADDR_LIMIT - PAGE_SIZE, 2));
        assert_eq!(pa.alloc_range(addr(BASE, 500), 20), 20 * PAGE_SIZE);
        assert!(
            !pa.is_free(addr(BASE, 510), 1)
                && !pa.is_free(addr(BASE, 0), 501)
                && pa.is_free(addr(BASE, 0), 500)
        );
        assert_eq!(pa.scavenged_pages(), 1536 - 20);
        pa.free(addr(BASE, 500), 20);
        assert!(pa.is_free(addr(BASE, 0), 1024));
        assert_eq!(pa.scavenged_pages(), 1536 - 20, "free does not scavenge");
        // Scavenging: only free, unscavenged heap pages change.
        pa.alloc_range(addr(BASE, 505), 2);
        assert_eq!(pa.mark_scavenged(addr(BASE, 480), 60), 18);
        assert_eq!(pa.mark_scavenged(addr(BASE, 480), 60), 0);
        assert_eq!(
            pa.mark_scavenged(addr(BASE + 1, 500), 600),
            0,
            "outside the heap or already scavenged"
        );
        assert_eq!(pa.scavenged_pages(), 1536 - 2);
        assert_eq!(pa.free_pages(), 1536 - 2);
        pa.check_invariants();
        assert_eq!(pa.alloc(500), Some((addr(BASE, 0), 500 * PAGE_SIZE)));
        assert_eq!(pa.alloc(6), Some((addr(BASE, 507), 6 * PAGE_SIZE)));
        assert_eq!(pa.alloc(5), Some((addr(BASE, 500), 5 * PAGE_SIZE)));
        pa.check_invariants();
    }

    #[test]
    fn scavenge_return_says_when_a_chunk_became_wholly_free_and_scavenged() {
        let mut pa = new_pa();
        let mut runs = [(0, 0); 4];
        pa.grow(&TestMem, addr(BASE, 0), 2 * CHUNK_SIZE).unwrap();
        pa.alloc_range(addr(BASE, 0), 2 * CHUNK_PAGES);
        pa.free(addr(BASE + 1, 0), CHUNK_PAGES);
        pa.free(addr(BASE, 0), CHUNK_PAGES - 1);
        // Chunk BASE + 1 in two takes: clean only once the second run is back.
        assert_eq!(pa.scavenge_take(ScavPolicy::ALL, 300, &mut runs), (1, 300));
        assert_eq!(runs[0], (addr(BASE + 1, CHUNK_PAGES - 300), 300));
        assert!(
            !pa.scavenge_return(runs[0].0, runs[0].1),
            "half the chunk is dirty"
        );
        assert_eq!(pa.scavenge_take(ScavPolicy::ALL, 212, &mut runs), (1, 212));
        assert!(
            pa.scavenge_return(runs[0].0, runs[0].1),
            "the whole chunk is clean"
        );
        // Chunk BASE keeps one page allocated: never clean.
        assert_eq!(
            pa.scavenge_take(ScavPolicy::ALL, 1000, &mut runs),
            (1, CHUNK_PAGES - 1)
        );
        assert!(
            !pa.scavenge_return(runs[0].0, runs[0].1),
            "a page is in use"
        );
        pa.check_invariants();
    }

    #[test]
    fn scavenger_takes_old_free_runs_from_the_top_and_gives_them_back() {
        let mut pa = new_pa();
        let mut runs = [(0, 0); 4];
        assert_eq!(pa.scavenge_take(ScavPolicy::ALL, 100, &mut runs), (0, 0));
        pa.grow(&TestMem, addr(BASE, 0), 3 * CHUNK_SIZE).unwrap();
        assert_eq!(
            pa.scavenge_take(ScavPolicy::ALL, 100, &mut runs),
            (0, 0),
            "fresh memory is already scavenged"
        );
        pa.alloc_range(addr(BASE, 0), 3 * CHUNK_PAGES);
        pa.set_clock(1000);
        pa.free(addr(BASE, 10), 20);
        pa.free(addr(BASE + 2, 100), 64);
        pa.free(addr(BASE + 2, 300), 1);
        // Chunk BASE + 1 is dense: 8 free pages of 512.
        pa.free(addr(BASE + 1, 200), 8);
        pa.check_invariants();
        let at = |now| ScavPolicy {
            now,
            min_age: 1000,
            skip_dense: true,
        };
        assert_eq!(
            pa.scavenge_take(at(1999), 1000, &mut runs),
            (0, 0),
            "pages freed less than the delay ago stay"
        );
        // Highest first, limited to 30 pages: the top run, then the top of the next.
        assert_eq!(pa.scavenge_take(at(2000), 30, &mut runs), (2, 30));
        assert_eq!(runs[0], (addr(BASE + 2, 300), 1));
        assert_eq!(runs[1], (addr(BASE + 2, 135), 29));
        assert!(
            !pa.is_free(addr(BASE + 2, 135), 1),
            "taken runs are allocated"
        );
        pa.check_invariants();
        let free_before = pa.free_pages();
        pa.scavenge_return(runs[0].0, runs[0].1);
        pa.scavenge_return(runs[1].0, runs[1].1);
        assert_eq!(pa.free_pages(), free_before + 30);
        assert_eq!(pa.scavenged_pages(), 30);
        pa.check_invariants();
        // The next scan resumes: the rest of that chunk, then chunk BASE (the dense
        // chunk is skipped).
        assert_eq!(pa.scavenge_take(at(2000), 1000, &mut runs), (2, 55));
        assert_eq!(runs[0], (addr(BASE + 2, 100), 35));
        assert_eq!(runs[1], (addr(BASE, 10), 20));
        for &(a, n) in &runs[..2] {
            pa.scavenge_return(a, n);
        }
        assert_eq!(pa.scavenge_take(at(2000), 1000, &mut runs), (0, 0));
        // Forced: the dense chunk too.
        assert_eq!(pa.scavenge_take(ScavPolicy::ALL, 1000, &mut runs), (1, 8));
        assert_eq!(runs[0], (addr(BASE + 1, 200), 8));
        pa.scavenge_return(runs[0].0, runs[0].1);
        assert_eq!(pa.scavenged_pages(), 93);
        assert_eq!(pa.scavenged_pages(), pa.free_pages());
        pa.check_invariants();
        // Every chunk was visited with nothing left: no dirty marks remain.
        assert_eq!(pa.prev_dirty(usize::MAX), None);
        // A scavenged page that is allocated again and freed is dirty again.
        assert_eq!(pa.alloc_range(addr(BASE, 12), 2), 2 * PAGE_SIZE);
        pa.set_clock(5000);
        pa.free(addr(BASE, 12), 2);
        assert_eq!(pa.prev_dirty(usize::MAX), Some(BASE));
        assert_eq!(pa.scavenge_take(at(5500), 1000, &mut runs), (0, 0));
        assert_eq!(pa.scavenge_take(at(6000), 1000, &mut runs), (1, 2));
        // Page-cache blocks given back dirty mark their chunk too.
        pa.scavenge_return(runs[0].0, runs[0].1);
        let (base, pages, scav) = pa.alloc_to_cache().unwrap();
        let b = 1u64 << pages.trailing_zeros();
        pa.free_from_cache(base, pages & !b, scav & !b);
        assert_eq!(pa.prev_dirty(usize::MAX), None, "all still scavenged");
        // The cache used page `b`: it comes back dirty.
        pa.free_from_cache(base, b, 0);
        assert_eq!(pa.prev_dirty(usize::MAX), Some(base >> LOG_CHUNK_SIZE));
        pa.check_invariants();
    }

    #[test]
    fn highest_run_finds_the_top_run() {
        let mut b = [0u64; CHUNK_WORDS];
        assert_eq!(highest_run(&b), None);
        b[0] = 1;
        assert_eq!(highest_run(&b), Some((0, 1)));
        b[7] = 1 << 63;
        assert_eq!(highest_run(&b), Some((511, 512)));
        b = [!0; CHUNK_WORDS];
        assert_eq!(highest_run(&b), Some((0, 512)));
        b[3] = !(1 << 10);
        assert_eq!(highest_run(&b), Some((3 * 64 + 11, 512)));
        b = [0; CHUNK_WORDS];
        b[2] = 1 << 63;
        b[3] = 0b111;
        assert_eq!(highest_run(&b), Some((2 * 64 + 63, 3 * 64 + 3)));
    }

    #[test]
    fn page_cache_blocks_are_taken_and_given_back() {
        let mut pa = new_pa();
        assert_eq!(
            pa.alloc_to_cache(),
            None,
            "nothing to take before the first grow"
        );
        pa.grow(&TestMem, addr(BASE, 0), CHUNK_SIZE).unwrap();
        // Pages 0..3 and 5 used, 70 used, page 4 scavenged and free, the rest of the
        // first block free and not scavenged.
        assert_eq!(pa.alloc_range(addr(BASE, 0), 64), 64 * PAGE_SIZE);
        pa.alloc_range(addr(BASE, 70), 1);
        pa.free(addr(BASE, 4), 1);
        pa.free(addr(BASE, 6), 58);
        pa.mark_scavenged(addr(BASE, 4), 1);
        pa.check_invariants();
        let free0 = pa.free_pages();
        let (base, pages, scav) = pa.alloc_to_cache().unwrap();
        assert_eq!(base, addr(BASE, 0));
        assert_eq!(pages, !0b10_1111u64, "pages 4 and 6..64");
        assert_eq!(scav, 1 << 4);
        assert_eq!(pa.free_pages(), free0 - 59);
        assert!(!pa.is_free(addr(BASE, 4), 1) && !pa.is_free(addr(BASE, 63), 1));
        pa.check_invariants();
        // The next block starts at page 64, whose page 70 is used.
        let (b2, p2, s2) = pa.alloc_to_cache().unwrap();
        assert_eq!((b2, p2, s2), (addr(BASE, 64), !(1u64 << 6), !(1u64 << 6)));
        pa.check_invariants();
        // Give back part of the first block (page 4 still scavenged) and all of the
        // second: the allocator hands those pages out again, first fit.
        pa.free_from_cache(base, (1 << 4) | (1 << 9), 1 << 4);
        pa.free_from_cache(b2, p2, s2);
        pa.check_invariants();
        assert_eq!(pa.alloc(1), Some((addr(BASE, 4), PAGE_SIZE)));
        assert_eq!(pa.alloc(1), Some((addr(BASE, 9), 0)));
        assert_eq!(pa.alloc(2), Some((addr(BASE, 64), 2 * PAGE_SIZE)));
        pa.check_invariants();
    }

    // -- extremes -----------------------------------------------------------------------

    #[test]
    fn whole_root_entries_and_huge_runs() {
        let mut pa = new_pa();
        let root = 1usize << LEVEL_SHIFT[0]; // 16 GiB, 2^21 pages
        let base = 3 * root;
        pa.grow(&TestMem, base, root).unwrap();
        let r = pa.sum(0, 3);
        assert_eq!(r, Sum(ALL_FREE_FLAG));
        assert_eq!(
            (r.start(), r.max(), r.end()),
            (MAX_PACKED, MAX_PACKED, MAX_PACKED)
        );
        assert_eq!(pa.free_pages(), MAX_PACKED);
        assert_eq!(pa.alloc(MAX_PACKED + 1), None);
        assert_eq!(pa.alloc(MAX_PACKED), Some((base, root)));
        assert_eq!(pa.sum(0, 3), Sum::EMPTY);
        pa.free(base, MAX_PACKED);
        assert_eq!(pa.sum(0, 3), Sum(ALL_FREE_FLAG));
        // 600,000 pages (4.6 GiB) from a free root entry.
        assert_eq!(pa.alloc(600_000), Some((base, 0)));
        let rest = MAX_PACKED - 600_000;
        let r = pa.sum(0, 3);
        assert_eq!((r.start(), r.max(), r.end()), (0, rest, rest));
        // A second root entry right after: a run through all of it plus the first one's tail.
        pa.grow(&TestMem, 4 * root, root).unwrap();
        assert_eq!(pa.alloc(rest + MAX_PACKED + 1), None);
        // The first fit (entry 3's tail) rounded up to 2^21 pages is entry 4's start.
        assert_eq!(
            pa.alloc_aligned(rest + 1, 1 << 21),
            Some((4 * root, (rest + 1) * PAGE_SIZE))
        );
        pa.free(4 * root, rest + 1);
        let scav = (MAX_PACKED - rest - 1) * PAGE_SIZE;
        assert_eq!(
            pa.alloc(rest + MAX_PACKED),
            Some((base + 600_000 * PAGE_SIZE, scav))
        );
        assert_eq!(pa.free_pages(), 0);
        pa.free(base + 100 * PAGE_SIZE, 2 * MAX_PACKED - 200);
        assert_eq!(pa.alloc_aligned(1 << 20, 1 << 21), Some((4 * root, 0)));
        pa.check_invariants();
    }

    #[test]
    fn top_of_the_address_space() {
        let mut pa = new_pa();
        let top = ADDR_LIMIT - 4 * CHUNK_SIZE;
        assert_eq!(
            pa.grow(&TestMem, top, 8 * CHUNK_SIZE),
            Err(OsError::TooLarge)
        );
        assert_eq!(
            pa.grow(&TestMem, usize::MAX & !(CHUNK_SIZE - 1), CHUNK_SIZE),
            Err(OsError::TooLarge)
        );
        assert_eq!(pa.free_pages(), 0);
        pa.grow(&TestMem, top, 4 * CHUNK_SIZE).unwrap();
        assert_eq!(pa.alloc(2049), None);
        assert_eq!(pa.alloc(2048), Some((top, 2048 * PAGE_SIZE)));
        assert_eq!(pa.alloc(1), None);
        pa.free(ADDR_LIMIT - PAGE_SIZE, 1);
        assert!(pa.is_free(ADDR_LIMIT - PAGE_SIZE, 1) && !pa.is_free(ADDR_LIMIT - PAGE_SIZE, 2));
        assert_eq!(pa.alloc_aligned(1, 2), None);
        assert_eq!(pa.alloc(1), Some((ADDR_LIMIT - PAGE_SIZE, 0)));
        pa.check_invariants();
    }

    // -- summary memory -------------------------------------------------------------------

    #[test]
    fn summary_units_are_mapped_once_and_kept() {
        let mem = TrackingMem::new();
        let mut pa = new_pa();
        pa.grow(&mem, addr(BASE, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.alloc(10), Some((addr(BASE, 0), 10 * PAGE_SIZE)));
        // The root level (16 units) and one unit of each other level.
        assert_eq!(pa.mapped_units(), 16 + 4);
        // A neighbour shares every unit: nothing new is mapped, nothing is zeroed.
        pa.grow(&mem, addr(BASE + 1, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.mapped_units(), 20);
        assert_eq!(
            pa.sum(LEAF, BASE).start(),
            0,
            "the old leaf summary survived"
        );
        pa.check_invariants();
        // A leaf unit holds 1024 chunks; BASE is aligned to every unit.
        pa.grow(&mem, addr(BASE + 1024, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.mapped_units(), 21);
        pa.grow(&mem, addr(BASE - 1, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.mapped_units(), 25);
        // Far away (just below 2^47), then a region over several leaf units, then one
        // that fills the gap between two others.
        pa.grow(&mem, (1 << 47) - CHUNK_SIZE, 2 * CHUNK_SIZE)
            .unwrap();
        assert_eq!(
            pa.mapped_units(),
            25 + 8,
            "2^47 is a unit boundary in each of the 4 lower levels"
        );
        pa.grow(&mem, addr(2 * BASE, 0), 3000 * CHUNK_SIZE).unwrap();
        assert_eq!(
            pa.mapped_units(),
            33 + 3 + 1 + 1 + 1,
            "3000 chunks span 3 leaf units"
        );
        pa.grow(&mem, addr(BASE + 2, 0), 1022 * CHUNK_SIZE).unwrap();
        assert_eq!(pa.mapped_units(), 39);
        pa.check_invariants();
        assert_eq!(
            pa.alloc(1022 * 512 + 510 + 512),
            Some((addr(BASE, 10), (1022 * 512 + 510 + 512) * PAGE_SIZE))
        );
        pa.check_invariants();
    }

    #[test]
    fn failed_grow_changes_nothing() {
        let mut failures = 0;
        for k in 0..12 {
            let mem = TrackingMem::failing_at(k);
            let mut pa = new_pa();
            match pa.grow(&mem, addr(BASE, 0), 2 * CHUNK_SIZE) {
                Ok(()) => assert!(k >= 8, "the first grow makes 8 reserve/map calls"),
                Err(e) => {
                    failures += 1;
                    assert_eq!(e, OsError::NoMemory(12));
                    assert_eq!((pa.free_pages(), pa.scavenged_pages()), (0, 0));
                    assert!(!pa.is_free(addr(BASE, 0), 1));
                    assert_eq!(pa.alloc(1), None);
                    pa.check_invariants();
                    pa.grow(&mem, addr(BASE, 0), 2 * CHUNK_SIZE).unwrap();
                }
            }
            assert_eq!(pa.alloc(1000), Some((addr(BASE, 0), 1000 * PAGE_SIZE)));
            // A second grow, far away, failing at its k-th call.
            mem.fail_in(k);
            let far = 0x7000_0000_0000;
            match pa.grow(&mem, far, CHUNK_SIZE) {
                Ok(()) => assert!(k >= 6),
                Err(_) => {
                    failures += 1;
                    assert_eq!((pa.free_pages(), pa.scavenged_pages()), (24, 24));
                    assert!(!pa.is_free(far, 1));
                    assert_eq!(pa.alloc(25), None);
                    pa.check_invariants();
                    pa.grow(&mem, far, CHUNK_SIZE).unwrap();
                }
            }
            assert_eq!(pa.alloc(25), Some((far, 25 * PAGE_SIZE)));
            pa.check_invariants();
        }
        assert_eq!(failures, 8 + 6);
    }

    #[test]
    fn const_constructible_and_send() {
        static HEAP: Mutex<PageAlloc> = Mutex::new(PageAlloc::new());
        fn assert_send<T: Send>() {}
        assert_send::<PageAlloc>();
        let mut pa = HEAP.lock().unwrap();
        pa.grow(&TestMem, addr(3 * BASE, 0), CHUNK_SIZE).unwrap();
        assert_eq!(pa.alloc(3), Some((addr(3 * BASE, 0), 3 * PAGE_SIZE)));
        drop(pa);
        // A grown allocator moves to another thread with its metadata.
        let mut other = new_pa();
        other
            .grow(&TestMem, addr(3 * BASE + 8, 0), CHUNK_SIZE)
            .unwrap();
        let got = std::thread::spawn(move || other.alloc(512)).join().unwrap();
        assert_eq!(got, Some((addr(3 * BASE + 8, 0), CHUNK_SIZE)));
    }

    // -- randomized differential test ---------------------------------------------------

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in `0..n` (n > 0).
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The obvious page allocator: per-chunk bit arrays, first fit by linear scan.
    struct RefHeap {
        /// (chunk index, alloc bits, scavenged bits), sorted by chunk index.
        chunks: Vec<(usize, [u64; CHUNK_WORDS], [u64; CHUNK_WORDS])>,
    }

    impl RefHeap {
        fn pos(&self, ci: usize) -> Option<usize> {
            self.chunks.binary_search_by_key(&ci, |c| c.0).ok()
        }
        fn grow(&mut self, c0: usize, n: usize) {
            for ci in c0..c0 + n {
                let at = self.chunks.binary_search_by_key(&ci, |c| c.0).unwrap_err();
                self.chunks
                    .insert(at, (ci, [0; CHUNK_WORDS], [!0; CHUNK_WORDS]));
            }
        }
        /// Calls `f(used, scav)` with the bit pair of every page of `[p, p + n)` that is
        /// in the heap; returns how many pages were outside it.
        fn each_page(
            &mut self,
            p: usize,
            n: usize,
            mut f: impl FnMut(&mut bool, &mut bool),
        ) -> usize {
            let mut outside = 0;
            for (ci, s, e) in (ChunkSpans { p, end: p + n }) {
                let Some(i) = self.pos(ci) else {
                    outside += e - s;
                    continue;
                };
                let c = &mut self.chunks[i];
                for q in s..e {
                    let (w, b) = (q / 64, q % 64);
                    let (mut used, mut scav) = (c.1[w] >> b & 1 != 0, c.2[w] >> b & 1 != 0);
                    f(&mut used, &mut scav);
                    c.1[w] = (c.1[w] & !(1 << b)) | (used as u64) << b;
                    c.2[w] = (c.2[w] & !(1 << b)) | (scav as u64) << b;
                }
            }
            outside
        }
        fn first_fit(&self, n: usize) -> Option<usize> {
            let (mut run, mut run_start, mut prev) = (0, 0, usize::MAX);
            for (ci, used, _) in &self.chunks {
                if prev.wrapping_add(1) != *ci {
                    run = 0; // a gap in the heap
                }
                prev = *ci;
                for (w, &word) in used.iter().enumerate() {
                    let p0 = ci * CHUNK_PAGES + w * 64;
                    if word == !0 {
                        run = 0;
                    } else if word == 0 && run + 64 < n {
                        if run == 0 {
                            run_start = p0;
                        }
                        run += 64;
                    } else {
                        // Bit by bit (a `while` loop: much faster than a range
                        // iterator in unoptimised builds).
                        let mut b = 0;
                        while b < 64 {
                            if word >> b & 1 != 0 {
                                run = 0;
                            } else {
                                if run == 0 {
                                    run_start = p0 + b;
                                }
                                run += 1;
                                if run >= n {
                                    return Some(run_start);
                                }
                            }
                            b += 1;
                        }
                    }
                }
            }
            None
        }
        fn is_free(&mut self, p: usize, n: usize) -> bool {
            let mut free = true;
            let outside = self.each_page(p, n, |used, _| free &= !*used);
            free && outside == 0
        }
        fn alloc_range(&mut self, p: usize, n: usize) -> usize {
            let mut scav = 0;
            let outside = self.each_page(p, n, |used, s| {
                assert!(!*used);
                scav += *s as usize;
                (*used, *s) = (true, false);
            });
            assert_eq!(outside, 0);
            scav * PAGE_SIZE
        }
        fn free(&mut self, p: usize, n: usize) {
            let outside = self.each_page(p, n, |used, s| {
                assert!(*used && !*s);
                *used = false;
            });
            assert_eq!(outside, 0);
        }
        fn mark_scavenged(&mut self, p: usize, n: usize) -> usize {
            let mut changed = 0;
            let n = n.min((ADDR_LIMIT >> PAGE_SHIFT) - p);
            self.each_page(p, n, |used, s| {
                if !*used && !*s {
                    *s = true;
                    changed += 1;
                }
            });
            changed
        }
        fn alloc(&mut self, n: usize) -> Option<(usize, usize)> {
            let p = self.first_fit(n)?;
            Some((p * PAGE_SIZE, self.alloc_range(p, n)))
        }
        /// The documented semantics of `alloc_aligned`.
        fn alloc_aligned(&mut self, n: usize, align: usize) -> Option<(usize, usize)> {
            let f = self.first_fit(n)?;
            let a = f.next_multiple_of(align);
            if self.is_free(a, n) {
                return Some((a * PAGE_SIZE, self.alloc_range(a, n)));
            }
            let a = self.first_fit(n + align - 1)?.next_multiple_of(align);
            Some((a * PAGE_SIZE, self.alloc_range(a, n)))
        }
        fn counts(&self) -> (usize, usize) {
            let mut f = 0;
            let mut s = 0;
            for (_, u, sc) in &self.chunks {
                f += u.iter().map(|w| w.count_zeros() as usize).sum::<usize>();
                s += sc.iter().map(|w| w.count_ones() as usize).sum::<usize>();
            }
            (f, s)
        }
    }

    #[test]
    fn reference_heap_is_sane() {
        // The reference itself, on a hand-checked case: a gap stops runs.
        let mut r = RefHeap { chunks: Vec::new() };
        r.grow(10, 1);
        r.grow(12, 2);
        assert_eq!(r.first_fit(513), Some(12 * 512));
        assert_eq!(r.alloc(3), Some((addr(10, 0), 3 * PAGE_SIZE)));
        assert_eq!(r.alloc_aligned(2, 4), Some((addr(10, 4), 2 * PAGE_SIZE)));
        assert_eq!(r.first_fit(510), Some(12 * 512));
        r.free(10 * 512, 3);
        assert_eq!(r.first_fit(4), Some(10 * 512));
        assert_eq!(r.counts(), (1536 - 2, 1536 - 5));
    }

    /// A place where the random test grows the heap: chunk `next` onwards (up) or
    /// chunks below `next` (down).
    struct Cursor {
        next: usize,
        up: bool,
    }

    const RANDOM_OPS: usize = 150_000;
    const MAX_CHUNKS: usize = 72;
    const CHECK_EVERY: usize = 128;

    #[test]
    fn randomized_against_reference() {
        let mut rng = Rng(0x5EED_2024);
        let mem = TrackingMem::new();
        let mut pa = new_pa();
        let mut rf = RefHeap { chunks: Vec::new() };
        let mut live: Vec<(usize, usize)> = Vec::new(); // (address, pages)
        let mut cursors = [
            Cursor {
                next: BASE,
                up: true,
            },
            // Leaves chunk BASE-1 a permanent gap.
            Cursor {
                next: BASE - 1,
                up: false,
            },
            // Grows toward cursor 0's region; the two may meet and become contiguous.
            Cursor {
                next: BASE + 40,
                up: false,
            },
            // Crosses an L2 array and root entry boundary after two chunks.
            Cursor {
                next: 5 * L2_ENTRIES - 2,
                up: true,
            },
            // Crosses 2^47.
            Cursor {
                next: (1 << 47 >> LOG_CHUNK_SIZE) - 3,
                up: true,
            },
            // Ends at the top of the address space.
            Cursor {
                next: CHUNK_COUNT,
                up: false,
            },
        ];
        #[derive(Default, Debug)]
        struct Stats {
            allocs: usize,
            misses: usize,
            aligned: usize,
            crossing: usize,
            multi_chunk: usize,
            frees: usize,
            grows: usize,
            scav_bytes: usize,
            scav_taken: usize,
            ranges: usize,
        }
        let mut st = Stats::default();

        let mut grow = |pa: &mut PageAlloc, rf: &mut RefHeap, rng: &mut Rng, st: &mut Stats| {
            if rf.chunks.len() >= MAX_CHUNKS {
                return;
            }
            let c = if rng.below(2) == 0 {
                0
            } else {
                rng.below(cursors.len())
            };
            let cur = &mut cursors[c];
            let lim = if rng.below(4) == 0 { 8 } else { 3 };
            let want = (1 + rng.below(lim)).min(MAX_CHUNKS - rf.chunks.len());
            // Clip at chunks already in the heap and at the address-space ends.
            let mut n = 0;
            while n < want {
                let ci = if cur.up {
                    cur.next + n
                } else {
                    cur.next.wrapping_sub(n + 1)
                };
                if ci >= CHUNK_COUNT || rf.pos(ci).is_some() {
                    break;
                }
                n += 1;
            }
            if n == 0 {
                return;
            }
            let c0 = if cur.up { cur.next } else { cur.next - n };
            pa.grow(&mem, c0 * CHUNK_SIZE, n * CHUNK_SIZE).unwrap();
            rf.grow(c0, n);
            cur.next = if cur.up { cur.next + n } else { cur.next - n };
            st.grows += 1;
        };

        grow(&mut pa, &mut rf, &mut rng, &mut st);
        for op in 0..RANDOM_OPS {
            let r = rng.below(1000);
            if r < 460 {
                // Allocate.
                let n = match rng.below(100) {
                    0..=64 => 1 + rng.below(16),
                    65..=86 => 17 + rng.below(584),
                    87..=95 => 600 + rng.below(1400),
                    _ => 1000 + rng.below(4001),
                };
                let align = if rng.below(8) == 0 {
                    [2, 4, 8, 16, 64, 512, 4096][rng.below(7)]
                } else {
                    1
                };
                let (got, want) = if align > 1 {
                    (pa.alloc_aligned(n, align), rf.alloc_aligned(n, align))
                } else {
                    (pa.alloc(n), rf.alloc(n))
                };
                assert_eq!(got, want, "op {op}: alloc {n} pages aligned {align}");
                match got {
                    Some((a, s)) => {
                        st.allocs += 1;
                        st.scav_bytes += s;
                        st.aligned += (align > 1) as usize;
                        let p = (a / PAGE_SIZE) % CHUNK_PAGES;
                        st.crossing += (p + n > CHUNK_PAGES) as usize;
                        st.multi_chunk += (n > CHUNK_PAGES) as usize;
                        live.push((a, n));
                    }
                    None => {
                        st.misses += 1;
                        if rng.below(2) == 0 {
                            grow(&mut pa, &mut rf, &mut rng, &mut st);
                        }
                    }
                }
            } else if r < 920 {
                // Free a live run: whole, or its head or tail.
                if live.is_empty() {
                    continue;
                }
                let i = if r < 900 {
                    rng.below(live.len())
                } else {
                    (0..live.len()).min_by_key(|&i| live[i].0).unwrap()
                };
                let (a, n) = live[i];
                if n >= 2 && rng.below(5) == 0 {
                    let k = 1 + rng.below(n - 1);
                    if rng.below(2) == 0 {
                        pa.free(a, k);
                        rf.free(a / PAGE_SIZE, k);
                        live[i] = (a + k * PAGE_SIZE, n - k);
                    } else {
                        pa.free(a + k * PAGE_SIZE, n - k);
                        rf.free(a / PAGE_SIZE + k, n - k);
                        live[i] = (a, k);
                    }
                } else {
                    pa.free(a, n);
                    rf.free(a / PAGE_SIZE, n);
                    live.swap_remove(i);
                }
                st.frees += 1;
            } else if r < 935 {
                // The scavenger: take free unscavenged runs, check them against the
                // reference, give them back scavenged.
                pa.set_clock(op as u32);
                let policy = if rng.below(2) == 0 {
                    ScavPolicy::ALL
                } else {
                    ScavPolicy {
                        now: op as u32,
                        min_age: rng.below(2000) as u32,
                        skip_dense: rng.below(2) == 0,
                    }
                };
                let mut runs = [(0, 0); 8];
                let max = 1 + rng.below(3000);
                let (n, pages) = pa.scavenge_take(policy, max, &mut runs);
                assert!(pages <= max);
                let mut sum = 0;
                for &(a, np) in &runs[..n] {
                    let p = a / PAGE_SIZE;
                    assert!(rf.is_free(p, np), "op {op}: scavenger took used pages");
                    assert_eq!(rf.alloc_range(p, np), 0, "op {op}: took scavenged pages");
                    sum += np;
                }
                assert_eq!(sum, pages);
                if rng.below(4) == 0 {
                    pa.check_invariants();
                }
                for &(a, np) in &runs[..n] {
                    pa.scavenge_return(a, np);
                    rf.free(a / PAGE_SIZE, np);
                    assert_eq!(rf.mark_scavenged(a / PAGE_SIZE, np), np);
                }
                st.scav_taken += pages;
            } else if r < 950 {
                // Scavenge part of the heap.
                let ci = rf.chunks[rng.below(rf.chunks.len())].0;
                let p = ci * CHUNK_PAGES + rng.below(CHUNK_PAGES);
                let n = 1 + rng.below(1000);
                assert_eq!(
                    pa.mark_scavenged(p * PAGE_SIZE, n),
                    rf.mark_scavenged(p, n),
                    "op {op}: scavenge"
                );
            } else if r < 990 {
                // Query a range near the heap, and sometimes take it.
                let lim = if rng.below(4) == 0 { 1200 } else { 20 };
                let n = 1 + rng.below(lim);
                let p = match rf.first_fit(n) {
                    // Around a free run (often not its first fit: alloc_range takes any).
                    Some(f) if rng.below(2) == 0 => (f + rng.below(4)).saturating_sub(1),
                    _ => {
                        let ci = (rf.chunks[rng.below(rf.chunks.len())].0 + rng.below(3))
                            .saturating_sub(1);
                        ci * CHUNK_PAGES + rng.below(CHUNK_PAGES)
                    }
                };
                let free = rf.is_free(p, n);
                assert_eq!(
                    pa.is_free(p * PAGE_SIZE, n),
                    free,
                    "op {op}: is_free({p:#x}, {n})"
                );
                if free && rng.below(2) == 0 {
                    assert_eq!(
                        pa.alloc_range(p * PAGE_SIZE, n),
                        rf.alloc_range(p, n),
                        "op {op}: alloc_range"
                    );
                    live.push((p * PAGE_SIZE, n));
                    st.ranges += 1;
                }
            } else {
                grow(&mut pa, &mut rf, &mut rng, &mut st);
            }
            if op % CHECK_EVERY == 0 || op + 1 == RANDOM_OPS {
                pa.check_invariants();
                assert_eq!(
                    (pa.free_pages(), pa.scavenged_pages()),
                    rf.counts(),
                    "op {op}: counters"
                );
                for (ci, used, scav) in &rf.chunks {
                    assert_eq!(
                        pa.chunk_bits(*ci),
                        Some((*used, *scav)),
                        "op {op}: bitmaps of chunk {ci:#x}"
                    );
                }
            }
        }
        std::println!("{st:?}, {} chunks", rf.chunks.len());
        // The run covered what it is meant to cover.
        assert!(
            st.allocs > 50_000 && st.misses > 1_000 && st.frees > 50_000,
            "{st:?}"
        );
        assert!(
            st.aligned > 5_000 && st.crossing > 3_000 && st.multi_chunk > 500,
            "{st:?}"
        );
        assert!(
            st.grows >= 20 && st.ranges > 500 && st.scav_bytes > 0,
            "{st:?}"
        );
        assert_eq!(rf.chunks.len(), MAX_CHUNKS);
        assert!(rf.pos(BASE - 1).is_none(), "the gap stayed a gap");
        assert!(rf.pos(CHUNK_COUNT - 1).is_some() && rf.pos(1 << 47 >> LOG_CHUNK_SIZE).is_some());
    }
}

#[cfg(test)]
mod find_zero_run_tests {
    use super::find_zero_run;

    #[test]
    fn matches_a_bit_by_bit_search() {
        let naive = |x: u64, n: usize| {
            (0..=64 - n)
                .find(|&i| (i..i + n).all(|b| x >> b & 1 == 0))
                .unwrap_or(64)
        };
        let mut r = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            // Sparse and dense words, and long zero runs.
            let x = match r % 4 {
                0 => r,
                1 => r & (r >> 3) & (r >> 7),
                2 => r | (r >> 5),
                _ => (r & 0xF0F0_0000_0000_0F0F) << (r % 9),
            };
            for n in 1..=64 {
                assert_eq!(find_zero_run(x, n), naive(x, n), "x={x:#018x} n={n}");
            }
        }
        let naive_longest = |x: u64| {
            (0..64)
                .filter(|&i| x >> i & 1 == 0)
                .map(|i| (i..64).take_while(|&b| x >> b & 1 == 0).count())
                .max()
                .unwrap_or(0)
        };
        r = 99;
        for _ in 0..50_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            for x in [
                r,
                r & (r >> 9),
                r | (r >> 3),
                r << (r % 64),
                !(r << (r % 64)),
                r & 0x8000_0000_0000_0001,
            ] {
                assert_eq!(super::longest_zero_run(x), naive_longest(x), "x={x:#018x}");
            }
        }
        assert_eq!(super::longest_zero_run(0), 64);
        assert_eq!(super::longest_zero_run(!0), 0);
        assert_eq!(find_zero_run(0, 64), 0);
        assert_eq!(find_zero_run(1, 64), 64);
        assert_eq!(find_zero_run(!0, 1), 64);
    }
}
