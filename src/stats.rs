//! Consistent heap statistics (Go's `consistentHeapStats`, seed 002) and the public
//! [`stats()`](crate::stats()) snapshot.
//!
//! # The protocol
//!
//! Statistics are kept as *deltas* in two generations. Every writer with a thread cache
//! has its own pair of delta arrays (in its sequence record); writers without one share
//! a pair under a leaf lock. A writer adds to the generation `gen` names, in its own
//! array, with plain loads and stores (it is the array's only writer). A reader (one at
//! a time, holding the running totals) takes a snapshot by
//!
//! 1. flipping `gen`, so new writes go to the other generation, which the previous read
//!    left cleared;
//! 2. for every writer, waiting until it is no longer inside a write section that began
//!    before the flip (that one may still be adding to the old generation), then adding
//!    its old-generation deltas to the totals and clearing them;
//! 3. doing the same with the shared arrays of the cache-less writers.
//!
//! Go's `consistentHeapStats` keeps one shared ring of three generations that every P
//! adds to atomically; here the deltas are per writer, so a write section costs no
//! atomic read-modify-write on a shared cache line, and two generations are enough
//! because the reader folds and clears the old one in the same pass.
//!
//! A writer with a thread cache brackets its section with its own sequence counter:
//! odd while writing. Between its store of the odd value and its load of `gen` it has a
//! SeqCst fence, as the reader has between its store of `gen` and its loads of the
//! counters, so either the writer sees the new `gen`, or the reader sees the counter odd
//! and waits for it (a store->load pattern on both sides: only the fences' single total
//! order excludes both missing each other; fences rather than SeqCst accesses because
//! that is the form loom models exactly). The writer's closing store is Release and the
//! reader's loads Acquire: the section's additions are visible once the counter is seen
//! even again. The reader's clearing reaches the writer through `gen`: the next flip back
//! to that generation is a Release store under `reader`, which the writer loads Acquire.
//!
//! A writer without a cache (start-up, TLS teardown, a thread that could not get one)
//! takes the small leaf lock `nop` instead; the reader holds `nop` only while it flips
//! `gen`, so such writers are wholly before or wholly after the flip.
//!
//! A section only adds, never blocks and never nests, so the reader's wait is short.
//! Sections are taken at span, refill and flush granularity, never per object on the
//! fast path. Every update a caller makes in one section is seen by a snapshot entirely
//! or not at all: the snapshot is *consistent*.
//!
//! Shared fields and what protects them:
//!
//! | field              | protection                                                     |
//! |--------------------|----------------------------------------------------------------|
//! | `StatsSeq::slots[g]` | its writer alone, inside sections of generation g; the reader reads and clears it once that writer has left g |
//! | `shared[g]`        | `nop` for writers of generation g; the reader reads and clears it after the flip |
//! | `gen`              | written by the reader under `reader` and `nop`; read Acquire by writers after their fence |
//! | `nop`              | leaf lock: cache-less writers' sections; the reader's flip      |
//! | `reader`           | one reader at a time, and the running totals (lock order: `reader` -> `nop`) |
//! | `writers`          | push-only list of sequence records (Release push, Acquire walk) |
//! | `StatsSeq::seq`    | written only by its thread, read by the reader                 |

use core::fmt;
use core::ptr;

use crate::mspan::Purpose;
use crate::sizeclasses::{CLASS_TO_NOBJS, CLASS_TO_NPAGES, CLASS_TO_SIZE, NUM_CLASSES};
use crate::sync::{
    fence, AtomicPtr, AtomicU32, AtomicU64, LockCount, Mutex, Ordering, Rank, SpinWait,
};

/// The writer's fence between its odd counter and its load of `gen`. The loom suite's
/// mutant `spanheap_mutant="stats_no_fence"` drops it to show the model can fail.
#[inline(always)]
fn writer_fence() {
    #[cfg(not(spanheap_mutant = "stats_no_fence"))]
    fence(Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------
// Writers' sequence records and their two generations of deltas.
// ---------------------------------------------------------------------------------------

/// One writer's sequence counter (odd while it is inside a write section) and its own
/// deltas. Lives in a thread cache record (never freed, so the registry can keep
/// pointing to it; a record reused by a new thread keeps its registration and deltas).
#[derive(Debug)]
pub(crate) struct StatsSeq<const N: usize> {
    seq: AtomicU32,
    /// Next record in the registry; written before the record is published.
    next: AtomicPtr<StatsSeq<N>>,
    /// This writer's deltas per generation (see the module docs).
    slots: [Delta<N>; 2],
}

impl<const N: usize> StatsSeq<N> {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            StatsSeq {
                seq: AtomicU32::new(0),
                next: AtomicPtr::new(ptr::null_mut()),
                slots: [Delta::new(), Delta::new()],
            }
        }
    }
}

/// One generation's deltas of one writer (or of the cache-less writers): `N` counters,
/// added to with wrapping arithmetic (a delta may be negative; the merged totals are
/// not). Each array has one writer at a time (its thread, or the holder of `nop`), so
/// an addition is a load and a store, not a read-modify-write.
#[derive(Debug)]
pub(crate) struct Delta<const N: usize>([AtomicU64; N]);

impl<const N: usize> Delta<N> {
    crate::sync::const_fn! {
        fn new() -> Self {
            #[cfg(not(spanheap_loom))]
            return Delta([const { AtomicU64::new(0) }; N]);
            #[cfg(spanheap_loom)]
            return Delta(core::array::from_fn(|_| AtomicU64::new(0)));
        }
    }

    /// Adds `v` to counter `i`.
    #[inline]
    pub(crate) fn add(&self, i: usize, v: u64) {
        // Relaxed, and not an RMW: the array's only writer is the caller (see the type
        // docs). The section's closing Release on the writer's counter (or the `nop`
        // lock) publishes it to the reader.
        let c = &self.0[i];
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    }

    /// Subtracts `v` from counter `i`.
    #[inline]
    pub(crate) fn sub(&self, i: usize, v: u64) {
        self.add(i, v.wrapping_neg());
    }

    /// Adds every counter to `totals` and clears it. Only for the reader, once no
    /// writer can be writing this array (see `ConsistentStats::read`).
    fn drain_into(&self, totals: &mut [u64; N]) {
        for (t, c) in totals.iter_mut().zip(self.0.iter()) {
            // Relaxed: the caller's Acquire (the writer's counter, or `nop`) made the
            // writes visible, and the next writer of this array learns of the clearing
            // through `gen` (see the module docs).
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                *t = t.wrapping_add(v);
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// `N` counters that writers update in sections and a reader snapshots consistently.
#[derive(Debug)]
pub(crate) struct ConsistentStats<const N: usize> {
    /// The cache-less writers' deltas per generation (under `nop`).
    shared: [Delta<N>; 2],
    /// The generation writers add to (0 or 1).
    gen: AtomicU32,
    /// Cache-less writers' sections, and the reader's flip of `gen`. A leaf lock.
    nop: Mutex<()>,
    /// Serialises readers, and holds the totals of every generation drained so far.
    reader: Mutex<[u64; N]>,
    /// Every registered writer record (push-only).
    writers: AtomicPtr<StatsSeq<N>>,
}

impl<const N: usize> ConsistentStats<N> {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            ConsistentStats {
                shared: [Delta::new(), Delta::new()],
                gen: AtomicU32::new(0),
                nop: Mutex::new((), crate::lockrank::STATS_NOP),
                reader: Mutex::new([0; N], crate::lockrank::STATS_READER),
                writers: AtomicPtr::new(ptr::null_mut()),
            }
        }
    }

    /// Makes `w` a writer the reader waits for and drains. Once per record, before its
    /// first section; records are never unregistered (they are never unmapped, and an
    /// idle one costs the reader a load of its counter and of its deltas).
    pub(crate) fn register(&self, w: &'static StatsSeq<N>) {
        // Release: the link is visible to a reader that finds `w` (Acquire walk).
        crate::sync::push_linked(
            &self.writers,
            w as *const StatsSeq<N> as *mut StatsSeq<N>,
            &w.next,
            Ordering::Release,
        );
    }

    /// Runs one write section: `f` adds its deltas to the current generation. With
    /// `Some(w)` (a registered record owned by the calling thread) the section is
    /// lock-free and adds to `w`'s own deltas; with `None` it takes the leaf lock. Sections
    /// must not nest, and `f` must only add.
    #[inline]
    pub(crate) fn update(&self, w: Option<&StatsSeq<N>>, f: impl FnOnce(&Delta<N>)) {
        match w {
            Some(w) => {
                // Only this thread writes its counter: a load and a store, no RMW.
                let s = w.seq.load(Ordering::Relaxed);
                debug_assert!(s % 2 == 0, "nested statistics section");
                // Relaxed: the fence below orders it before the load of `gen`.
                w.seq.store(s.wrapping_add(1), Ordering::Relaxed);
                // Pairs with the reader's fence (see the module docs): either we load
                // the new `gen`, or the reader sees our counter odd and waits.
                writer_fence();
                // Acquire pairs with the reader's Release store of `gen`: its clearing
                // of the deltas we are about to add to happens-before our additions.
                let g = self.gen.load(Ordering::Acquire);
                f(&w.slots[g as usize]);
                // Release: our additions happen-before the reader's Acquire load that
                // sees the counter even again.
                w.seq.store(s.wrapping_add(2), Ordering::Release);
            }
            None => {
                self.nop.lock().with(|_| {
                    // Relaxed: `gen` only changes under `nop`, which we hold.
                    let g = self.gen.load(Ordering::Relaxed);
                    f(&self.shared[g as usize]);
                });
            }
        }
    }

    /// The counts of its two locks (`reader`, then `nop`), with their ranks.
    pub(crate) fn lock_counts(&self) -> [(Rank, LockCount); 2] {
        [self.reader.counts(), self.nop.counts()]
    }

    /// Fork handlers: take and release the reader and `nop` locks (see `global/fork.rs`).
    pub(crate) fn fork_lock_reader(&self) {
        self.reader.fork_lock();
    }
    pub(crate) fn fork_lock_nop(&self) {
        self.nop.fork_lock();
    }
    /// # Safety
    /// The calling thread holds the lock (`fork_lock_reader`).
    pub(crate) unsafe fn fork_unlock_reader(&self) {
        // SAFETY: forwarded.
        unsafe { self.reader.fork_unlock() };
    }
    /// # Safety
    /// The calling thread holds the lock (`fork_lock_nop`).
    pub(crate) unsafe fn fork_unlock_nop(&self) {
        // SAFETY: forwarded.
        unsafe { self.nop.fork_unlock() };
    }

    /// In the child of a fork (one thread left): ends every write section that another
    /// thread's copy was in the middle of, so that the reader does not wait for it
    /// forever. `me` is the calling thread's own counter (never odd here: fork is not
    /// called from inside a section).
    #[cfg(not(spanheap_loom))]
    pub(crate) fn fork_child_settle(&self, me: Option<&StatsSeq<N>>) {
        let me = me.map_or(ptr::null(), |m| m as *const StatsSeq<N>);
        let mut w = self.writers.load(Ordering::Acquire);
        while !w.is_null() {
            // SAFETY: registered counters are 'static.
            let ws = unsafe { &*w };
            if !ptr::eq(w, me) && ws.seq.load(Ordering::Relaxed) % 2 != 0 {
                // Relaxed: single-threaded now.
                ws.seq.fetch_add(1, Ordering::Relaxed);
            }
            w = ws.next.load(Ordering::Relaxed);
        }
    }

    /// A consistent snapshot of the totals into `out` (one reader at a time; concurrent
    /// readers wait). Never allocates.
    pub(crate) fn read(&self, out: &mut [u64; N]) {
        self.reader.lock().with(|totals| {
            // Relaxed: only readers write `gen`, under `reader`, which we hold.
            let old = self.gen.load(Ordering::Relaxed);
            self.nop.lock().with(|_| {
                // Release: the previous reader's clearing of the other generation
                // (before it released `reader`) happens-before any writer's additions
                // to it (writers load `gen` with Acquire).
                self.gen.store(old ^ 1, Ordering::Release);
            });
            // Pairs with the writers' fence between their odd counter and `gen` load.
            fence(Ordering::SeqCst);
            let mut w = self.writers.load(Ordering::Acquire);
            while !w.is_null() {
                // SAFETY: registered records are 'static.
                let ws = unsafe { &*w };
                // Wait for a section that may have loaded the old generation. Acquire
                // pairs with the writer's closing Release store.
                let mut s = ws.seq.load(Ordering::Acquire);
                let mut spin = SpinWait::new();
                while s % 2 != 0 {
                    spin.spin();
                    s = ws.seq.load(Ordering::Acquire);
                }
                // Every section of the old generation has ended and no later one
                // can reach it: the deltas are final.
                ws.slots[old as usize].drain_into(totals);
                w = ws.next.load(Ordering::Relaxed);
            }
            // The cache-less writers of the old generation finished before our flip
            // (they hold `nop`, as we did to flip): their deltas are final too.
            self.shared[old as usize].drain_into(totals);
            *out = *totals;
        });
    }
}

// ---------------------------------------------------------------------------------------
// What the heap counts.
// ---------------------------------------------------------------------------------------

/// Indices of the heap's consistent counters.
pub(crate) mod field {
    use super::{Purpose, NUM_CLASSES};

    /// Bytes of arena address space mapped from the OS.
    pub(crate) const ARENA: usize = 0;
    /// Arena bytes in the Ready state (in use, or free and not released).
    pub(crate) const COMMITTED: usize = 1;
    /// Arena bytes in the Prepared state (free and returned to the OS).
    pub(crate) const RELEASED: usize = 2;
    /// Bytes of OS memory for metadata outside the arenas.
    pub(crate) const META: usize = 3;
    /// Bytes in live spans, every purpose.
    pub(crate) const INUSE: usize = 4;
    /// Bytes in live spans per purpose: `PURPOSE + purpose as usize`.
    pub(crate) const PURPOSE: usize = 5;
    /// Pages in live heap spans.
    pub(crate) const PAGES_IN_USE: usize = PURPOSE + Purpose::COUNT;
    pub(crate) const LARGE_ALLOCS: usize = PAGES_IN_USE + 1;
    pub(crate) const LARGE_FREES: usize = PAGES_IN_USE + 2;
    pub(crate) const LARGE_ALLOC_BYTES: usize = PAGES_IN_USE + 3;
    pub(crate) const LARGE_FREE_BYTES: usize = PAGES_IN_USE + 4;
    /// Live thread caches.
    pub(crate) const CACHES: usize = PAGES_IN_USE + 5;
    /// Free bytes held in threads' page caches.
    pub(crate) const PAGE_CACHED: usize = PAGES_IN_USE + 6;
    /// Bytes returned to the OS by the scavenger (cumulative).
    pub(crate) const SCAV_BYTES: usize = PAGES_IN_USE + 7;
    /// Successful `madvise` calls made by the scavenger (cumulative).
    pub(crate) const SCAV_CALLS: usize = PAGES_IN_USE + 8;
    /// Released bytes taken back into use (re-committed) by allocations (cumulative).
    pub(crate) const REUSED_RELEASED: usize = PAGES_IN_USE + 9;
    /// `decommit` calls the OS refused (cumulative).
    pub(crate) const DECOMMIT_FAILURES: usize = PAGES_IN_USE + 10;
    /// Bytes those calls covered (cumulative).
    pub(crate) const DECOMMIT_FAILED_BYTES: usize = PAGES_IN_USE + 11;
    /// Arena bytes given back to the OS whole (`munmap`) when a growth was refused
    /// (cumulative).
    pub(crate) const UNMAPPED: usize = PAGES_IN_USE + 12;
    /// Small-object allocations per class: `SMALL_ALLOCS + class`.
    pub(crate) const SMALL_ALLOCS: usize = PAGES_IN_USE + 13;
    /// Small-object frees per class: `SMALL_FREES + class`.
    pub(crate) const SMALL_FREES: usize = SMALL_ALLOCS + NUM_CLASSES;
    /// Live small-object spans per class: `SMALL_SPANS + class`.
    pub(crate) const SMALL_SPANS: usize = SMALL_FREES + NUM_CLASSES;
    /// Number of counters.
    pub(crate) const N: usize = SMALL_SPANS + NUM_CLASSES;
}

/// The heap's consistent counters.
pub(crate) type HeapStats = ConsistentStats<{ field::N }>;
/// One generation of them, as a write section sees it.
pub(crate) type HeapDelta = Delta<{ field::N }>;
/// A writer's record of them (a thread cache's).
pub(crate) type HeapSeq = StatsSeq<{ field::N }>;

// ---------------------------------------------------------------------------------------
// The public snapshot.
// ---------------------------------------------------------------------------------------

/// Allocation counts of one size class.
///
/// Small objects are counted when a thread takes a *window* of up to 64 of them from a
/// span (the unused rest is subtracted when the thread gives the span back), when it
/// reuses an object from its local free list, and freed when they go back to a span.
/// An object freed onto a thread's local free list therefore still counts as live until
/// that thread reuses it (counted as one allocation and one free) or flushes it (at most
/// about 512 KiB per class and thread, and everything when the thread exits or calls
/// [`flush_thread_cache`](crate::flush_thread_cache)). A thread publishes its reuse
/// counts when it next refills or flushes a class, calls [`stats()`](crate::stats()), or exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Object size of the class in bytes (every object of the class occupies this much).
    pub size: u64,
    /// Objects allocated so far (cumulative).
    pub allocs: u64,
    /// Objects freed so far (cumulative).
    pub frees: u64,
    /// Live spans of the class (each `span_bytes()` long, holding `objects_per_span()`
    /// objects).
    pub spans: u64,
}

impl ClassStats {
    /// Live objects: `allocs - frees`.
    pub fn live(&self) -> u64 {
        self.allocs.saturating_sub(self.frees)
    }
    /// Bytes occupied by live objects: `live() * size`.
    pub fn live_bytes(&self) -> u64 {
        self.live() * self.size
    }

    /// The class's index (0 for the "no class" entry, whose size is 0).
    fn class(&self) -> usize {
        CLASS_TO_SIZE
            .iter()
            .position(|&z| u64::from(z) == self.size)
            .unwrap_or(0)
    }

    /// Bytes of one span of the class.
    pub fn span_bytes(&self) -> u64 {
        u64::from(CLASS_TO_NPAGES[self.class()]) * crate::os::PAGE_SIZE as u64
    }

    /// Objects one span of the class holds.
    pub fn objects_per_span(&self) -> u64 {
        u64::from(CLASS_TO_NOBJS[self.class()])
    }

    /// Bytes of the class's live spans: `spans * span_bytes()`.
    pub fn spans_bytes(&self) -> u64 {
        self.spans * self.span_bytes()
    }

    /// Bytes of free object slots in the class's spans: their slots less the live
    /// objects (objects on threads' free stacks count as live, see above).
    pub fn free_slot_bytes(&self) -> u64 {
        (self.spans * self.objects_per_span() * self.size).saturating_sub(self.live_bytes())
    }

    /// Bytes at the ends of the class's spans too short for one more object.
    pub fn tail_bytes(&self) -> u64 {
        self.spans * (self.span_bytes() - self.objects_per_span() * self.size)
    }
}

/// Where the memory the heap may hold resident goes ([`Stats::resident`]): every
/// committed arena byte is in exactly one of the first six parts, and `metadata` is the
/// allocator's memory outside the arenas. `total()` is what the heap adds to the
/// process's resident set when every byte it handed out has been written (pages
/// handed out and never touched are counted but not resident; metadata is address
/// space, resident where touched): the test `stats::resident_breakdown_matches_rss`
/// compares it with `/proc/self/smaps_rollup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resident {
    /// Live small objects at their class size (rounding included), counting as live
    /// the objects threads keep on their free stacks (`Stats::free_stack_bytes`
    /// estimates those) and the unused rest of their current windows.
    pub small_objects: u64,
    /// Free object slots in small-object spans: partly used spans' free neighbours of
    /// live objects, per class in [`ClassStats::free_slot_bytes`].
    pub small_free_slots: u64,
    /// The ends of small-object spans too short for one more object.
    pub small_tails: u64,
    /// Live large blocks in whole pages, blocks kept in threads' large-block caches
    /// included.
    pub large_blocks: u64,
    /// Free pages not returned to the OS (threads' page caches included, see
    /// `page_caches`).
    pub free_pages: u64,
    /// Of `free_pages`, those in threads' page caches.
    pub page_caches: u64,
    /// Arena pages lent to the allocator's own records (span records, span bitmaps,
    /// thread-cache records), less record chunks returned to the OS.
    pub records: u64,
    /// Memory the allocator maps outside the arenas (`Stats::metadata_bytes`).
    pub metadata: u64,
}

impl Resident {
    /// All parts together (`page_caches` is inside `free_pages`).
    pub fn total(&self) -> u64 {
        self.small_objects
            + self.small_free_slots
            + self.small_tails
            + self.large_blocks
            + self.free_pages
            + self.records
            + self.metadata
    }
}

/// The heap's atomic counters (seed 000), read one by one. Each is exact on its own, but
/// while span operations are in flight on other threads they need not agree with each
/// other or with the consistent fields of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapGauges {
    /// Arena bytes that belong to the heap proper (mapped arena bytes minus what is lent
    /// to the allocator's own metadata spans): `heap_inuse + heap_idle` when quiet.
    pub heap_sys: u64,
    /// Bytes in live heap spans (user memory, including free objects of small-object spans).
    pub heap_inuse: u64,
    /// Bytes in free page runs, released or not.
    pub heap_idle: u64,
    /// Bytes of free page runs returned to the OS.
    pub heap_released: u64,
    /// Pages in live heap spans (`pagesInUse`, the counter of the publication protocol).
    pub pages_in_use: u64,
}

/// How many kinds of lock [`lock_stats`](crate::lock_stats) reports: one per row of
/// the lock order (`docs/design.md`, "Lock order").
pub const LOCK_KINDS: usize = crate::lockrank::TABLE.len();

/// The use of one kind of the allocator's shared locks (see
/// [`lock_stats`](crate::lock_stats)): the counts of every lock of that kind (one per
/// size class for `mcentral`), summed. All counts are cumulative since the process
/// started.
///
/// Counted by the locks themselves: an acquisition with a plain load and store of a
/// counter that only the holder writes, beside the lock word (no atomic
/// read-modify-write on the uncontended path); the rest on the slow path only. Each
/// lock's counts are read without stopping its users, so a snapshot is not consistent
/// across locks, but it never shows more contended acquisitions than acquisitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockStats {
    /// The kind's name in the lock order: `reclaim`, `stats reader`, `shared cache`,
    /// `mcentral`, `cache records`, `heap`, `stats nop`.
    pub name: &'static str,
    /// How many locks of this kind the process-wide heap has.
    pub locks: u32,
    /// Successful acquisitions (`lock`, and `try_lock` when the lock was free).
    pub acquisitions: u64,
    /// Acquisitions that found the lock taken and went to the slow path (spinning,
    /// then sleeping on a futex). Never more than `acquisitions`.
    pub contended: u64,
    /// `futex_wait` calls made by contended acquisitions (each a sleep in the kernel,
    /// or a call that returned at once because the lock word had changed).
    pub sleeps: u64,
    /// Nanoseconds contended acquisitions spent waiting (`CLOCK_MONOTONIC`, read only
    /// on the slow path), spinning and sleeping together.
    pub wait_ns: u64,
    /// `try_lock` calls that found the lock taken and gave up (the thread-cache flush
    /// sends such a chunk of objects down the lock-free remote path instead).
    pub try_busy: u64,
}

impl LockStats {
    /// The kind `name` with nothing counted.
    pub const fn empty(name: &'static str) -> LockStats {
        LockStats {
            name,
            locks: 0,
            acquisitions: 0,
            contended: 0,
            sleeps: 0,
            wait_ns: 0,
            try_busy: 0,
        }
    }

    /// Every kind, in lock order, with nothing counted.
    pub(crate) fn table() -> [LockStats; LOCK_KINDS] {
        let mut t = [LockStats::empty(""); LOCK_KINDS];
        for (l, e) in t.iter_mut().zip(crate::lockrank::TABLE.iter()) {
            l.name = e.name;
        }
        t
    }

    /// Adds lock count `c` to the row of its rank's kind in `t`.
    pub(crate) fn add(t: &mut [LockStats; LOCK_KINDS], (rank, c): (Rank, LockCount)) {
        if let Some(l) = t.get_mut(crate::lockrank::kind(rank)) {
            l.locks += 1;
            l.acquisitions += c.acquisitions;
            l.contended += c.contended;
            l.sleeps += c.sleeps;
            l.wait_ns += c.wait_ns;
            l.try_busy += c.try_busy;
        }
    }

    /// The counts since `before` (an earlier reading of the same kind).
    pub fn since(&self, before: &LockStats) -> LockStats {
        LockStats {
            name: self.name,
            locks: self.locks,
            acquisitions: self.acquisitions.wrapping_sub(before.acquisitions),
            contended: self.contended.wrapping_sub(before.contended),
            sleeps: self.sleeps.wrapping_sub(before.sleeps),
            wait_ns: self.wait_ns.wrapping_sub(before.wait_ns),
            try_busy: self.try_busy.wrapping_sub(before.try_busy),
        }
    }
}

/// What thread caches' remote frees (frees of objects of spans the freeing cache does
/// not own, returned when a cache flushes its remote buffer or free stack) did to
/// shared cache lines, cumulative (see
/// [`remote_free_stats`](crate::remote_free_stats)). Each is an atomic
/// read-modify-write on a line the span's owner (or another freer) also writes.
/// Counted per thread-cache record and summed when read; frees by threads without a
/// cache are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteFreeStats {
    /// Objects freed through the remote path.
    pub objects: u64,
    /// `fetch_or`s of spans' remote-free bitmap words (one per 64-object word a run
    /// of frees into one span touches).
    pub bitmap_rmws: u64,
    /// `fetch_add`s of spans' state words (one per run of frees into one span).
    pub state_rmws: u64,
    /// Announcements to a size class's mcentral (a span became allocatable again or
    /// wholly free): a push on its lock-free pending stack, and a drain under the
    /// mcentral lock when `try_lock` gets it.
    pub announces: u64,
}

impl RemoteFreeStats {
    pub(crate) fn from_array(a: [u64; 4]) -> Self {
        RemoteFreeStats {
            objects: a[0],
            bitmap_rmws: a[1],
            state_rmws: a[2],
            announces: a[3],
        }
    }

    /// The counts since `before` (an earlier reading).
    pub fn since(&self, before: &RemoteFreeStats) -> RemoteFreeStats {
        RemoteFreeStats {
            objects: self.objects.wrapping_sub(before.objects),
            bitmap_rmws: self.bitmap_rmws.wrapping_sub(before.bitmap_rmws),
            state_rmws: self.state_rmws.wrapping_sub(before.state_rmws),
            announces: self.announces.wrapping_sub(before.announces),
        }
    }
}

/// A snapshot of spanheap's statistics: see [`stats()`](crate::stats()).
///
/// All fields except [`gauges`](Self::gauges) come from one consistent snapshot: every
/// update the allocator makes together (a span allocated and its bytes counted, a batch
/// of frees) is in it entirely or not at all. The invariants [`check`](Self::check)
/// verifies therefore hold for every snapshot, however busy the other threads are:
///
/// - object counts never go negative: `frees <= allocs` for every class and for large
///   objects;
/// - bytes per purpose sum to the in-use total:
///   `heap_bytes + span_record_bytes + span_bitmap_bytes + thread_cache_bytes == inuse_bytes`,
///   and `heap_bytes == pages_in_use * 8 KiB`;
/// - committed and released bytes make up what the heap holds from the OS:
///   `committed_bytes + released_bytes == arena_bytes`, and `inuse_bytes <= committed_bytes`;
/// - live objects fit in the heap: `small_live_bytes() + large_live_bytes() <= heap_bytes`,
///   and so do the small-object spans: `sum of ClassStats::spans_bytes() <= heap_bytes`;
/// - page caches hold free memory only: `page_cache_bytes <= arena_bytes - inuse_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of address space mapped for heap arenas (64 MiB each). Mapped is not
    /// resident: see `committed_bytes` and `released_bytes`.
    pub arena_bytes: u64,
    /// Arena bytes that may be resident: in use, or free but not returned to the OS.
    pub committed_bytes: u64,
    /// Arena bytes free and returned to the OS (or never touched since mapping).
    pub released_bytes: u64,
    /// Bytes of OS memory the allocator uses for metadata outside the arenas (arena
    /// records with their span maps, the arena index, page-allocator summaries, the
    /// thread caches' free stacks: address space, resident only where touched).
    pub metadata_bytes: u64,
    /// Bytes in live spans of every purpose.
    pub inuse_bytes: u64,
    /// Bytes in live spans holding user memory: small-object spans (live objects and
    /// their free neighbours) and large objects. Go's `heap_inuse`.
    pub heap_bytes: u64,
    /// Bytes in live spans holding span records (allocator metadata).
    pub span_record_bytes: u64,
    /// Bytes in live spans holding small-object span bitmaps (allocator metadata).
    pub span_bitmap_bytes: u64,
    /// Bytes in live spans holding thread-cache records (allocator metadata).
    pub thread_cache_bytes: u64,
    /// Committed arena bytes in free page runs: `committed_bytes - inuse_bytes`.
    pub free_bytes: u64,
    /// Pages (8 KiB) in live heap spans.
    pub pages_in_use: u64,
    /// Free bytes held in threads' page caches (each thread keeps up to a 512 KiB
    /// block of free pages to allocate small spans from without the heap lock). They
    /// are part of the free memory: committed or released as their pages are.
    pub page_cache_bytes: u64,
    /// Large objects (over 32 KiB, or alignment over 8 KiB) allocated so far. A `realloc`
    /// that resizes a large block in place counts as one free and one allocation.
    pub large_allocs: u64,
    /// Large objects freed so far.
    pub large_frees: u64,
    /// Bytes of large objects allocated so far, in whole pages (a large object occupies
    /// its size rounded up to 8 KiB).
    pub large_alloc_bytes: u64,
    /// Bytes of large objects freed so far, in whole pages.
    pub large_free_bytes: u64,
    /// Threads with a live thread cache.
    pub thread_caches: u64,
    /// Bytes of freed objects held in threads' free stacks (counted as live above until
    /// they go back to their spans), an estimate: each class's depth as of its last
    /// refill, overflow or visit. Not part of the consistent snapshot.
    pub free_stack_bytes: u64,
    /// The budget of all threads' free stacks together
    /// ([`thread_cache_budget`](crate::thread_cache_budget)).
    pub thread_cache_budget: u64,
    /// Bytes of the live record chunks counted in `span_record_bytes` and
    /// `span_bitmap_bytes` that the scavenger has returned to the OS because every
    /// record in them was free (they are counted in use, but not resident).
    pub metadata_released_bytes: u64,
    /// Span-map pages (one 4 KiB page of entries per 4 MiB of heap) the scavenger has
    /// dropped because the heap pages they describe were all free and returned, in all.
    pub span_map_pages_dropped: u64,
    /// Bytes the scavenger has returned to the OS so far (cumulative; the automatic
    /// passes and [`release_memory`](crate::release_memory)).
    pub scavenged_bytes: u64,
    /// Successful `madvise` calls the scavenger has made so far (cumulative).
    pub scavenge_calls: u64,
    /// Released bytes that allocations have taken back into use so far (cumulative):
    /// pages returned to the OS (or never touched) and then re-committed.
    pub reused_released_bytes: u64,
    /// `madvise(MADV_DONTNEED)` calls the OS refused so far (cumulative; for example on
    /// memory locked by `mlockall`). A scavenger run whose call failed stays committed
    /// and dirty (not counted in `released_bytes` or `scavenged_bytes`, cleared before
    /// `alloc_zeroed` hands it out) and is tried again only after the delay; a thread
    /// cache's free-stack storage stays resident.
    pub decommit_failures: u64,
    /// Bytes those refused calls covered (cumulative).
    pub decommit_failed_bytes: u64,
    /// Arena bytes given back to the OS whole (`munmap`) so far (cumulative): when the
    /// OS refuses to grow the heap (address space or memory exhausted, `RLIMIT_AS`),
    /// the arenas whose every page is free are unmapped and the growth is tried again.
    /// They no longer count in `arena_bytes`.
    pub unmapped_bytes: u64,
    /// Small-object counts per size class, indexed by class (index 0, "no class", is
    /// all zero). See [`ClassStats`] for when objects are counted.
    pub classes: [ClassStats; NUM_CLASSES],
    /// The atomic heap counters, read separately (not part of the consistent snapshot).
    pub gauges: HeapGauges,
    /// The use of the allocator's locks per kind, read after the consistent snapshot
    /// (not part of it; it includes the locks `stats()` itself took): see
    /// [`lock_stats`](crate::lock_stats).
    pub locks: [LockStats; LOCK_KINDS],
    /// What remote frees did to shared cache lines, read after the consistent snapshot
    /// (not part of it): see [`remote_free_stats`](crate::remote_free_stats).
    pub remote: RemoteFreeStats,
}

impl Stats {
    pub(crate) fn from_totals(t: &[u64; field::N], gauges: HeapGauges) -> Stats {
        use field::*;
        let purpose = |p: Purpose| t[PURPOSE + p as usize];
        let mut classes = [ClassStats::default(); NUM_CLASSES];
        for (c, cs) in classes.iter_mut().enumerate().skip(1) {
            *cs = ClassStats {
                size: CLASS_TO_SIZE[c] as u64,
                allocs: t[SMALL_ALLOCS + c],
                frees: t[SMALL_FREES + c],
                spans: t[SMALL_SPANS + c],
            };
        }
        Stats {
            arena_bytes: t[ARENA],
            committed_bytes: t[COMMITTED],
            released_bytes: t[RELEASED],
            metadata_bytes: t[META],
            inuse_bytes: t[INUSE],
            heap_bytes: purpose(Purpose::Heap),
            span_record_bytes: purpose(Purpose::SpanRecords),
            span_bitmap_bytes: purpose(Purpose::SpanBitmaps),
            thread_cache_bytes: purpose(Purpose::ThreadCaches),
            free_bytes: t[COMMITTED].wrapping_sub(t[INUSE]),
            pages_in_use: t[PAGES_IN_USE],
            page_cache_bytes: t[PAGE_CACHED],
            large_allocs: t[LARGE_ALLOCS],
            large_frees: t[LARGE_FREES],
            large_alloc_bytes: t[LARGE_ALLOC_BYTES],
            large_free_bytes: t[LARGE_FREE_BYTES],
            thread_caches: t[CACHES],
            free_stack_bytes: 0,
            thread_cache_budget: 0,
            metadata_released_bytes: 0,
            span_map_pages_dropped: 0,
            scavenged_bytes: t[SCAV_BYTES],
            scavenge_calls: t[SCAV_CALLS],
            reused_released_bytes: t[REUSED_RELEASED],
            decommit_failures: t[DECOMMIT_FAILURES],
            decommit_failed_bytes: t[DECOMMIT_FAILED_BYTES],
            unmapped_bytes: t[UNMAPPED],
            classes,
            gauges,
            locks: LockStats::table(),
            remote: RemoteFreeStats::default(),
        }
    }

    /// Live small objects, all classes.
    pub fn small_live_objects(&self) -> u64 {
        self.classes.iter().map(ClassStats::live).sum()
    }
    /// Bytes of live small objects (each counted at its class size).
    pub fn small_live_bytes(&self) -> u64 {
        self.classes.iter().map(ClassStats::live_bytes).sum()
    }
    /// Small objects allocated so far, all classes.
    pub fn small_allocs(&self) -> u64 {
        self.classes.iter().map(|c| c.allocs).sum()
    }
    /// Small objects freed so far, all classes.
    pub fn small_frees(&self) -> u64 {
        self.classes.iter().map(|c| c.frees).sum()
    }
    /// Live large objects.
    pub fn large_live_objects(&self) -> u64 {
        self.large_allocs.saturating_sub(self.large_frees)
    }
    /// Bytes of live large objects (whole pages).
    pub fn large_live_bytes(&self) -> u64 {
        self.large_alloc_bytes.saturating_sub(self.large_free_bytes)
    }

    /// Where the heap's committed bytes and its metadata go (see [`Resident`]).
    pub fn resident(&self) -> Resident {
        let sum = |f: fn(&ClassStats) -> u64| self.classes.iter().map(f).sum::<u64>();
        let small_spans = sum(ClassStats::spans_bytes);
        let records = self.span_record_bytes + self.span_bitmap_bytes + self.thread_cache_bytes;
        Resident {
            small_objects: self.small_live_bytes(),
            small_free_slots: sum(ClassStats::free_slot_bytes),
            small_tails: sum(ClassStats::tail_bytes),
            large_blocks: self.heap_bytes.saturating_sub(small_spans),
            free_pages: self.free_bytes,
            page_caches: self.page_cache_bytes.min(self.free_bytes),
            records: records.saturating_sub(self.metadata_released_bytes),
            metadata: self.metadata_bytes,
        }
    }

    /// Checks the invariants listed on [`Stats`]; `Err` names the first one violated.
    pub fn check(&self) -> Result<(), &'static str> {
        // Counters are u64 totals of wrapping deltas: a "negative" one is huge.
        const NEG: u64 = 1 << 63;
        if self
            .classes
            .iter()
            .any(|c| c.frees > c.allocs || c.allocs >= NEG)
        {
            return Err("a size class has more frees than allocations");
        }
        if self.large_frees > self.large_allocs || self.large_free_bytes > self.large_alloc_bytes {
            return Err("more large frees than large allocations");
        }
        let by_purpose = [
            self.heap_bytes,
            self.span_record_bytes,
            self.span_bitmap_bytes,
            self.thread_cache_bytes,
        ];
        if by_purpose.iter().any(|&b| b >= NEG) {
            return Err("bytes of a purpose are negative");
        }
        if by_purpose.iter().sum::<u64>() != self.inuse_bytes {
            return Err("bytes per purpose do not sum to the in-use total");
        }
        if self.heap_bytes != self.pages_in_use * crate::os::PAGE_SIZE as u64 {
            return Err("heap bytes are not pages in use times the page size");
        }
        if self.committed_bytes >= NEG || self.released_bytes >= NEG {
            return Err("committed or released bytes are negative");
        }
        if self.committed_bytes + self.released_bytes != self.arena_bytes {
            return Err("committed + released is not the arena bytes mapped");
        }
        if self.inuse_bytes > self.committed_bytes {
            return Err("more bytes in use than committed");
        }
        if self.small_live_bytes() + self.large_live_bytes() > self.heap_bytes {
            return Err("live objects occupy more than the heap spans in use");
        }
        if self.classes.iter().any(|c| c.spans >= NEG) {
            return Err("a size class has a negative number of spans");
        }
        // (Counted in the same sections as the heap bytes, unlike the large-block
        // counts, which a snapshot may see a section apart from their spans.)
        let small_spans: u64 = self.classes.iter().map(ClassStats::spans_bytes).sum();
        if small_spans > self.heap_bytes {
            return Err("small-object spans occupy more than the heap spans in use");
        }
        if self.page_cache_bytes >= NEG
            || self.page_cache_bytes > self.arena_bytes - self.inuse_bytes
        {
            return Err("page caches hold more than the free memory");
        }
        if self.thread_caches >= NEG {
            return Err("negative number of thread caches");
        }
        Ok(())
    }
}

/// `n` bytes in a short human unit.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0;
        let mut u = 0;
        while v >= 10 * 1024 && u < UNITS.len() - 1 {
            v /= 1024;
            u += 1;
        }
        // Through a stack buffer, so that the caller's width and alignment apply.
        let mut s = Short {
            buf: [0; 24],
            len: 0,
        };
        let _ = fmt::write(&mut s, format_args!("{v} {}", UNITS[u]));
        f.pad(s.as_str())
    }
}

impl fmt::Display for Stats {
    /// A readable report: totals, then one row per size class that was used.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.gauges;
        writeln!(f, "spanheap statistics")?;
        write!(
            f,
            "  arenas mapped      {:>12}   committed {}, released {}",
            Bytes(self.arena_bytes),
            Bytes(self.committed_bytes),
            Bytes(self.released_bytes)
        )?;
        if self.unmapped_bytes != 0 {
            write!(f, ", unmapped {}", Bytes(self.unmapped_bytes))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  in use             {:>12}   heap {}, span records {}, span bitmaps {}, thread caches {}",
            Bytes(self.inuse_bytes),
            Bytes(self.heap_bytes),
            Bytes(self.span_record_bytes),
            Bytes(self.span_bitmap_bytes),
            Bytes(self.thread_cache_bytes)
        )?;
        writeln!(
            f,
            "  free, committed    {:>12}   page caches hold {}",
            Bytes(self.free_bytes),
            Bytes(self.page_cache_bytes)
        )?;
        writeln!(
            f,
            "  metadata (other)   {:>12}   records released {}, span-map pages dropped {}",
            Bytes(self.metadata_bytes),
            Bytes(self.metadata_released_bytes),
            self.span_map_pages_dropped
        )?;
        writeln!(f, "  pages in use       {:>12}", self.pages_in_use)?;
        writeln!(
            f,
            "  thread caches      {:>12}   free stacks hold about {} (budget {})",
            self.thread_caches,
            Bytes(self.free_stack_bytes),
            Bytes(self.thread_cache_budget)
        )?;
        writeln!(
            f,
            "  scavenged          {:>12}   in {} madvise calls; {} released bytes reused",
            Bytes(self.scavenged_bytes),
            self.scavenge_calls,
            Bytes(self.reused_released_bytes)
        )?;
        if self.decommit_failures != 0 {
            writeln!(
                f,
                "  decommit failed    {:>12}   in {} madvise calls (kept committed)",
                Bytes(self.decommit_failed_bytes),
                self.decommit_failures
            )?;
        }
        writeln!(
            f,
            "  small objects      {:>12} live ({}), {} allocated, {} freed",
            self.small_live_objects(),
            Bytes(self.small_live_bytes()),
            self.small_allocs(),
            self.small_frees()
        )?;
        writeln!(
            f,
            "  large objects      {:>12} live ({}), {} allocated ({}), {} freed ({})",
            self.large_live_objects(),
            Bytes(self.large_live_bytes()),
            self.large_allocs,
            Bytes(self.large_alloc_bytes),
            self.large_frees,
            Bytes(self.large_free_bytes)
        )?;
        writeln!(
            f,
            "  atomic counters    heap_sys {}, heap_inuse {}, heap_idle {}, heap_released {}, pagesInUse {}",
            Bytes(g.heap_sys),
            Bytes(g.heap_inuse),
            Bytes(g.heap_idle),
            Bytes(g.heap_released),
            g.pages_in_use
        )?;
        let b = self.resident();
        writeln!(
            f,
            "  resident, at most  {:>12}   small objects {}, free slots {}, span tails {}, large blocks {}, free pages {} (page caches {}), records {}, metadata {}",
            Bytes(b.total()),
            Bytes(b.small_objects),
            Bytes(b.small_free_slots),
            Bytes(b.small_tails),
            Bytes(b.large_blocks),
            Bytes(b.free_pages),
            Bytes(b.page_caches),
            Bytes(b.records),
            Bytes(b.metadata)
        )?;
        let r = &self.remote;
        writeln!(
            f,
            "  remote frees       {:>12}   bitmap fetch_or {}, state fetch_add {}, announcements {}",
            r.objects, r.bitmap_rmws, r.state_rmws, r.announces
        )?;
        writeln!(
            f,
            "  {:<14} {:>5} {:>14} {:>12} {:>12} {:>12} {:>12}",
            "lock", "locks", "acquisitions", "contended", "sleeps", "waited us", "try busy"
        )?;
        for l in &self.locks {
            writeln!(
                f,
                "  {:<14} {:>5} {:>14} {:>12} {:>12} {:>12} {:>12}",
                l.name,
                l.locks,
                l.acquisitions,
                l.contended,
                l.sleeps,
                l.wait_ns / 1000,
                l.try_busy
            )?;
        }
        writeln!(
            f,
            "  {:>5} {:>6} {:>14} {:>14} {:>12} {:>12} {:>8} {:>12}",
            "class", "size", "allocs", "frees", "live", "live bytes", "spans", "free slots"
        )?;
        for (c, cs) in self.classes.iter().enumerate().skip(1) {
            if cs.allocs == 0 && cs.frees == 0 && cs.spans == 0 {
                continue;
            }
            writeln!(
                f,
                "  {:>5} {:>6} {:>14} {:>14} {:>12} {:>12} {:>8} {:>12}",
                c,
                cs.size,
                cs.allocs,
                cs.frees,
                cs.live(),
                Bytes(cs.live_bytes()),
                cs.spans,
                Bytes(cs.free_slot_bytes())
            )?;
        }
        Ok(())
    }
}

/// A short string on the stack (formatting without allocating).
struct Short {
    buf: [u8; 24],
    len: usize,
}

impl fmt::Write for Short {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Short {
    fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

// ---------------------------------------------------------------------------------------
// SPANHEAP_STATS=1: the report at process exit.
// ---------------------------------------------------------------------------------------

/// Registers the exit report if `SPANHEAP_STATS` is set to something other than `0` or
/// the empty string. Called when a thread cache is created; does its work once.
#[cfg(not(spanheap_loom))]
pub(crate) fn exit_report_once() {
    // Process-wide set-once state, not part of the modelled core (core atomics).
    use core::sync::atomic::{AtomicBool, Ordering as O};
    static CHECKED: AtomicBool = AtomicBool::new(false);
    if CHECKED.load(O::Relaxed) || CHECKED.swap(true, O::Relaxed) {
        return;
    }
    // SAFETY: getenv with a NUL-terminated name; it returns a pointer into the
    // environment (or null) and does not allocate.
    let v = unsafe { libc::getenv(c"SPANHEAP_STATS".as_ptr()) };
    // SAFETY: a non-null result is a NUL-terminated string.
    if v.is_null() || matches!(unsafe { *v } as u8, 0 | b'0') {
        return;
    }
    // SAFETY: registering a handler of the right signature. (If it fails there is no
    // report; nothing else depends on it.)
    unsafe { libc::atexit(report_at_exit) };
}

#[cfg(not(spanheap_loom))]
extern "C" fn report_at_exit() {
    let s = crate::stats();
    let mut w = StderrWriter {
        buf: [0; 1024],
        len: 0,
    };
    let _ = fmt::write(&mut w, format_args!("{s}"));
    w.flush();
}

/// Formats to stderr through a stack buffer (no allocation).
#[cfg(not(spanheap_loom))]
struct StderrWriter {
    buf: [u8; 1024],
    len: usize,
}

#[cfg(not(spanheap_loom))]
impl StderrWriter {
    fn flush(&mut self) {
        crate::os::write_stderr(&self.buf[..self.len]);
        self.len = 0;
    }
}

#[cfg(not(spanheap_loom))]
impl fmt::Write for StderrWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(self.buf.len()) {
            if self.len + chunk.len() > self.buf.len() {
                self.flush();
            }
            self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_seen_whole_and_totals_accumulate() {
        static S: ConsistentStats<2> = ConsistentStats::new();
        static W: StatsSeq<2> = StatsSeq::new();
        S.register(&W);
        let mut out = [0u64; 2];
        for round in 1..=5u64 {
            S.update(Some(&W), |d| {
                d.add(0, 3);
                d.add(1, 3);
            });
            S.update(None, |d| {
                d.add(0, 2);
                d.sub(1, 1);
            });
            S.read(&mut out);
            assert_eq!(out, [5 * round, 2 * round]);
        }
    }

    #[test]
    fn concurrent_writers_each_with_own_deltas_are_seen_whole() {
        // Three writers with their own records and one cache-less writer add to both
        // counters in each section while the main thread takes snapshots: every
        // snapshot shows both equal and never goes backwards, and the last one has
        // every section.
        static S: ConsistentStats<2> = ConsistentStats::new();
        // Snapshots taken so far: the writers wait halfway for a few, so that
        // snapshots overlap writing however the threads are scheduled.
        static READS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
        const SECTIONS: u64 = 20_000;
        std::thread::scope(|sc| {
            let mut hs = Vec::new();
            for t in 0..4u64 {
                hs.push(sc.spawn(move || {
                    let w: Option<&'static StatsSeq<2>> = (t < 3).then(|| {
                        let w = Box::leak(Box::new(StatsSeq::new()));
                        S.register(w);
                        &*w
                    });
                    for i in 0..SECTIONS {
                        if i == SECTIONS / 2 {
                            while READS.load(core::sync::atomic::Ordering::Relaxed) < 3 {
                                std::thread::yield_now();
                            }
                        }
                        let v = t + 1 + (i & 1);
                        S.update(w, |d| {
                            d.add(0, v);
                            d.sub(1, 1);
                            d.add(1, v + 1);
                        });
                    }
                }));
            }
            let mut last = 0;
            loop {
                let mut out = [0u64; 2];
                S.read(&mut out);
                assert_eq!(out[0], out[1], "a snapshot saw half a section");
                assert!(out[0] >= last, "snapshots went backwards");
                last = out[0];
                READS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                if hs.iter().all(|h| h.is_finished()) {
                    break;
                }
            }
        });
        let mut out = [0u64; 2];
        S.read(&mut out);
        // Writer t adds (t + 1) + (i & 1) per section: SECTIONS * (t + 1) + SECTIONS / 2.
        let expect: u64 = (0..4u64).map(|t| SECTIONS * (t + 1) + SECTIONS / 2).sum();
        assert_eq!(out, [expect, expect]);
    }

    #[test]
    fn report_names_spanheap_and_lists_used_classes() {
        let mut t = [0u64; field::N];
        t[field::SMALL_ALLOCS + 3] = 10;
        t[field::SMALL_FREES + 3] = 4;
        let s = Stats::from_totals(&t, HeapGauges::default());
        struct W(usize, bool, bool);
        impl fmt::Write for W {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                if self.0 == 0 && s.starts_with("spanheap") {
                    self.1 = true;
                }
                if s.contains("10") {
                    self.2 = true;
                }
                self.0 += s.len();
                Ok(())
            }
        }
        let mut w = W(0, false, false);
        fmt::write(&mut w, format_args!("{s}")).unwrap();
        assert!(w.1 && w.2);
        assert_eq!(s.classes[3].live(), 6);
        assert_eq!(s.classes[3].live_bytes(), 6 * CLASS_TO_SIZE[3] as u64);
    }
}
