//! Sampling (Go's `MemProfileRate`, `nextSample`, `profilealloc`): which allocations
//! are recorded, and the hooks the allocation and free paths call.
//!
//! # What it costs with profiling off: nothing on the fast paths
//!
//! The fast paths of `alloc` and `dealloc` (`malloc.rs`) load a request's size class
//! from a table; those tables are atomics (`fastclass.rs`), and turning profiling on
//! sets every entry to class 0, which no thread cache ever has an object or a span of.
//! Every allocation and free then misses its fast path, and the slow paths, seeing
//! class 0, call [`after_alloc`] and [`before_free`]; the other out-of-line paths
//! (large blocks, over-aligned ones, `realloc`, `alloc_zeroed`, C's validated `free`) test
//! [`watching`]. So with profiling off the fast paths run the instructions they ran
//! before (a relaxed 32-bit load is a plain one), and with it on every request costs an
//! out-of-line call more, a thread-local countdown per allocation and one load (the
//! negative check of `table::remove`) per free.
//!
//! The tables and `WATCHING` stay so once profiling was turned on, even if the rate is
//! set back to 0: sampled objects may still be live, and their frees must be seen.
//!
//! # The countdown
//!
//! Each thread counts down the bytes it allocates to its next sample, drawn from an
//! exponential distribution with mean `rate` (Go's `fastexprand`), so that every byte
//! allocated is equally likely to be the one sampled and an object of `size` bytes is
//! sampled with probability `1 - exp(-size / rate)`, which the writers undo
//! ([`scale`](super::scale), Go's `scaleHeapSample`). A rate of 1 samples everything.
//!
//! # Recording
//!
//! A sampled allocation walks its stack with the unwinder (`backtrace`'s
//! `trace_unsynchronized`: libgcc's `_Unwind_Backtrace`, which does not allocate) into a
//! stack buffer, then takes the profile lock to count it in its bucket. While it walks,
//! the thread's `busy` flag is set: an allocation the unwinder makes is served but not
//! sampled (and the recursion stops there).
//!
//! Not quite nothing elsewhere: C's `free` fast path (the preload) loads its per-class
//! span size as an atomic (one instruction more, `fastclass::FREE_CHECK`), and
//! `alloc_zeroed` tests [`watching`] (two).

use core::cell::Cell;

use crate::sync::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::table;

/// Set (for good) when profiling is first turned on: the out-of-line paths call the
/// hooks. Relaxed: see [`set_rate`].
static WATCHING: AtomicU8 = AtomicU8::new(0);

/// The mean bytes between samples; 0: off. A thread that sees a new rate late samples
/// a few more or fewer allocations at the old one (see `set_rate` for the one ordering
/// that matters).
static RATE: AtomicUsize = AtomicUsize::new(0);

/// Bumped by every `set_rate`, so that threads redraw their countdown.
static RATE_GEN: AtomicUsize = AtomicUsize::new(0);

/// Allocations sampled (the tests' cross-check of the tables' totals). Relaxed.
static SAMPLED: AtomicU64 = AtomicU64::new(0);

/// The calling thread's sampling state.
struct Local {
    /// Bytes still to allocate before the next sample.
    next: Cell<usize>,
    /// The `RATE_GEN` that `next` was drawn for.
    gen: Cell<usize>,
    /// xorshift64* state (0: not seeded yet).
    rng: Cell<u64>,
    /// Set while this thread records a sample (or writes a profile): its allocations
    /// are not sampled.
    busy: Cell<bool>,
}

thread_local! {
    // Const-initialised and without a destructor: no allocation, usable until the
    // thread is gone (thread-exit destructors that allocate included).
    static LOCAL: Local = const {
        Local {
            next: Cell::new(0),
            gen: Cell::new(0),
            rng: Cell::new(0),
            busy: Cell::new(false),
        }
    };
}

/// Whether the out-of-line paths must call the hooks (profiling was turned on).
#[inline(always)]
pub(crate) fn watching() -> bool {
    WATCHING.load(Ordering::Relaxed) != 0
}

/// The sampling rate in bytes (0: off).
pub(crate) fn rate() -> usize {
    RATE.load(Ordering::Relaxed)
}

/// Sets the sampling rate (0: off).
///
/// `WATCHING` and the fast paths' class tables are stored before `RATE`, with Release
/// on the rate: a thread that samples has loaded the new rate (Acquire), so its records
/// happen after those stores, and the free of a recorded object (which happens after
/// its record) sees them and takes a hooked path.
pub(crate) fn set_rate(rate: usize) {
    if rate != 0 && !watching() {
        WATCHING.store(1, Ordering::Relaxed);
        crate::fastclass::route_to_slow_paths();
    }
    RATE.store(rate, Ordering::Release);
    RATE_GEN.fetch_add(1, Ordering::Relaxed);
}

/// Allocations sampled so far (including ones the tables dropped).
pub(crate) fn sampled() -> u64 {
    SAMPLED.load(Ordering::Relaxed)
}

/// Runs `f` with sampling off on the calling thread (the writers: what they allocate
/// is not profiled).
pub(crate) fn unsampled<R>(f: impl FnOnce() -> R) -> R {
    let was = LOCAL.try_with(|l| l.busy.replace(true)).unwrap_or(true);
    let r = f();
    let _ = LOCAL.try_with(|l| l.busy.set(was));
    r
}

/// A draw from the exponential distribution of mean `rate`, at least 1 (Go's
/// `fastexprand`, with the natural logarithm of a 53-bit uniform).
fn draw(l: &Local, rate: usize) -> usize {
    let mut x = l.rng.get();
    if x == 0 {
        // Seed from the thread's TLS address and the clock: distinct per thread.
        x = (l as *const Local as u64) ^ crate::os::now_ns().rotate_left(32) | 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    l.rng.set(x);
    let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
    // (0, 1]: never 0, whose logarithm is -inf.
    let u = ((r >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let n = -libm::log(u) * rate as f64;
    // An f64 to usize cast saturates (and maps NaN to 0).
    (n as usize).max(1)
}

/// After an allocation of `size` bytes at `p` (null: failed) that took an out-of-line
/// path while profiling is on: counts it down, and records it if it is the one sampled
/// (`sample_slow`). Inlined into the out-of-line paths: the countdown is a dozen
/// instructions without a stack frame of its own.
#[inline]
pub(crate) fn after_alloc(p: *mut u8, size: usize) {
    // Acquire: pairs with `set_rate`'s Release, so that this thread's record happens
    // after the stores that route frees to the hooks.
    let rate = RATE.load(Ordering::Acquire);
    if rate == 0 || p.is_null() {
        return;
    }
    let _ = LOCAL.try_with(|l| {
        if l.busy.get() {
            return;
        }
        let next = l.next.get();
        if rate != 1 && size < next && l.gen.get() == RATE_GEN.load(Ordering::Relaxed) {
            l.next.set(next - size);
            return;
        }
        sample_slow(l, p, size, rate);
    });
}

/// `after_alloc` when the countdown runs out, the rate changed (a new draw first) or
/// the rate is 1.
#[cold]
#[inline(never)]
fn sample_slow(l: &Local, p: *mut u8, size: usize, rate: usize) {
    let gen = RATE_GEN.load(Ordering::Relaxed);
    if l.gen.get() != gen {
        l.gen.set(gen);
        let next = draw(l, rate);
        if rate != 1 && size < next {
            l.next.set(next - size);
            return;
        }
    }
    l.next.set(draw(l, rate));
    l.busy.set(true);
    record(p, size);
    super::periodic_write();
    l.busy.set(false);
}

/// Walks the stack and records the sample. Out of line so that the stack buffer is
/// only on the stack while sampling.
#[inline(never)]
fn record(p: *mut u8, size: usize) {
    let mut stack = [0usize; table::MAX_DEPTH];
    let mut n = 0;
    // SAFETY: the unsynchronized walk is safe as long as no other thread uses the
    // unwinder's non-reentrant parts concurrently; with the libgcc backend
    // (`_Unwind_Backtrace`) there are none: it is thread-safe and does not allocate.
    unsafe {
        backtrace::trace_unsynchronized(|f| {
            stack[n] = f.ip() as usize;
            n += 1;
            n < table::MAX_DEPTH
        });
    }
    SAMPLED.fetch_add(1, Ordering::Relaxed);
    table::record(&stack[..n], p as usize, size);
}

/// Before the block at `p` is freed, on an out-of-line free path while profiling was
/// on (`watching`): a sampled object's free is counted in its bucket.
#[inline(never)]
pub(crate) fn before_free(p: *mut u8) {
    let _ = table::remove(p as usize);
}

/// A resize of the large block at `p` (by `resize`, which returns the new block or
/// null with `p` left as it was) while profiling was on: a free of `p` and an
/// allocation of `new_size` bytes, as a move would be.
#[inline(never)]
pub(crate) fn resize(p: *mut u8, new_size: usize, resize: impl FnOnce() -> *mut u8) -> *mut u8 {
    let removed = table::remove(p as usize);
    let q = resize();
    if q.is_null() {
        if let Some(r) = removed {
            table::restore(r);
        }
        return q;
    }
    after_alloc(q, new_size);
    q
}
