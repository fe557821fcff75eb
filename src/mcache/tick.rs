//! The class entry's `tick`: the one counter the allocation fast path writes, read two
//! ways.
//!
//! *Statistics.* An object reused from the free stack is counted as one allocation and
//! one free when the class's counts are next published (a refill, a flush, a snapshot);
//! a window's objects are counted when the window is loaded. The fast path does not
//! count stack pops apart from window takes: it only bumps `tick`. The stack pops not
//! yet published are
//!
//! ```text
//!     tick - tick_mark + (objects left in the window)
//! ```
//!
//! with `MCache::tick_mark` advanced by a window's objects when it is loaded
//! ([`window_loaded`]) and moved back by the unused ones when it is dropped
//! ([`window_dropped`]), so that window takes cancel out; [`take_pops`] publishes.
//! Everything wraps.
//!
//! *The heap profile's countdown* (Go's `mcache.nextSample`, per class here). The tick
//! is set to `-n` for a countdown of `n` objects, so that the fast path's test is the
//! sign of the incremented value (`inc` and `jns`, no second counter to load and
//! store): when it turns non-negative, the caller asks the profile ([`next_countdown`],
//! `profile::sample::expired`) whether this object is sampled and for the next
//! countdown, and `tick_mark` moves with the tick so that the pending pops stay. A path
//! that does not look (the shared cache, a slow path while the profile is off) leaves
//! the tick non-negative, and the next allocation of the class that looks sees it.
//!
//! Sampling per class rather than per thread: each class's countdown is an exponential
//! draw of the profile's mean rate in bytes, counted in objects of the class's size, so
//! every byte allocated is sampled at that rate all the same (the classes' independent
//! processes add up to one of the same rate per byte), and the probability that an
//! object is sampled depends on its class's size, which is what the profile records
//! (as Go's does).

#[cfg(feature = "profile")]
use super::entry;
use super::{ClassCache, MCache};

/// Adds the `n` objects just loaded into class `class`'s window (empty before) to the
/// window takes to discount.
///
/// # Safety
/// `c` is a live cache owned by the caller; `class < NUM_CLASSES`.
pub(super) unsafe fn window_loaded(c: *mut MCache, class: usize, n: u64) {
    // SAFETY: per the contract.
    unsafe {
        let m = &mut (*c).tick_mark[class];
        *m = m.wrapping_add(n);
    }
}

/// Takes back from the window takes to discount the objects still in the window of
/// `e`, class `class`'s entry, which the caller is about to drop unused.
///
/// (These functions take the entry as well as the cache: the caller holds a reference
/// to it, which a second one, made from `c`, would invalidate; `tick_mark` is a field
/// apart.)
///
/// # Safety
/// As for `window_loaded`, and `e` is entry `class` of `c`.
pub(super) unsafe fn window_dropped(c: *mut MCache, e: &ClassCache, class: usize) {
    let n = e.alloc_cache.count_ones() as u64;
    // SAFETY: per the contract.
    let m = unsafe { &mut (*c).tick_mark[class] };
    *m = m.wrapping_sub(n);
}

/// The stack pops of class `class` (entry `e`) not yet published.
///
/// # Safety
/// As for `window_dropped`.
pub(super) unsafe fn pending_pops(c: *mut MCache, e: &ClassCache, class: usize) -> u64 {
    // SAFETY: per the contract.
    let m = unsafe { (*c).tick_mark[class] };
    e.tick
        .wrapping_sub(m)
        .wrapping_add(e.alloc_cache.count_ones() as u64)
}

/// The stack pops of class `class` (entry `e`) not yet published, which the caller
/// publishes now.
///
/// # Safety
/// As for `window_dropped`.
pub(super) unsafe fn take_pops(c: *mut MCache, e: &ClassCache, class: usize) -> u64 {
    // SAFETY: per the contract.
    unsafe {
        let n = pending_pops(c, e, class);
        let m = &mut (*c).tick_mark[class];
        *m = m.wrapping_add(n);
        n
    }
}

/// Sets class `class`'s tick to `t`, keeping its pending pops.
///
/// # Safety
/// As for `window_loaded`.
#[cfg(feature = "profile")]
pub(super) unsafe fn set_tick(c: *mut MCache, class: usize, t: u64) {
    // SAFETY: per the contract.
    unsafe {
        let e = entry(c, class);
        let m = &mut (*c).tick_mark[class];
        *m = m.wrapping_add(t.wrapping_sub(e.tick));
        e.tick = t;
    }
}

/// Whether a tick the fast path returned says the countdown ran out.
#[inline(always)]
pub(super) fn ran_out(tick: u64) -> bool {
    (tick as i64) >= 0
}

#[cfg(not(spanheap_loom))]
mod process {
    use super::super::{take_then, tls};
    #[cfg(feature = "profile")]
    use super::{super::entry, super::lifecycle::live_cache, set_tick};

    /// `alloc_cached` counted down for the heap profile: an object that runs class
    /// `class`'s countdown out goes through `out` (which asks the profile,
    /// [`next_countdown`], and may give another object, never null), whose result is
    /// returned instead. Without the `profile` feature, `out` is never called.
    #[inline(always)]
    pub(crate) fn alloc_cached_then(class: usize, out: impl FnOnce(*mut u8) -> *mut u8) -> *mut u8 {
        // SAFETY: `tls::cache()` is this thread's cache or the empty one; `out` never
        // returns null (the caller's contract).
        unsafe { take_then(tls::cache(), class, cfg!(feature = "profile"), out) }
    }

    /// For the slow paths, after they took an object of class `class`: if the class's
    /// countdown on the calling thread's cache has run out, sets the next one and says
    /// whether that object is sampled (`next_countdown`); false otherwise, and for a
    /// thread without a cache.
    #[cfg(feature = "profile")]
    pub(crate) fn sample_due(class: usize) -> bool {
        match live_cache() {
            // SAFETY: our live cache's entry is ours.
            Some(c) if super::ran_out(unsafe { entry(c, class) }.tick) => {
                // SAFETY: as above.
                unsafe { redraw(c, class) }
            }
            _ => false,
        }
    }

    /// Class `class`'s countdown ran out on the calling thread's cache: sets the next
    /// one (`profile::sample::expired`) and says whether the object that ran it out is
    /// sampled. Through `live_cache`, not the slot alone: a visit that was abandoned
    /// leaves the slot empty while the owner runs on (`global/idle.rs`), and a countdown
    /// that ran out must not stay so on the record.
    #[cfg(feature = "profile")]
    #[cold]
    pub(crate) fn next_countdown(class: usize) -> bool {
        match live_cache() {
            // SAFETY: our live cache.
            Some(c) => unsafe { redraw(c, class) },
            None => false,
        }
    }

    /// `next_countdown` on cache `c`.
    ///
    /// # Safety
    /// `c` is the calling thread's live cache; `class < NUM_CLASSES`.
    #[cfg(feature = "profile")]
    unsafe fn redraw(c: *mut super::MCache, class: usize) -> bool {
        let size = crate::sizeclasses::CLASS_TO_SIZE[class] as usize;
        // SAFETY: our live cache's fields are ours (the caller's contract).
        unsafe {
            let (n, sampled) = crate::profile::sample::expired(size, &mut (*c).sample_gen[class]);
            // `n >= 1`: the tick turns non-negative at the `n`th object from now.
            set_tick(c, class, n.wrapping_neg());
            sampled
        }
    }

    /// Runs every class's countdown of the calling thread out, so that its next
    /// allocation of any class asks the profile (`profile::set_rate`, outside the
    /// allocator). Takes the record back first if an idle visitor emptied the slot
    /// (`live_cache`): a countdown left on the record would otherwise carry the old
    /// rate on.
    #[cfg(feature = "profile")]
    pub(crate) fn restart_countdown() {
        if let Some(c) = live_cache() {
            for class in 1..crate::sizeclasses::NUM_CLASSES {
                // SAFETY: our live cache; `class < NUM_CLASSES`.
                unsafe { set_tick(c, class, u64::MAX) };
            }
        }
    }
}

#[cfg(not(spanheap_loom))]
pub(crate) use process::*;
