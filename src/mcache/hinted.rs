//! `free` without a size (the C ABI): the block's class comes from its page's
//! span-map entry, which names the span's class beside the record pointer
//! (`HeapArena::spans`), instead of a walk to the span record and its checks, and is trusted only if the block lies in the calling thread's current
//! span of that class. That span is live, of that class and owned by this cache, so
//! the check validates the hint whatever its age; the rest is `dealloc`'s fast path.
//! Anything else (another span, a page without a hint, an arena other than the one
//! the thread's memo holds, an address that is not an object's start, a full free
//! stack, a thread without a cache) is left to the validating path, which looks the
//! span up (`malloc.rs`).
//!
//! The thread's arena memo (`MCache::arena_hint`) is read here, never written: the
//! empty cache's must stay as it is. The validating path refreshes it (`note_arena`).

use core::ptr;

use crate::arena::arena_number;
use crate::fastclass::FREE_CHECK;

use super::{empty_cache, entry, tls, MCache, Process};

/// Whether `off`, an offset into a span of class `class`, is an object's start.
#[inline(always)]
pub(crate) fn at_object_start(class: usize, off: usize) -> bool {
    let d = FREE_CHECK[class].divisible;
    (off as u64).wrapping_mul(d) < d
}

/// Frees `p` into the calling thread's cache and returns true if it is an object of
/// the thread's current span of the class its page's hint names, and that class's free
/// stack has room; otherwise does nothing and returns false. Never makes a system call
/// and takes no lock.
///
/// Null misses: its arena number is 0, and arena 0 would hold address 0, which is
/// never mapped, so no memo names it.
///
/// # Safety
/// `p` is null, foreign, or a live block of the process-wide heap, not used afterwards
/// if this returns true.
#[inline(always)]
#[cfg_attr(feature = "checked", allow(dead_code))] // checked mode validates every free
pub(crate) unsafe fn free_hinted<P: Process>(p: *mut u8) -> bool {
    let c = tls::cache();
    let addr = p as usize;
    // SAFETY: `c` is this thread's cache or the empty one; the memo is only read (the
    // empty cache's is `NO_ARENA`, which no address matches).
    let (n, arena) = unsafe { *ptr::addr_of!((*c).arena_hint) };
    if arena_number(addr) != n {
        return false;
    }
    // SAFETY: a matching memo holds a record that is never freed.
    let class = unsafe { (*arena).class_hint_at(addr) };
    // SAFETY: `class < NUM_CLASSES` (hints are classes); `c` as above (the empty cache's
    // entries have no span, `span_base == 0`, which no heap address passes below).
    let e = unsafe { entry(c, class) };
    let off = addr.wrapping_sub(e.span_base);
    // SAFETY: as above.
    let check = unsafe { FREE_CHECK.get_unchecked(class) };
    // Inside the current span of `class` (live, owned by us; a class-0 hint has no
    // span bytes), at an object's start.
    if off as u64 >= check.span_bytes
        || (off as u64).wrapping_mul(check.divisible) >= check.divisible
    {
        return false;
    }
    let n = e.nfree;
    if n >= u32::from(e.limit) {
        return false; // the push would overflow: `dealloc` flushes
    }
    // SAFETY: below the limit, the stack has room (see `push_local`).
    unsafe { e.stack.add(n as usize).write(p) };
    e.nfree = n + 1;
    true
}

/// Points the calling thread's arena memo at `p`'s arena (for `free_hinted`), if its
/// cache is in its slot.
#[inline]
pub(crate) fn note_arena<P: Process>(p: *const u8) {
    let c: *mut MCache = tls::cache();
    if c == empty_cache() {
        return;
    }
    // SAFETY: our live cache's memo is ours.
    let hint = unsafe { &mut *ptr::addr_of_mut!((*c).arena_hint) };
    let _ = P::heap().arenas.arena_of_hinted(p as usize, hint);
}
