//! How many freed objects a thread cache may keep, and where it keeps them.
//!
//! Holds the per-class free-stack limits (`FREE_LIMIT`, from the tuning constants in
//! `mod.rs`), the layout of a record's stack storage (`STACK_OFFSET`, `STACK_BYTES`,
//! `STACK_MAP_BYTES`, `MCache::set_stacks`), and the budget of all threads' free stacks
//! together: its process-wide state (`budget::get`/`set`, the thread count and the
//! generation), the limits scaled to a thread's share (`scaled_limits`), and how a
//! cache takes them up (`check_budget`, `MCache::apply_limits`). Go's mcache has no
//! counterpart (it keeps no freed objects); the budget is tcmalloc's overall
//! thread-cache size.
//!
//! *Protection.* The limits a record works with (`ClassCache::limit`, `limits_gen`) are
//! its owner's (or a visitor's holding its door). The budget's process-wide state is
//! core atomics, Relaxed: it only steers limits, and a stale value delays a thread's
//! adjustment to its next slow path. The tables and the layout are constants.

use core::ptr;

use super::heap::Heap;
use crate::os::MemSource;
use crate::sizeclasses::{CLASS_TO_SIZE, NUM_CLASSES};

use super::flush::flush;
#[cfg(not(spanheap_loom))]
use super::lifecycle::{live_cache, Slow};
use super::{entry, MCache};
use super::{FREE_LIMIT_BYTES, MAX_FREE_LIMIT, MIN_FREE_LIMIT};

#[cfg(not(spanheap_loom))]
pub(crate) use state::{get, set, thread_count};

/// How many freed objects a class's local free list may hold before three quarters of
/// them are flushed back to their spans: `FREE_LIMIT_BYTES` worth (512 KiB), at least
/// `MIN_FREE_LIMIT` (32) and at most `MAX_FREE_LIMIT` (4096) objects (so a burst of 128
/// 4 KiB blocks, or 32 of the largest class, is recycled locally: classes with few
/// objects per span, 2 for 4 KiB, otherwise churn spans on every burst; a thread pins
/// at most this much per class it uses, and gives it back at exit or on
/// `flush_thread_cache`).
pub(super) static FREE_LIMIT: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        t[c] = free_limit(c);
        c += 1;
    }
    t
};

/// `FREE_LIMIT[class]` (a function, so that the consts below can use it).
const fn free_limit(class: usize) -> u32 {
    let n = FREE_LIMIT_BYTES / CLASS_TO_SIZE[class] as u32;
    if n < MIN_FREE_LIMIT {
        MIN_FREE_LIMIT
    } else if n > MAX_FREE_LIMIT {
        MAX_FREE_LIMIT
    } else {
        n
    }
}

/// Where each class's free stack starts in a cache's stack storage, in slots: class
/// `c` has `FREE_LIMIT[c] + 1` slots (a push may reach the limit + 1 before it
/// flushes); entry `NUM_CLASSES` is the total.
const STACK_OFFSET: [usize; NUM_CLASSES + 1] = {
    let mut t = [0usize; NUM_CLASSES + 1];
    let mut c = 1;
    while c < NUM_CLASSES {
        t[c + 1] = t[c] + free_limit(c) as usize + 1;
        c += 1;
    }
    t
};

// `stack_base` relies on it: class 1's stack starts the storage.
const _: () = assert!(STACK_OFFSET[1] == 0);

/// Bytes of stack storage a cache needs (about 640 KiB of address space; only the
/// slots a thread's deepest stacks reach are ever touched, so resident memory follows
/// use: 8 bytes per object a thread keeps freed).
pub(crate) const STACK_BYTES: usize = STACK_OFFSET[NUM_CLASSES] * core::mem::size_of::<*mut u8>();

/// Bytes of the mapping that holds a cache record's stacks (`STACK_BYTES` in whole
/// pages).
pub(crate) const STACK_MAP_BYTES: usize = STACK_BYTES.next_multiple_of(crate::os::PAGE_SIZE);

impl MCache {
    /// Points every class's free stack into `base`, `STACK_BYTES` bytes of storage
    /// that stays with this record for its lifetime.
    ///
    /// # Safety
    /// `base` is writable for `STACK_BYTES` bytes, aligned for pointers, used by
    /// nothing else; the cache is unused (every stack empty).
    pub(crate) unsafe fn set_stacks(&mut self, base: *mut *mut u8) {
        let per_class = self.classes.iter_mut().zip(&STACK_OFFSET).zip(&FREE_LIMIT);
        for ((e, &off), &limit) in per_class.skip(1) {
            debug_assert!(e.nfree == 0);
            // SAFETY: off + FREE_LIMIT[c] + 1 <= STACK_OFFSET[NUM_CLASSES] slots.
            e.stack = unsafe { base.add(off) };
            e.limit = limit as u16;
        }
    }

    /// Whether the stacks have storage (`set_stacks` ran).
    pub(crate) fn has_stacks(&self) -> bool {
        !self.stack_base().is_null()
    }

    /// The start of the stack storage (null before `set_stacks`).
    pub(crate) fn stack_base(&self) -> *mut *mut u8 {
        // Class 1's stack is the first (STACK_OFFSET[1] == 0).
        self.classes[1].stack
    }

    /// A cache whose record and stack storage come from the Rust global allocator and
    /// are never freed: for unit tests and the loom models, which drive the cache code
    /// outside the process-wide heap.
    pub(crate) fn leaked() -> *mut MCache {
        let c = Box::into_raw(Box::new(MCache::empty()));
        let slots = STACK_OFFSET[NUM_CLASSES];
        let stacks = Box::leak(vec![ptr::null_mut::<u8>(); slots].into_boxed_slice());
        // SAFETY: fresh, unused, `slots` pointer slots (STACK_BYTES).
        unsafe { (*c).set_stacks(stacks.as_mut_ptr()) };
        c
    }
}

/// The calling thread's stack storage, `(base, bytes)`, if it has a live cache (for
/// tests).
#[cfg(not(spanheap_loom))]
pub(crate) fn thread_stack_storage() -> Option<(usize, usize)> {
    let c = live_cache()?;
    // SAFETY: this thread's live cache; only read.
    let base = unsafe { (*c).stack_base() };
    Some((base as usize, STACK_MAP_BYTES))
}

// ---------------------------------------------------------------------------------------
// The budget of all threads' free stacks together (tcmalloc's overall thread-cache size).
// ---------------------------------------------------------------------------------------

/// Bytes a thread's free stacks may hold with the full `FREE_LIMIT` of every class.
pub(super) const FULL_STACK_BYTES: usize = {
    let (mut c, mut sum) = (1, 0);
    while c < NUM_CLASSES {
        sum += free_limit(c) as usize * CLASS_TO_SIZE[c] as usize;
        c += 1;
    }
    sum
};

/// Bytes a thread's free stacks hold at least, with a limit of one object per class
/// (so the budget binds only while it is at least this much per thread).
#[cfg(test)]
pub(super) const FLOOR_STACK_BYTES: usize = {
    let (mut c, mut sum) = (1, 0);
    while c < NUM_CLASSES {
        sum += CLASS_TO_SIZE[c] as usize;
        c += 1;
    }
    sum
};

/// The budget's process-wide state (outside the modelled core: core atomics, Relaxed:
/// they steer limits, and a stale value only delays a thread's adjustment to its next
/// slow path).
#[cfg(not(spanheap_loom))]
mod state {
    use core::sync::atomic::{AtomicUsize, Ordering};

    /// The budget in bytes (`usize::MAX`: not read from the environment yet).
    static BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// Threads with a live cache.
    static THREADS: AtomicUsize = AtomicUsize::new(0);
    /// Bumped whenever the share changes (thread count or budget): a thread whose
    /// record saw another generation recomputes its limits.
    static GEN: AtomicUsize = AtomicUsize::new(1);

    /// The budget in bytes (environment `SPANHEAP_THREAD_CACHE_BUDGET`, bytes with an
    /// optional K, M or G suffix).
    pub(crate) fn get() -> usize {
        let b = BUDGET.load(Ordering::Relaxed);
        if b != usize::MAX {
            return b;
        }
        let v = crate::env::env_size(c"SPANHEAP_THREAD_CACHE_BUDGET")
            .unwrap_or(crate::mcache::DEFAULT_BUDGET)
            .min(usize::MAX - 1);
        let _ = BUDGET.compare_exchange(usize::MAX, v, Ordering::Relaxed, Ordering::Relaxed);
        BUDGET.load(Ordering::Relaxed)
    }

    /// Sets the budget (the API).
    pub(crate) fn set(bytes: usize) {
        BUDGET.store(bytes.min(usize::MAX - 1), Ordering::Relaxed);
        GEN.fetch_add(1, Ordering::Relaxed);
    }

    /// A thread got (`+1`) or gave up (`-1`) its cache.
    pub(crate) fn thread_count(delta: isize) {
        if delta > 0 {
            THREADS.fetch_add(1, Ordering::Relaxed);
        } else {
            THREADS.fetch_sub(1, Ordering::Relaxed);
        }
        GEN.fetch_add(1, Ordering::Relaxed);
    }

    /// The current generation.
    #[inline]
    pub(crate) fn generation() -> usize {
        GEN.load(Ordering::Relaxed)
    }

    /// One thread's share of the budget now.
    pub(crate) fn share() -> usize {
        get() / THREADS.load(Ordering::Relaxed).max(1)
    }
}

/// Per-class free-stack limits for a thread whose share of the budget is `share`
/// bytes: every class's `FREE_LIMIT` scaled by one factor, at least one object, the
/// factor chosen so that the limits' bytes fit the share (or, for a share below
/// `FLOOR_STACK_BYTES`, one object per class).
pub(crate) fn scaled_limits(share: usize) -> [u16; NUM_CLASSES] {
    let mut t = [0u16; NUM_CLASSES];
    let bytes = |t: &[u16; NUM_CLASSES]| -> usize {
        (1..NUM_CLASSES)
            .map(|c| t[c] as usize * CLASS_TO_SIZE[c] as usize)
            .sum()
    };
    // The factor, in 1/65536ths.
    let mut f: u64 = if share >= FULL_STACK_BYTES {
        1 << 16
    } else {
        ((share as u64) << 16) / FULL_STACK_BYTES as u64
    };
    loop {
        for c in 1..NUM_CLASSES {
            t[c] = ((u64::from(FREE_LIMIT[c]) * f) >> 16).max(1) as u16;
        }
        let b = bytes(&t);
        if b <= share || f == 0 {
            return t;
        }
        // The classes held at one object took more than their share: shrink the rest.
        f = f * share as u64 / b as u64;
        f = f.saturating_sub(1);
    }
}

impl MCache {
    /// Sets this record's free-stack limits to `limits`, flushing stacks that hold more.
    /// Then records generation `generation`.
    ///
    /// # Safety
    /// The caller owns the live cache (or holds its door); no lock held.
    pub(crate) unsafe fn apply_limits<M: MemSource>(
        this: *mut MCache,
        heap: &Heap<M>,
        limits: &[u16; NUM_CLASSES],
        generation: usize,
    ) {
        // First, so that the flushes below do not come back here.
        // SAFETY: the field is the owner's (caller's contract).
        unsafe { *ptr::addr_of_mut!((*this).limits_gen) = generation };
        for (class, &limit) in limits.iter().enumerate().skip(1) {
            // SAFETY: the entry is ours (caller's contract).
            let e = unsafe { entry(this, class) };
            e.limit = limit;
            if e.nfree > u32::from(e.limit) {
                // SAFETY: forwarded.
                unsafe { flush(heap, this, e, class, u32::from(e.limit)) };
            }
        }
    }
}

/// At a slow path of the process-wide heap's cache `c`: if the budget's share changed
/// since the cache last looked, applies the new limits.
///
/// # Safety
/// As for `MCache::apply_limits`.
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) unsafe fn check_budget<M: MemSource>(heap: &Heap<M>, c: *mut MCache) {
    let g = state::generation();
    // SAFETY: the field is the owner's.
    if unsafe { *ptr::addr_of!((*c).limits_gen) } != g {
        // SAFETY: forwarded.
        unsafe { apply_budget(heap, c, g) };
    }
}

/// Brings the calling thread's limits up to date with the budget now.
#[cfg(not(spanheap_loom))]
pub(crate) fn apply_own_budget<P: super::Process>() {
    if let Some(c) = live_cache() {
        // SAFETY: our live cache, no lock held.
        unsafe {
            let _slow = Slow::new(c);
            check_budget(P::heap(), c);
        }
    }
}

/// The calling thread's free stacks: bytes held and bytes their limits allow (for
/// tests of the budget).
#[cfg(not(spanheap_loom))]
pub(crate) fn own_stack_bytes() -> (u64, u64) {
    let Some(c) = live_cache() else {
        return (0, 0);
    };
    (1..NUM_CLASSES).fold((0, 0), |(held, cap), class| {
        // SAFETY: our live cache's entries; only read.
        let e = unsafe { entry(c, class) };
        let size = u64::from(CLASS_TO_SIZE[class]);
        (
            held + u64::from(e.nfree) * size,
            cap + u64::from(e.limit) * size,
        )
    })
}

/// Bytes of this thread's free-stack storage that are resident (for tests).
#[cfg(not(spanheap_loom))]
pub(crate) fn own_stack_resident() -> u64 {
    let Some(c) = live_cache() else {
        return 0;
    };
    // SAFETY: our live cache; only read.
    let base = unsafe { (*c).stack_base() };
    let page = crate::os::os_page_size().unwrap_or(4096);
    let mut vec = [0u8; STACK_MAP_BYTES / 4096];
    let n = STACK_MAP_BYTES / page;
    if base.is_null() || n > vec.len() {
        return 0;
    }
    // SAFETY: the record's own stack mapping, `STACK_MAP_BYTES` from a page boundary;
    // `vec` has a byte per page.
    if unsafe { libc::mincore(base.cast(), STACK_MAP_BYTES, vec.as_mut_ptr()) } != 0 {
        return 0;
    }
    vec[..n].iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64
}

#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
unsafe fn apply_budget<M: MemSource>(heap: &Heap<M>, c: *mut MCache, g: usize) {
    let limits = scaled_limits(state::share());
    // SAFETY: forwarded.
    unsafe { MCache::apply_limits(c, heap, &limits, g) };
}
