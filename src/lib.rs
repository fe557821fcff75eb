//! spanheap: a Rust global allocator built on the Go runtime's span heap.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;
//! ```
//!
//! # Architecture
//!
//! Memory flows through these layers (one module each; `docs/design.md` has the full
//! design, the walk-through of an allocation and a free, and the table of shared fields):
//!
//! - [`os`]: reserve / map / commit / decommit / release address space (`mmap`,
//!   `madvise`), with Go's four memory states. Nothing else talks to the OS.
//! - `arena`: 64 MiB heap arenas, the two-level arena index, the per-arena span map
//!   and `pageInUse` bitmap. Address -> span is lock-free.
//! - `pagealloc`: Go's radix-tree page allocator: address-ordered first fit over
//!   per-chunk bitmaps, O(levels) search, scavenged bitmap.
//! - `fixalloc`: fixed-size records for the allocator's own metadata.
//! - `mspan`: the span record and span purposes.
//! - `mheap`: `alloc_span` / `free_span` under a lock held only to take pages, with
//!   lock-free initialisation and an atomic publication protocol.
//! - `sizeclasses`: the generated size-class table (67 classes up to 32 KiB).
//! - `mcache`: the thread-local front end for small objects: local free stack and a
//!   64-object window per class, no lock and no atomic read-modify-write; remote frees.
//!   Its two thread-local slots are in `mcache::tls` (initial-exec TLS in shared
//!   libraries with the `static-tls` feature).
//! - `mcentral`: per-class spans no cache owns: partial/full lists, announcements.
//! - `malloc`: `Layout` -> small object (size class) or large object (page span).
//! - `scavenger`: returns free memory to the OS after a delay, from a background
//!   thread started once there is some (or paced from the slow paths), and
//!   [`release_memory`] for all of it now; `bgscavenge`: that thread, for the
//!   process-wide heap.
//! - `stats`: consistent statistics (per-writer deltas in two generations, with
//!   per-thread sequence counters) behind [`stats()`], and the [`Stats`] report.
//! - `sync`: the single shim for atomics, cells and the lock (std or loom).
//! - `env`: the `SPANHEAP_*` environment settings, read without allocating.
//! - `fork`: the `pthread_atfork` handlers.
//!
//! The allocator never panics, never unwinds and never calls the global allocator.

#![deny(unsafe_op_in_unsafe_fn)]
// Under loom the `GlobalAlloc` front end (process-wide statics, thread caches) is
// compiled out and models drive the core directly, so much of the crate has no caller.
#![cfg_attr(spanheap_loom, allow(dead_code))]
#![warn(missing_debug_implementations)]

mod arena;
mod env;
#[cfg(not(spanheap_loom))]
mod fastclass;
mod fatal;
#[cfg(feature = "fault-injection")]
pub mod fault_injection;
mod fixalloc;
#[cfg(not(spanheap_loom))]
mod global;
mod lockrank;
mod malloc;
mod mcache;
mod mcentral;
mod mheap;
mod mspan;
pub mod os;
mod pagealloc;
mod pagecache;
#[cfg(all(feature = "profile", not(spanheap_loom)))]
pub mod profile;
mod scavenger;
mod sizeclasses;
mod stats;
mod sync;

// Classes serve alignments up to one heap page (spans are page aligned).
const _: () = assert!(sizeclasses::MAX_CLASS_ALIGN == os::PAGE_SIZE);

pub use mspan::Purpose;
pub use scavenger::ScavengerConfig;
pub use stats::{ClassStats, HeapGauges, LockStats, RemoteFreeStats, Resident, Stats, LOCK_KINDS};

/// The spanheap global allocator (zero-sized; all state is process-wide: `global/mod.rs`).
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;
/// ```
#[cfg(not(spanheap_loom))]
#[derive(Clone, Copy, Debug, Default)]
pub struct SpanHeap;

// SAFETY: blocks come from spans that the heap hands out once and takes back only in
// `dealloc`/`realloc`; every block is at least `layout.size()` bytes (whole pages)
// and aligned to `layout.align()`; failures return null; nothing panics.
#[cfg(not(spanheap_loom))]
unsafe impl core::alloc::GlobalAlloc for SpanHeap {
    #[inline]
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        malloc::global::alloc(layout.size(), layout.align())
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: core::alloc::Layout) -> *mut u8 {
        malloc::global::alloc_zeroed(layout.size(), layout.align())
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // SAFETY: GlobalAlloc's contract: `ptr` is a live block allocated with `layout`.
        unsafe { malloc::global::dealloc(ptr, layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn realloc(
        &self,
        ptr: *mut u8,
        layout: core::alloc::Layout,
        new_size: usize,
    ) -> *mut u8 {
        // SAFETY: GlobalAlloc's contract: `ptr` is a live block allocated with `layout`.
        unsafe { malloc::global::realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}

/// A consistent snapshot of spanheap's statistics.
///
/// One call, no setup: the snapshot is taken while other threads keep allocating, and
/// every update the allocator makes together is in it entirely or not at all (Go's
/// consistent heap statistics), so the invariants documented on [`Stats`] hold for
/// every snapshot. Counts a thread has not yet published (objects it reused from its
/// own free list since its last refill) are published for the calling thread first;
/// see [`ClassStats`] for when objects are counted.
///
/// Taking a snapshot does not allocate. Snapshots are serialised with each other; a
/// snapshot waits (briefly) only for threads that are in the middle of a statistics
/// update.
///
/// ```
/// let s = spanheap::stats();
/// assert!(s.check().is_ok());
/// println!("{s}"); // a readable report: totals and a per-size-class table
/// ```
///
/// Setting `SPANHEAP_STATS=1` in the environment prints the same report to stderr when
/// the process exits.
#[cfg(not(spanheap_loom))]
pub fn stats() -> Stats {
    mcache::publish_counts::<global::Process>();
    let mut t = [0u64; stats::field::N];
    global::HEAP.stats.read(&mut t);
    let mut s = Stats::from_totals(&t, global::HEAP.gauges());
    s.free_stack_bytes = global::idle::census(|_, _| {});
    s.thread_cache_budget = mcache::budget::get() as u64;
    let c = global::HEAP.counters();
    s.metadata_released_bytes = c.meta_released;
    s.span_map_pages_dropped = c.span_map_drops;
    s.locks = lock_stats();
    s.remote = remote_free_stats();
    s
}

/// What the thread caches' remote frees (objects of spans another cache owns, or no
/// cache: cross-thread frees) did to shared cache lines so far: objects, and the
/// atomic read-modify-writes and mcentral announcements they took (see
/// [`RemoteFreeStats`]). Cheap: sums a few counters of every thread-cache record, takes
/// no lock and does not allocate. [`stats()`] reports the same in [`Stats::remote`].
#[cfg(not(spanheap_loom))]
pub fn remote_free_stats() -> RemoteFreeStats {
    RemoteFreeStats::from_array(mcache::door::remote_totals())
}

/// How much the allocator's shared locks are used and contended: one row per kind of
/// lock, in lock order (`reclaim`, `stats reader`, `shared cache`, `mcentral` (the 67
/// size classes' locks summed), `cache records`, `heap`, `stats nop`, `profile` (the
/// heap profile's, feature `profile`); see [`LockStats`]). Cumulative
/// counts; take two readings and subtract ([`LockStats::since`]) to measure a piece
/// of work. Cheap: it reads each lock's counters (no lock taken, no allocation).
/// [`stats()`] reports the same in [`Stats::locks`], and `SPANHEAP_STATS=1` prints it
/// at exit.
///
/// ```
/// let before = spanheap::lock_stats();
/// let v: Vec<Box<[u8; 64]>> = (0..10_000).map(|_| Box::new([0; 64])).collect();
/// drop(v);
/// for (now, then) in spanheap::lock_stats().iter().zip(&before) {
///     let d = now.since(then);
///     assert!(d.contended <= d.acquisitions);
///     println!("{:<14} {} acquisitions, {} contended", d.name, d.acquisitions, d.contended);
/// }
/// ```
#[cfg(not(spanheap_loom))]
pub fn lock_stats() -> [LockStats; LOCK_KINDS] {
    #[allow(unused_mut)]
    let mut t = global::HEAP.lock_stats();
    #[cfg(feature = "profile")]
    LockStats::add(&mut t, profile::lock_counts());
    t
}

/// What one thread's cache holds (see [`thread_caches`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCacheInfo {
    /// The thread's kernel id (`gettid`).
    pub tid: i32,
    /// Bytes of freed objects in its free stacks, as of each size class's last refill,
    /// overflow or visit.
    pub free_stack_bytes: u64,
}

/// Fills `out` with what each thread's cache holds, one entry per thread with a live
/// cache (as many as fit), and returns how many threads there are. Does not allocate.
///
/// ```
/// let mut t = [spanheap::ThreadCacheInfo::default(); 64];
/// let n = spanheap::thread_caches(&mut t);
/// for info in &t[..n.min(t.len())] {
///     let _ = (info.tid, info.free_stack_bytes);
/// }
/// ```
#[cfg(not(spanheap_loom))]
pub fn thread_caches(out: &mut [ThreadCacheInfo]) -> usize {
    let mut n = 0;
    global::idle::census(|tid, free_stack_bytes| {
        if let Some(o) = out.get_mut(n) {
            *o = ThreadCacheInfo {
                tid,
                free_stack_bytes,
            };
        }
        n += 1;
    });
    n
}

/// Returns everything the calling thread's cache holds to the shared heap: freed objects
/// waiting in its free lists and remote buffers go back to their spans, and its current
/// spans go back to the size classes' shared lists (so spans that are now completely free
/// are retired), and the pages its free stacks had touched are returned to the OS. The
/// thread keeps its cache and refills it on its next allocation. Thread exit does the
/// same automatically.
#[cfg(not(spanheap_loom))]
pub fn flush_thread_cache() {
    mcache::flush_own::<global::Process>();
}

/// Returns every free page of the heap to the OS now (Go's `debug.FreeOSMemory`), and
/// returns how many bytes that was.
///
/// The calling thread's cache is flushed first ([`flush_thread_cache`]), so what it
/// held is returned too; so are the free pages other threads' caches hold (their page
/// block, chunks and large blocks) unless the thread is using its cache at that moment,
/// the freed objects other threads' caches hold if the thread is blocked in a system
/// call (a visit, see `docs/design.md`), neither if the OS lacks `membarrier`; and the
/// completely free spans each size class keeps for its next refills. Free memory is
/// returned whatever its age, the retained headroom and the density of its chunk.
/// Afterwards the released pages cost no RAM; allocating them again re-commits them
/// (they read as zero).
/// Safe to call at any time from any thread; it does not allocate.
///
/// ```
/// let v = vec![0u8; 64 << 20];
/// drop(v);
/// let released = spanheap::release_memory();
/// # let _ = released;
/// ```
#[cfg(not(spanheap_loom))]
pub fn release_memory() -> usize {
    mcache::flush_own::<global::Process>();
    global::idle::visit_threads(true, 0, 0);
    global::HEAP.reclaim_caches(true, 0, 0);
    global::HEAP.release_spares();
    global::HEAP.scavenge(true, 0, u64::MAX).0
}

/// The scavenger's settings now (the environment's `SPANHEAP_*` values, or what
/// [`set_scavenger_config`] set).
#[cfg(not(spanheap_loom))]
pub fn scavenger_config() -> ScavengerConfig {
    global::HEAP.scavenger.config()
}

/// Changes the scavenger's settings, before or after the allocator is first used; a
/// call overrides the environment. Takes effect at the next slow path or background
/// pass. With `background: true`, if there is free memory to return and the background
/// thread is not running, starts it now (otherwise it starts once there is); returns
/// false if it could not be started (the other settings still apply, and the slow paths
/// do the passes).
///
/// ```
/// use std::time::Duration;
/// let mut c = spanheap::scavenger_config();
/// c.delay = Some(Duration::from_millis(500));
/// c.retain_percent = 5;
/// assert!(spanheap::set_scavenger_config(c));
/// assert_eq!(spanheap::scavenger_config(), c);
/// ```
#[cfg(not(spanheap_loom))]
pub fn set_scavenger_config(config: ScavengerConfig) -> bool {
    global::HEAP.scavenger.set_config(config);
    global::HEAP.start_background_if_due()
}

/// The budget of all threads' free stacks together, in bytes (tcmalloc's overall
/// thread-cache size): each thread's free stacks may hold at most its share, the budget
/// divided by the threads with a cache (but at least one object of each size class).
/// Default 1 GiB; environment `SPANHEAP_THREAD_CACHE_BUDGET` (bytes, or with a `K`,
/// `M` or `G` suffix).
#[cfg(not(spanheap_loom))]
pub fn thread_cache_budget() -> usize {
    mcache::budget::get()
}

/// Changes the budget of all threads' free stacks (see [`thread_cache_budget`]). Each
/// thread adopts its new share at its next refill or overflow, or when the background
/// scavenger next visits it; the calling thread at once.
///
/// ```
/// spanheap::set_thread_cache_budget(32 << 20);
/// assert_eq!(spanheap::thread_cache_budget(), 32 << 20);
/// ```
#[cfg(not(spanheap_loom))]
pub fn set_thread_cache_budget(bytes: usize) {
    mcache::budget::set(bytes);
    mcache::apply_own_budget::<global::Process>();
}

/// Entry points by address alone, for C-style callers that do not pass the size or
/// alignment back when freeing (the `spanheap-preload` library's `free`,
/// `malloc_usable_size` and `realloc`). Blocks from either API may be freed through
/// either, as long as each block is freed once.
#[cfg(not(spanheap_loom))]
pub mod raw {
    use crate::malloc::global;

    /// Allocates `size` bytes (at least 1) aligned to `align` (a power of two). Null if
    /// memory is exhausted or the request is impossible.
    #[inline]
    pub fn alloc(size: usize, align: usize) -> *mut u8 {
        global::alloc(size.max(1), align)
    }

    /// `malloc`'s alignment, as glibc gives it on 64-bit targets: 16 bytes for blocks
    /// of more than 8 bytes (they can hold any object that fits), 8 otherwise. `size`
    /// is rounded up to a multiple of 16, whose size class is always a multiple of 16
    /// (checked by a test over every small size), so this takes the class lookup of an
    /// alignment of 8, the fast one.
    #[inline]
    pub fn malloc(size: usize) -> *mut u8 {
        match malloc_size(size) {
            Some(s) => global::alloc(s, 8),
            None => core::ptr::null_mut(),
        }
    }

    /// The first half of [`malloc`]: a block from the calling thread's cache if its
    /// size class has one ready (free stack or window), else null and the caller calls
    /// [`malloc`]. Never makes a system call and takes no lock (so `errno` is
    /// untouched). Always null in checked mode.
    #[inline]
    pub fn malloc_fast(size: usize) -> *mut u8 {
        global::malloc_cached(size)
    }

    /// `malloc`'s request as a size with alignment 8 that gives glibc's alignment.
    #[inline(always)]
    fn malloc_size(size: usize) -> Option<usize> {
        if size <= 8 {
            return Some(size.max(1));
        }
        size.checked_add(15).map(|s| s & !15)
    }

    /// As [`alloc`], the bytes zeroed.
    #[inline]
    pub fn alloc_zeroed(size: usize, align: usize) -> *mut u8 {
        global::alloc_zeroed(size.max(1), align)
    }

    /// Frees the block at `p`, looking its size up from its span. Null and pointers
    /// spanheap never handed out are ignored.
    ///
    /// # Safety
    /// `p` is null, not spanheap's, or a live spanheap block that is not used
    /// afterwards (and not freed again).
    #[inline]
    pub unsafe fn free(p: *mut u8) {
        // SAFETY: forwarded.
        unsafe { global::free_unsized(p) }
    }

    /// The first half of [`free`]: frees `p` and returns true if it is an object of
    /// the calling thread's current span of its size class (found from a per-page
    /// size-class hint and checked against that span); otherwise does nothing and
    /// returns false, and the caller calls [`free_validated`]. Never makes a system call
    /// (so `errno` is untouched) and takes no lock. Always false in checked mode.
    ///
    /// # Safety
    /// As for [`free`].
    #[inline]
    pub unsafe fn free_fast(p: *mut u8) -> bool {
        // SAFETY: forwarded.
        unsafe { global::free_fast(p) }
    }

    /// The second half of [`free`]: looks `p`'s span up and frees it by what it says
    /// (may make system calls: returning memory, waiting for a lock).
    ///
    /// # Safety
    /// As for [`free`].
    #[inline]
    pub unsafe fn free_validated(p: *mut u8) {
        // SAFETY: forwarded.
        unsafe { global::free_validated(p) }
    }

    /// The number of usable bytes of the live block at `p` (at least what was asked
    /// for), or 0 for null and pointers spanheap never handed out.
    #[inline]
    pub fn usable_size(p: *const u8) -> usize {
        global::usable_size(p)
    }

    /// Resizes the live block at `p` to `new_size` bytes (at least 1), keeping its
    /// contents up to the smaller size; if it must move, the new block is aligned to
    /// `align`. Returns the block (maybe `p`), or null with `p` untouched if memory is
    /// exhausted or `p` is not spanheap's.
    ///
    /// # Safety
    /// `p` is a live spanheap block, not null; after a non-null return only the returned
    /// pointer may be used.
    #[inline]
    pub unsafe fn realloc(p: *mut u8, new_size: usize, align: usize) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { global::realloc_unsized(p, new_size.max(1), align) }
    }
}

#[cfg(all(test, not(spanheap_loom)))]
mod raw_tests {
    use crate::sizeclasses::{class_for_layout, CLASS_TO_SIZE, MAX_SMALL_SIZE};

    /// `raw::malloc`'s promise: a size rounded up to a multiple of 16 always maps (with
    /// the alignment-8 lookup) to a class whose size is a multiple of 16.
    #[test]
    fn rounded_sizes_get_16_byte_aligned_classes() {
        for n in 9..=MAX_SMALL_SIZE {
            let r = (n + 15) & !15;
            let c = class_for_layout(r, 8) as usize;
            if c != 0 {
                assert_eq!(CLASS_TO_SIZE[c] as usize % 16, 0, "size {n} -> class {c}");
                assert!(CLASS_TO_SIZE[c] as usize >= n);
            }
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "uses the global heap, which is on OsMemory (real mmap)"
    )]
    fn c_style_calls_by_address() {
        for n in [0usize, 1, 8, 9, 24, 100, 4096, 40_000, 1 << 20] {
            let p = super::raw::malloc(n);
            assert!(!p.is_null());
            assert_eq!(p as usize % if n > 8 { 16 } else { 8 }, 0);
            assert!(super::raw::usable_size(p) >= n.max(1));
            // SAFETY: a live block of at least n bytes; resized, then freed once.
            unsafe {
                p.write_bytes(0xAB, n);
                let q = super::raw::realloc(p, n * 3 + 1, 16);
                assert!(!q.is_null() && super::raw::usable_size(q) > n * 3);
                assert!(core::slice::from_raw_parts(q, n).iter().all(|&b| b == 0xAB));
                super::raw::free(q);
            }
        }
        assert_eq!(super::raw::usable_size(core::ptr::null()), 0);
        let local = 5u64;
        assert_eq!(super::raw::usable_size((&local as *const u64).cast()), 0);
        // SAFETY: null and foreign pointers are ignored.
        unsafe {
            super::raw::free(core::ptr::null_mut());
            super::raw::free((&local as *const u64 as *mut u64).cast());
        }
    }
}

/// Internals for this workspace's tests, benchmarks and loom models. Not part of the
/// public API; no semver promise.
#[doc(hidden)]
pub mod __private {
    use crate::mcache::Heap;
    pub use crate::mheap::HeapCounters;
    use crate::mspan::{MSpan, Purpose};
    use crate::os::{MemSource, OsMemory};
    use core::ptr::NonNull;

    /// The heap lock's implementation guarding a counter, for the loom model of the lock.
    #[derive(Debug)]
    pub struct LockedCounter(crate::sync::Mutex<u64>);
    impl LockedCounter {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            LockedCounter(crate::sync::Mutex::new(0, crate::lockrank::HEAP))
        }
        /// A non-atomic read-modify-write under the lock.
        pub fn increment(&self) {
            self.0.lock().with(|v| *v += 1);
        }
        pub fn get(&self) -> u64 {
            self.0.lock().with(|v| *v)
        }
    }

    /// Two counters kept with the real consistent-statistics code (`stats.rs`), for the
    /// loom model: writers add to both in one section; a snapshot must show them equal.
    #[derive(Debug)]
    pub struct StatsPair(crate::stats::ConsistentStats<2>);

    /// A registered writer of a [`StatsPair`] (a thread cache's sequence counter).
    #[derive(Debug)]
    pub struct StatsWriter(crate::stats::StatsSeq<2>);

    impl StatsPair {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            StatsPair(crate::stats::ConsistentStats::new())
        }
        /// A new registered writer (leaked: the registry keeps pointing to it).
        pub fn writer(&self) -> &'static StatsWriter {
            let w: &'static StatsWriter =
                Box::leak(Box::new(StatsWriter(crate::stats::StatsSeq::new())));
            self.0.register(&w.0);
            w
        }
        /// One section adding `v` to both counters, lock-free with a writer, else
        /// under the leaf lock. One writer per thread; sections must not nest.
        pub fn add(&self, w: Option<&StatsWriter>, v: u64) {
            self.0.update(w.map(|w| &w.0), |d| {
                d.add(0, v);
                d.add(1, v);
            });
        }
        /// A snapshot of both counters.
        pub fn read(&self) -> [u64; 2] {
            let mut out = [0; 2];
            self.0.read(&mut out);
            out
        }
    }

    /// Whether the calling thread's cache has the size class of `size`-byte,
    /// 8-aligned objects in wide mode (frees go to the local list without a span-map
    /// lookup; see `mcache::refill_span`). For tests.
    #[cfg(not(spanheap_loom))]
    pub fn thread_class_wide(size: usize) -> bool {
        crate::mcache::thread_class_wide(crate::sizeclasses::class_for_layout(size, 8) as usize)
    }

    /// Per size class with anything in its mcentral: (class, partial, full, spare, free
    /// objects in listed spans). For tests and debugging.
    #[cfg(not(spanheap_loom))]
    pub fn central_census() -> [(usize, usize, usize, usize, usize); 68] {
        let mut out = [(0, 0, 0, 0, 0); 68];
        for (c, o) in out.iter_mut().enumerate().skip(1) {
            let (p, f, s, free) = crate::global::HEAP.central[c].census();
            *o = (c, p, f, s, free);
        }
        out
    }

    /// Whether the scavenger's background thread is running.
    #[cfg(not(spanheap_loom))]
    pub fn background_scavenger_running() -> bool {
        crate::global::bgscavenge::running()
    }

    /// Visits of other threads' caches so far (`global/idle.rs`): doors claimed, visits that
    /// got in, idle threads released, busy threads trimmed.
    #[cfg(not(spanheap_loom))]
    pub fn thread_visits() -> (u64, u64, u64, u64) {
        crate::global::idle::counts()
    }

    /// The calling thread's free stacks: (bytes held, bytes their limits allow).
    #[cfg(not(spanheap_loom))]
    pub fn own_free_stack_bytes() -> (u64, u64) {
        crate::mcache::own_stack_bytes()
    }

    /// Bytes of the calling thread's free-stack storage that are resident (`mincore`).
    #[cfg(not(spanheap_loom))]
    pub fn own_stack_resident_bytes() -> u64 {
        crate::mcache::own_stack_resident()
    }

    /// Whether the scavenger's background thread is parked until a free wakes it.
    #[cfg(not(spanheap_loom))]
    pub fn background_scavenger_parked() -> bool {
        crate::global::bgscavenge::parked()
    }

    /// The address range of the calling thread's free-stack storage (the mapping its
    /// cache record keeps), if it has a live cache. For tests.
    #[cfg(not(spanheap_loom))]
    pub fn thread_stack_storage() -> Option<(usize, usize)> {
        crate::mcache::thread_stack_storage()
    }

    /// Whether the calling thread has a live thread cache.
    #[cfg(not(spanheap_loom))]
    pub fn thread_has_cache() -> bool {
        crate::mcache::has_cache()
    }

    /// Counters of the process-wide heap behind `SpanHeap`.
    #[cfg(not(spanheap_loom))]
    pub fn global_counters() -> HeapCounters {
        crate::global::HEAP.counters()
    }

    /// Whether `addr` lies in a live span of the process-wide heap, and that span's
    /// (base, pages).
    #[cfg(not(spanheap_loom))]
    pub fn global_span_of(addr: usize) -> Option<(usize, usize)> {
        crate::global::HEAP.span_of(addr).map(|s| {
            // SAFETY: span records are valid for the life of the process.
            let s = unsafe { s.as_ref() };
            (s.base(), s.npages())
        })
    }

    /// A private page heap (a separate `MHeap`), for exercising `alloc_span` /
    /// `free_span` directly (benches/alloc_span.rs, the loom models). Its memory goes
    /// back to the memory source only through [`release_free`](Self::release_free).
    #[derive(Debug)]
    pub struct PageHeap<M: MemSource + 'static = OsMemory> {
        heap: &'static Heap<M>,
    }

    impl<M: MemSource> core::fmt::Debug for Heap<M> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("Heap").finish_non_exhaustive()
        }
    }

    /// A live span of a [`PageHeap`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SpanRef(NonNull<MSpan>);
    // SAFETY: a span handle may be freed from any thread.
    unsafe impl Send for SpanRef {}

    impl SpanRef {
        pub fn base(self) -> usize {
            // SAFETY: span records are never unmapped.
            unsafe { self.0.as_ref() }.base()
        }
        pub fn npages(self) -> usize {
            // SAFETY: as above.
            unsafe { self.0.as_ref() }.npages()
        }
    }

    impl<M: MemSource> PageHeap<M> {
        /// A new heap over `mem`. Leaked on purpose: spans must outlive any handle.
        pub fn new(mem: M) -> Self {
            PageHeap {
                heap: Box::leak(Box::new(Heap::new(mem))),
            }
        }
        pub fn alloc_span(&self, npages: usize, purpose: Purpose, align: usize) -> Option<SpanRef> {
            self.heap.alloc_span(npages, purpose, 0, align).map(SpanRef)
        }
        /// # Safety
        /// `s` is a live span of this heap, freed once.
        pub unsafe fn free_span(&self, s: SpanRef) {
            // SAFETY: forwarded.
            unsafe { self.heap.free_span(s.0) }
        }

        /// `alloc_span` through a thread's page cache (no lock unless `tc` must be
        /// refilled).
        pub fn alloc_span_cached(
            &self,
            npages: usize,
            purpose: Purpose,
            align: usize,
            tc: &mut ThreadPages,
        ) -> Option<SpanRef> {
            self.heap
                .alloc_span_with(npages, purpose, 0, align, &mut tc.0)
                .map(SpanRef)
        }

        /// `free_span` through a thread's page cache.
        ///
        /// # Safety
        /// `s` is a live span of this heap, freed once.
        pub unsafe fn free_span_cached(&self, s: SpanRef, tc: &mut ThreadPages) {
            // SAFETY: forwarded.
            unsafe { self.heap.free_span_with(s.0, &mut tc.0) }
        }

        /// Returns what `tc` holds to this heap.
        pub fn flush_cache(&self, tc: &mut ThreadPages) {
            self.heap.flush_heap_cache(&mut tc.0)
        }

        /// A heap cache behind the reclaim gate (the real `GatedCache`), registered with
        /// this heap so that [`reclaim_idle`](Self::reclaim_idle) can take it back
        /// (leaked, as thread-cache records are).
        pub fn new_gated_pages(&self) -> GatedPages {
            let g: &'static crate::pagecache::GatedCache =
                Box::leak(Box::new(crate::pagecache::GatedCache::new()));
            self.heap.register_cache(g);
            GatedPages(g)
        }

        /// `alloc_span_cached` through a gated cache, as its owner.
        ///
        /// # Safety
        /// Only one thread at a time uses `g` as its owner (these three calls).
        pub unsafe fn alloc_span_gated(
            &self,
            npages: usize,
            purpose: Purpose,
            align: usize,
            g: &GatedPages,
        ) -> Option<SpanRef> {
            // SAFETY: per the contract; no lock is held here.
            unsafe {
                g.0.with(|tc| self.heap.alloc_span_with(npages, purpose, 0, align, tc))
                    .map(SpanRef)
            }
        }

        /// `free_span_cached` through a gated cache, as its owner.
        ///
        /// # Safety
        /// As for `alloc_span_gated`; `s` is a live span of this heap, freed once.
        pub unsafe fn free_span_gated(&self, s: SpanRef, g: &GatedPages) {
            // SAFETY: forwarded.
            unsafe { g.0.with(|tc| self.heap.free_span_with(s.0, tc)) }
        }

        /// `flush_cache` of a gated cache, as its owner.
        ///
        /// # Safety
        /// As for `alloc_span_gated`.
        pub unsafe fn flush_gated(&self, g: &GatedPages) {
            // SAFETY: forwarded.
            unsafe { g.0.with(|tc| self.heap.flush_heap_cache(tc)) }
        }

        /// Takes back the registered gated caches whose owners are not inside them
        /// (`release_memory`'s reclaim); returns how many it took.
        pub fn reclaim_idle(&self) -> usize {
            self.heap.reclaim_caches(true, 0, 0).0
        }

        /// A new thread cache for small objects of this heap (its record is leaked).
        pub fn new_cache(&self) -> SmallCache<M> {
            SmallCache {
                heap: self.heap,
                c: crate::mcache::MCache::leaked(),
            }
        }

        /// Frees a small object of class `class` the way a thread without a cache does
        /// (a remote free).
        ///
        /// # Safety
        /// `p` is a live object of class `class` of this heap, freed once.
        pub unsafe fn free_cacheless(&self, p: *mut u8, class: usize) {
            if let Some(s) = NonNull::new(self.heap.span_of_unchecked(p as usize)) {
                // SAFETY: forwarded.
                unsafe { crate::mcache::remote_free(self.heap, p, s, class) }
            }
        }

        /// Bytes in live heap spans (the in-use counter).
        pub fn heap_inuse(&self) -> u64 {
            self.heap.counters().heap_inuse
        }

        /// Allocates an object of class `class` as a thread without a cache does:
        /// from the heap's shared cache, under its lock (then a scavenger pass, if
        /// one is due and the refill took a span).
        pub fn alloc_shared(&self, class: usize) -> *mut u8 {
            self.heap.shared.alloc(self.heap, class)
        }

        /// Makes a scavenger pass due at the next slow path that looks (under loom,
        /// where there is no clock, none is due until this is called; then the first
        /// one only).
        pub fn scavenge_soon(&self) {
            #[cfg(spanheap_loom)]
            self.heap
                .scavenger
                .model_due
                .store(true, core::sync::atomic::Ordering::Relaxed);
            self.heap
                .scavenger
                .next_due
                .store(0, crate::sync::Ordering::Relaxed);
        }

        /// The fork handlers' *prepare*: takes every lock of the heap in rank order.
        pub fn fork_lock_all(&self) {
            self.heap.fork_lock_all();
        }

        /// The fork handlers' *parent*: releases what `fork_lock_all` took.
        ///
        /// # Safety
        /// The calling thread took them with `fork_lock_all`.
        pub unsafe fn fork_unlock_all(&self) {
            // SAFETY: forwarded.
            unsafe { self.heap.fork_unlock_all() };
        }

        /// Returns every free page to the memory source now (the scavenger's forced
        /// pass, as `release_memory` runs it); returns the bytes released.
        pub fn release_free(&self) -> usize {
            self.heap.scavenge(true, 0, u64::MAX).0
        }

        /// Free bytes returned to the memory source (`heap_released`).
        pub fn released_bytes(&self) -> u64 {
            self.heap.counters().heap_released
        }

        /// Free bytes, released or not (`heap_idle`).
        pub fn idle_bytes(&self) -> u64 {
            self.heap.counters().heap_idle
        }

        // Lock-free readers (the loom models of span publication).

        /// The live span containing `addr` as a lock-free reader finds it (span map,
        /// then `state`, as `dealloc` validates a pointer), with the fields read after.
        ///
        /// # Safety
        /// No span of this heap may be freed while this runs (the span record found
        /// could be recycled, and its fields rewritten, under the reader).
        pub unsafe fn span_at(&self, addr: usize) -> Option<SpanView> {
            self.heap.span_of(addr).map(|s| {
                // SAFETY: span records are never unmapped.
                let span = unsafe { s.as_ref() };
                // SAFETY: `span_of` loaded a live state with Acquire, which pairs with
                // the Release that published the span's fields; nobody frees it now
                // (caller's contract), so nobody writes them.
                let info = unsafe { span.info() };
                SpanView {
                    base: span.base(),
                    npages: span.npages(),
                    purpose: info.purpose,
                    spanclass: info.spanclass,
                }
            })
        }
        /// Whether the `pageInUse` bit of the page at `addr` is set (Acquire).
        pub fn page_in_use(&self, addr: usize) -> bool {
            self.heap.arenas.is_marked_in_use(addr)
        }
        /// `pagesInUse`: pages in live heap spans (Acquire).
        pub fn pages_in_use(&self) -> usize {
            self.heap.pages_in_use()
        }
    }

    /// A thread's page cache and record caches for a [`PageHeap`] (the real
    /// `HeapCache`). Flush it into its heap before dropping it.
    #[derive(Debug)]
    pub struct ThreadPages(crate::pagecache::HeapCache);

    // SAFETY: the cache holds pages and records of a heap, not thread-local data.
    unsafe impl Send for ThreadPages {}

    impl ThreadPages {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            ThreadPages(crate::pagecache::HeapCache::new())
        }
    }

    /// A gated heap cache of a [`PageHeap`] (see [`PageHeap::new_gated_pages`]).
    #[derive(Clone, Copy)]
    pub struct GatedPages(&'static crate::pagecache::GatedCache);

    impl core::fmt::Debug for GatedPages {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("GatedPages").finish_non_exhaustive()
        }
    }

    /// A thread cache of a [`PageHeap`] (the real `MCache` code): owned by one thread
    /// at a time (it may be moved between threads, never shared).
    #[derive(Debug)]
    pub struct SmallCache<M: MemSource + 'static> {
        heap: &'static Heap<M>,
        c: *mut crate::mcache::MCache,
    }

    // SAFETY: a cache may move to another thread; `&mut self` methods keep it unshared.
    unsafe impl<M: MemSource> Send for SmallCache<M> {}

    impl core::fmt::Debug for crate::mcache::MCache {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("MCache").finish_non_exhaustive()
        }
    }

    impl<M: MemSource> SmallCache<M> {
        /// An object of size class `class` (1..68), or null if memory is exhausted.
        pub fn alloc(&mut self, class: usize) -> *mut u8 {
            assert!(class > 0 && class < crate::sizeclasses::NUM_CLASSES);
            // SAFETY: the cache is ours (`&mut self`) and belongs to `heap`.
            unsafe { crate::mcache::alloc_from(self.heap, self.c, class) }
        }

        /// Frees an object through this cache (local free list if the cache owns the
        /// object's span, else the remote buffer).
        ///
        /// # Safety
        /// `p` is a live object of class `class` of this cache's heap, freed once.
        pub unsafe fn free(&mut self, p: *mut u8, class: usize) {
            if let Some(s) = NonNull::new(self.heap.span_of_unchecked(p as usize)) {
                // SAFETY: forwarded; the cache is ours.
                unsafe { crate::mcache::free_to(self.heap, self.c, p, s, class) }
            }
        }

        /// Gives everything back (local lists, remote buffers, current spans), as at
        /// thread exit. The cache stays usable.
        pub fn release(&mut self) {
            // SAFETY: the cache is ours.
            unsafe { crate::mcache::release_all(self.heap, self.c) }
        }
    }

    /// The size class of `size`-byte objects with 8-byte alignment (0: large).
    pub fn class_for_size(size: usize) -> usize {
        crate::sizeclasses::class_for_layout(size, 8) as usize
    }

    /// Objects per span of size class `class`.
    pub fn objects_per_span(class: usize) -> usize {
        crate::sizeclasses::CLASS_TO_NOBJS[class] as usize
    }

    /// A span as [`PageHeap::span_at`] reads it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SpanView {
        pub base: usize,
        pub npages: usize,
        pub purpose: Purpose,
        pub spanclass: u8,
    }

    // Hooks for the loom models of the small-object core (span sets, remote frees,
    // thread exit): the mcentral's census and a span's small-object state, read when no
    // other thread uses the heap.

    /// A small-object span as [`PageHeap::small_span`] reads it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SmallSpanView {
        pub base: usize,
        pub spanclass: u8,
        /// `SmallSpan::place`: 0 CACHED (owned, or a spare), 1 PARTIAL, 2 FULL,
        /// 3 PENDING.
        pub place: u8,
        /// The mcentral list the span is linked in (1 PARTIAL, 2 FULL), or 0xFF.
        pub list: u8,
        /// Whether a cache owns the span (`rstate`'s high half is OWNED).
        pub owned: bool,
        /// `rstate`'s high half: live objects at the last merge (if not owned).
        pub live_at_merge: u32,
        /// `rstate`'s low half: remote frees counted since the last merge (unbiased).
        pub unmerged: i64,
        /// Set bits in the remote-free bitmap.
        pub remote_bits: u32,
        pub nelems: usize,
        /// Free objects according to the alloc bitmap.
        pub free: usize,
    }

    impl<M: MemSource> PageHeap<M> {
        /// The mcentral of class `class`: (partial spans, full spans, spare spans, free
        /// objects in listed spans).
        pub fn census(&self, class: usize) -> (usize, usize, usize, usize) {
            self.heap.central[class].census()
        }

        /// The small-object state of the live span containing `addr`, if any.
        ///
        /// # Safety
        /// No other thread uses the heap meanwhile (this reads the span's private
        /// state, which belongs to its owner or the mcentral lock holder).
        pub unsafe fn small_span(&self, addr: usize) -> Option<SmallSpanView> {
            let s = self.heap.span_of(addr)?;
            // SAFETY: span records are never unmapped; `span_of` loaded a live state with
            // Acquire, so the published fields are visible; nobody else runs (contract).
            let (span, info) = unsafe { (s.as_ref(), s.as_ref().info()) };
            if info.spanclass == 0 {
                return None;
            }
            let small = &span.small;
            // SAFETY: nobody else uses the heap (contract), so the private state is ours
            // to read.
            let p = unsafe { crate::mcentral::private(s) };
            let (high, low) =
                crate::mspan::rstate_parts(small.rstate.load(crate::sync::Ordering::SeqCst));
            let remote_bits = (0..p.words as usize)
                .map(|w| {
                    // SAFETY: w < words.
                    let r = unsafe { p.remote(w) };
                    r.load(crate::sync::Ordering::SeqCst).count_ones()
                })
                .sum();
            Some(SmallSpanView {
                base: span.base(),
                spanclass: info.spanclass,
                place: small.place.load(crate::sync::Ordering::SeqCst),
                list: p.list,
                owned: high == crate::mspan::RSTATE_OWNED,
                live_at_merge: high,
                unmerged: low,
                remote_bits,
                nelems: p.nelems as usize,
                // SAFETY: as above.
                free: unsafe { crate::mcentral::count_free(p) },
            })
        }
    }

    /// A registered statistics writer of a [`PageHeap`] made with
    /// [`PageHeap::with_thread_writers`], for one (model or benchmark) thread: like a
    /// thread cache's sequence counter in the process-wide heap, it makes the thread's
    /// statistics sections lock-free (without one they take the statistics' leaf lock,
    /// an ordering and a cost the real threads with caches do not have).
    #[derive(Clone, Copy, Debug)]
    pub struct StatsThread(&'static crate::stats::HeapSeq);

    #[cfg(spanheap_loom)]
    loom::thread_local! {
        static THREAD_WRITER: core::cell::Cell<Option<&'static crate::stats::HeapSeq>> =
            core::cell::Cell::new(None);
    }

    #[cfg(not(spanheap_loom))]
    std::thread_local! {
        static THREAD_WRITER: core::cell::Cell<Option<&'static crate::stats::HeapSeq>> =
            const { core::cell::Cell::new(None) };
    }

    fn thread_writer() -> Option<&'static crate::stats::HeapSeq> {
        THREAD_WRITER.with(|w| w.get())
    }

    impl<M: MemSource> PageHeap<M> {
        /// A new heap over `mem` whose statistics sections use the calling thread's
        /// [`StatsThread`] (see [`StatsThread::bind`]), or the leaf lock on a thread
        /// without one. Leaked, as [`PageHeap::new`].
        pub fn with_thread_writers(mem: M) -> Self {
            PageHeap {
                heap: Box::leak(Box::new(Heap::with_writer(mem, thread_writer))),
            }
        }

        /// A new registered statistics writer (leaked: the registry keeps it).
        pub fn stats_writer(&self) -> StatsThread {
            let w: &'static crate::stats::HeapSeq =
                Box::leak(Box::new(crate::stats::StatsSeq::new()));
            self.heap.stats.register(w);
            StatsThread(w)
        }
    }

    impl StatsThread {
        /// Makes this the calling thread's writer (one thread per writer).
        pub fn bind(self) {
            THREAD_WRITER.with(|w| w.set(Some(self.0)));
        }
    }
}
