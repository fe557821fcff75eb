//! Unit tests of the page allocator, of `mod.rs`, `bits.rs` and `scav.rs` alike:
//! summary packing and merging, chunk bitmaps against naive versions, table-driven
//! cases, the scavenger's takes and returns, the page caches' blocks, extremes of the
//! address space, the mapping of summary memory, and a randomized differential test
//! against a plain reference heap. The test-only inspection methods of `PageAlloc`
//! are here too: `check_invariants` checks the invariants listed in `mod.rs`.
//!
//! Each test owns its `PageAlloc` (one keeps it in a static `Mutex`, as the heap does
//! under its lock), so there is no shared state between tests.

extern crate std;

use super::bits::{highest_run, next_bit};
use super::*;
use crate::os::TestMem;
use core::ptr::NonNull;
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

    /// Regions whose block of lower-level summaries exists.
    fn region_blocks(&self) -> Vec<usize> {
        (0..ROOT_ENTRIES)
            .filter(|&r| !self.region_block(r).is_null())
            .collect()
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
        // Bounds of the grown chunks (exact until a `shrink` takes out the top or
        // bottom ones).
        assert!(self.end_chunk >= grown.last().map_or(0, |&c| c + 1));
        assert!(grown.first().map_or(true, |&c| self.first_chunk <= c));
        if grown.is_empty() {
            return;
        }
        assert!(!self.root.is_null(), "no root array");
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
                    self.sum_ptr(l, i).is_some(),
                    "summary ({l}, {i:#x}) has no storage"
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

#[test]
fn a_block_with_a_run_is_the_first_that_holds_one() {
    let mut pa = new_pa();
    pa.grow(&TestMem, addr(BASE, 0), CHUNK_SIZE).unwrap();
    // Block 0: every other page free (no run of 2). Pages 126..=129 free and 130
    // used, so the first run of 4 (126..=129) crosses from block 1 into block 2.
    // Pages from 131 on were never used (still scavenged).
    assert_eq!(pa.alloc_range(addr(BASE, 0), 131), 131 * PAGE_SIZE);
    for i in (0..64).step_by(2) {
        pa.free(addr(BASE, i), 1);
    }
    pa.free(addr(BASE, 126), 4);
    pa.check_invariants();
    let free0 = pa.free_pages();
    // The first run of 4 crosses a block boundary: no block is taken.
    assert_eq!(pa.alloc_to_cache_with_run(4), None);
    assert_eq!(pa.free_pages(), free0, "nothing taken");
    // Shorten it: now the first run of 4 is block 2's, from page 131.
    pa.alloc_range(addr(BASE, 127), 1);
    let (base, pages, scav) = pa.alloc_to_cache_with_run(4).unwrap();
    assert_eq!(base, addr(BASE, 128));
    assert_eq!(pages, !0b100u64, "pages 128, 129 and 131..192");
    assert_eq!(scav, !0b111u64, "the pages never used");
    pa.check_invariants();
    // Block 0's single pages are still free and still found first.
    assert_eq!(pa.alloc(1), Some((addr(BASE, 0), 0)));
    let (b0, p0, s0) = pa.alloc_to_cache_with_run(1).unwrap();
    assert_eq!((b0, p0.count_ones(), s0), (addr(BASE, 0), 31, 0));
    pa.free_from_cache(b0, p0, s0);
    pa.free_from_cache(base, pages, scav);
    pa.check_invariants();
    assert_eq!(pa.alloc(2), Some((addr(BASE, 128), 0)));
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
fn region_blocks_are_made_once_and_kept() {
    let region = |ci: usize| (ci << LOG_CHUNK_SIZE) >> ROOT_REGION_SHIFT;
    let mem = TrackingMem::new();
    let mut pa = new_pa();
    pa.grow(&mem, addr(BASE, 0), CHUNK_SIZE).unwrap();
    assert_eq!(pa.alloc(10), Some((addr(BASE, 0), 10 * PAGE_SIZE)));
    // The root array (with the region pointers), the chunks' L2 array and one region
    // block.
    assert_eq!(mem.maps.lock().unwrap().len(), 3);
    assert_eq!(pa.region_blocks(), [region(BASE)]);
    // A neighbour shares the block: nothing new is made, nothing is zeroed.
    pa.grow(&mem, addr(BASE + 1, 0), CHUNK_SIZE).unwrap();
    assert_eq!(mem.maps.lock().unwrap().len(), 3);
    assert_eq!(
        pa.sum(LEAF, BASE).start(),
        0,
        "the old leaf summary survived"
    );
    pa.check_invariants();
    // A region holds 4,096 chunks (16 GiB); BASE is a region's first chunk.
    pa.grow(&mem, addr(BASE + 1024, 0), CHUNK_SIZE).unwrap();
    assert_eq!(pa.region_blocks(), [region(BASE)]);
    pa.grow(&mem, addr(BASE - 1, 0), CHUNK_SIZE).unwrap();
    assert_eq!(pa.region_blocks(), [region(BASE - 1), region(BASE)]);
    // Far away (just below 2^47), then a range over several regions, then one that
    // fills the gap between two others.
    pa.grow(&mem, (1 << 47) - CHUNK_SIZE, 2 * CHUNK_SIZE)
        .unwrap();
    let far = ((1 << 47) - CHUNK_SIZE) >> ROOT_REGION_SHIFT;
    assert_eq!(
        pa.region_blocks(),
        [region(BASE - 1), region(BASE), far, far + 1]
    );
    pa.grow(&mem, addr(2 * BASE, 0), 9000 * CHUNK_SIZE).unwrap();
    assert_eq!(
        pa.region_blocks().len(),
        4 + 3,
        "9000 chunks from a region's start span 3 regions"
    );
    pa.grow(&mem, addr(BASE + 2, 0), 1022 * CHUNK_SIZE).unwrap();
    assert_eq!(pa.region_blocks().len(), 7);
    pa.check_invariants();
    assert_eq!(
        pa.alloc(1022 * 512 + 510 + 512),
        Some((addr(BASE, 10), (1022 * 512 + 510 + 512) * PAGE_SIZE))
    );
    pa.check_invariants();
}

#[test]
fn shrink_takes_a_free_region_out_and_it_can_be_grown_again() {
    // Three contiguous "arenas" of 16 chunks and a fourth far away.
    const A: usize = 16;
    let size = A * CHUNK_SIZE;
    let mem = TrackingMem::new();
    let mut pa = new_pa();
    pa.grow(&mem, addr(BASE, 0), 3 * size).unwrap();
    let far = 0x7000_0000_0000;
    pa.grow(&mem, far, size).unwrap();
    let total = 4 * A * CHUNK_PAGES;
    // Free runs coalesce across the regions' boundaries: the three are one run.
    assert!(pa.is_free(addr(BASE, 0), 3 * A * CHUNK_PAGES));
    assert_eq!(pa.alloc_range(addr(BASE, 0), 10), 10 * PAGE_SIZE);
    // 20 dirty free pages in the second region.
    pa.alloc_range(addr(BASE + A, 5), 20);
    pa.free(addr(BASE + A, 5), 20);
    pa.check_invariants();
    assert_eq!(pa.free_region(0, size), Some(addr(BASE + A, 0)));
    assert_eq!(pa.shrink(addr(BASE, 0), size), None, "pages in use");
    assert_eq!(pa.free_pages(), total - 10);
    assert_eq!(
        pa.shrink(addr(BASE + A, 0), size),
        Some(A * CHUNK_PAGES - 20)
    );
    pa.check_invariants();
    assert_eq!(pa.free_pages(), total - 10 - A * CHUNK_PAGES);
    assert_eq!(pa.scavenged_pages(), total - 10 - A * CHUNK_PAGES);
    assert!(!pa.is_free(addr(BASE + A, 0), 1));
    assert_eq!(
        pa.free_region(addr(BASE + A, 0), size),
        Some(addr(BASE + 2 * A, 0))
    );
    // No run crosses the hole; the scavenger has nothing dirty left to take.
    assert_eq!(pa.alloc(A * CHUNK_PAGES + 1), None);
    let mut runs = [(0, 0); 4];
    assert_eq!(
        pa.scavenge_take(ScavPolicy::ALL, usize::MAX, &mut runs),
        (0, 0)
    );
    // The top region goes too: the bounds stay, searches still work.
    assert_eq!(pa.shrink(far, size), Some(A * CHUNK_PAGES));
    assert_eq!(pa.free_region(addr(BASE + 2 * A + 1, 0), size), None);
    pa.check_invariants();
    assert_eq!(pa.alloc(1), Some((addr(BASE, 10), PAGE_SIZE)));
    pa.free(addr(BASE, 10), 1);
    // Grown again (the same ranges): fresh, scavenged, one run with its neighbours.
    pa.grow(&mem, addr(BASE + A, 0), size).unwrap();
    pa.grow(&mem, far, size).unwrap();
    pa.check_invariants();
    assert_eq!(pa.free_pages(), total - 10);
    let run = 3 * A * CHUNK_PAGES - 10;
    let got = pa.alloc(run).unwrap();
    assert_eq!(got.0, addr(BASE, 10));
    assert_eq!(pa.alloc(A * CHUNK_PAGES), Some((far, size)));
    pa.check_invariants();
    assert_eq!(pa.free_pages(), 0);
}

#[test]
fn failed_grow_changes_nothing() {
    let mut failures = 0;
    for k in 0..10 {
        let mem = TrackingMem::failing_at(k);
        let mut pa = new_pa();
        match pa.grow(&mem, addr(BASE, 0), 2 * CHUNK_SIZE) {
            Ok(()) => assert!(k >= 6, "the first grow makes 6 reserve/map calls"),
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
            // Its region's block and the chunks' L2 array: two calls each.
            Ok(()) => assert!(k >= 4),
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
    assert_eq!(failures, 6 + 4);
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
    fn each_page(&mut self, p: usize, n: usize, mut f: impl FnMut(&mut bool, &mut bool)) -> usize {
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
                    let ci =
                        (rf.chunks[rng.below(rf.chunks.len())].0 + rng.below(3)).saturating_sub(1);
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

/// A page allocator on fixed storage for region `region`, and the storage (leaked: it
/// must outlive the allocator, as the process-wide heap's static does).
fn new_fixed_pa(region: usize) -> (Box<PageAlloc>, &'static FixedSummary) {
    let storage: &'static FixedSummary = Box::leak(Box::new(FixedSummary::new()));
    // SAFETY: fresh, zero-filled, leaked storage that only this allocator uses.
    (
        Box::new(unsafe { PageAlloc::with_fixed(storage, region) }),
        storage,
    )
}

#[test]
fn fixed_summaries_need_no_memory_in_their_region() {
    // Region 40 is the 16 GiB from 640 GiB, where the heap's first arena goes.
    let region = 40;
    let base = region << ROOT_REGION_SHIFT;
    let mem = TrackingMem::new();
    let (mut pa, storage) = new_fixed_pa(region);
    pa.grow(&mem, base, 16 * CHUNK_SIZE).unwrap();
    // Only the chunks' L2 array was mapped (by `alloc_meta`): no summary memory.
    assert_eq!(mem.maps.lock().unwrap().len(), 1);
    assert!(pa.fixed_block.is_null(), "the fixed block is in use");
    pa.check_invariants();
    assert_eq!(pa.alloc(CHUNK_PAGES + 1).map(|r| r.0), Some(base));
    pa.check_invariants();
    // Growth past the region's end makes the next region's block (one mapping).
    let top = (region + 1) << ROOT_REGION_SHIFT;
    pa.grow(&mem, top - 2 * CHUNK_SIZE, 4 * CHUNK_SIZE).unwrap();
    assert_eq!(mem.maps.lock().unwrap().len(), 2);
    assert_eq!(pa.region_blocks(), [region, region + 1]);
    pa.check_invariants();
    // Entries of the region are read and written in the fixed storage, the others in
    // the new block (the root entries all in the fixed root array).
    let fixed = storage as *const FixedSummary as usize;
    let fixed = fixed..fixed + core::mem::size_of::<FixedSummary>();
    for (l, &shift) in LEVEL_SHIFT.iter().enumerate() {
        let inside = pa.sum_ptr(l, (top - 1) >> shift).unwrap() as usize;
        let outside = pa.sum_ptr(l, top >> shift).unwrap() as usize;
        assert!(fixed.contains(&inside), "level {l}");
        assert_eq!(fixed.contains(&outside), l == 0, "level {l}");
    }
    // A run across the region's end is found through both storages (once the lower
    // part, which first fit prefers, is full).
    let rest = 16 * CHUNK_PAGES - (CHUNK_PAGES + 1);
    assert_eq!(
        pa.alloc(rest).map(|r| r.0),
        Some(base + (CHUNK_PAGES + 1) * PAGE_SIZE)
    );
    assert_eq!(
        pa.alloc(4 * CHUNK_PAGES).map(|r| r.0),
        Some(top - 2 * CHUNK_SIZE)
    );
    pa.check_invariants();
}

#[test]
fn fixed_and_obtained_summaries_give_the_same_answers() {
    // The same operations on a page allocator with fixed storage for region 40 and on
    // one that obtains all of its summary memory: every answer agrees, and both keep
    // their invariants. The heap straddles the region's end, so searches cross from
    // the fixed block to an obtained one.
    let region = 40;
    let (bottom, top) = (
        region << ROOT_REGION_SHIFT,
        (region + 1) << ROOT_REGION_SHIFT,
    );
    let (mut a, _) = new_fixed_pa(region);
    let mut b = new_pa();
    // Ranges at several places of the region, so that entries at both ends and in the
    // middle of every level's part of the storage are used.
    for (base, size) in [
        (bottom, 4 * CHUNK_SIZE),
        (bottom + (768 << 20), 4 * CHUNK_SIZE),
        (bottom + (8 << 30) + (3 << 28), 4 * CHUNK_SIZE),
        (top - 8 * CHUNK_SIZE, 8 * CHUNK_SIZE),
        (top, 8 * CHUNK_SIZE),
        (top - 64 * CHUNK_SIZE, 4 * CHUNK_SIZE),
    ] {
        a.grow(&TestMem, base, size).unwrap();
        b.grow(&TestMem, base, size).unwrap();
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut live: Vec<(usize, usize)> = Vec::new();
    for step in 0..3000 {
        if rng.below(3) != 0 || live.is_empty() {
            let n = match rng.below(10) {
                0 => 1 + rng.below(3 * CHUNK_PAGES),
                _ => 1 + rng.below(64),
            };
            let (x, y) = (a.alloc(n), b.alloc(n));
            assert_eq!(x, y, "step {step}: alloc({n})");
            if let Some((p, _)) = x {
                live.push((p, n));
            }
        } else {
            let (p, n) = live.swap_remove(rng.below(live.len()));
            a.free(p, n);
            b.free(p, n);
        }
        assert_eq!(
            (a.free_pages(), a.scavenged_pages()),
            (b.free_pages(), b.scavenged_pages())
        );
        if step % 500 == 0 {
            a.check_invariants();
            b.check_invariants();
        }
    }
    a.check_invariants();
    b.check_invariants();
}
