//! The heap as the thread caches see it: the page heap (`mheap`), the mcentrals that
//! sit on it, the shared cache of threads without one, and the allocator of the thread
//! caches' own records. In Go, `mheap_` owns the mcentrals and the mcentrals name
//! `mheap_` back (one package, so no cycle shows); here this level owns both, so that
//! the page heap knows nothing of size classes' mcentrals or of thread caches, and an
//! mcentral reaches the page heap and its siblings through `mcentral::SpanSource`.
//!
//! `Heap` dereferences to its page heap: every `MHeap` method (span allocation and
//! free, lookup, statistics, scavenging) is called on it directly.
//!
//! Shared fields and what protects them:
//!
//! | field      | protection                                                             |
//! |------------|------------------------------------------------------------------------|
//! | `pages`    | its own (`mheap/mod.rs`)                                               |
//! | `central`  | each mcentral's lock and atomics (`mcentral.rs`)                       |
//! | `shared`   | the shared cache's lock (`shared.rs`)                                  |
//! | `records`  | the cache-record lock (rank `CACHE_RECORDS`: below the heap lock, which is taken under it when a chunk runs out) |
//! | `budgeted`, `on_cache_live` | immutable                                             |

use core::ops::Deref;
#[cfg(not(spanheap_loom))]
use core::ptr::{self, NonNull};

#[cfg(not(spanheap_loom))]
use crate::fixalloc::{FixAlloc, CHUNK_BYTES};
use crate::mcentral::{MCentral, SpanSource};
use crate::mheap::MHeap;
#[cfg(not(spanheap_loom))]
use crate::mspan::Purpose;
use crate::os::MemSource;
use crate::sizeclasses::NUM_CLASSES;
use crate::stats::{HeapSeq, LockStats, LOCK_KINDS};
#[cfg(not(spanheap_loom))]
use crate::sync::Mutex;

#[cfg(not(spanheap_loom))]
use super::budget::STACK_MAP_BYTES;
#[cfg(not(spanheap_loom))]
use super::MCache;
use super::SharedCache;

/// The page heap with the mcentrals, the shared cache and the cache records on it.
pub(crate) struct Heap<M: MemSource> {
    /// The page heap.
    pub(crate) pages: MHeap<M>,
    /// One mcentral per size class (index 0 unused).
    pub(crate) central: [MCentral; NUM_CLASSES],
    /// The cache of threads without one (`shared.rs`).
    pub(crate) shared: SharedCache,
    /// Thread-cache records (the `GlobalAlloc` front end only), carved from chunks the
    /// page heap lends as manual spans (`Purpose::ThreadCaches`); reused, never given
    /// back.
    #[cfg(not(spanheap_loom))]
    records: Mutex<FixAlloc<MCache>>,
    /// Whether its thread caches follow the process's free-stack budget (`budget.rs`):
    /// the process-wide heap's do. Immutable.
    pub(crate) budgeted: bool,
    /// Run each time a thread cache comes to life (`lifecycle.rs`): for the
    /// process-wide heap, registering the fork handlers (`global/fork.rs`, which sits above
    /// the caches and so is passed in rather than named); nothing for other heaps.
    pub(crate) on_cache_live: fn(),
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

impl<M: MemSource> Heap<M> {
    crate::sync::const_fn! {
        /// A heap whose statistics writers all take the leaf lock (no thread caches).
        pub(crate) fn new(mem: M) -> Self {
            Self::over(MHeap::new(mem))
        }
    }

    /// A heap whose statistics write sections use the counter `writer` returns for the
    /// calling thread (see `MHeap::with_writer`).
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn with_writer(mem: M, writer: fn() -> Option<&'static HeapSeq>) -> Self {
        Self::over(MHeap::with_writer(mem, writer))
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn with_writer(mem: M, writer: fn() -> Option<&'static HeapSeq>) -> Self {
        Self::over(MHeap::with_writer(mem, writer))
    }

    /// The process-wide heap: its page heap is `MHeap::global`'s (environment settings,
    /// background scavenger `bg`), and `on_cache_live` runs each time a thread cache
    /// comes to life.
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn global(
        mem: M,
        writer: fn() -> Option<&'static HeapSeq>,
        bg: crate::scavenger::Background,
        on_cache_live: fn(),
    ) -> Self {
        let mut h = Self::over(MHeap::global(mem, writer, bg));
        h.on_cache_live = on_cache_live;
        h.budgeted = true;
        h
    }

    crate::sync::const_fn! {
        /// The mcentrals, shared cache and records over page heap `pages`.
        fn over(pages: MHeap<M>) -> Self {
            Heap {
                pages,
                #[cfg(not(spanheap_loom))]
                central: centrals(),
                #[cfg(spanheap_loom)]
                central: core::array::from_fn(MCentral::new),
                shared: SharedCache::new(),
                #[cfg(not(spanheap_loom))]
                records: Mutex::new(FixAlloc::new(), crate::lockrank::CACHE_RECORDS),
                budgeted: false,
                on_cache_live: || {},
            }
        }
    }

    /// The use of every lock of this heap, summed per kind (`spanheap::lock_stats`).
    #[cfg_attr(spanheap_loom, allow(dead_code))]
    pub(crate) fn lock_stats(&self) -> [LockStats; LOCK_KINDS] {
        let mut t = LockStats::table();
        self.pages.add_lock_stats(&mut t);
        LockStats::add(&mut t, self.shared.lock_counts());
        for c in &self.central[1..] {
            LockStats::add(&mut t, c.lock_counts());
        }
        #[cfg(not(spanheap_loom))]
        LockStats::add(&mut t, self.records.counts());
        t
    }

    /// Gives every mcentral's spare spans back to the page heap (for `release_memory`).
    /// Takes each mcentral lock in turn; the heap lock must not be held.
    pub(crate) fn release_spares(&self) -> usize {
        self.central.iter().map(|c| c.release_spares(self)).sum()
    }

    /// For the fork handlers (`global/fork.rs`): takes every lock of the heap in rank order
    /// (`lockrank::TABLE`) and holds them until [`fork_unlock_all`](Self::fork_unlock_all).
    pub(crate) fn fork_lock_all(&self) {
        self.pages.fork_lock_reclaim();
        self.pages.stats.fork_lock_reader();
        self.shared.fork_lock();
        for c in &self.central[1..NUM_CLASSES] {
            c.fork_lock();
        }
        #[cfg(not(spanheap_loom))]
        self.records.fork_lock();
        self.pages.fork_lock_heap();
        self.pages.stats.fork_lock_nop();
    }

    /// Releases what [`fork_lock_all`](Self::fork_lock_all) took, in reverse order.
    ///
    /// # Safety
    /// The calling thread holds every lock of the heap, taken with `fork_lock_all` (in
    /// the child of a fork, the thread that forked).
    pub(crate) unsafe fn fork_unlock_all(&self) {
        // SAFETY: the calling thread holds each lock, taken by `fork_lock_all`.
        unsafe {
            self.pages.stats.fork_unlock_nop();
            self.pages.fork_unlock_heap();
            #[cfg(not(spanheap_loom))]
            self.records.fork_unlock();
            for c in self.central[1..NUM_CLASSES].iter().rev() {
                c.fork_unlock();
            }
            self.shared.fork_unlock();
            self.pages.stats.fork_unlock_reader();
            self.pages.fork_unlock_reclaim();
        }
    }

    /// A thread-cache record (constructed empty, with its free-stack storage), or null
    /// if memory is exhausted.
    #[cfg(not(spanheap_loom))]
    pub(crate) fn alloc_cache_record(&self) -> *mut MCache {
        let p = self.records.lock().with(|r| {
            let mut p = r.alloc();
            if p.is_null() {
                // Under the record lock, so that one chunk serves every thread that
                // runs out at once (lock order: cache records -> heap).
                let Some(base) = self.pages.record_chunk(Purpose::ThreadCaches) else {
                    return ptr::null_mut();
                };
                r.add_chunk(base, CHUNK_BYTES);
                p = r.alloc();
            }
            p
        });
        // A record's free stacks get their storage when it is first handed out and
        // keep it (records are reused, never unmapped): a mapping of its own, outside
        // the arenas (metadata, like the arena index), so that it does not split the
        // heap's free page runs. Lazily backed: pages are touched only as far as the
        // stacks grow.
        // SAFETY: the record is ours (just taken, in use by nobody).
        if !p.is_null() && !unsafe { (*p).has_stacks() } {
            let Some(base) = self.pages.alloc_meta_mapping(STACK_MAP_BYTES) else {
                // SAFETY: the record was just taken and is unused.
                self.records.lock().with(|r| unsafe { r.free(p) });
                return ptr::null_mut();
            };
            // SAFETY: a fresh mapping of STACK_MAP_BYTES >= STACK_BYTES, ours alone.
            unsafe { (*p).set_stacks(base.as_ptr().cast()) };
        }
        p
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
        self.records.lock().with(|r| unsafe { r.free(p) });
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
            // SAFETY: the record's own stack mapping; no slot holds anything.
            unsafe { self.pages.drop_meta_pages(base.cast(), STACK_MAP_BYTES) };
        }
    }
}

impl<M: MemSource> Deref for Heap<M> {
    type Target = MHeap<M>;

    #[inline(always)]
    fn deref(&self) -> &MHeap<M> {
        &self.pages
    }
}

impl<M: MemSource> SpanSource for Heap<M> {
    type Mem = M;

    #[inline(always)]
    fn pages(&self) -> &MHeap<M> {
        &self.pages
    }

    #[inline(always)]
    fn central(&self, class: usize) -> &MCentral {
        &self.central[class]
    }
}
