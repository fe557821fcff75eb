//! A thread cache's life: creation, thread exit, and what others may do to it meanwhile.
//!
//! Holds the thread's cache state (`NO_CACHE`, `CREATING`, `LIVE`, `DEAD`; the values
//! live in `tls.rs`), the pthread key whose destructor releases a cache at thread exit
//! (`exit_key`, `on_thread_exit`), cache creation (`create_cache`), finding the
//! thread's record (`live_cache`, `own_record`, `current_writer`), giving everything
//! back (`release_all`, `release_classes`, `flush_own`, `publish_counts`), a visitor's
//! trim (`trim_class`), and the `Slow` guard that keeps visitors off a record whose
//! owner is in a slow path. Go's counterparts are mcache.go's `allocmcache`,
//! `freemcache` and `releaseAll`, run when a P is created or destroyed.
//!
//! *Protection.* The state and the cache pointer are thread-locals, the key a
//! process-wide set-once core atomic. A record is its owner's; `release_classes` and
//! `trim_class` may also run in a visitor that holds the record's door (`global/idle.rs`),
//! which `Slow` and `idle::exit` coordinate with. Statistics go through the heap's
//! statistics sections.

use core::ptr;

use super::heap::Heap;
use crate::os::MemSource;
use crate::sizeclasses::NUM_CLASSES;
use crate::stats::field;
#[cfg(not(spanheap_loom))]
use crate::stats::HeapSeq;

#[cfg(not(spanheap_loom))]
use super::budget;
#[cfg(not(spanheap_loom))]
use super::empty_cache;
use super::flush::{flush, flush_remote};
use super::{current_span, entry, normalize, ClassCache, MCache, EMPTY_CLASS, TRIM_KEEP_DIV};

#[cfg(not(spanheap_loom))]
pub(super) const NO_CACHE: u8 = 0;
#[cfg(not(spanheap_loom))]
pub(super) const LIVE: u8 = 1;
#[cfg(not(spanheap_loom))]
const DEAD: u8 = 2;
/// The thread is creating its cache (`create_cache`): an allocation made meanwhile by
/// the C library on spanheap's behalf (glibc's `pthread_setspecific` allocates the
/// second level of a thread's key table for keys 32 and up), which under `LD_PRELOAD`
/// comes back into spanheap, is served cache-less instead of creating a second cache.
#[cfg(not(spanheap_loom))]
const CREATING: u8 = 3;

// The thread's cache pointer and state live in `tls.rs` (std's thread-locals, or
// initial-exec TLS for the LD_PRELOAD library). NO_CACHE must be 0: both start zeroed.
#[cfg(not(spanheap_loom))]
const _: () = assert!(NO_CACHE == 0);

/// The statistics writer of the calling thread: its cache's sequence counter while the
/// cache is live (the process-wide heap's `writer` hook).
#[cfg(not(spanheap_loom))]
pub(crate) fn current_writer() -> Option<&'static HeapSeq> {
    if super::tls::state() != LIVE {
        return None;
    }
    let c = super::tls::cache();
    if c == empty_cache() {
        // A visitor emptied the slot (`global/idle.rs`): the locked statistics path serves
        // until the record is back.
        return None;
    }
    // SAFETY: a live cache's record is never unmapped; `seq` is only used atomically.
    Some(unsafe { &(*c).seq })
}

/// This thread's live cache, re-installed first if a visitor emptied its slot
/// (`global/idle.rs`); None if the thread has no live cache.
#[cfg(not(spanheap_loom))]
#[inline]
pub(super) fn live_cache() -> Option<*mut MCache> {
    if super::tls::state() != LIVE {
        return None;
    }
    let c = super::tls::cache();
    if c != empty_cache() {
        return Some(c);
    }
    super::door::reattach()
}

/// The calling thread's cache record (the exit key's value), whether or not its slot
/// holds it; None if it has none.
#[cfg(not(spanheap_loom))]
pub(crate) fn own_record() -> Option<*mut MCache> {
    let key = exit_key_loaded()?;
    // SAFETY: reading this thread's value of our key.
    let c = unsafe { libc::pthread_getspecific(key) }.cast::<MCache>();
    (!c.is_null()).then_some(c)
}

/// Marks the owner of `c` as inside a slow path that uses its record, for as long as
/// it lives (visitors leave such a record alone, `global/idle.rs`).
pub(super) struct Slow<'a>(&'a super::door::Door, u32);

impl<'a> Slow<'a> {
    /// # Safety
    /// `c` is a live cache record (its door is used atomically only).
    #[inline]
    pub(super) unsafe fn new(c: *mut MCache) -> Self {
        // SAFETY: per the contract.
        let d = unsafe { &*ptr::addr_of!((*c).door) };
        Slow(d, d.enter_slow())
    }
}

impl Drop for Slow<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.exit_slow(self.1);
    }
}

#[cfg(not(spanheap_loom))]
/// The pthread key whose destructor releases a thread's cache. Process-wide set-once
/// state, not part of the modelled concurrent core (core atomics).
static KEY: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
#[cfg(not(spanheap_loom))]
const KEY_FAILED: usize = usize::MAX;

#[cfg(not(spanheap_loom))]
fn exit_key<P: super::Process>() -> Option<libc::pthread_key_t> {
    use core::sync::atomic::Ordering as O;
    match KEY.load(O::Acquire) {
        0 => {}
        KEY_FAILED => return None,
        k => return Some((k - 1) as libc::pthread_key_t),
    }
    let mut k: libc::pthread_key_t = 0;
    // SAFETY: creating a key with a destructor of the right signature.
    if unsafe { libc::pthread_key_create(&mut k, Some(on_thread_exit::<P>)) } != 0 {
        let _ = KEY.compare_exchange(0, KEY_FAILED, O::AcqRel, O::Acquire);
        return exit_key_loaded();
    }
    match KEY.compare_exchange(0, k as usize + 1, O::AcqRel, O::Acquire) {
        Ok(_) => Some(k),
        Err(_) => {
            // Another thread won the race; use its key.
            // SAFETY: our key is unused.
            unsafe { libc::pthread_key_delete(k) };
            exit_key_loaded()
        }
    }
}

#[cfg(not(spanheap_loom))]
fn exit_key_loaded() -> Option<libc::pthread_key_t> {
    match KEY.load(core::sync::atomic::Ordering::Acquire) {
        0 | KEY_FAILED => None,
        k => Some((k - 1) as libc::pthread_key_t),
    }
}

/// Creates this thread's cache and registers the exit hook. None if either fails (the
/// thread then stays cache-less).
#[cfg(not(spanheap_loom))]
pub(super) fn create_cache<P: super::Process>() -> Option<*mut MCache> {
    let heap = P::heap();
    // From here until the cache is live, an allocation the calls below make (the C
    // library may allocate inside them) takes the cache-less path: no recursion.
    super::tls::set_state(CREATING);
    let c = create_cache_record::<P>();
    if c.is_null() {
        super::tls::set_state(NO_CACHE);
        return None;
    }
    // SAFETY: the record is ours; `seq` lives as long as the process.
    let first = unsafe { !(*c).registered };
    if first {
        // SAFETY: as above.
        unsafe {
            heap.stats.register(&(*c).seq);
            heap.register_cache(&*ptr::addr_of!((*c).heap));
            (*c).registered = true;
        }
    }
    // The heap profile's countdowns are the entries' ticks (`tick.rs`): a new record's
    // first allocation of each class asks for one; a reused record's carry on.
    super::tls::set_cache(c);
    super::door::open(c, first);
    budget::thread_count(1);
    super::tls::set_state(LIVE);
    heap.stats_update(|d| d.add(field::CACHES, 1));
    crate::stats::exit_report_once();
    // The process-wide heap's: registers the fork handlers once.
    (heap.on_cache_live)();
    Some(c)
}

/// A cache record for this thread, with the exit hook set to release it; null if
/// either fails. The caller has set the state to CREATING.
#[cfg(not(spanheap_loom))]
fn create_cache_record<P: super::Process>() -> *mut MCache {
    let Some(key) = exit_key::<P>() else {
        return ptr::null_mut();
    };
    let c = P::heap().alloc_cache_record();
    if c.is_null() {
        return c;
    }
    // SAFETY: setting this thread's value of our key; a non-null value makes the
    // destructor run at thread exit.
    if unsafe { libc::pthread_setspecific(key, c.cast()) } != 0 {
        // SAFETY: the record is unused.
        unsafe { P::heap().free_cache_record(c) };
        return ptr::null_mut();
    }
    c
}

/// The pthread-key destructor: gives every current span back and frees the cache.
/// From here on the thread is cache-less.
#[cfg(not(spanheap_loom))]
extern "C" fn on_thread_exit<P: super::Process>(arg: *mut libc::c_void) {
    let heap = P::heap();
    let c = arg.cast::<MCache>();
    // No visitor may take the record from here on (one at work finishes first).
    super::door::exit(c);
    budget::thread_count(-1);
    super::tls::set_cache(empty_cache());
    super::tls::set_state(DEAD);
    // SAFETY: the cache was this thread's, and nothing refers to it any more.
    unsafe {
        release_all(heap, c);
        heap.free_cache_record(c);
    }
    heap.stats_update(|d| d.sub(field::CACHES, 1));
}

/// Publishes the calling thread's pending reuse counts (for a statistics snapshot).
#[cfg(not(spanheap_loom))]
pub(crate) fn publish_counts<P: super::Process>() {
    let heap = P::heap();
    let Some(c) = live_cache() else {
        return;
    };
    // SAFETY: our live cache.
    let _slow = unsafe { Slow::new(c) };
    // SAFETY: our live cache's heap cache is ours, entered with no lock held.
    unsafe { (*c).heap.with(|tc| heap.publish_heap_cache(tc)) };
    heap.stats_update(|d| {
        for class in 1..NUM_CLASSES {
            // SAFETY: our live cache's entries are ours.
            let pops = unsafe { super::tick::take_pops(c, entry(c, class), class) };
            if pops != 0 {
                d.add(field::SMALL_ALLOCS + class, pops);
                d.add(field::SMALL_FREES + class, pops);
            }
        }
    });
}

/// Gives everything the calling thread's cache holds back to the heap: local free
/// lists and remote buffers are flushed and every current span returned to its
/// mcentral. The cache stays usable.
#[cfg(not(spanheap_loom))]
pub(crate) fn flush_own<P: super::Process>() {
    let Some(c) = live_cache() else {
        return;
    };
    // SAFETY: our live cache.
    let _slow = unsafe { Slow::new(c) };
    // SAFETY: our live cache; `release_all` leaves it empty and valid, so the stack
    // pages can go too.
    unsafe {
        release_all(P::heap(), c);
        P::heap().drop_stack_pages(c);
    }
}

/// Gives every span of the cache back to its mcentral (Go's `releaseAll`), after
/// flushing the free lists and remote buffers. Leaves the cache empty and usable.
///
/// # Safety
/// `c` is a live cache owned by the caller.
pub(crate) unsafe fn release_all<M: MemSource>(heap: &Heap<M>, c: *mut MCache) {
    // SAFETY: forwarded.
    unsafe { release_classes(heap, c) };
    // SAFETY: the heap cache is ours, entered with no lock held.
    unsafe { (*c).heap.with(|tc| heap.flush_heap_cache(tc)) };
    // What was given back may be work for the scavenger (an exiting thread's caches
    // are eligible at once: the background thread is woken, or started from here).
    heap.maybe_scavenge();
}

/// The small-object half of `release_all`: free stacks, remote buffers and current
/// spans (not the page caches). Leaves every class empty and usable.
///
/// # Safety
/// `c` is a live cache owned by the caller (or a visitor holding its door).
pub(crate) unsafe fn release_classes<M: MemSource>(heap: &Heap<M>, c: *mut MCache) {
    // SAFETY: `c` is a live cache (caller's contract).
    let _slow = unsafe { Slow::new(c) };
    for class in 1..NUM_CLASSES {
        // SAFETY: the entry is ours.
        let e = unsafe { entry(c, class) };
        // Objects on the free list go back to their spans first (ours is merged by the
        // normalisation below; others are remote frees).
        // SAFETY: `e` is entry `class` of our cache.
        unsafe { flush(heap, c, e, class, 0) };
        // SAFETY: as above.
        unsafe { flush_remote(heap, c, class) };
        if let Some(s) = current_span(heap, e) {
            // The window's unused objects were counted as allocated when it was
            // loaded: uncount them before the span can retire.
            let unused = e.alloc_cache.count_ones() as u64;
            if unused != 0 {
                heap.stats_update(|d| d.sub(field::SMALL_ALLOCS + class, unused));
            }
            // SAFETY: `e` is entry `class` of our cache `c`.
            unsafe { super::tick::window_dropped(c, e, class) };
            // SAFETY: we own the span.
            unsafe {
                normalize(e, s);
                heap.central[class].uncache_span(heap, class as u8, s);
            }
        }
        // The stack's storage stays with the record.
        // The tick stays: it is the profile's countdown too.
        *e = ClassCache {
            stack: e.stack,
            limit: e.limit,
            tick: e.tick,
            ..EMPTY_CLASS
        };
        // SAFETY: `c` is a live cache; its door is used atomically.
        unsafe { (*c).door.publish_depth(class, 0) };
    }
}

/// A visitor's trim of class `class` of record `c` (`global/idle.rs`): the remote buffer goes
/// back, and of the objects on the free stack, three quarters of `min(low, depth)` (the
/// low-water estimate), taken from the bottom (the longest unused); or all of them if
/// no allocation took from the stack since the class's last slow path (no pops are
/// pending) or, as `unused(tick)` says of the entry's tick, since the last visit.
/// Returns the depth left, whether anything went back, and the tick.
///
/// # Safety
/// The caller holds the door of the live cache `c`; `class < NUM_CLASSES`.
pub(crate) unsafe fn trim_class<M: MemSource>(
    heap: &Heap<M>,
    c: *mut MCache,
    class: usize,
    low: u32,
    unused: impl FnOnce(u64) -> bool,
) -> (u32, bool, u64) {
    // SAFETY: the entry is ours (caller's contract).
    let e = unsafe { entry(c, class) };
    let mut any = false;
    // SAFETY: the counter is ours; `class < NUM_CLASSES`.
    if unsafe { *ptr::addr_of!((*c).nremote[class]) } != 0 {
        // SAFETY: forwarded.
        unsafe { flush_remote(heap, c, class) };
        any = true;
    }
    // A stack nothing was taken from since the last visit, or since the class's last
    // slow path (which publishes the pops; the objects on the stack were all
    // pushed since, and an allocation would have popped one), is a sink of frees: what
    // it holds would stay until the thread exits, pinning its spans' pages (the
    // leftover of a burst of frees). All of it goes. Otherwise the low-water rule.
    // SAFETY: `e` is entry `class` of `c`, whose door the caller holds.
    let pops = unsafe { super::tick::pending_pops(c, e, class) };
    let k = if pops == 0 || unused(e.tick) {
        e.nfree
    } else {
        let n = low.min(e.nfree);
        n - n / TRIM_KEEP_DIV
    };
    if k != 0 {
        // SAFETY: slots 0..nfree hold the stack's objects.
        let objs = unsafe { core::slice::from_raw_parts_mut(e.stack, e.nfree as usize) };
        // The bottom `k` objects to the top, where `flush` takes them from.
        objs.rotate_left(k as usize);
        let (before, keep) = (e.nfree, e.nfree - k);
        // SAFETY: forwarded.
        unsafe { flush(heap, c, e, class, keep) };
        // The storage the objects filled goes back too, in whole pages: a burst pushed
        // the stack deep, and the slots are written before they are read again.
        // SAFETY: slots keep..before of our stack hold nothing now.
        unsafe {
            heap.drop_stack_range(
                e.stack.add(keep as usize) as usize,
                (before - keep) as usize * core::mem::size_of::<*mut u8>(),
            )
        };
        any = true;
    }
    (e.nfree, any, e.tick)
}

/// Whether this thread has a live cache (otherwise it allocates from the shared one).
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn has_cache() -> bool {
    super::tls::state() == LIVE
}
