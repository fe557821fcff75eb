//! `MCache`: the per-thread front end for small objects (Go's `mcache`).
//!
//! Each thread with a cache owns at most one span per size class (its *current* span)
//! and allocates from it with no lock and no atomic read-modify-write:
//!
//! 1. pop the class's local free list (objects this thread freed: a stack of pointers,
//!    so neither a free nor a reuse touches the object's memory);
//! 2. else take the lowest set bit of `alloc_cache`, a 64-object window of the span's
//!    alloc bitmap inverted (Go's `allocCache`, count-trailing-zeros);
//! 3. else `refill`: load the span's next window; when the span is exhausted, merge its
//!    remote frees and keep it if enough came back, else give it to the mcentral and
//!    take another span (or grow the heap).
//!
//! Freeing is told the size, so the class comes from the `Layout`. If this thread's
//! cache owns the object's span or owned it last, the object goes on the class's local
//! free list (no lock, no atomic RMW; the span keeps counting it as allocated). A class
//! whose frees have all been of this cache's own objects for a span's worth of
//! allocations is in *wide mode*: its frees go on the local list without looking the
//! span up (as jemalloc's tcache does for every free), until a flush finds more than
//! an eighth of what it returns to be other caches' objects. When a local list grows
//! past about 512 KiB worth of objects (32..4096), all but a quarter of it is flushed back
//! to the spans; at thread exit all of it is. An object of a span this cache does not own goes on the
//! class's *remote buffer* instead (never reused here), which is flushed to the spans
//! in batches of up to 64 objects (at most about 16 KiB). Flushes, and every free of a
//! cache-less thread, are *remote* frees: set the object's bit in the span's remote
//! bitmap and count it in the span's state word (two atomic RMWs, lock-free, never
//! lost); the owner merges remote bits when it next sweeps the span, and an unowned
//! span is announced to its mcentral when it becomes allocatable again or completely
//! free (then its pages go back to the heap).
//!
//! Statistics (`stats.rs`) are written at refill and flush granularity: a window's
//! objects count as allocated when it is loaded (the unused rest is subtracted when the
//! span is given back); an object reused from the local free list is counted in the
//! plain per-class `pops` (the one statistics cost on the fast path) and published at
//! the next refill or flush as one allocation and one free; an object counts as freed
//! when it goes back to its span, in a write section that precedes the remote free. So
//! every snapshot counts an object as live while its span holds it allocated, and a
//! span's bytes leave the in-use total only after its objects' frees were counted.
//!
//! The thread-local pointer starts at a static empty cache whose every class has an
//! empty window and a sentinel span, so the fast path has no "is there a cache" test:
//! the first allocation simply misses and the slow path creates the real cache. A
//! `pthread_key_create` destructor releases the cache at thread exit, independent of
//! std's TLS destructors; afterwards, and for threads that could not get a cache, the
//! thread is *cache-less* ("P-less"): it allocates through one shared cache under a lock
//! and frees through the remote path.

//!
//! The cache logic (everything that takes a `heap` argument) is generic over the heap
//! and compiled under loom too, so the models drive the real code; the thread-local
//! glue and the process-wide entry points (`alloc`, `dealloc`, thread exit, the shared
//! cache) are not.

use core::ptr::{self, NonNull};

use crate::arena::{ArenaHint, NO_ARENA};
use crate::fixalloc::Record;
#[cfg(not(spanheap_loom))]
use crate::global::HEAP;
use crate::mcentral::{count_free, merge_remote, private};
use crate::mheap::MHeap;
use crate::mspan::{rstate_parts, MSpan, Purpose, RSTATE_OWNED};
use crate::os::MemSource;
use crate::pagecache::GatedCache;
use crate::sizeclasses::{obj_index, CLASS_TO_NPAGES, CLASS_TO_SIZE, NUM_CLASSES};
use crate::stats::{field, HeapSeq};
use crate::sync::{AtomicU64, Mutex, Ordering, UnsafeCell};

/// One size class of a cache: one cache line, all the fast paths touch.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct ClassCache {
    /// Local free stack: objects of this class freed by this thread (from spans this
    /// cache owns or owned last, or any in wide mode), `stack[0..nfree]`, the most
    /// recent on top. Their spans still count them as allocated until they are flushed
    /// (`flush`) when the stack grows past `FREE_LIMIT`. A stack of pointers rather
    /// than a list linked through the objects: a free does not write to the object, an
    /// allocation does not read it, and a flush walks an array instead of chasing
    /// links through cold objects. The storage (`FREE_LIMIT + 1` slots in the record's
    /// stack mapping, see `MCache::set_stacks` and `MHeap::alloc_cache_record`) is
    /// fixed for the record's lifetime; null in the empty cache, whose `nfree` stays 0.
    stack: *mut *mut u8,
    /// Objects on `stack`.
    /// (32 bits: the fast paths' 32-bit read-modify-writes of it then forward from
    /// each other's stores; a 16-bit store followed by a wider load would stall.)
    nfree: u32,
    /// `FREE_LIMIT` of the class, here so that a push compares with a value on the
    /// line it already has (`MCache::set_stacks` sets it; 0 in the empty cache, whose
    /// stacks are never pushed to).
    limit: u16,
    /// Object size of the class (at most 32 KiB).
    elemsize: u16,
    /// Free objects of the current window (bit i = object at `window_base + i * elemsize`).
    alloc_cache: u64,
    window_base: usize,
    /// The current span's memory, `[span_base, span_base + span_len)` (both 0 when
    /// there is none): a free inside it is local without a span-map lookup. In wide
    /// mode `span_len` is `usize::MAX`, so that every address but `span_base - 1` is
    /// "inside". (A length rather than an end: the free path's range test is then one
    /// subtraction and one compare.)
    span_base: usize,
    span_len: usize,
    /// Objects taken from `free` since the class's counts were last published.
    pops: u64,
    /// Remote buffer: objects freed by this thread from spans it does not own, linked
    /// through their first word, returned to their spans in a batch (`flush_remote`)
    /// when `REMOTE_LIMIT` is reached. Never reused for allocation.
    remote: *mut u8,
}

const _: () = assert!(core::mem::size_of::<ClassCache>() == 64);

/// A thread cache. Owned by one thread (or, for the shared cache, by the holder of the
/// shared lock); never touched by others, except `seq`, which the statistics reader
/// reads.
#[repr(C)]
pub(crate) struct MCache {
    classes: [ClassCache; NUM_CLASSES],
    /// The arena of this thread's last slow-path free (`dealloc_slow`), so that the
    /// next one in the same arena skips the index walk. Owner only.
    arena_hint: ArenaHint,
    /// Per class: objects this cache put on the remote buffer (frees of spans it does
    /// not own), or found among its own flushed objects in wide mode, since the class
    /// last took a span. 0 when a span is taken puts the class in wide mode (see
    /// `refill_span`). Owner only.
    remote_since: [u32; NUM_CLASSES],
    /// Per class: objects on the entry's remote buffer. Owner only.
    nremote: [u16; NUM_CLASSES],
    /// The thread's page block, chunk, large-block and record caches (span allocation
    /// without the lock), behind the gate that lets the scavenger take them back while
    /// the thread is idle (`GatedCache`). Owner, inside the gate.
    heap: GatedCache,
    /// The statistics sequence counter of the thread owning this cache.
    seq: HeapSeq,
    /// Whether `seq` is in the statistics registry (records are reused, the
    /// registration stays). Owner only.
    registered: bool,
    /// The budget generation the free-stack limits were set for (0: never; the
    /// `FREE_LIMIT`s then apply). Owner (or a visitor holding the door).
    limits_gen: usize,
    /// The door through which other threads may visit the record while its owner is
    /// provably outside the allocator (`idle.rs`).
    pub(crate) door: crate::idle::Door,
    /// Fixalloc free-list link (heap lock).
    free_link: UnsafeCell<*mut MCache>,
}

const EMPTY_CLASS: ClassCache = ClassCache {
    stack: ptr::null_mut(),
    nfree: 0,
    limit: 0,
    elemsize: 0,
    alloc_cache: 0,
    window_base: 0,
    span_base: 0,
    span_len: 0,
    pops: 0,
    remote: ptr::null_mut(),
};

/// The cache every thread starts with (and returns to at exit): all misses.
///
/// The fast paths reach a class entry through a raw pointer and may form a `&mut`
/// to it (`entry`), so the record lives in an `UnsafeCell`: a `&mut` into an
/// immutable static would be undefined behaviour even though nothing is written.
/// (`core`'s cell, not the shim's: this is no shared state, it is never written, and
/// its address must be a constant for the thread-local's initial value.)
#[cfg(not(spanheap_loom))]
pub(crate) struct SyncCache(core::cell::UnsafeCell<MCache>);
// SAFETY: the empty cache is never written (every fast path misses on it first), so
// sharing it between threads shares only reads.
#[cfg(not(spanheap_loom))]
unsafe impl Sync for SyncCache {}
#[cfg(not(spanheap_loom))]
impl SyncCache {
    /// The record's address (a constant: usable in a `const` initialiser).
    #[inline(always)]
    pub(crate) const fn get(&self) -> *mut MCache {
        self.0.get()
    }
}
#[cfg(not(spanheap_loom))]
pub(crate) static EMPTY_CACHE: SyncCache = SyncCache(core::cell::UnsafeCell::new(MCache::empty()));

impl MCache {
    crate::sync::const_fn! {
        /// A cache with nothing in it.
        pub(crate) fn empty() -> Self {
            MCache {
                classes: [EMPTY_CLASS; NUM_CLASSES],
                arena_hint: NO_ARENA,
                remote_since: [0; NUM_CLASSES],
                nremote: [0; NUM_CLASSES],
                heap: GatedCache::new(),
                seq: HeapSeq::new(),
                registered: false,
                limits_gen: 0,
                door: crate::idle::Door::new(),
                free_link: UnsafeCell::new(ptr::null_mut()),
            }
        }
    }
}

// SAFETY: `free_link` is used only by the fixalloc.
unsafe impl Record for MCache {
    fn fresh() -> Self {
        MCache::empty()
    }
    fn free_link(&self) -> &UnsafeCell<*mut Self> {
        &self.free_link
    }
}

#[cfg(not(spanheap_loom))]
const NO_CACHE: u8 = 0;
#[cfg(not(spanheap_loom))]
const LIVE: u8 = 1;
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

#[cfg(not(spanheap_loom))]
#[inline]
fn empty_cache() -> *mut MCache {
    EMPTY_CACHE.get()
}

/// The entry of class `class` in cache `c`.
///
/// # Safety
/// `c` is a live cache the caller owns (see `try_alloc`), `class < NUM_CLASSES`.
#[inline(always)]
unsafe fn entry<'a>(c: *mut MCache, class: usize) -> &'a mut ClassCache {
    // SAFETY: per the contract.
    unsafe {
        &mut *ptr::addr_of_mut!((*c).classes)
            .cast::<ClassCache>()
            .add(class)
    }
}

/// The statistics writer of the calling thread: its cache's sequence counter while the
/// cache is live (the process-wide heap's `writer` hook).
#[cfg(not(spanheap_loom))]
pub(crate) fn current_writer() -> Option<&'static HeapSeq> {
    if crate::tls::state() != LIVE {
        return None;
    }
    let c = crate::tls::cache();
    if c == empty_cache() {
        // A visitor emptied the slot (`idle.rs`): the locked statistics path serves
        // until the record is back.
        return None;
    }
    // SAFETY: a live cache's record is never unmapped; `seq` is only used atomically.
    Some(unsafe { &(*c).seq })
}

/// This thread's live cache, re-installed first if a visitor emptied its slot
/// (`idle.rs`); None if the thread has no live cache.
#[cfg(not(spanheap_loom))]
#[inline]
fn live_cache() -> Option<*mut MCache> {
    if crate::tls::state() != LIVE {
        return None;
    }
    let c = crate::tls::cache();
    if c != empty_cache() {
        return Some(c);
    }
    crate::idle::reattach()
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
/// it lives (visitors leave such a record alone, `idle.rs`).
struct Slow<'a>(&'a crate::idle::Door, u32);

impl<'a> Slow<'a> {
    /// # Safety
    /// `c` is a live cache record (its door is used atomically only).
    #[inline]
    unsafe fn new(c: *mut MCache) -> Self {
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

/// The fast path shared by thread caches and the shared cache.
///
/// # Safety
/// `c` is this thread's cache, the empty cache, or the shared cache with its lock held.
#[inline(always)]
unsafe fn try_alloc(c: *mut MCache, class: usize) -> *mut u8 {
    // SAFETY: `class < NUM_CLASSES` (from the size-class functions); the entry is ours.
    // Writes happen only when the entry had something to give, which the empty cache
    // never has. Slots below `nfree` hold pushed objects: never null (`dealloc` is
    // never given null; `free_to` callers pass live objects).
    unsafe {
        let e = ptr::addr_of_mut!((*c).classes)
            .cast::<ClassCache>()
            .add(class);
        let n = (*e).nfree;
        if n != 0 {
            let n = n - 1;
            (*e).nfree = n;
            (*e).pops += 1;
            // The stack holds `nfree` objects below its top, none of them null (telling
            // the compiler so spares the caller's null test on this path).
            let p = (*e).stack.add(n as usize).read();
            if p.is_null() {
                core::hint::unreachable_unchecked();
            }
            return p;
        }
        let ac = (*e).alloc_cache;
        if ac != 0 {
            (*e).alloc_cache = ac & (ac - 1);
            return ((*e).window_base + ac.trailing_zeros() as usize * (*e).elemsize as usize)
                as *mut u8;
        }
    }
    ptr::null_mut()
}

/// Allocates an object of class `class` from cache `c` of `heap`, refilling it if
/// needed. Null if memory is exhausted.
///
/// # Safety
/// `c` is a live cache of `heap` owned by the caller (thread, or lock holder).
#[inline]
pub(crate) unsafe fn alloc_from<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    class: usize,
) -> *mut u8 {
    // SAFETY: per the contract.
    unsafe {
        let p = try_alloc(c, class);
        if !p.is_null() {
            return p;
        }
        refilled(heap, c, class)
    }
}

/// Refills the class (its window and free list are empty) and allocates from it; runs
/// a due scavenger pass if a new span was taken. Null if memory is exhausted.
///
/// # Safety
/// `c` is a thread cache owned by the caller, who holds no lock.
unsafe fn refilled<M: MemSource>(heap: &MHeap<M>, c: *mut MCache, class: usize) -> *mut u8 {
    // SAFETY: forwarded.
    let r = unsafe { refill(heap, c, class) };
    if r == Refill::Span {
        heap.maybe_scavenge();
    }
    if r == Refill::Failed {
        return ptr::null_mut();
    }
    // SAFETY: forwarded; the window is loaded.
    unsafe { try_alloc(c, class) }
}

/// Allocates an object of size class `class` (1..NUM_CLASSES). Null on failure.
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn alloc(class: usize) -> *mut u8 {
    #[cfg(feature = "checked")]
    {
        let p = alloc_unchecked(class);
        crate::checked::on_alloc(p);
        p
    }
    #[cfg(not(feature = "checked"))]
    alloc_unchecked(class)
}

#[cfg(not(spanheap_loom))]
#[inline(always)]
fn alloc_unchecked(class: usize) -> *mut u8 {
    let c = crate::tls::cache();
    // SAFETY: `c` is this thread's cache or the empty one.
    let p = unsafe { try_alloc(c, class) };
    if !p.is_null() {
        return p;
    }
    alloc_slow(class)
}

#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
fn alloc_slow(class: usize) -> *mut u8 {
    let c = match crate::tls::state() {
        LIVE => match live_cache() {
            Some(c) => c,
            None => return HEAP.shared.alloc(&HEAP, class),
        },
        NO_CACHE => match create_cache() {
            Some(n) => n,
            None => return HEAP.shared.alloc(&HEAP, class),
        },
        _ => return HEAP.shared.alloc(&HEAP, class),
    };
    // SAFETY: `c` is this thread's live cache, no lock held.
    unsafe {
        let _slow = Slow::new(c);
        check_budget(c);
        // A re-installed record may have a non-empty stack for this class.
        let p = try_alloc(c, class);
        if !p.is_null() {
            return p;
        }
        refilled(&HEAP, c, class)
    }
}

/// How many freed objects a class's local free list may hold before three quarters of
/// them are flushed back to their spans: about 512 KiB worth, at least 32 and at most 4096
/// objects (so a burst of 128 4 KiB blocks, or 32 of the largest class, is recycled
/// locally: classes with few objects per span, 2 for 4 KiB, otherwise churn spans on
/// every burst; a thread pins at most this much per class it uses, and gives it back
/// at exit or on `flush_thread_cache`).
static FREE_LIMIT: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        t[c] = free_limit(c);
        c += 1;
    }
    t
};

/// The largest `FREE_LIMIT` (`ClassCache::limit` holds it in 16 bits).
const MAX_FREE_LIMIT: u32 = 4096;
const _: () = assert!(MAX_FREE_LIMIT <= u16::MAX as u32);

/// `FREE_LIMIT[class]` (a function, so that the consts below can use it).
const fn free_limit(class: usize) -> u32 {
    let n = (512 << 10) / CLASS_TO_SIZE[class] as u32;
    if n < 32 {
        32
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

// ---------------------------------------------------------------------------------------
// The budget of all threads' free stacks together (tcmalloc's overall thread-cache size).
// ---------------------------------------------------------------------------------------

/// Default budget of all threads' free stacks together, in bytes. (64 MiB, with the
/// limits scaled evenly across classes, halved `threads`' `local` throughput at 16
/// threads on 2 cores, 130-175 against 300-345 Mops/s: 1 GiB binds only beyond about 32
/// busy threads.)
pub(crate) const DEFAULT_BUDGET: usize = 1 << 30;

/// Bytes a thread's free stacks may hold with the full `FREE_LIMIT` of every class.
const FULL_STACK_BYTES: usize = {
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
const FLOOR_STACK_BYTES: usize = {
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
pub(crate) mod budget {
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
        let v = crate::scavenger::env_size(c"SPANHEAP_THREAD_CACHE_BUDGET")
            .unwrap_or(super::DEFAULT_BUDGET)
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
        heap: &MHeap<M>,
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
pub(crate) unsafe fn check_budget(c: *mut MCache) {
    let g = budget::generation();
    // SAFETY: the field is the owner's.
    if unsafe { *ptr::addr_of!((*c).limits_gen) } != g {
        // SAFETY: forwarded.
        unsafe { apply_budget(c, g) };
    }
}

/// Brings the calling thread's limits up to date with the budget now.
#[cfg(not(spanheap_loom))]
pub(crate) fn apply_own_budget() {
    if let Some(c) = live_cache() {
        // SAFETY: our live cache, no lock held.
        unsafe {
            let _slow = Slow::new(c);
            check_budget(c);
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

#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
unsafe fn apply_budget(c: *mut MCache, g: usize) {
    let limits = scaled_limits(budget::share());
    // SAFETY: forwarded.
    unsafe { MCache::apply_limits(c, &HEAP, &limits, g) };
}

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

/// Frees an object of class `class`. Never panics.
///
/// Fast path: the object lies in the class's current span (which this cache owns), or
/// the class is in wide mode (`refill_span`), so it goes on the local free list: no
/// span-map lookup, no lock, no atomic RMW. Otherwise `dealloc_slow` looks the span up,
/// and ignores a pointer that is not an object of this heap. (In wide mode such a
/// pointer is not looked at: it is undefined behaviour for `GlobalAlloc::dealloc` in
/// any case, and checked mode reports it before this point. The C ABI's `free`
/// validates the address first.)
///
/// # Safety
/// `p` is a live small object of class `class`, not used afterwards.
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) unsafe fn dealloc(p: *mut u8, class: usize) {
    let c = crate::tls::cache();
    // SAFETY: `c` is this thread's cache or the empty one, whose span range is empty
    // (so it is never written here).
    unsafe {
        let e = entry(c, class);
        // Wrapping: below `span_base` the difference is huge (and in wide mode
        // `span_len` is usize::MAX, see `set_span`).
        if (p as usize).wrapping_sub(e.span_base) < e.span_len {
            push_local(&HEAP, c, e, p, class);
        } else {
            dealloc_slow(p, class, c);
        }
    }
}

/// The rest of `dealloc`: a span-map lookup, then `free_to` (or, for a thread without
/// a cache, `dealloc_first`). Every call in it is a tail call, so it saves no registers.
///
/// # Safety
/// As for `dealloc`; `c` is this thread's cache or the empty one.
#[cfg(not(spanheap_loom))]
#[inline(never)]
unsafe fn dealloc_slow(p: *mut u8, class: usize, c: *mut MCache) {
    if c == empty_cache() {
        // SAFETY: forwarded.
        return unsafe { dealloc_first(p, class) };
    }
    // SAFETY: `c` is this thread's live cache; the hint is its own.
    let hint = unsafe { &mut *ptr::addr_of_mut!((*c).arena_hint) };
    let Some(s) = NonNull::new(HEAP.span_of_hinted(p as usize, hint)) else {
        return; // not ours
    };
    // SAFETY: forwarded; `c` is this thread's live cache.
    unsafe { free_to(&HEAP, c, p, s, class) }
}

/// A free by a thread still on the empty cache: a thread that frees before it ever
/// allocated (a consumer of another thread's objects) gets a cache here, so that its
/// frees are batched like anyone's; a thread that cannot have one frees cache-less.
///
/// # Safety
/// As for `dealloc`.
#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
unsafe fn dealloc_first(p: *mut u8, class: usize) {
    let Some(s) = NonNull::new(HEAP.span_of_unchecked(p as usize)) else {
        return; // not ours
    };
    let c = match crate::tls::state() {
        NO_CACHE => create_cache(),
        // A visitor emptied the slot (`idle.rs`).
        LIVE => live_cache(),
        _ => None,
    };
    match c {
        // SAFETY: forwarded; `c` is this thread's new cache.
        Some(c) => unsafe { free_to(&HEAP, c, p, s, class) },
        // SAFETY: forwarded.
        None => unsafe { pless_free(p, s, class) },
    }
}

/// Pushes `p` on the class's local free stack; past the class's limit, flushes all but
/// a quarter of the limit back to the spans.
///
/// # Safety
/// `e` is entry `class` of cache `c`, which the caller owns; `p` a live object of class
/// `class` of this heap, given up (normally of a span that cache owns or owned last; any
/// other is correct too, see `free_to`).
#[inline(always)]
unsafe fn push_local<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    p: *mut u8,
    class: usize,
) {
    let n = e.nfree;
    // SAFETY: a live cache's stack has FREE_LIMIT + 1 slots and holds at most
    // FREE_LIMIT objects between pushes (a push past the limit flushes).
    unsafe { e.stack.add(n as usize).write(p) };
    e.nfree = n + 1;
    let limit = u32::from(e.limit);
    if n >= limit {
        // The stack holds limit + 1: return all but a quarter of the limit, in one
        // `FLUSH_CHUNK`. A flush costs a lock round trip and a state-word CAS per span
        // it touches, so the more objects per flush, the fewer per object when frees
        // come in no order (see `FLUSH_CHUNK`); the quarter kept serves the next
        // allocations without a refill.
        // SAFETY: forwarded.
        unsafe { overflow(heap, c, e, class) };
    }
}

/// A push took class `class`'s stack past its limit: flushes all but a quarter of the
/// limit, after bringing the limit up to date with the budget (process-wide heap).
///
/// # Safety
/// As for `push_local`.
#[cold]
#[inline(never)]
unsafe fn overflow<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    class: usize,
) {
    #[cfg(not(spanheap_loom))]
    if ptr::eq(
        heap as *const MHeap<M> as *const u8,
        &HEAP as *const _ as *const u8,
    ) {
        // SAFETY: `c` is a live cache of the process-wide heap, ours.
        unsafe { check_budget(c) };
        if e.nfree <= u32::from(e.limit) {
            return; // a larger limit keeps them all (or `check_budget` flushed)
        }
    }
    let keep = u32::from(e.limit) / 4 + 1;
    // SAFETY: forwarded.
    unsafe { flush(heap, c, e, class, keep) };
}

/// Frees an object into cache `c`: its local free list if the cache owns (or owned
/// last) the object's span, else its remote buffer. The fast path of `dealloc`.
///
/// # Safety
/// `c` is a live cache of `heap` owned by the caller; `p` is a live object of span `s`
/// and class `class`, not used afterwards.
#[inline(always)]
pub(crate) unsafe fn free_to<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    p: *mut u8,
    s: NonNull<MSpan>,
    class: usize,
) {
    // Local only for spans this cache owns or owned last: a thread's own recently
    // rotated spans stay on the fast path, while objects of other (e.g. exited)
    // threads' spans go back to their spans, which can then empty and retire instead of
    // being pinned by this thread's list. Relaxed: only this thread stores its own
    // address there; a stale value only picks the other, also correct, path.
    // SAFETY: our cache's entry and the object are ours; span records are never unmapped.
    unsafe {
        let e = entry(c, class);
        if s.as_ref().small.owner.load(Ordering::Relaxed) != c as usize {
            return buffer_remote(heap, c, e, p, class);
        }
        push_local(heap, c, e, p, class);
    }
}

/// Puts an object of a span this cache does not own on the class's remote buffer.
/// Out of line, so that the local-free fast path needs no extra registers.
///
/// # Safety
/// `e` is entry `class` of this thread's cache `c`; `p` a live object of class `class`,
/// given up.
#[inline(never)]
unsafe fn buffer_remote<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    p: *mut u8,
    class: usize,
) {
    // Frees of other caches' objects keep the class out of wide mode (see `refill_span`).
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    unsafe {
        let r = &mut *ptr::addr_of_mut!((*c).remote_since[class]);
        *r = r.saturating_add(1);
    }
    // SAFETY: per the contract, the object's first word is ours to link through.
    unsafe { p.cast::<*mut u8>().write(e.remote) };
    e.remote = p;
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    let n = unsafe { &mut *ptr::addr_of_mut!((*c).nremote[class]) };
    *n += 1;
    if u32::from(*n) >= REMOTE_LIMIT[class] {
        // SAFETY: forwarded.
        unsafe { flush_remote(heap, c, e, class) };
    }
}

/// How many objects a class's remote buffer collects before it is returned to the
/// spans: about 16 KiB worth, at least 2 and at most 64.
static REMOTE_LIMIT: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        let n = (16 << 10) / CLASS_TO_SIZE[c] as u32;
        t[c] = if n < 2 {
            2
        } else if n > 64 {
            64
        } else {
            n
        };
        c += 1;
    }
    t
};

/// A free by a thread without a cache: counted (under the statistics lock), then a
/// remote free.
///
/// # Safety
/// As for `dealloc`.
#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
unsafe fn pless_free(p: *mut u8, s: NonNull<MSpan>, class: usize) {
    HEAP.stats_update(|d| d.add(field::SMALL_FREES + class, 1));
    // SAFETY: forwarded.
    unsafe { remote_free(&HEAP, p, s, class) }
}

/// Returns the whole remote buffer to the objects' spans, after counting the frees.
///
/// # Safety
/// `e` is entry `class` of cache `c`, which the caller owns.
#[cold]
#[inline(never)]
unsafe fn flush_remote<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    class: usize,
) {
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    let n = u64::from(core::mem::take(unsafe {
        &mut *ptr::addr_of_mut!((*c).nremote[class])
    }));
    if n == 0 {
        return;
    }
    // SAFETY: `c` is a live cache (caller's contract).
    let _slow = unsafe { Slow::new(c) };
    heap.stats_update(|d| d.add(field::SMALL_FREES + class, n));
    let p = e.remote;
    e.remote = ptr::null_mut();
    // SAFETY: the buffer's objects are ours, live from their spans' view, and linked
    // into a null-terminated list. (The owner count is only `flush`'s.)
    unsafe { remote_free_objs(heap, LinkedObjs(p), class, 0, &mut 0) };
}

/// The objects of a null-terminated list linked through their first word (the remote
/// buffer), each read just before it is handed out.
struct LinkedObjs(*mut u8);

impl Iterator for LinkedObjs {
    type Item = *mut u8;
    #[inline]
    fn next(&mut self) -> Option<*mut u8> {
        let p = self.0;
        if p.is_null() {
            return None;
        }
        // SAFETY: the list's creator (`buffer_remote`) linked each object to the next.
        self.0 = unsafe { p.cast::<*mut u8>().read() };
        // The next object is likely cold: start loading it while this one is handled.
        prefetch(self.0);
        Some(p)
    }
}

/// Returns objects from the top of the local free stack to their spans until `keep`
/// remain. Objects of spans no cache owns are freed under the mcentral lock
/// (`MCentral::free_unowned`); the others, and all of a chunk whose lock is busy, as
/// remote frees (merged by the span's owner, or announced if the span is unowned).
///
/// In wide mode the objects returned are also counted by owner: if more than an eighth
/// belong to spans another cache owns or owned last, the class leaves wide mode and the
/// whole list is returned (it may hold more of them).
///
/// # Safety
/// `e` is entry `class` of cache `c`, which the caller owns.
#[cold]
#[inline(never)]
unsafe fn flush<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    class: usize,
    keep: u32,
) {
    // SAFETY: `c` is a live cache (caller's contract).
    let _slow = unsafe { Slow::new(c) };
    // Count first: the objects leave the stack before their spans see them free.
    let n = e.nfree.saturating_sub(keep) as u64;
    let pops = core::mem::take(&mut e.pops);
    if n | pops != 0 {
        heap.stats_update(|d| {
            d.add(field::SMALL_ALLOCS + class, pops);
            d.add(field::SMALL_FREES + class, pops + n);
        });
    }
    if n == 0 {
        return;
    }
    // A slow path (a thread that mostly frees reaches no other), where a due
    // scavenger pass may run.
    heap.maybe_scavenge();
    // Return the top `n` objects (the most recently freed: the older ones stay) in
    // chunks: objects of spans no cache owns go back under the mcentral lock without
    // atomics (a short hold per chunk, and never a wait: a busy lock sends the chunk
    // down the remote path); the rest (of this cache's current span, or of spans
    // another cache took since) take the remote path.
    let owner = c as usize;
    let mut foreign = 0u64;
    // SAFETY: slots keep..nfree of the stack hold the objects to return: ours, live
    // from their spans' view, counted. The stack is not the cache record, so `e` and
    // the slice do not overlap.
    let objs = unsafe { core::slice::from_raw_parts_mut(e.stack.add(keep as usize), n as usize) };
    for chunk in objs.chunks_mut(FLUSH_CHUNK) {
        // SAFETY: as above.
        unsafe {
            match heap.central[class].free_unowned(heap, class as u8, chunk, owner) {
                Some((kept, f)) => {
                    foreign += f;
                    let rest = chunk.get_unchecked(..kept).iter().copied();
                    remote_free_objs(heap, rest, class, owner, &mut foreign);
                }
                None => remote_free_objs(heap, chunk.iter().copied(), class, owner, &mut foreign),
            }
        }
    }
    e.nfree = keep;
    // SAFETY: `c` is a live cache; its door is used atomically.
    unsafe { (*c).door.publish_depth(class, keep) };
    if is_wide(e) && foreign * 8 > n {
        // Wide mode took in other caches' objects (a consumer of another thread's
        // objects): back to the owner test, and return the rest of the stack too.
        // SAFETY: the counter is the owner's; `class < NUM_CLASSES`.
        unsafe { *ptr::addr_of_mut!((*c).remote_since[class]) = foreign as u32 };
        let s = current_span(heap, e);
        set_span(e, s, false);
        // SAFETY: forwarded; no longer wide, so this does not come back here.
        unsafe { flush(heap, c, e, class, 0) };
    }
}

/// How many objects `flush` returns per hold of the mcentral lock (a hold of about
/// 12 µs at most). Each span a chunk touches costs a state-word CAS and its list
/// bookkeeping, so objects freed in no particular order over many spans cost less the
/// larger the chunk: scattered frees of 64 B objects over 782 spans touched about one
/// span per 1.3 objects with 1,024-object chunks, one per 5 with 3,072.
const FLUSH_CHUNK: usize = 4096;

// A flush on a push returns what it returns in one chunk.
const _: () = assert!(MAX_FREE_LIMIT as usize - MAX_FREE_LIMIT as usize / 4 <= FLUSH_CHUNK);

/// Remote-frees objects of class `class`; those of spans whose owner (current or last)
/// is not `owner` are added to `foreign`. Objects of one span that follow each other
/// are returned together:
/// their bits are ORed into the remote bitmap one word at a time, and the span's state
/// word takes one increment for all of them, which is what an increment per object
/// would have done, announcements included.
///
/// # Safety
/// The objects are live small objects of class `class` of `heap`, given up.
unsafe fn remote_free_objs<M: MemSource>(
    heap: &MHeap<M>,
    objs: impl Iterator<Item = *mut u8>,
    class: usize,
    owner: usize,
    foreign: &mut u64,
) {
    let mut run: Option<RemoteRun> = None;
    let mut hint = NO_ARENA;
    for p in objs {
        if let Some(s) = NonNull::new(heap.span_of_hinted(p as usize, &mut hint)) {
            if run.as_ref().map_or(true, |r| r.span != s) {
                if let Some(r) = run.take() {
                    *foreign += r.foreign(owner);
                    // SAFETY: the run's objects were given up by the caller.
                    unsafe { r.finish(heap, class) };
                }
                run = Some(RemoteRun::new(s));
            }
            if let Some(r) = run.as_mut() {
                r.add(p, class);
            }
        }
    }
    if let Some(r) = run {
        *foreign += r.foreign(owner);
        // SAFETY: as above.
        unsafe { r.finish(heap, class) };
    }
}

/// Asks the CPU to start loading the cache line at `p` (a no-op on targets without a
/// stable prefetch intrinsic). A hint only: any address, null included, is fine.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no memory, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The ordering of a remote free's bitmap OR (single or in a run): Release, paired with
/// the merger's Acquire swap. The loom mutant `remote_relaxed` weakens it to show that
/// a model catches it.
#[cfg(not(spanheap_mutant = "remote_relaxed"))]
const REMOTE_RELEASE: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "remote_relaxed")]
const REMOTE_RELEASE: Ordering = Ordering::Relaxed;

/// Consecutive remote frees into one span (see `remote_free_objs`).
struct RemoteRun {
    span: NonNull<MSpan>,
    base: usize,
    /// The span's bitmap record: remote words first.
    bits: *mut u64,
    /// The remote word being collected, and its bits.
    word: usize,
    mask: u64,
    count: u64,
}

impl RemoteRun {
    fn new(span: NonNull<MSpan>) -> Self {
        // SAFETY: span records are never unmapped; `info` is immutable while the span is
        // live, and the objects being freed keep it live.
        let (base, bits) = unsafe { (span.as_ref().base(), span.as_ref().info().bits) };
        RemoteRun {
            span,
            base,
            bits,
            word: 0,
            mask: 0,
            count: 0,
        }
    }

    /// The run's object count if its span's owner (current or last) is not `owner`.
    fn foreign(&self, owner: usize) -> u64 {
        // Relaxed: as in `free_to`, a hint.
        // SAFETY: span records are never unmapped.
        let o = unsafe { self.span.as_ref() }
            .small
            .owner
            .load(Ordering::Relaxed);
        if o != owner {
            self.count
        } else {
            0
        }
    }

    fn add(&mut self, p: *mut u8, class: usize) {
        let idx = obj_index(class as u8, p as usize - self.base);
        if idx / 64 != self.word {
            self.or_word(class);
            self.word = idx / 64;
        }
        let bit = 1 << (idx % 64);
        if self.mask & bit != 0 {
            // The same object twice in one flush.
            crate::fatal::double_free(p as usize, CLASS_TO_SIZE[class] as usize);
        }
        self.mask |= bit;
        self.count += 1;
    }

    fn or_word(&mut self, class: usize) {
        if self.mask != 0 {
            // SAFETY: the record starts with one atomic word per 64 objects, and `word`
            // came from an object index below nelems.
            let w = unsafe { &*self.bits.cast::<AtomicU64>().add(self.word) };
            // Release: our uses of the objects happen-before whoever merges the bits
            // reuses them.
            let old = w.fetch_or(self.mask, REMOTE_RELEASE);
            if old & self.mask != 0 {
                // Freed remotely before and not merged since: freed twice.
                let size = CLASS_TO_SIZE[class] as usize;
                let idx = self.word * 64 + (old & self.mask).trailing_zeros() as usize;
                crate::fatal::double_free(self.base + idx * size, size);
            }
            self.mask = 0;
        }
    }

    /// Publishes the bits, then counts the frees in the state word and announces the
    /// span when the run freed the first object since it was full (the count crossed
    /// zero) or its last live object.
    ///
    /// # Safety
    /// The run's objects were given up by their user.
    unsafe fn finish<M: MemSource>(mut self, heap: &MHeap<M>, class: usize) {
        self.or_word(class);
        // SAFETY: span records are never unmapped.
        let span = unsafe { self.span.as_ref() };
        // SeqCst: ordered with the owner's SeqCst state-word CASes (ownership changes).
        let old = span.small.rstate.fetch_add(self.count, Ordering::SeqCst);
        let (high, low) = rstate_parts(old);
        if high != RSTATE_OWNED {
            let n = self.count as i64;
            let last = low + n == high as i64;
            // One increment per object would have announced on the one that found the
            // count at zero (it can be transiently negative, see `mcentral`).
            let first = low <= 0 && low + n > 0;
            if last || first {
                heap.central[class].announce(heap, class as u8, self.span, last);
            }
        }
    }
}

/// Allocates a zeroed object of class `class` (`size` bytes are cleared when needed).
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn alloc_zeroed(class: usize, size: usize) -> *mut u8 {
    let c = crate::tls::cache();
    // An empty slot may hide a live record whose stacks hold objects: one a visitor
    // trimmed or left (`idle.rs`). The slow path re-installs it and may pop a used
    // object from it, so clear whatever comes (once per visit, or per new thread).
    // SAFETY: `c` is this thread's cache or the empty one (whose stacks are empty).
    let recycled = c == empty_cache()
        || unsafe { (*ptr::addr_of!((*c).classes).cast::<ClassCache>().add(class)).nfree != 0 };
    let p = alloc(class);
    if p.is_null() {
        return p;
    }
    // An object from the free list was used before. A window object is fresh unless
    // its span was dirty or not zero from the OS; a cache-less thread cannot read the
    // shared cache's span state after the lock is gone, so it always clears.
    let clear = recycled
        || !has_cache()
        || match NonNull::new(HEAP.span_of_unchecked(p as usize)) {
            // SAFETY: the window object came from the current span our cache owns.
            Some(s) => unsafe { s.as_ref().info().needzero || private(s).dirty },
            None => true,
        };
    if clear {
        // SAFETY: the object holds at least `size` bytes.
        unsafe { ptr::write_bytes(p, 0, size) };
    }
    p
}

/// The remote free: lock-free, two atomic RMWs, and an announcement to the
/// mcentral when the span becomes allocatable again or completely free.
///
/// # Safety
/// As for `dealloc`.
#[cold]
pub(crate) unsafe fn remote_free<M: MemSource>(
    heap: &MHeap<M>,
    p: *mut u8,
    s: NonNull<MSpan>,
    class: usize,
) {
    // SAFETY: span records are never unmapped; `info` is immutable while the span is
    // live, and the caller's object keeps it live.
    let span = unsafe { s.as_ref() };
    // SAFETY: as above.
    let bits = unsafe { span.info() }.bits;
    let idx = obj_index(class as u8, p as usize - span.base());
    // SAFETY: the record starts with one atomic word per 64 objects, idx < nelems.
    let word = unsafe { &*bits.cast::<AtomicU64>().add(idx / 64) };
    // Release: our uses of the object happen-before whoever merges the bit reuses it.
    let bit = 1 << (idx % 64);
    if word.fetch_or(bit, REMOTE_RELEASE) & bit != 0 {
        // Freed remotely before and not merged since: freed twice.
        crate::fatal::double_free(p as usize, CLASS_TO_SIZE[class] as usize);
    }
    // SeqCst: ordered with the owner's SeqCst state-word CASes (ownership changes).
    let old = span.small.rstate.fetch_add(1, Ordering::SeqCst);
    let (high, low) = rstate_parts(old);
    if high != RSTATE_OWNED {
        let last = low + 1 == high as i64;
        if last || low == 0 {
            heap.central[class].announce(heap, class as u8, s, last);
        }
    }
}

/// Refills class `class` of cache `c`, then publishes the class's counts: the new
/// window's objects as allocated, reuses from the free list as allocated and freed.
/// Runs no scavenger pass (the shared cache's lock may be held: a pass takes the
/// reclaim lock, which ranks before it); if it says `Span`, the caller runs a due one
/// once it holds no lock.
///
/// # Safety
/// `c` is a live cache owned by the caller (thread cache, or shared cache under lock),
/// and the class's free list and window are empty.
unsafe fn refill<M: MemSource>(heap: &MHeap<M>, c: *mut MCache, class: usize) -> Refill {
    // SAFETY: forwarded.
    let r = unsafe { refill_span(heap, c, class) };
    // SAFETY: the entry is ours.
    let e = unsafe { entry(c, class) };
    // SAFETY: `c` is a live cache; its door is used atomically.
    unsafe { (*c).door.publish_depth(class, e.nfree) };
    let pops = core::mem::take(&mut e.pops);
    // The window is empty on entry, so whatever it holds now was just loaded.
    let window = e.alloc_cache.count_ones() as u64;
    if pops | window != 0 {
        heap.stats_update(|d| {
            d.add(field::SMALL_ALLOCS + class, window + pops);
            d.add(field::SMALL_FREES + class, pops);
        });
    }
    r
}

/// What a refill did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Refill {
    /// Memory is exhausted: the window is still empty.
    Failed,
    /// The window was loaded from the class's current span.
    Window,
    /// The class took a new span: a slow path, where a due scavenger pass may run.
    Span,
}

/// Makes the span of class `class` have a window with free objects (see `refill`).
///
/// *Wide mode.* When the class takes a new span, it is put in wide mode if none of its
/// frees since the last span went to the remote buffer (`MCache::remote_since`): the
/// thread frees what it allocated, so the owner test (a span-map lookup and a load of
/// the span record on every free outside the current span) only ever says "local".
/// In wide mode the free fast path takes every object of the class (`set_span` widens
/// the range it tests), and `flush` counts whose objects it returns; more than an
/// eighth of other caches' objects (a consumer of another thread's allocations) ends
/// wide mode, returns the whole list, and keeps the class out of it for at least the
/// next span. Wide mode changes only which list an object waits on: every object on
/// the local list is returned correctly by `flush` (`free_unowned` or the remote path
/// decide per object), so a wrong guess costs memory held for a while, never
/// correctness. (Pushing every free locally, always, took churn from 13.3 to 10.8 ns
/// but raised `messages`' peak RSS from 8 to 53 MiB: consumers pinned producers'
/// objects.)
///
/// # Safety
/// As for `refill`.
unsafe fn refill_span<M: MemSource>(heap: &MHeap<M>, c: *mut MCache, class: usize) -> Refill {
    // SAFETY: the entry is ours.
    let e = unsafe { entry(c, class) };
    // The span to give back in the same hold of the mcentral lock as the next is taken.
    let mut old = None;
    if let Some(s) = current_span(heap, e) {
        // SAFETY: we own the current span.
        if unsafe { load_window(e, s) } {
            return Refill::Window;
        }
        // Exhausted: sweep in place (merge remote frees). Keep the span if at least an
        // eighth of it came back: a producer whose objects are freed elsewhere, or a
        // steady alloc/free loop, then stays on one span.
        // SAFETY: as above.
        let free = unsafe { normalize(e, s) };
        // SAFETY: as above.
        let nelems = unsafe { private(s) }.nelems as usize;
        if free >= (nelems / 8).max(1) {
            // SAFETY: as above.
            return if unsafe { load_window(e, s) } {
                Refill::Window
            } else {
                Refill::Failed
            };
        }
        set_span(e, None, false);
        old = Some(s);
    }
    let central = &heap.central[class];
    loop {
        let taken = match old.take() {
            // SAFETY: we own `o` (normalised, no longer the entry's span) and give it up.
            Some(o) => unsafe { central.exchange_span(heap, class as u8, o, c as usize) },
            None => central.cache_span(heap, class as u8, c as usize),
        };
        let s = match taken {
            Some(s) => s,
            // SAFETY: our cache's gated heap cache, entered with no lock held and not
            // nested (`alloc_span_with` does not reach the thread cache).
            None => match unsafe {
                (*c).heap.with(|tc| {
                    heap.alloc_span_with(
                        CLASS_TO_NPAGES[class] as usize,
                        Purpose::Heap,
                        class as u8,
                        1,
                        tc,
                    )
                })
            } {
                Some(s) => {
                    // Relaxed: as in `mcentral::take_ownership`.
                    // SAFETY: a fresh span, ours alone (init_small made it OWNED, CACHED).
                    unsafe { s.as_ref() }
                        .small
                        .owner
                        .store(c as usize, Ordering::Relaxed);
                    s
                }
                None => return Refill::Failed,
            },
        };
        // Wide mode if no free of this class since the last span was another cache's
        // object: this thread frees what it allocated, so every free of the class goes
        // to the local list without a span-map lookup (the fast path's range test
        // passes for any address). `flush` leaves wide mode when the objects it returns
        // show otherwise.
        // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
        let wide = unsafe {
            let r = &mut *ptr::addr_of_mut!((*c).remote_since[class]);
            core::mem::take(r) == 0
        };
        set_span(e, Some(s), wide);
        // A new span for the class: a slow path (a few per thousand objects at most),
        // where the caller runs a due scavenger pass. Window loads from the current
        // span (every 64 objects) do not look at the clock.
        // SAFETY: we own the new span.
        if unsafe { load_window(e, s) } {
            return Refill::Span;
        }
        // A span the mcentral thought partial had nothing free after all (its frees
        // were merged by an earlier owner): give it back as full and take another.
        set_span(e, None, false);
        // SAFETY: we own it; its window state is reset. The next exchange gives it up.
        unsafe { normalize(e, s) };
        old = Some(s);
    }
}

/// Whether class `class` of the calling thread's cache is in wide mode (for tests).
#[cfg(not(spanheap_loom))]
pub(crate) fn thread_class_wide(class: usize) -> bool {
    if class == 0 || class >= NUM_CLASSES {
        return false;
    }
    let c = live_cache().unwrap_or_else(empty_cache);
    // SAFETY: this thread's cache or the empty one; only read.
    is_wide(unsafe { entry(c, class) })
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

/// Whether entry `e` is in wide mode (see `refill_span`).
#[inline]
fn is_wide(e: &ClassCache) -> bool {
    e.span_base != 0 && e.span_len == usize::MAX
}

/// The current span of entry `e`, found through the span map (the entry keeps its
/// address range, which the fast free path tests).
#[inline]
fn current_span<M: MemSource>(heap: &MHeap<M>, e: &ClassCache) -> Option<NonNull<MSpan>> {
    if e.span_base == 0 {
        return None;
    }
    NonNull::new(heap.span_of_unchecked(e.span_base))
}

/// Makes `s` (owned by the cache) the current span of `e`, or none; `wide`: in wide
/// mode (see `refill_span`).
fn set_span(e: &mut ClassCache, s: Option<NonNull<MSpan>>, wide: bool) {
    match s {
        Some(s) => {
            // SAFETY: the cache owns the span; its record is never unmapped.
            let span = unsafe { s.as_ref() };
            e.span_base = span.base();
            e.span_len = if wide {
                // The free fast path's range test then passes for every address but
                // `span_base - 1`.
                usize::MAX
            } else {
                span.npages() << crate::os::PAGE_SHIFT
            };
            // SAFETY: as above.
            e.elemsize = unsafe { private(s) }.elemsize as u16;
        }
        None => {
            e.span_base = 0;
            e.span_len = 0;
        }
    }
}

/// Loads the span's next window with a free object into `e`. False if none is left.
///
/// # Safety
/// The caller owns `s`, the current span of `e`.
unsafe fn load_window(e: &mut ClassCache, s: NonNull<MSpan>) -> bool {
    // SAFETY: we own the private state.
    let p = unsafe { private(s) };
    // SAFETY: span records are never unmapped.
    let base = unsafe { s.as_ref() }.base();
    while (p.next_word as usize) < p.words as usize {
        let w = p.next_word as usize;
        p.next_word += 1;
        // SAFETY: w < words.
        let a = unsafe { *p.alloc(w) };
        if a != !0 {
            e.alloc_cache = !a;
            e.window_base = base + w * 64 * p.elemsize as usize;
            return true;
        }
    }
    false
}

/// Makes the span's alloc bitmap exact: windows already handed out become allocated,
/// the current window's unused objects stay free, remote frees are merged. Resets the
/// window. Returns the number of free objects. (Objects on the local free list count
/// as allocated; `release_all` flushes them first.)
///
/// # Safety
/// The caller owns `s`, the current span of `e`.
unsafe fn normalize(e: &mut ClassCache, s: NonNull<MSpan>) -> usize {
    // SAFETY: we own the private state.
    let p = unsafe { private(s) };
    if p.next_word > 0 {
        let cur = p.next_word as usize - 1;
        for w in 0..cur {
            // SAFETY: w < words. Every object of an earlier window was handed out.
            unsafe { *p.alloc(w) = !0 };
        }
        // SAFETY: cur < words. Objects of the current window not in `alloc_cache`
        // were handed out.
        unsafe { *p.alloc(cur) = !e.alloc_cache };
    }
    e.alloc_cache = 0;
    p.next_word = 0;
    // SAFETY: we own the private state.
    let m = unsafe { merge_remote(p, s.as_ref().base()) };
    if m != 0 {
        // The merged frees leave the remote count (we stay the owner). SeqCst like
        // every other `rstate` update, so all of them fall in one total order with the
        // freers' increments (the "last free" test relies on that count).
        // SAFETY: span records are never unmapped.
        let rs = unsafe { &s.as_ref().small.rstate };
        rs.fetch_sub(m as u64, Ordering::SeqCst);
    }
    // SAFETY: as above.
    unsafe { count_free(p) }
}

// ---------------------------------------------------------------------------------------
// Cache creation, thread exit, and cache-less threads.
// ---------------------------------------------------------------------------------------

#[cfg(not(spanheap_loom))]
/// The pthread key whose destructor releases a thread's cache. Process-wide set-once
/// state, not part of the modelled concurrent core (core atomics).
static KEY: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
#[cfg(not(spanheap_loom))]
const KEY_FAILED: usize = usize::MAX;

#[cfg(not(spanheap_loom))]
fn exit_key() -> Option<libc::pthread_key_t> {
    use core::sync::atomic::Ordering as O;
    match KEY.load(O::Acquire) {
        0 => {}
        KEY_FAILED => return None,
        k => return Some((k - 1) as libc::pthread_key_t),
    }
    let mut k: libc::pthread_key_t = 0;
    // SAFETY: creating a key with a destructor of the right signature.
    if unsafe { libc::pthread_key_create(&mut k, Some(on_thread_exit)) } != 0 {
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
fn create_cache() -> Option<*mut MCache> {
    // From here until the cache is live, an allocation the calls below make (the C
    // library may allocate inside them) takes the cache-less path: no recursion.
    crate::tls::set_state(CREATING);
    let c = create_cache_record();
    if c.is_null() {
        crate::tls::set_state(NO_CACHE);
        return None;
    }
    // SAFETY: the record is ours; `seq` lives as long as the process.
    let first = unsafe { !(*c).registered };
    if first {
        // SAFETY: as above.
        unsafe {
            HEAP.stats.register(&(*c).seq);
            HEAP.register_cache(&*ptr::addr_of!((*c).heap));
            (*c).registered = true;
        }
    }
    crate::tls::set_cache(c);
    crate::idle::open(c, first);
    budget::thread_count(1);
    crate::tls::set_state(LIVE);
    HEAP.stats_update(|d| d.add(field::CACHES, 1));
    crate::stats::exit_report_once();
    crate::fork::register_once();
    Some(c)
}

/// A cache record for this thread, with the exit hook set to release it; null if
/// either fails. The caller has set the state to CREATING.
#[cfg(not(spanheap_loom))]
fn create_cache_record() -> *mut MCache {
    let Some(key) = exit_key() else {
        return ptr::null_mut();
    };
    let c = HEAP.alloc_cache_record();
    if c.is_null() {
        return c;
    }
    // SAFETY: setting this thread's value of our key; a non-null value makes the
    // destructor run at thread exit.
    if unsafe { libc::pthread_setspecific(key, c.cast()) } != 0 {
        // SAFETY: the record is unused.
        unsafe { HEAP.free_cache_record(c) };
        return ptr::null_mut();
    }
    c
}

/// The pthread-key destructor: gives every current span back and frees the cache.
/// From here on the thread is cache-less.
#[cfg(not(spanheap_loom))]
extern "C" fn on_thread_exit(arg: *mut libc::c_void) {
    let c = arg.cast::<MCache>();
    // No visitor may take the record from here on (one at work finishes first).
    crate::idle::exit(c);
    budget::thread_count(-1);
    crate::tls::set_cache(empty_cache());
    crate::tls::set_state(DEAD);
    // SAFETY: the cache was this thread's, and nothing refers to it any more.
    unsafe {
        release_all(&HEAP, c);
        HEAP.free_cache_record(c);
    }
    HEAP.stats_update(|d| d.sub(field::CACHES, 1));
}

/// Publishes the calling thread's pending reuse counts (for a statistics snapshot).
#[cfg(not(spanheap_loom))]
pub(crate) fn publish_counts() {
    let Some(c) = live_cache() else {
        return;
    };
    // SAFETY: our live cache.
    let _slow = unsafe { Slow::new(c) };
    // SAFETY: our live cache's heap cache is ours, entered with no lock held.
    unsafe { (*c).heap.with(|tc| HEAP.publish_heap_cache(tc)) };
    HEAP.stats_update(|d| {
        for class in 1..NUM_CLASSES {
            // SAFETY: our live cache's entries are ours.
            let e = unsafe { entry(c, class) };
            let pops = core::mem::take(&mut e.pops);
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
pub(crate) fn flush_own() {
    let Some(c) = live_cache() else {
        return;
    };
    // SAFETY: our live cache.
    let _slow = unsafe { Slow::new(c) };
    // SAFETY: our live cache; `release_all` leaves it empty and valid, so the stack
    // pages can go too.
    unsafe {
        release_all(&HEAP, c);
        HEAP.drop_stack_pages(c);
    }
}

/// Gives every span of the cache back to its mcentral (Go's `releaseAll`), after
/// flushing the free lists and remote buffers. Leaves the cache empty and usable.
///
/// # Safety
/// `c` is a live cache owned by the caller.
pub(crate) unsafe fn release_all<M: MemSource>(heap: &MHeap<M>, c: *mut MCache) {
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
pub(crate) unsafe fn release_classes<M: MemSource>(heap: &MHeap<M>, c: *mut MCache) {
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
        unsafe { flush_remote(heap, c, e, class) };
        if let Some(s) = current_span(heap, e) {
            // The window's unused objects were counted as allocated when it was
            // loaded: uncount them before the span can retire.
            let unused = e.alloc_cache.count_ones() as u64;
            if unused != 0 {
                heap.stats_update(|d| d.sub(field::SMALL_ALLOCS + class, unused));
            }
            // SAFETY: we own the span.
            unsafe {
                normalize(e, s);
                heap.central[class].uncache_span(heap, class as u8, s);
            }
        }
        // The stack's storage stays with the record.
        *e = ClassCache {
            stack: e.stack,
            limit: e.limit,
            ..EMPTY_CLASS
        };
        // SAFETY: `c` is a live cache; its door is used atomically.
        unsafe { (*c).door.publish_depth(class, 0) };
    }
}

/// A visitor's trim of class `class` of record `c` (`idle.rs`): the remote buffer goes
/// back, and of the objects on the free stack, three quarters of `min(low, depth)` (the
/// low-water estimate), taken from the bottom (the longest unused). Returns the depth
/// left and whether anything went back.
///
/// # Safety
/// The caller holds the door of the live cache `c`; `class < NUM_CLASSES`.
pub(crate) unsafe fn trim_class<M: MemSource>(
    heap: &MHeap<M>,
    c: *mut MCache,
    class: usize,
    low: u32,
) -> (u32, bool) {
    // SAFETY: the entry is ours (caller's contract).
    let e = unsafe { entry(c, class) };
    let mut any = false;
    // SAFETY: the counter is ours; `class < NUM_CLASSES`.
    if unsafe { *ptr::addr_of!((*c).nremote[class]) } != 0 {
        // SAFETY: forwarded.
        unsafe { flush_remote(heap, c, e, class) };
        any = true;
    }
    let n = low.min(e.nfree);
    let k = n - n / 4;
    if k != 0 {
        // SAFETY: slots 0..nfree hold the stack's objects.
        let objs = unsafe { core::slice::from_raw_parts_mut(e.stack, e.nfree as usize) };
        // The bottom `k` objects to the top, where `flush` takes them from.
        objs.rotate_left(k as usize);
        let keep = e.nfree - k;
        // SAFETY: forwarded.
        unsafe { flush(heap, c, e, class, keep) };
        any = true;
    }
    (e.nfree, any)
}

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

    /// Allocates an object of class `class` (1..NUM_CLASSES) from the shared cache.
    /// Null if memory is exhausted. The caller holds no lock.
    #[cold]
    pub(crate) fn alloc<M: MemSource>(&self, heap: &MHeap<M>, class: usize) -> *mut u8 {
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
    fn record<M: MemSource>(heap: &MHeap<M>) -> *mut MCache {
        #[cfg(not(spanheap_loom))]
        return heap.alloc_cache_record();
        #[cfg(spanheap_loom)]
        {
            let _ = heap;
            MCache::leaked()
        }
    }

    /// For the fork handlers (`MHeap::fork_lock_all`): takes the lock without a guard.
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
pub(crate) fn with_heap_cache<R>(
    f: impl FnOnce(Option<&mut crate::pagecache::HeapCache>) -> R,
) -> R {
    let c = match crate::tls::state() {
        LIVE => match live_cache() {
            Some(c) => c,
            None => return f(None),
        },
        NO_CACHE => match create_cache() {
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

/// Whether this thread has a live cache (otherwise it allocates from the shared one).
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn has_cache() -> bool {
    crate::tls::state() == LIVE
}

#[cfg(all(test, not(spanheap_loom)))]
mod tests {
    use super::*;
    use crate::os::TestMem;
    use crate::sizeclasses::CLASS_TO_NOBJS;

    /// `spans` spans' worth of class `class` objects from cache `c`.
    fn fill(h: &MHeap<TestMem>, c: *mut MCache, class: usize, spans: usize) -> Vec<*mut u8> {
        let n = CLASS_TO_NOBJS[class] as usize * spans;
        let objs: Vec<*mut u8> = (0..n).map(|_| unsafe { alloc_from(h, c, class) }).collect();
        assert!(objs.iter().all(|p| !p.is_null()));
        objs
    }

    /// A heap of its own for one test.
    fn test_heap() -> &'static MHeap<TestMem> {
        Box::leak(Box::new(MHeap::new(TestMem)))
    }

    /// Frees `objs`, live objects of class `class`, through cache `c`, in order.
    fn free_all<'a>(
        h: &MHeap<TestMem>,
        c: *mut MCache,
        class: usize,
        objs: impl IntoIterator<Item = &'a *mut u8>,
    ) {
        for &p in objs {
            let s = NonNull::new(h.span_of_unchecked(p as usize)).unwrap();
            unsafe { free_to(h, c, p, s, class) };
        }
    }

    /// Frees the objects of `objs` whose index passes `free` through cache `c` and gives
    /// the cache's spans back (`release_all`), so that they sit in the partial list with
    /// `c` as their last owner.
    fn free_and_release(
        h: &MHeap<TestMem>,
        c: *mut MCache,
        class: usize,
        objs: &[*mut u8],
        free: impl Fn(usize) -> bool,
    ) {
        let chosen = objs.iter().enumerate().filter(|&(i, _)| free(i));
        free_all(h, c, class, chosen.map(|(_, p)| p));
        unsafe { release_all(h, c) };
    }

    #[test]
    fn scaled_limits_fit_the_share() {
        let bytes = |t: &[u16; NUM_CLASSES]| -> usize {
            (1..NUM_CLASSES)
                .map(|c| t[c] as usize * CLASS_TO_SIZE[c] as usize)
                .sum()
        };
        println!("full stacks {FULL_STACK_BYTES} B, floor {FLOOR_STACK_BYTES} B");
        let full = scaled_limits(FULL_STACK_BYTES);
        assert!((1..NUM_CLASSES).all(|c| u32::from(full[c]) == FREE_LIMIT[c]));
        assert_eq!(bytes(&full), FULL_STACK_BYTES);
        for share in [
            FLOOR_STACK_BYTES,
            1 << 20,
            4 << 20,
            16 << 20,
            FULL_STACK_BYTES - 1,
        ] {
            let t = scaled_limits(share);
            assert!(bytes(&t) <= share, "share {share}: {} B", bytes(&t));
            assert!((1..NUM_CLASSES).all(|c| t[c] >= 1 && u32::from(t[c]) <= FREE_LIMIT[c]));
            // Not needlessly small: at least half the share is used.
            assert!(
                bytes(&t) * 2 >= share,
                "share {share}: only {} B",
                bytes(&t)
            );
        }
        let tiny = scaled_limits(1000);
        assert!((1..NUM_CLASSES).all(|c| tiny[c] == 1));
        assert_eq!(bytes(&tiny), FLOOR_STACK_BYTES);
    }

    #[test]
    fn a_local_free_leaves_the_object_alone() {
        // The local free list is a stack of pointers: a free writes nothing into the
        // object (a list linked through the objects would overwrite its first word),
        // the next allocation of the class hands it back, and a flush past the limit
        // loses nothing.
        let h = test_heap();
        let c = MCache::leaked();
        let class = 5;
        let size = CLASS_TO_SIZE[class] as usize;
        let p = unsafe { alloc_from(h, c, class) };
        unsafe { p.write_bytes(0xA5, size) };
        free_all(h, c, class, [&p]);
        // SAFETY: the object is still heap memory of ours (it sits on the stack).
        let bytes = unsafe { core::slice::from_raw_parts(p, size) };
        assert!(
            bytes.iter().all(|&b| b == 0xA5),
            "the free wrote into the object"
        );
        assert_eq!(unsafe { alloc_from(h, c, class) }, p);
        // Past the limit: every object comes back exactly once.
        let limit = FREE_LIMIT[class] as usize;
        let objs: Vec<*mut u8> = (0..limit * 2)
            .map(|_| unsafe { alloc_from(h, c, class) })
            .collect();
        free_all(h, c, class, &objs);
        assert!(unsafe { entry(c, class) }.nfree as usize <= limit);
        let mut again: Vec<*mut u8> = (0..limit * 2)
            .map(|_| unsafe { alloc_from(h, c, class) })
            .collect();
        again.sort();
        again.dedup();
        assert_eq!(again.len(), limit * 2, "an object was handed out twice");
        unsafe { release_all(h, c) };
    }

    #[test]
    fn an_exhausted_span_is_exchanged_for_a_partial_one_in_one_step() {
        // A cache whose span is exhausted gives it back and takes the next in one hold
        // of the mcentral lock (`exchange_span`): the old span must land in the full
        // list, and the new one be the partial span this cache owned last, not a
        // fresh one.
        let h = test_heap();
        let (c, other) = (MCache::leaked(), MCache::leaked());
        let class = 5;
        let n = CLASS_TO_NOBJS[class] as usize;
        let objs = fill(h, c, class, 2);
        let span = |p: *mut u8| h.span_of_unchecked(p as usize);
        let (a, b) = (span(objs[0]), span(objs[n]));
        assert_ne!(a, b);
        assert!(objs[..n].iter().all(|&p| span(p) == a));
        // Span A was given up full when B was taken; B is exhausted but still cached.
        assert_eq!(h.central[class].census(), (0, 1, 0, 0));
        // Another thread frees half of A: announced, A becomes partial (last owner c).
        let half: Vec<*mut u8> = objs[..n].iter().step_by(2).copied().collect();
        free_all(h, other, class, &half);
        unsafe { release_all(h, other) };
        let (partial, full, _, _) = h.central[class].census();
        assert_eq!((partial, full), (1, 0));
        // The next allocation exchanges B for A.
        let p = unsafe { alloc_from(h, c, class) };
        assert_eq!(span(p), a, "the partial span owned last was not taken");
        assert!(half.contains(&p));
        assert_eq!(
            h.central[class].census(),
            (0, 1, 0, 0),
            "the exhausted span was not given back as full"
        );
        unsafe { release_all(h, c) };
    }

    #[test]
    fn spans_other_threads_empty_are_kept_as_spares() {
        // Six full 8 KiB spans of 16-byte objects, given up by cache `c`, then emptied
        // by another thread's frees: each last free announces its span, the drain
        // retires it, and 32 KiB of them (four) are kept for the class's refills; the
        // rest go back to the page heap. A refill takes a spare, not a fresh span.
        let h = test_heap();
        let (c, other) = (MCache::leaked(), MCache::leaked());
        let class = 2;
        let objs = fill(h, c, class, 6);
        unsafe { release_all(h, c) };
        assert_eq!(h.central[class].census(), (0, 6, 0, 0));
        let inuse = h.counters().heap_inuse;
        free_all(h, other, class, &objs);
        unsafe { release_all(h, other) };
        assert_eq!(h.central[class].census(), (0, 0, 4, 0));
        let page = crate::os::PAGE_SIZE as u64;
        assert_eq!(
            inuse - h.counters().heap_inuse,
            2 * page,
            "two spans retired"
        );
        let spares: Vec<usize> = objs
            .iter()
            .map(|&p| h.span_of_unchecked(p as usize) as usize)
            .collect();
        let p = unsafe { alloc_from(h, c, class) };
        assert!(spares.contains(&(h.span_of_unchecked(p as usize) as usize)));
        assert_eq!(h.central[class].census().2, 3);
        free_all(h, c, class, [&p]);
        unsafe { release_all(h, c) };
    }

    #[test]
    fn a_push_past_the_limit_returns_three_quarters() {
        // The push that takes a stack past its limit returns all but a quarter of the
        // limit to the spans, in one hold of the mcentral lock (`FLUSH_CHUNK`): for the
        // 16-byte class, 3,072 objects. The spans no cache owns get them straight into
        // their alloc bitmaps, so they show as free in the mcentral's census.
        let h = test_heap();
        let c = MCache::leaked();
        let class = 2;
        let limit = FREE_LIMIT[class] as usize;
        assert_eq!(limit, MAX_FREE_LIMIT as usize);
        let per_span = CLASS_TO_NOBJS[class] as usize;
        // Whole spans, and one object of the next, which the cache then owns: every
        // earlier span went to the mcentral's full list.
        let objs: Vec<*mut u8> = (0..limit + 1)
            .map(|_| unsafe { alloc_from(h, c, class) })
            .collect();
        assert_eq!((limit + 1) % per_span, 1);
        assert_eq!(h.central[class].census().3, 0, "full spans");
        // Oldest first: the flush returns the most recently freed, which (but for the
        // last, of the current span) lie in spans the mcentral holds.
        free_all(h, c, class, &objs);
        let kept = unsafe { entry(c, class) }.nfree as usize;
        assert_eq!(kept, limit / 4 + 1);
        // objs[1025..4097] went back: spans 0 and 1 stay full, span 2 has its last 511
        // objects free, spans 3..7 are completely free (one kept as the spare, the rest
        // retired: this thread emptied them), and the current span's object took the
        // remote path.
        assert_eq!((kept, per_span), (1025, 512));
        assert_eq!(
            h.central[class].census(),
            (1, 2, 1, 511),
            "(partial, full, spare, free objects in listed spans)"
        );
        unsafe { release_all(h, c) };
        let (partial, full, spares, free) = h.central[class].census();
        assert_eq!((partial, full, free), (0, 0, 0), "every span retired");
        // `release_memory` gives the spares back to the page heap.
        let inuse = h.counters().heap_inuse;
        assert_eq!(h.release_spares(), spares);
        assert_eq!(h.central[class].census(), (0, 0, 0, 0));
        assert_eq!(
            inuse - h.counters().heap_inuse,
            (spares * crate::os::PAGE_SIZE) as u64,
            "the spares' pages are not free"
        );
    }

    #[test]
    fn a_cache_takes_back_a_span_it_owned_last() {
        // Cache A's and then cache B's partial spans sit in the mcentral, B's nearer
        // the head. A's next refill must take one of A's own spans (whose live objects
        // A holds), not B's: two threads trading spans turn each other's frees into
        // remote frees.
        let h = test_heap();
        let a = MCache::leaked();
        let b = MCache::leaked();
        let class = 5;
        let span_of = |p: usize| h.span_of_unchecked(p) as usize;
        let (a_objs, b_objs) = (fill(h, a, class, 3), fill(h, b, class, 3));
        let a_spans: Vec<usize> = a_objs.iter().map(|&p| span_of(p as usize)).collect();
        let b_spans: Vec<usize> = b_objs.iter().map(|&p| span_of(p as usize)).collect();
        assert!(a_spans.iter().all(|s| !b_spans.contains(s)));
        free_and_release(h, a, class, &a_objs, |i| i % 2 == 0);
        free_and_release(h, b, class, &b_objs, |i| i % 2 == 0);
        let p = unsafe { alloc_from(h, a, class) };
        assert!(!p.is_null());
        assert!(
            a_spans.contains(&span_of(p as usize)),
            "cache A was handed a span it never owned (B's: {})",
            b_spans.contains(&span_of(p as usize))
        );
        let p = unsafe { alloc_from(h, b, class) };
        assert!(
            b_spans.contains(&span_of(p as usize)),
            "and B one of its own"
        );
        unsafe {
            release_all(h, a);
            release_all(h, b);
        }
    }

    #[test]
    fn many_caches_each_take_back_their_own_spans() {
        // Sixteen caches leave four partly free spans each in the mcentral, one cache
        // after the other. Each must get one of its own back: in a single partial list
        // the first caches' spans would lie 48 deep, past any bounded search for one's
        // own, and they would be handed fresh spans (or others') while theirs waited.
        let h = test_heap();
        let class = 5;
        let span_of = |p: usize| h.span_of_unchecked(p) as usize;
        let caches: Vec<*mut MCache> = (0..16).map(|_| MCache::leaked()).collect();
        let mut owned: Vec<Vec<usize>> = Vec::new();
        for &c in &caches {
            let objs = fill(h, c, class, 4);
            owned.push(objs.iter().map(|&p| span_of(p as usize)).collect());
            // A third free: too little for the later caches to take them.
            free_and_release(h, c, class, &objs, |i| i % 3 == 0);
        }
        let (partial, _, _, _) = h.central[class].census();
        assert_eq!(partial, 64);
        for (i, &c) in caches.iter().enumerate() {
            let p = unsafe { alloc_from(h, c, class) };
            assert!(
                owned[i].contains(&span_of(p as usize)),
                "cache {i} got a span not its own"
            );
        }
        for &c in &caches {
            unsafe { release_all(h, c) };
        }
        h.central[class].census();
    }

    #[test]
    fn another_caches_span_is_taken_only_when_mostly_free() {
        // Cache A leaves spans in the mcentral with a quarter of their objects free
        // (class 5) and with three quarters free (class 6). A cache that owned none of
        // them gets a fresh span of class 5 (taking one would make A's frees of the
        // live three quarters remote) but reuses one of A's class 6 spans (few live
        // objects: the memory is worth more than the locality).
        let h = test_heap();
        let a = MCache::leaked();
        let b = MCache::leaked();
        let span_of = |p: usize| h.span_of_unchecked(p) as usize;
        // (class, whether A frees its object i, whether B reuses one of A's spans)
        type Case = (usize, fn(usize) -> bool, bool);
        let cases: [Case; 2] = [(5, |i| i % 4 == 0, false), (6, |i| i % 4 != 0, true)];
        for (class, free, reused) in cases {
            let objs = fill(h, a, class, 3);
            let a_spans: Vec<usize> = objs.iter().map(|&p| span_of(p as usize)).collect();
            free_and_release(h, a, class, &objs, free);
            let (partial, _, _, _) = h.central[class].census();
            assert!(
                partial >= 3,
                "A's spans are not in the partial list ({partial})"
            );
            let p = unsafe { alloc_from(h, b, class) };
            assert!(!p.is_null());
            assert_eq!(
                a_spans.contains(&span_of(p as usize)),
                reused,
                "class {class}: whether B took one of A's spans"
            );
        }
        unsafe {
            release_all(h, a);
            release_all(h, b);
        }
    }
}
