//! The page allocator: which heap pages are free, and address-ordered first-fit search
//! for runs of free pages (the design of Go's `mpagealloc.go`, proposal 35112,
//! "scaling the page allocator").
//!
//! This file holds [`PageAlloc`] itself: the chunk map, the radix tree of summaries
//! over it, the search, growth, `alloc` / `free` and the entry points of the threads'
//! page and chunk caches. The other concepts of the design have a file each, cut as Go
//! cuts them:
//!
//! * `bits.rs` (Go's `mpallocbits.go`): one chunk's alloc and scavenged bitmaps and
//!   the bit operations and searches over them.
//! * `scav.rs` (the scavenge index of Go's `mgcscavenge.go`): the dirty marks and free
//!   stamps of the chunks, and the scavenger's methods on `PageAlloc` in their own
//!   `impl` block.
//! * `tests.rs`: the unit tests of all three, with the test-only `check_invariants`.
//!   (The tests of the two single-word bit searches stay at the end of `bits.rs`,
//!   next to the private functions they test.)
//!
//! The `PageAlloc` struct and the chunk map's L2 arrays are declared here, fields of
//! the scavenger's index included, so that the struct stays one place to read.
//!
//! # Locking
//!
//! A [`PageAlloc`] is plain, unsynchronised memory. It is always used under the heap
//! lock: its owner keeps it inside a mutex, and every method that changes it takes
//! `&mut self`, which is the proof that the lock is held. No atomics are needed. The
//! same holds in the child modules: the chunk bitmaps and the scavenger's index are
//! parts of one `PageAlloc` and are only reached through it.
//!
//! # Design
//!
//! * **Chunks.** The address space is cut into 4 MiB chunks of [`CHUNK_PAGES`] = 512
//!   heap pages. Each chunk that belongs to the heap ("grown") has two 512-bit bitmaps,
//!   `alloc` and `scav` (`bits.rs` says what their bits mean).
//!   Chunk records live in a two-level sparse array over the 2^26 chunks of the 48-bit
//!   address space: a fixed L1 array of 2^13 pointers (a field of the struct) to L2
//!   arrays of 2^13 chunk records, each L2 array obtained with
//!   [`MemSource::alloc_meta`] the first time a chunk it covers is grown, never freed.
//!   An L2 array also holds a bitmap of which of its chunks are grown, and the
//!   scavenger's index of its chunks (`scav.rs`).
//!
//! * **Summaries.** A radix tree of five levels (radix bits 14, 3, 3, 3, 3, as Go uses
//!   on 64-bit) sits over the chunks. Each entry summarises a power-of-two region of
//!   address space with three numbers packed into a `u64`: `start` (free pages at the
//!   beginning of the region), `max` (the longest run of free pages inside it) and
//!   `end` (free pages at its end). A leaf entry covers one chunk; a root entry covers
//!   16 GiB = 2^21 pages. Entries are numbered by address at each level, so the
//!   children of entry `i` are entries `8i .. 8i+8` of the next level, stored side by
//!   side: 64 bytes in one cache line. The root level is one array of 2^14 entries, so
//!   that a search may read any root entry. Below it the tree is stored by *region*,
//!   the 16 GiB a root entry covers: one block per region holds that region's entries
//!   of the four lower levels (8 + 64 + 512 + 4,096 entries, 37 KiB), made the first
//!   time a chunk of the region is grown, never freed, and found through a pointer
//!   kept beside the region's root entry (256 KiB for both). Root array and blocks
//!   come from [`MemSource::alloc_meta`] (lazily backed: a block's pages are touched
//!   only as its entries are written), except in the process-wide heap, where the root
//!   array and the block of the first arenas' region are a [`FixedSummary`] in `.bss`.
//!   (Go reserves the five levels as flat arrays, 585 MiB of address space, and maps
//!   pieces of them; spanheap did too. Blocks cost no reservation, which a process
//!   under `RLIMIT_AS` would pay from its first allocation, and no `mmap` at start-up.)
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
//! * **Scavenging.** Free pages start dirty; the scavenger finds them through a
//!   per-chunk index and returns them to the OS (`scav.rs` describes how).
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
//! 6. The root array exists once anything was grown, and the block of every region
//!    with a grown chunk exists; a region's block is made at most once.
//! 7. A chunk with free pages that are not scavenged has its dirty mark set.

mod bits;
mod scav;
#[cfg(test)]
mod tests;

use core::ptr;

use crate::os::{MemSource, OsError, ADDR_LIMIT, PAGE_SHIFT, PAGE_SIZE};

use bits::Chunk;
pub(crate) use scav::ScavPolicy;

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
/// Words of the bitmap of nonzero root entries.
const ROOT_WORDS: usize = LEVEL_ENTRIES[0] / 64;
/// log2 of the address space one root entry covers (16 GiB): the region of an
/// address is `address >> ROOT_REGION_SHIFT`.
pub(crate) const ROOT_REGION_SHIFT: u32 = LEVEL_SHIFT[0];
/// Entries of the root level.
const ROOT_ENTRIES: usize = LEVEL_ENTRIES[0];
/// Word offset of each lower level's entries in a region's block (index 0 unused): 8
/// entries of level 1, then 64 of level 2, 512 of level 3 and 4,096 leaves.
const REGION_OFFSET: [usize; LEVELS] = region_offsets();
/// Words of a region's block (37 KiB).
const REGION_WORDS: usize = REGION_OFFSET[LEAF] + per_region(LEAF);

/// Entries of level `l` (1..LEVELS) under one root entry: 8^l.
const fn per_region(l: usize) -> usize {
    1 << (3 * l)
}

const fn region_offsets() -> [usize; LEVELS] {
    let mut o = [0; LEVELS];
    let mut l = 2;
    while l < LEVELS {
        o[l] = o[l - 1] + per_region(l - 1);
        l += 1;
    }
    o
}

/// A root-level summary and the block of its region's lower levels (null where no
/// chunk of the region was ever grown), side by side: the two are used together, and
/// a heap's first growth then touches one OS page for both instead of one each.
#[repr(C)]
#[derive(Clone, Copy)]
struct Root {
    sum: u64,
    block: *mut u64,
}

/// Zero-initialised storage for a page allocator's root array (with its region
/// table) and one region's block, so that a heap living in that region obtains no
/// summary memory at all: the process-wide heap's, whose first arenas go to
/// `mheap::FIRST_ARENA_HINT` (region 40). A static of this type is in `.bss`: pages the
/// kernel maps zero-filled with the program, touched only as entries are written.
/// (Start-up: summary memory cost four `mmap`s and a 585 MiB reservation in every
/// process, docs/design.md.)
#[repr(C, align(64))]
pub(crate) struct FixedSummary {
    root: core::cell::UnsafeCell<[Root; ROOT_ENTRIES]>,
    block: core::cell::UnsafeCell<[u64; REGION_WORDS]>,
}

// SAFETY: the storage is only reached through the one `PageAlloc` built on it
// (`PageAlloc::with_fixed`'s contract), under whatever protects that `PageAlloc`.
unsafe impl Sync for FixedSummary {}

impl FixedSummary {
    pub(crate) const fn new() -> Self {
        FixedSummary {
            root: core::cell::UnsafeCell::new(
                [Root {
                    sum: 0,
                    block: ptr::null_mut(),
                }; ROOT_ENTRIES],
            ),
            block: core::cell::UnsafeCell::new([0; REGION_WORDS]),
        }
    }
}

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

const _: () = {
    assert!(LEVEL_SHIFT[0] + LEVEL_BITS[0] == 48 && ADDR_LIMIT == 1 << 48);
    assert!(LEVEL_ENTRIES[0] == 1 << LEVEL_BITS[0] && LEVEL_ENTRIES[LEAF] == CHUNK_COUNT);
    // Every level below the root has 8 children per parent (`merge` takes 8).
    assert!(LEVEL_BITS[1] == 3 && LEVEL_BITS[2] == 3 && LEVEL_BITS[3] == 3);
    assert!(LEVEL_BITS[4] == 3);
    // A region's entries of each level start 64-byte aligned in its block, so that
    // 8 siblings are one cache line.
    assert!(REGION_OFFSET[2] % 8 == 0 && REGION_OFFSET[3] % 8 == 0);
    assert!(REGION_OFFSET[4] % 8 == 0 && REGION_WORDS * 8 % 64 == 0);
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
// The chunk map
// ---------------------------------------------------------------------------------

/// One second-level array of the chunk map: the chunks of 32 GiB of address space.
#[repr(C)]
struct L2 {
    /// Bit `k` set: chunk `k` of this array has been grown into the heap.
    grown: [u64; L2_ENTRIES / 64],
    /// Bit `k` set: chunk `k` may hold free pages that are not scavenged (set when
    /// pages are freed into it, cleared by the scavenger when it finds none): the
    /// scavenger's index, so that a pass visits only chunks with work (Go's
    /// `scavengeIndex`).
    dirty: [u64; L2_ENTRIES / 64],
    /// The chunk records; meaningful only for grown chunks. After the two bitmaps, so
    /// that growing the heap's first chunks touches one OS page of this array, not two.
    chunks: [Chunk; L2_ENTRIES],
    /// Clock (milliseconds, wrapping) of the last free into chunk `k`: the scavenger
    /// leaves chunks alone until their pages have stayed free for its delay.
    freed_at: [u32; L2_ENTRIES],
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
    /// The root level's [`ROOT_ENTRIES`] summaries, each with its region's block
    /// ([`REGION_WORDS`] summaries of the lower levels); null before the first grow.
    root: *mut Root,
    /// A zero-filled block to use for region `fixed_region` when it is first needed
    /// (a [`FixedSummary`]'s), or null.
    fixed_block: *mut u64,
    fixed_region: usize,
    /// Bit `i` set: root entry `i` is nonzero (has a free page). Lets a search skip
    /// the empty root entries in a few word operations.
    root_free: [u64; ROOT_WORDS],
    /// Search hint: every heap page below this address is allocated. [`ADDR_LIMIT`]
    /// while nothing was ever grown.
    search_addr: usize,
    /// One past the highest chunk index ever grown (0 before the first grow): an upper
    /// bound of the grown chunks (a [`shrink`](Self::shrink) leaves it). Bounds the
    /// scan of the root level.
    end_chunk: usize,
    /// Free pages in the heap.
    free: usize,
    /// Free pages whose scavenged bit is set.
    scav: usize,
    /// Pages of all grown chunks.
    total: usize,
    /// Lowest chunk index ever grown (`usize::MAX` before the first grow): a lower
    /// bound of the grown chunks, as `end_chunk` is an upper one.
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
            root: ptr::null_mut(),
            fixed_block: ptr::null_mut(),
            fixed_region: 0,
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

    /// An empty page allocator whose root array and block of region
    /// `region` are `storage` (no summary memory obtained while the heap stays there).
    ///
    /// # Safety
    /// `storage` is zero-filled, used by this `PageAlloc` alone, and lives as long as
    /// it (a static).
    pub(crate) const unsafe fn with_fixed(storage: &'static FixedSummary, region: usize) -> Self {
        let mut pa = Self::new();
        pa.root = storage.root.get().cast::<Root>();
        pa.fixed_block = storage.block.get().cast::<u64>();
        pa.fixed_region = region;
        pa
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

    /// The block of region `r` (null if none was made).
    #[inline]
    fn region_block(&self, r: usize) -> *mut u64 {
        if self.root.is_null() || r >= ROOT_ENTRIES {
            return ptr::null_mut();
        }
        // SAFETY: `root` holds ROOT_ENTRIES entries (obtained in `grow` or given to
        // `with_fixed`), owned by `self`.
        unsafe { (*self.root.add(r)).block }
    }

    /// A pointer to entry `i` of level `l` if that entry exists and its storage does.
    #[inline]
    fn sum_ptr(&self, l: usize, i: usize) -> Option<*mut u64> {
        if i >= LEVEL_ENTRIES[l] {
            return None;
        }
        if l == 0 {
            // SAFETY: the root array holds ROOT_ENTRIES words and i < ROOT_ENTRIES.
            return (!self.root.is_null())
                .then(|| unsafe { ptr::addr_of_mut!((*self.root.add(i)).sum) });
        }
        let b = self.region_block(i / per_region(l));
        // SAFETY: a block holds REGION_WORDS words; the offset is below
        // REGION_OFFSET[l] + per_region(l) <= REGION_WORDS.
        (!b.is_null()).then(|| unsafe { b.add(REGION_OFFSET[l] + i % per_region(l)) })
    }

    /// Entry `i` of level `l`. Only entries with storage are ever read (invariant 6);
    /// one without reads as "no free pages".
    #[inline]
    fn sum(&self, l: usize, i: usize) -> Sum {
        match self.sum_ptr(l, i) {
            // SAFETY: an entry of our root array or of a region block, 8-aligned, only
            // accessed under `&self`.
            Some(p) => Sum(unsafe { p.read() }),
            None => {
                debug_assert!(false, "read of a summary without storage ({l}, {i})");
                Sum::EMPTY
            }
        }
    }

    /// The 8 sibling entries `first..first + 8` of level `l` (`first` a multiple of 8),
    /// with one storage check: siblings share their parent's region, so they are 64
    /// contiguous bytes of one block (or of the root array). Without storage they read
    /// as "no free pages".
    #[inline]
    fn sum_block(&self, l: usize, first: usize) -> [Sum; 8] {
        debug_assert!(first % 8 == 0);
        match self.sum_ptr(l, first) {
            // SAFETY: the 8 siblings lie in the same storage as the first (same region
            // block, or the root array), contiguous and inside it (a region holds a
            // multiple of 8 entries of each level), and `&self` excludes writers.
            Some(p) => unsafe { p.cast::<[u64; 8]>().read() }.map(Sum),
            None => {
                debug_assert!(
                    false,
                    "read of a summary block without storage ({l}, {first})"
                );
                [Sum::EMPTY; 8]
            }
        }
    }

    /// Writes entry `i` of level `l` (which must have storage; otherwise nothing
    /// happens).
    #[inline]
    fn set_sum(&mut self, l: usize, i: usize, s: Sum) {
        match self.sum_ptr(l, i) {
            // SAFETY: as in `sum`; `&mut self` makes this the only access.
            Some(p) => unsafe { p.write(s.0) },
            None => {
                debug_assert!(false, "write of a summary without storage ({l}, {i})");
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
    /// part of the heap now (it may have been before: a range taken out by
    /// [`shrink`](Self::shrink) can be grown again, and its summary memory, mapped the
    /// first time, is reused). The new pages are free and scavenged (fresh OS memory is
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

        // 1. All metadata memory, before any state changes: the root array (the first
        // time), the block of each region of the new range.
        if self.root.is_null() {
            let bytes = ROOT_ENTRIES * core::mem::size_of::<Root>();
            self.root = mem.alloc_meta(bytes)?.as_ptr().cast();
        }
        for r in base >> ROOT_REGION_SHIFT..=(limit - 1) >> ROOT_REGION_SHIFT {
            // SAFETY: r < ROOT_ENTRIES (limit <= ADDR_LIMIT); the root array is ours.
            // Touched for writing first: a fresh entry is read, then written.
            unsafe { crate::os::touch_for_write(ptr::addr_of_mut!((*self.root.add(r)).sum)) };
            if !self.region_block(r).is_null() {
                continue;
            }
            let b = if r == self.fixed_region && !self.fixed_block.is_null() {
                core::mem::replace(&mut self.fixed_block, ptr::null_mut())
            } else {
                mem.alloc_meta(REGION_WORDS * 8)?.as_ptr().cast()
            };
            // SAFETY: r < ROOT_ENTRIES (limit <= ADDR_LIMIT), and the array is ours.
            unsafe { (*self.root.add(r)).block = b };
        }
        // `update` below reads each of these entries before writing it: touch their
        // pages for writing first (one fault per fresh page instead of two).
        let per_page = crate::os::os_page_size()? / 8;
        for (l, &shift) in LEVEL_SHIFT.iter().enumerate() {
            let mut i = base >> shift;
            while i <= (limit - 1) >> shift {
                if let Some(p) = self.sum_ptr(l, i) {
                    // SAFETY: an entry with storage, 8-aligned; `&mut self` excludes
                    // every other access.
                    unsafe { crate::os::touch_for_write(p) };
                }
                i = (i / per_page + 1) * per_page;
            }
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
            // SAFETY: a word of our L2 array, which `&mut self` makes ours alone.
            unsafe { crate::os::touch_for_write(&mut l2.grown[k / 64]) };
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

    // -- giving address space back ---------------------------------------------------

    /// The lowest address `a >= from`, a multiple of `size`, such that every page of
    /// `[a, a + size)` is part of the heap and free: a region the heap could give back
    /// to the OS whole. `size` is a power-of-two multiple of [`CHUNK_SIZE`], at most
    /// what a root summary entry covers (16 GiB). Skips the root entries without a free
    /// page, so the cost is bounded by the regions under the root entries that have
    /// one, whatever the spread of the heap. Changes nothing.
    pub(crate) fn free_region(&self, from: usize, size: usize) -> Option<usize> {
        let ok = size.is_power_of_two() && size >= CHUNK_SIZE && size <= 1 << LEVEL_SHIFT[0];
        debug_assert!(ok, "free_region of {size:#x} bytes");
        if !ok || self.end_chunk == 0 {
            return None;
        }
        let end = self.end_chunk << LOG_CHUNK_SIZE;
        let root_shift = LEVEL_SHIFT[0];
        let hi = ((self.end_chunk - 1) >> (root_shift - LOG_CHUNK_SIZE)) + 1;
        let mut a = from
            .max(self.first_chunk << LOG_CHUNK_SIZE)
            .checked_next_multiple_of(size)?;
        while a < end {
            let r = a >> root_shift;
            let next = self.next_free_root(r, hi);
            if next != r {
                if next >= hi {
                    return None;
                }
                a = next << root_shift;
                continue;
            }
            if self.is_free(a, size >> PAGE_SHIFT) {
                return Some(a);
            }
            a += size;
        }
        None
    }

    /// Takes `[base, base + size)` out of the heap (the opposite of
    /// [`grow`](Self::grow)), for a caller that gives that address space back to the
    /// OS: its chunks stop being part of the heap, so no search, cache refill or
    /// scavenger pass finds their pages again, and their summaries, dirty marks and
    /// page counts go. `base` and `size` are chunk aligned. Only done if every page of
    /// the range is part of the heap and free (None otherwise, nothing changed).
    /// Returns how many of its pages were scavenged (the rest were free and dirty).
    ///
    /// The chunk map's L2 arrays and the summary blocks stay (they are never freed),
    /// ready for the range, or another, to be grown again.
    pub(crate) fn shrink(&mut self, base: usize, size: usize) -> Option<usize> {
        let aligned = base % CHUNK_SIZE == 0 && size % CHUNK_SIZE == 0 && size != 0;
        debug_assert!(aligned, "shrink({base:#x}, {size:#x}) is not chunk aligned");
        if !aligned || !self.is_free(base, size >> PAGE_SHIFT) {
            return None;
        }
        // `is_free` saw every chunk of the range grown, so the range is below
        // ADDR_LIMIT and every L2 array it needs exists.
        let (c0, c1) = (base >> LOG_CHUNK_SIZE, (base + size) >> LOG_CHUNK_SIZE);
        let mut scav = 0;
        for ci in c0..c1 {
            let p = self.l1[ci >> L2_BITS];
            // SAFETY: a non-null L1 entry is our L2 array (as in `chunk_mut`); `&mut
            // self` makes this the only reference into it.
            let Some(l2) = (unsafe { p.as_mut() }) else {
                debug_assert!(false, "L2 array missing for a grown chunk");
                continue;
            };
            let k = ci & (L2_ENTRIES - 1);
            let ch = &mut l2.chunks[k];
            scav += ch
                .scav
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>();
            *ch = Chunk {
                alloc: [0; CHUNK_WORDS],
                scav: [0; CHUNK_WORDS],
            };
            l2.grown[k / 64] &= !(1 << (k % 64));
            l2.dirty[k / 64] &= !(1 << (k % 64));
            // The leaf has storage: the chunk was grown.
            self.set_sum(LEAF, ci, Sum::EMPTY);
        }
        let pages = size >> PAGE_SHIFT;
        self.free -= pages;
        self.scav -= scav;
        self.total -= pages;
        // `search_addr` stays a lower bound of the first free page, and `first_chunk`
        // / `end_chunk` stay bounds of the grown chunks.
        self.update_parents(c0, c1);
        Some(scav)
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
        if changed {
            self.update_parents(c0, c1);
        }
    }

    /// Recomputes the summaries above the leaves of chunks `[c0, c1)`, level by level
    /// from their children, as long as a level changed.
    fn update_parents(&mut self, c0: usize, c1: usize) {
        let mut changed = true;
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

    /// For a thread's page cache (Go's `allocToCache`): takes every free page of the
    /// 64-page aligned block that holds the first free page of the heap. Returns the
    /// block's base, the bitmap of the pages taken (bit `i` = page `base + i` pages)
    /// and the bitmap of those that were scavenged (their scavenged bits are cleared
    /// here; the cache remembers them). None if no page is free.
    pub(crate) fn alloc_to_cache(&mut self) -> Option<(usize, u64, u64)> {
        let first = self.find_and_learn(1)?;
        let base = first & !(64 * PAGE_SIZE - 1);
        let got = self.take_block(base)?;
        // `first` was the lowest free page, and the whole block is now allocated.
        self.search_addr = self.search_addr.max(base + 64 * PAGE_SIZE);
        Some(got)
    }

    /// `alloc_to_cache`, but the block is the one that holds the first free run of
    /// `npages` pages (`1 <= npages <= 64`), so that the cache can serve a span of that
    /// length. None if there is no such run, or if the first one crosses a block
    /// boundary (the caller then allocates its span outside the cache).
    pub(crate) fn alloc_to_cache_with_run(&mut self, npages: usize) -> Option<(usize, u64, u64)> {
        debug_assert!((1..=64).contains(&npages));
        let first = self.find_and_learn(npages)?;
        let base = first & !(64 * PAGE_SIZE - 1);
        if first + npages * PAGE_SIZE > base + 64 * PAGE_SIZE {
            return None;
        }
        // Pages below `first` may be free (runs too short): the hint stays where the
        // search left it.
        self.take_block(base)
    }

    /// Allocates every free page of the 64-page aligned block at `base` (in the heap)
    /// to a page cache: see `alloc_to_cache`. The caller keeps the search hint right.
    fn take_block(&mut self, base: usize) -> Option<(usize, u64, u64)> {
        let ci = base >> LOG_CHUNK_SIZE;
        let w = (base & (CHUNK_SIZE - 1)) / PAGE_SIZE / 64;
        let ch = self.chunk_mut(ci)?;
        let pages = !ch.alloc[w];
        let scav = ch.scav[w] & pages;
        ch.alloc[w] = !0;
        ch.scav[w] &= !pages;
        self.free -= pages.count_ones() as usize;
        self.scav -= scav.count_ones() as usize;
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
}
