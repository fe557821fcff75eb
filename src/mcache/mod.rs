//! `MCache`: the per-thread front end for small objects (Go's `mcache`, mcache.go; the
//! allocation fast path plays malloc.go's `nextFreeFast`/`nextFree`, the refill
//! `mcache.refill`).
//!
//! This file holds the cache records (`ClassCache`, one cache line per size class;
//! `MCache`; the static empty cache; `entry`), the tuning constants of the whole module,
//! and both fast paths with the refill behind them. The other rooms:
//!
//! - `flush`: where a freed object goes when the fast path does not keep it: a local
//!   stack's overflow, the remote buffer, `flush`, and the remote free itself;
//! - `budget`: the free-stack limits, the stacks' storage layout, and the budget of all
//!   threads' stacks together;
//! - `lifecycle`: the thread's cache state, cache creation (the pthread key), thread
//!   exit, releasing and trimming a record, and the `Slow` guard visitors respect;
//! - `shared`: the one locked cache of threads without their own;
//! - `tick`: the fast path's counter, read as the statistics' stack pops and as the
//!   heap profile's per-class countdown;
//! - `tests`: unit tests of the cache logic.
//!
//! The free fast path (`dealloc`, `free_to`, `push_local`, and `dealloc`'s own slow
//! branches `dealloc_slow` and `dealloc_first`) stays here rather than with the flush:
//! it is the other half of the per-class entry the allocation fast path uses (the same
//! cache line, the same `span_base`/`span_len` range that wide mode widens in
//! `set_span`), and it ends where `flush.rs` begins (`overflow`, `buffer_remote`).
//!
//! *Protection.* A cache record belongs to its owner thread (the shared cache: to the
//! holder of its lock): its entries are read and written with plain loads and stores,
//! no lock and no atomic read-modify-write. Others reach a live record only through its
//! `door` (`door.rs`, atomics; a visitor, `global/idle.rs`, that holds it acts as the owner)
//! and its statistics counter `seq`. The current spans a cache owns are its own too;
//! objects of spans it does not own go back through the spans' atomic remote bitmaps.
//!
//! # How it works
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
//! one in `WIDE_EXIT_DIV` of what it returns to be other caches' objects. When a local
//! list grows past its limit (`FREE_LIMIT_BYTES` worth of objects, clamped to
//! `MIN_FREE_LIMIT..=MAX_FREE_LIMIT`), all but a quarter of it is flushed back to the
//! spans; at thread exit all of it is. An object of a span this cache does not own goes
//! on the class's *remote buffer* instead (never reused here), which is flushed to the
//! spans in batches (`REMOTE_LIMIT_BYTES` worth, at most `MAX_REMOTE_LIMIT` objects).
//! Flushes, and every free of a cache-less thread, are *remote* frees: set the object's
//! bit in the span's remote bitmap and count it in the span's state word (two atomic
//! RMWs, lock-free, never lost); the owner merges remote bits when it next sweeps the
//! span, and an unowned span is announced to its mcentral when it becomes allocatable
//! again or completely free (then its pages go back to the heap).
//!
//! Statistics (`stats.rs`) are written at refill and flush granularity: a window's
//! objects count as allocated when it is loaded (the unused rest is subtracted when the
//! span is given back); an object reused from the local free list is counted through
//! the entry's plain `tick`, which every fast-path take increments (the one counter
//! on the fast path, also the heap profile's countdown: `tick.rs`), and published at
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

pub(crate) mod budget;
pub(crate) mod door;
mod flush;
mod heap;
#[cfg(not(spanheap_loom))]
mod hinted;
mod lifecycle;
mod shared;
#[cfg(all(test, not(spanheap_loom)))]
mod tests;
mod tick;
#[cfg(not(spanheap_loom))]
pub(crate) mod tls;

use core::ptr::{self, NonNull};

use crate::arena::{ArenaHint, NO_ARENA};
use crate::fixalloc::Record;
use crate::mcentral::{count_free, merge_remote, private};
use crate::mspan::{MSpan, Purpose};
use crate::os::MemSource;
use crate::pagecache::GatedCache;
use crate::sizeclasses::{CLASS_TO_NPAGES, NUM_CLASSES};
use crate::stats::{field, HeapSeq};
use crate::sync::{Ordering, UnsafeCell};

#[cfg(not(spanheap_loom))]
use flush::pless_free;
use flush::{buffer_remote, overflow};
#[cfg(not(spanheap_loom))]
use lifecycle::{create_cache, live_cache, Slow, LIVE, NO_CACHE};

// The crate's paths into the cache (`crate::mcache::...`), wherever the items live now.
#[cfg(not(spanheap_loom))]
pub(crate) use budget::{
    apply_own_budget, check_budget, own_stack_bytes, own_stack_resident, thread_stack_storage,
};
pub(crate) use flush::remote_free;
pub(crate) use heap::Heap;
#[cfg(not(spanheap_loom))]
#[cfg_attr(feature = "checked", allow(unused_imports))] // checked mode validates every free
pub(crate) use hinted::{at_object_start, free_hinted, note_arena};
pub(crate) use lifecycle::release_all;
#[cfg(not(spanheap_loom))]
pub(crate) use lifecycle::{
    current_writer, flush_own, has_cache, own_record, publish_counts, release_classes, trim_class,
};
#[cfg(not(spanheap_loom))]
pub(crate) use shared::with_heap_cache;
pub(crate) use shared::SharedCache;
#[cfg(not(spanheap_loom))]
pub(crate) use tick::alloc_cached_then;
#[cfg(all(not(spanheap_loom), feature = "profile"))]
pub(crate) use tick::{next_countdown, restart_countdown, sample_due};

// What the unit tests (`use super::*`) name from the other rooms.
#[cfg(all(test, not(spanheap_loom)))]
use crate::sizeclasses::CLASS_TO_SIZE;
#[cfg(all(test, not(spanheap_loom)))]
use budget::{scaled_limits, FLOOR_STACK_BYTES, FREE_LIMIT, FULL_STACK_BYTES};

// ---------------------------------------------------------------------------------------
// Tuning: every ratio, byte amount and count that sets the caches' policies. They trade
// memory held per thread against lock round trips and refills; none of them matters for
// correctness (the asserts keep the layouts that depend on them consistent). The
// measurements behind the values are in docs/benchmarks.md.
// ---------------------------------------------------------------------------------------

/// Bytes' worth of objects a class's local free stack may hold before a push flushes
/// it (`FREE_LIMIT`, clamped to `MIN_FREE_LIMIT..=MAX_FREE_LIMIT` objects): a thread
/// pins at most about this much per class it uses.
const FREE_LIMIT_BYTES: u32 = 512 << 10;

/// The smallest `FREE_LIMIT` of a class, however large its objects (a burst of this
/// many objects of the largest class is still recycled locally).
const MIN_FREE_LIMIT: u32 = 32;

/// The largest `FREE_LIMIT` of a class, however small its objects (`ClassCache::limit`
/// holds it in 16 bits).
const MAX_FREE_LIMIT: u32 = 4096;
const _: () = assert!(MAX_FREE_LIMIT <= u16::MAX as u32);

/// What a push past the limit keeps on the stack: `limit / OVERFLOW_KEEP_DIV + 1`
/// objects (a quarter of the limit, which serves the next allocations without a
/// refill); the rest goes back to the spans in one `FLUSH_CHUNK`.
const OVERFLOW_KEEP_DIV: u32 = 4;

/// How many objects `flush` returns per hold of the mcentral lock. Each span a chunk
/// touches costs a state-word CAS and its list bookkeeping, so objects freed in no
/// particular order over many spans cost less the larger the chunk (measurements:
/// docs/benchmarks.md, "Scattered frees").
const FLUSH_CHUNK: usize = 4096;

// A flush on a push returns what it returns in one chunk.
const _: () = assert!(
    MAX_FREE_LIMIT as usize - MAX_FREE_LIMIT as usize / OVERFLOW_KEEP_DIV as usize <= FLUSH_CHUNK
);

/// Bytes' worth of objects a class's remote buffer (frees of objects of spans this
/// cache does not own) collects before they go back to their spans in one batch
/// (`REMOTE_LIMIT`, clamped to `MIN_REMOTE_LIMIT..=MAX_REMOTE_LIMIT` objects).
const REMOTE_LIMIT_BYTES: u32 = 16 << 10;

/// The smallest `REMOTE_LIMIT` of a class, however large its objects.
const MIN_REMOTE_LIMIT: u32 = 2;

/// The largest `REMOTE_LIMIT` of a class, however small its objects.
const MAX_REMOTE_LIMIT: u32 = 64;

/// Wide mode ends when more than one in `WIDE_EXIT_DIV` (an eighth) of the objects a
/// flush returns belong to spans another cache owns or owned last (`flush`).
const WIDE_EXIT_DIV: u64 = 8;

/// An exhausted current span is swept in place and kept if at least one in
/// `SPAN_KEEP_DIV` (an eighth) of its objects came back, else it goes back to its
/// mcentral for another (`refill_span`).
const SPAN_KEEP_DIV: usize = 8;

/// A visitor's trim (`trim_class`) keeps one in `TRIM_KEEP_DIV` (a quarter) of the
/// objects below a free stack's low-water mark and returns the rest (all of a stack
/// nothing was taken from since the previous visit).
const TRIM_KEEP_DIV: u32 = 4;

/// Default budget of all threads' free stacks together, in bytes (`budget`; the
/// environment's `SPANHEAP_THREAD_CACHE_BUDGET` or `set_thread_cache_budget` replace
/// it). 1 GiB binds only beyond about 32 busy threads; why no smaller default:
/// docs/benchmarks.md, "Threads".
pub(crate) const DEFAULT_BUDGET: usize = 1 << 30;

// ---------------------------------------------------------------------------------------
// The cache records.
// ---------------------------------------------------------------------------------------

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
    /// stack mapping, see `MCache::set_stacks` and `Heap::alloc_cache_record`) is
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
    /// The current span's base (0 when there is none; C's `free` fast path checks a
    /// pointer against it, `free_hinted`).
    span_base: usize,
    /// The addresses the free fast path takes as local without a span-map lookup,
    /// `[range_base, range_base + span_len)` (wrapping): the current span's memory, or
    /// in wide mode every address but the heap profile's sampled blocks (`set_span`);
    /// both 0 when there is no span. (A length rather than an end: the free path's
    /// range test is then one subtraction and one compare.)
    range_base: usize,
    span_len: usize,
    /// Counts every object the fast path takes (free stack or window), wrapping: the
    /// one counter the allocation fast path writes. Two readers (`tick.rs`): the
    /// statistics derive from it the stack pops not yet published (with
    /// `MCache::tick_mark`), and the heap profile uses it as the class's countdown to
    /// its next sample, set to `-n` so that it turns non-negative at the `n`th object.
    tick: u64,
}

const _: () = assert!(core::mem::size_of::<ClassCache>() == 64);

/// A thread cache. Owned by one thread (or, for the shared cache, by the holder of the
/// shared lock); never touched by others, except `seq`, which the statistics reader
/// reads.
#[repr(C)]
pub(crate) struct MCache {
    classes: [ClassCache; NUM_CLASSES],
    /// Per class: the entry's `tick` as of the last publication of its counts, offset
    /// so that `tick - tick_mark + (objects in the window)` is the number of stack pops
    /// not yet published (`tick.rs`). Owner only.
    tick_mark: [u64; NUM_CLASSES],
    /// Per class: the heap profile's rate generation the class's countdown was drawn
    /// for (`profile::sample::expired`). Owner only.
    sample_gen: [u32; NUM_CLASSES],
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
    /// Per class, the remote buffer: objects freed by this thread from spans it does
    /// not own, linked through their first word, returned to their spans in a batch
    /// (`flush_remote`) when `REMOTE_LIMIT` is reached. Never reused for allocation.
    /// Owner only.
    remote: [*mut u8; NUM_CLASSES],
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
    /// provably outside the allocator (`global/idle.rs`).
    pub(crate) door: door::Door,
    /// Fixalloc free-list link (heap lock).
    free_link: UnsafeCell<*mut MCache>,
}

pub(super) const EMPTY_CLASS: ClassCache = ClassCache {
    stack: ptr::null_mut(),
    nfree: 0,
    limit: 0,
    elemsize: 0,
    alloc_cache: 0,
    window_base: 0,
    span_base: 0,
    range_base: 0,
    span_len: 0,
    // One object from the end of its countdown: a fresh record's first allocation of
    // the class asks the profile for the countdown (`tick.rs`).
    tick: u64::MAX,
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
                tick_mark: [EMPTY_CLASS.tick; NUM_CLASSES],
                sample_gen: [0; NUM_CLASSES],
                arena_hint: NO_ARENA,
                remote_since: [0; NUM_CLASSES],
                nremote: [0; NUM_CLASSES],
                remote: [ptr::null_mut(); NUM_CLASSES],
                heap: GatedCache::new(),
                seq: HeapSeq::new(),
                registered: false,
                limits_gen: 0,
                door: door::Door::new(),
                free_link: UnsafeCell::new(ptr::null_mut()),
            }
        }
    }
}

// Thread-cache records are too big for a paged record allocator, so their pages are
// never given back (a record keeps its free-stack mapping for its next thread).
const _: () = assert!(2 * core::mem::size_of::<MCache>() > crate::fixalloc::RECORD_PAGE);

// SAFETY: `free_link` is used only by the fixalloc; the allocator is not paged.
unsafe impl Record for MCache {
    fn fresh() -> Self {
        MCache::empty()
    }
    fn free_link(&self) -> &UnsafeCell<*mut Self> {
        &self.free_link
    }
}

#[cfg(not(spanheap_loom))]
#[inline]
pub(super) fn empty_cache() -> *mut MCache {
    EMPTY_CACHE.get()
}

/// The entry of class `class` in cache `c`.
///
/// # Safety
/// `c` is a live cache the caller owns (see `try_alloc`), `class < NUM_CLASSES`.
#[inline(always)]
pub(super) unsafe fn entry<'a>(c: *mut MCache, class: usize) -> &'a mut ClassCache {
    // SAFETY: per the contract.
    unsafe {
        &mut *ptr::addr_of_mut!((*c).classes)
            .cast::<ClassCache>()
            .add(class)
    }
}

// ---------------------------------------------------------------------------------------
// The allocation fast path.
// ---------------------------------------------------------------------------------------

/// The fast path shared by thread caches and the shared cache.
///
/// # Safety
/// `c` is this thread's cache, the empty cache, or the shared cache with its lock held.
#[inline(always)]
pub(super) unsafe fn try_alloc(c: *mut MCache, class: usize) -> *mut u8 {
    // SAFETY: forwarded.
    unsafe { take_then(c, class, false, |p| p) }
}

/// `try_alloc`; with `look`, an object that runs the class's heap-profile countdown out
/// (its `tick` turns non-negative, `tick.rs`) goes through `out`, whose result is
/// returned instead. (The test sits in each branch, right after the increment, so that
/// it is the increment's own flags: `inc` and `jns`.)
///
/// # Safety
/// As for `try_alloc`; `out` never returns null.
#[inline(always)]
pub(super) unsafe fn take_then(
    c: *mut MCache,
    class: usize,
    look: bool,
    out: impl FnOnce(*mut u8) -> *mut u8,
) -> *mut u8 {
    // SAFETY: `class < NUM_CLASSES` (from the size-class functions); the entry is ours.
    // Writes happen only when the entry had something to give, which the empty cache
    // never has. Slots below `nfree` hold pushed objects: never null (`dealloc` is
    // never given null; `free_to` callers pass live objects); a window object's
    // address is its span's base or above. (Telling the compiler so spares the
    // caller's null test on these paths.)
    unsafe {
        let e = ptr::addr_of_mut!((*c).classes)
            .cast::<ClassCache>()
            .add(class);
        // The countdown's test, in each branch (see above).
        let done = |p: *mut u8, t: u64| {
            if p.is_null() {
                core::hint::unreachable_unchecked();
            }
            if look && tick::ran_out(t) {
                let q = out(p);
                if q.is_null() {
                    core::hint::unreachable_unchecked();
                }
                return q;
            }
            p
        };
        let n = (*e).nfree;
        if n != 0 {
            let n = n - 1;
            (*e).nfree = n;
            let t = (*e).tick.wrapping_add(1);
            (*e).tick = t;
            return done((*e).stack.add(n as usize).read(), t);
        }
        let ac = (*e).alloc_cache;
        if ac != 0 {
            (*e).alloc_cache = ac & (ac - 1);
            let t = (*e).tick.wrapping_add(1);
            (*e).tick = t;
            let p = (*e).window_base + ac.trailing_zeros() as usize * (*e).elemsize as usize;
            return done(p as *mut u8, t);
        }
        ptr::null_mut()
    }
}

/// Allocates an object of class `class` from cache `c` of `heap`, refilling it if
/// needed. Null if memory is exhausted.
///
/// # Safety
/// `c` is a live cache of `heap` owned by the caller (thread, or lock holder).
#[inline]
pub(crate) unsafe fn alloc_from<M: MemSource>(
    heap: &Heap<M>,
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
unsafe fn refilled<M: MemSource>(heap: &Heap<M>, c: *mut MCache, class: usize) -> *mut u8 {
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

/// How the calling thread's cache reaches the process-wide heap: a zero-sized type of
/// the layer above (`global::Process`) whose `heap` is the one `HEAP`. The entry points
/// that serve the process (`alloc`, `dealloc`, the thread's birth and death) are generic
/// over it rather than naming the static, so that this layer does not depend on the one
/// that builds the heap; once inlined, `P::heap()` is the static's address, as if named.
#[cfg(not(spanheap_loom))]
pub(crate) trait Process: 'static {
    /// The process-wide heap.
    fn heap() -> &'static Heap<crate::os::OsMemory>;
}

/// An object of size class `class` (1..NUM_CLASSES) from what the calling thread's
/// cache holds (free stack or window), or null: `alloc` without its slow path.
#[cfg(not(spanheap_loom))]
#[inline(always)]
pub(crate) fn alloc_cached(class: usize) -> *mut u8 {
    // SAFETY: `tls::cache()` is this thread's cache or the empty one.
    unsafe { try_alloc(tls::cache(), class) }
}

/// Allocates an object of size class `class` (1..NUM_CLASSES) from the calling thread's
/// cache of the process-wide heap. Null on failure. (Checked mode's `on_alloc` is the
/// caller's: `malloc.rs`.)
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn alloc<P: Process>(class: usize) -> *mut u8 {
    let p = alloc_cached(class);
    if !p.is_null() {
        return p;
    }
    alloc_slow::<P>(class)
}

/// `alloc` after its fast path missed: creates the thread's cache if it has none,
/// refills the class. (`malloc.rs`'s common requests call it directly.)
#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
pub(crate) fn alloc_slow<P: Process>(class: usize) -> *mut u8 {
    let heap = P::heap();
    let c = match tls::state() {
        LIVE => match live_cache() {
            Some(c) => c,
            None => return heap.shared.alloc(heap, class),
        },
        NO_CACHE => match create_cache::<P>() {
            Some(n) => n,
            None => return heap.shared.alloc(heap, class),
        },
        _ => return heap.shared.alloc(heap, class),
    };
    // SAFETY: `c` is this thread's live cache, no lock held.
    unsafe {
        let _slow = Slow::new(c);
        check_budget(heap, c);
        // A re-installed record may have a non-empty stack for this class.
        let p = try_alloc(c, class);
        if !p.is_null() {
            return p;
        }
        refilled(heap, c, class)
    }
}

/// Allocates a zeroed object of class `class` (`size` bytes are cleared when needed).
#[cfg(not(spanheap_loom))]
#[inline]
pub(crate) fn alloc_zeroed<P: Process>(class: usize, size: usize) -> *mut u8 {
    let c = tls::cache();
    // An empty slot may hide a live record whose stacks hold objects: one a visitor
    // trimmed or left (`global/idle.rs`). The slow path re-installs it and may pop a used
    // object from it, so clear whatever comes (once per visit, or per new thread).
    // SAFETY: `c` is this thread's cache or the empty one (whose stacks are empty).
    let recycled = c == empty_cache()
        || unsafe { (*ptr::addr_of!((*c).classes).cast::<ClassCache>().add(class)).nfree != 0 };
    let p = alloc::<P>(class);
    if p.is_null() {
        return p;
    }
    // An object from the free list was used before. A window object is fresh unless
    // its span was dirty or not zero from the OS; a cache-less thread cannot read the
    // shared cache's span state after the lock is gone, so it always clears.
    let clear = recycled
        || !has_cache()
        || match NonNull::new(P::heap().span_of_unchecked(p as usize)) {
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

// ---------------------------------------------------------------------------------------
// The free fast path (and `dealloc`'s own slow branches).
// ---------------------------------------------------------------------------------------

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
pub(crate) unsafe fn dealloc<P: Process>(p: *mut u8, class: usize) {
    let c = tls::cache();
    // SAFETY: `c` is this thread's cache or the empty one, whose span range is empty
    // (so it is never written here).
    unsafe {
        let e = entry(c, class);
        // Wrapping: below `span_base` the difference is huge (and in wide mode
        // `span_len` is usize::MAX, see `set_span`).
        if (p as usize).wrapping_sub(e.range_base) < e.span_len {
            push_local(P::heap(), c, e, p, class);
        } else {
            dealloc_slow::<P>(p, class, c);
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
unsafe fn dealloc_slow<P: Process>(p: *mut u8, class: usize, c: *mut MCache) {
    #[cfg(feature = "profile")]
    if crate::profile::blocks::contains(p as usize) {
        // A sampled object, in a block of its own (no range test passes it).
        return crate::profile::sample::free_block(p);
    }
    if c == empty_cache() {
        // SAFETY: forwarded.
        return unsafe { dealloc_first::<P>(p, class) };
    }
    // SAFETY: `c` is this thread's live cache; the hint is its own.
    let hint = unsafe { &mut *ptr::addr_of_mut!((*c).arena_hint) };
    let Some(s) = NonNull::new(P::heap().span_of_hinted(p as usize, hint)) else {
        return; // not ours
    };
    // SAFETY: forwarded; `c` is this thread's live cache.
    unsafe { free_to(P::heap(), c, p, s, class) }
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
unsafe fn dealloc_first<P: Process>(p: *mut u8, class: usize) {
    let Some(s) = NonNull::new(P::heap().span_of_unchecked(p as usize)) else {
        return; // not ours
    };
    let c = match tls::state() {
        NO_CACHE => create_cache::<P>(),
        // A visitor emptied the slot (`global/idle.rs`).
        LIVE => live_cache(),
        _ => None,
    };
    match c {
        // SAFETY: forwarded; `c` is this thread's new cache.
        Some(c) => unsafe { free_to(P::heap(), c, p, s, class) },
        // SAFETY: forwarded.
        None => unsafe { pless_free(P::heap(), p, s, class) },
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
    heap: &Heap<M>,
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

/// Frees an object into cache `c`: its local free list if the cache owns (or owned
/// last) the object's span, else its remote buffer. The fast path of `dealloc`.
///
/// # Safety
/// `c` is a live cache of `heap` owned by the caller; `p` is a live object of span `s`
/// and class `class`, not used afterwards.
#[inline(always)]
pub(crate) unsafe fn free_to<M: MemSource>(
    heap: &Heap<M>,
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
            return buffer_remote(heap, c, p, class);
        }
        push_local(heap, c, e, p, class);
    }
}

// ---------------------------------------------------------------------------------------
// The refill: windows, spans, and wide mode.
// ---------------------------------------------------------------------------------------

/// Refills class `class` of cache `c`, then publishes the class's counts: the new
/// window's objects as allocated, reuses from the free list as allocated and freed.
/// Runs no scavenger pass (the shared cache's lock may be held: a pass takes the
/// reclaim lock, which ranks before it); if it says `Span`, the caller runs a due one
/// once it holds no lock.
///
/// # Safety
/// `c` is a live cache owned by the caller (thread cache, or shared cache under lock),
/// and the class's free list and window are empty.
pub(super) unsafe fn refill<M: MemSource>(heap: &Heap<M>, c: *mut MCache, class: usize) -> Refill {
    // SAFETY: forwarded.
    let r = unsafe { refill_span(heap, c, class) };
    // SAFETY: the entry is ours.
    let e = unsafe { entry(c, class) };
    // SAFETY: `c` is a live cache; its door is used atomically.
    unsafe { (*c).door.publish_depth(class, e.nfree) };
    // The window is empty on entry, so whatever it holds now was just loaded.
    let window = e.alloc_cache.count_ones() as u64;
    // SAFETY: our cache; `class < NUM_CLASSES`.
    let pops = unsafe {
        tick::window_loaded(c, class, window);
        tick::take_pops(c, e, class)
    };
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
pub(super) enum Refill {
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
/// correctness. (Why not every free locally, always: consumers would pin producers'
/// objects; the figures are in docs/benchmarks.md, "Fast-path instruction counts".)
///
/// # Safety
/// As for `refill`.
unsafe fn refill_span<M: MemSource>(heap: &Heap<M>, c: *mut MCache, class: usize) -> Refill {
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
        if free >= (nelems / SPAN_KEEP_DIV).max(1) {
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

/// Whether entry `e` is in wide mode (see `refill_span`).
#[inline]
pub(super) fn is_wide(e: &ClassCache) -> bool {
    e.span_base != 0 && e.span_len == WIDE_LEN
}

/// Wide mode's range (`set_span`): every address but the heap profile's sampled blocks,
/// `[WIDE_BASE - (2^64 - WIDE_LEN), WIDE_BASE)`, whose frees must reach the slow path.
const WIDE_BASE: usize = crate::mheap::SAMPLED_BLOCKS_END;
const WIDE_LEN: usize = 0usize.wrapping_sub(crate::mheap::SAMPLED_BLOCKS_SIZE);

/// The current span of entry `e`, found through the span map (the entry keeps its
/// address range, which the fast free path tests).
#[inline]
pub(super) fn current_span<M: MemSource>(heap: &Heap<M>, e: &ClassCache) -> Option<NonNull<MSpan>> {
    if e.span_base == 0 {
        return None;
    }
    NonNull::new(heap.span_of_unchecked(e.span_base))
}

/// Makes `s` (owned by the cache) the current span of `e`, or none; `wide`: in wide
/// mode (see `refill_span`).
pub(super) fn set_span(e: &mut ClassCache, s: Option<NonNull<MSpan>>, wide: bool) {
    match s {
        Some(s) => {
            // SAFETY: the cache owns the span; its record is never unmapped.
            let span = unsafe { s.as_ref() };
            e.span_base = span.base();
            (e.range_base, e.span_len) = if wide {
                // The free fast path's range test then passes for every address but
                // the sampled blocks' range (below `WIDE_BASE`).
                (WIDE_BASE, WIDE_LEN)
            } else {
                (span.base(), span.npages() << crate::os::PAGE_SHIFT)
            };
            // SAFETY: as above.
            e.elemsize = unsafe { private(s) }.elemsize as u16;
        }
        None => {
            e.span_base = 0;
            e.range_base = 0;
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
pub(super) unsafe fn normalize(e: &mut ClassCache, s: NonNull<MSpan>) -> usize {
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
