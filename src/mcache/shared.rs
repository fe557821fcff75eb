//! The cache of threads without one of their own, and the large-object paths' access to
//! a thread's heap cache.
//!
//! Holds `SharedCache` (one per heap: exited threads in later destructors and threads
//! whose cache could not be made allocate small objects through it) and
//! `with_heap_cache`, which hands the large-object paths the calling thread's page
//! caches (creating its cache on a first allocation). Go's nearest counterpart of the
//! shared cache is `mcache0`, the cache mcache.go's `getMCache` hands to code running
//! without a P.
//!
//! *Protection.* The shared cache's record is used only under its lock (rank `SHARED`,
//! `lockrank.rs`); no scavenger pass runs under it. `with_heap_cache` runs its closure
//! inside the thread cache's gate (`GatedCache::with`), as the owner.

use core::ptr;

use super::heap::Heap;
use crate::os::MemSource;
use crate::sync::Mutex;

#[cfg(not(spanheap_loom))]
use super::lifecycle::{create_cache, live_cache, Slow, LIVE, NO_CACHE};
use super::{refill, try_alloc, MCache, Refill};

/// The cache of threads without one of their own ("P-less": exited threads in later
/// destructors, threads whose cache could not be made), one per heap, its record made
/// on first use. Its lock ranks after the reclaim and statistics reader locks and
/// before the mcentral locks its refills take (`lockrank.rs`), so no scavenger pass
/// may run under it (a pass takes the reclaim lock, as the fork handler does before
/// this one): `alloc` runs a due pass after letting go of the lock.
pub(crate) struct SharedCache(Mutex<Shared>);

struct Shared(*mut MCache);
// SAFETY: the pointer is only used under the lock.
unsafe impl Send for Shared {}

impl SharedCache {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            SharedCache(Mutex::new(Shared(ptr::null_mut()), crate::lockrank::SHARED))
        }
    }

    /// The counts of its lock, with its rank (`spanheap::lock_stats`).
    pub(crate) fn lock_counts(&self) -> (crate::sync::Rank, crate::sync::LockCount) {
        self.0.counts()
    }

    /// Allocates an object of class `class` (1..NUM_CLASSES) from the shared cache.
    /// Null if memory is exhausted. The caller holds no lock.
    #[cold]
    pub(crate) fn alloc<M: MemSource>(&self, heap: &Heap<M>, class: usize) -> *mut u8 {
        let (p, refill) = self.0.lock().with(|sh| {
            if sh.0.is_null() {
                sh.0 = Self::record(heap);
                if sh.0.is_null() {
                    return (ptr::null_mut(), Refill::Failed);
                }
            }
            let c = sh.0;
            // SAFETY: the shared cache is ours under the lock.
            unsafe {
                let p = try_alloc(c, class);
                if !p.is_null() {
                    return (p, Refill::Window);
                }
                let r = refill(heap, c, class);
                // The mutant `shared_scavenge` restores the old order (a pass under
                // this lock), which the loom model `fork_order` must catch.
                #[cfg(spanheap_mutant = "shared_scavenge")]
                if r == Refill::Span {
                    heap.maybe_scavenge();
                }
                if r == Refill::Failed {
                    return (ptr::null_mut(), r);
                }
                (try_alloc(c, class), r)
            }
        });
        #[cfg(not(spanheap_mutant = "shared_scavenge"))]
        if refill == Refill::Span {
            heap.maybe_scavenge();
        }
        #[cfg(spanheap_mutant = "shared_scavenge")]
        let _ = refill;
        p
    }

    /// A record for the shared cache: from the heap's records, or (under loom, whose
    /// atomics need constructing) a leaked one.
    fn record<M: MemSource>(heap: &Heap<M>) -> *mut MCache {
        #[cfg(not(spanheap_loom))]
        return heap.alloc_cache_record();
        #[cfg(spanheap_loom)]
        {
            let _ = heap;
            MCache::leaked()
        }
    }

    /// For the fork handlers (`Heap::fork_lock_all`): takes the lock without a guard.
    pub(crate) fn fork_lock(&self) {
        self.0.fork_lock();
    }

    /// # Safety
    /// The calling thread holds the lock (`fork_lock`).
    pub(crate) unsafe fn fork_unlock(&self) {
        // SAFETY: forwarded.
        unsafe { self.0.fork_unlock() };
    }
}

/// Runs `f` with the calling thread's heap cache, creating the thread cache if this is
/// the thread's first allocation; with `None` for a cache-less thread. For the
/// large-object paths. `f` runs inside the cache's gate (`GatedCache::with`), so it
/// must not reach the thread cache again (the large-object paths only use the heap).
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn with_heap_cache<P: super::Process, R>(
    f: impl FnOnce(Option<&mut crate::pagecache::HeapCache>) -> R,
) -> R {
    let c = match super::tls::state() {
        LIVE => match live_cache() {
            Some(c) => c,
            None => return f(None),
        },
        NO_CACHE => match create_cache::<P>() {
            Some(c) => c,
            None => return f(None),
        },
        _ => return f(None),
    };
    // SAFETY: a live cache of this thread; allocator calls do not nest and hold no lock
    // here, so this is the only entry into its gate.
    unsafe {
        let _slow = Slow::new(c);
        (*c).heap.with(|tc| f(Some(tc)))
    }
}
