//! Fork safety: `pthread_atfork` handlers that make `fork()` from a multi-threaded
//! program safe for the child to allocate and free at once.
//!
//! A `fork()` copies the address space with only the forking thread. A lock another
//! thread held at that moment would stay held forever in the child. So the *prepare*
//! handler takes every allocator lock in rank order (`lockrank::TABLE`: reclaim,
//! statistics reader, shared cache, every mcentral, heap, statistics `nop`, the heap
//! profile's), and both
//! the *parent* and the *child* handlers release them in reverse order. Between
//! prepare and the return of `fork()` no other thread can be inside a locked section
//! of the allocator.
//!
//! Lock-free state needs fixing up in the child only where another thread could have
//! been in the middle of something when its copy stopped:
//!
//! - a statistics write section (its sequence counter odd): `stats()` in the child would
//!   wait for it forever. The child handler makes every counter but the forking thread's
//!   even. A section cut short may have added only part of its deltas, so the child's
//!   statistics can be off by that one section (counters that never go negative and the
//!   invariants `Stats::check` tests can then fail in the child; the parent is
//!   unaffected);
//! - a scavenger pass (its claim `next_due == u64::MAX`): the child resets the claim,
//!   so its own slow paths scavenge again. Pages the interrupted pass had taken stay
//!   allocated (leaked) in the child;
//! - the background scavenger thread does not exist in the child: its running flag is
//!   cleared (set the configuration again to start one in the child).
//! - a reading of the `SPANHEAP_*` environment (`env == 1`) another thread had started:
//!   restarted, or `set_scavenger_config` would wait for it forever.
//!
//! Other threads' thread caches are orphaned in the child: what they held (free lists,
//! current spans, page blocks) is leaked there, and objects they allocated that the
//! child frees go back to their spans as remote frees, as from any other thread.
//!
//! The handlers are registered once, when the first thread cache is created (after it
//! is live, so that an allocation `pthread_atfork` itself may make is an ordinary one):
//! `register_once` is the process-wide heap's `on_cache_live` hook (`global/mod.rs`), which
//! the thread cache runs without naming this module, above it.

// Process-wide set-once flag, outside the modelled core.
use core::sync::atomic::{AtomicBool, Ordering};

use super::HEAP;

static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Registers the fork handlers (once per process).
pub(crate) fn register_once() {
    if REGISTERED.load(Ordering::Relaxed) || REGISTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the handlers have the right signature and stay valid for the life of the
    // process. (If registration fails, fork is as unsafe as without spanheap's help.)
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

extern "C" fn prepare() {
    // Every lock in rank order (`lockrank::TABLE`): reclaim first (a reclaimer takes
    // the heap lock while holding it), and no path waits for a lower-ranked lock while
    // holding a higher one, so this cannot deadlock against a thread inside spanheap.
    HEAP.fork_lock_all();
    // The heap profile's lock ranks last.
    #[cfg(feature = "profile")]
    crate::profile::fork_lock();
}

/// Releases what `prepare` took, in reverse order.
///
/// # Safety
/// The calling thread ran `prepare` (it holds every lock).
unsafe fn unlock_all() {
    // SAFETY: the calling thread took every lock in `prepare`.
    unsafe {
        #[cfg(feature = "profile")]
        crate::profile::fork_unlock();
        HEAP.fork_unlock_all();
    }
}

extern "C" fn parent() {
    // SAFETY: fork() ran `prepare` on this thread.
    unsafe { unlock_all() };
}

extern "C" fn child() {
    // The only thread now. Fix up what other threads' copies left half done, then
    // release the locks (the child's thread is the one that took them).
    HEAP.stats
        .fork_child_settle(crate::mcache::current_writer());
    HEAP.scavenger.fork_child_reset();
    crate::os::membarrier_fork_child_reset();
    super::bgscavenge::fork_child_reset();
    super::idle::fork_child(crate::mcache::own_record());
    // SAFETY: fork() ran `prepare` on this thread before the copy.
    unsafe { unlock_all() };
}
