//! Sampling (Go's `MemProfileRate`, `nextSample`, `profilealloc`): which allocations
//! are recorded, and the hooks the allocation and free paths call.
//!
//! # The countdown
//!
//! Each thread counts down the bytes it allocates to its next sample, drawn from an
//! exponential distribution with mean `rate` (Go's `fastexprand`), so that every byte
//! allocated is equally likely to be the one sampled and an object of `size` bytes is
//! sampled with probability `1 - exp(-size / rate)`, which the writers undo
//! ([`scale`](super::scale), Go's `scaleHeapSample`). A rate of 1 samples everything.
//!
//! The fast paths count down per size class, in objects (`mcache/tick.rs`: the class
//! entry's `tick`, the counter the fast path increments anyway, set to `-n` for a
//! countdown of `n` objects, so the test is `inc` and `jns`): when it runs out,
//! [`expired`] says whether this object is sampled and what the next countdown is, an
//! exponential draw in bytes counted in objects of the class's size. Independent
//! countdowns of one rate per class still sample every byte at that rate; an object is
//! sampled with the probability of its class's size, which is the size recorded (as Go
//! records it). While profiling is off a countdown is [`OFF_COUNTDOWN`] worth of
//! objects, so another thread notices a new rate within that much allocation of a
//! class (the calling thread at once: `set_rate` runs its countdowns out). Large blocks
//! count down a second, thread-local countdown in bytes ([`due`]).

//! # A sampled small object gets a block of its own
//!
//! A free of a small object takes the fast path when the pointer passes the freeing
//! thread's range test for its class, without looking at anything else; a sampled
//! object's free must not, or it would go uncounted. So a sampled small object is given
//! a block in the profile's own range of address space (`blocks.rs`), which no range
//! test passes (wide mode's included), instead of the object the fast path had taken,
//! which goes back to the cache. Its free then always reaches a slow path, which sees
//! the range with one compare and counts the free ([`free_block`]). That makes in-use
//! figures exact, at a page or more per live sampled object (about one per `rate`
//! bytes of live heap). Large blocks are sampled where they are (their frees always
//! take the large path, which calls [`before_free`]).
//!
//! # Recording
//!
//! A sampled allocation walks its stack with the unwinder (`backtrace`'s
//! `trace_unsynchronized`: libgcc's `_Unwind_Backtrace`, which does not allocate) into a
//! stack buffer, then takes the profile lock to count it in its bucket. While it walks,
//! the thread's `busy` flag is set: an allocation the unwinder makes is served but not
//! sampled (and the recursion stops there).

use core::cell::Cell;

use crate::sync::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::table;

/// Set (for good) when profiling is first turned on: the out-of-line paths call the
/// hooks. Relaxed: see [`set_rate`].
static WATCHING: AtomicU8 = AtomicU8::new(0);

/// The fast paths' countdown while profiling is off: how many bytes a thread allocates
/// of one class before it looks at the rate again.
const OFF_COUNTDOWN: usize = 4 << 20;

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
/// `WATCHING` is stored before `RATE`, with Release on the rate: a thread that samples
/// has loaded the new rate (Acquire), so its records happen after that store, and the
/// free of a recorded large block (which happens after its record) sees it and calls
/// the hook.
pub(crate) fn set_rate(rate: usize) {
    if rate != 0 && !watching() {
        WATCHING.store(1, Ordering::Relaxed);
    }
    RATE.store(rate, Ordering::Release);
    RATE_GEN.fetch_add(1, Ordering::Relaxed);
    // The calling thread's countdowns start over at its next allocation of each class.
    let f = RESTART_OWN.load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: the only non-zero value stored is a `fn()` (`register_restart`).
        let f = unsafe { core::mem::transmute::<usize, fn()>(f) };
        f();
    }
}

/// Runs the calling thread cache's countdowns out (`mcache::restart_countdown`, which
/// this module, below the caches, cannot name): 0 if none registered yet.
/// Release/Acquire: the function is complete before it is called.
static RESTART_OWN: AtomicUsize = AtomicUsize::new(0);

/// Registers the thread caches' `restart_countdown` (`global::on_cache_live`), for
/// `set_rate`.
pub(crate) fn register_restart(f: fn()) {
    RESTART_OWN.store(f as usize, Ordering::Release);
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

/// A thread cache's countdown of a size class of `size`-byte objects ran out
/// (`mcache/tick.rs`): the next countdown in objects (at least 1, below 2^63) and
/// whether the object that ran it out is sampled. `gen` is the rate generation the
/// countdown was drawn for, which this updates: a countdown drawn for an earlier rate
/// (or while off) is redrawn, counting this object in, before it may sample. A busy
/// thread samples nothing.
#[cold]
#[inline(never)]
pub(crate) fn expired(size: usize, gen: &mut u32) -> (u64, bool) {
    // Acquire: as in `due`.
    let rate = RATE.load(Ordering::Acquire);
    if rate == 0 {
        return (objects(OFF_COUNTDOWN, size), false);
    }
    // Rate 1: every object is sampled.
    if rate == 1 {
        return (1, LOCAL.try_with(|l| !l.busy.get()).unwrap_or(false));
    }
    LOCAL
        .try_with(|l| {
            let now = RATE_GEN.load(Ordering::Relaxed) as u32;
            if *gen != now {
                *gen = now;
                // The draw's byte falls in the `k`th object from this one: this is the
                // first.
                let k = objects(draw(l, rate), size);
                if k > 1 {
                    return (k - 1, false);
                }
            }
            (objects(draw(l, rate), size), !l.busy.get())
        })
        .unwrap_or((objects(OFF_COUNTDOWN, size), false))
}

/// The objects of `size` bytes up to and including the one that holds byte `bytes`
/// (from 1) of their run: the countdown in objects of a draw in bytes.
fn objects(bytes: usize, size: usize) -> u64 {
    (bytes.div_ceil(size.max(1)) as u64).clamp(1, 1 << 62)
}

/// Counts down a large block of `size` bytes while profiling is
/// on: true if it is the one sampled (the caller then allocates the block it records
/// with [`record_sample`]).
#[inline]
pub(crate) fn due(size: usize) -> bool {
    // Acquire: pairs with `set_rate`'s Release, so that this thread's record happens
    // after the store of `WATCHING`, which sends the frees of large blocks to the hook.
    let rate = RATE.load(Ordering::Acquire);
    if rate == 0 {
        return false;
    }
    LOCAL
        .try_with(|l| {
            if l.busy.get() {
                return false;
            }
            let next = l.next.get();
            if rate != 1 && size < next && l.gen.get() == RATE_GEN.load(Ordering::Relaxed) {
                l.next.set(next - size);
                return false;
            }
            due_slow(l, size, rate)
        })
        .unwrap_or(false)
}

/// `due` when the countdown runs out, the rate changed (a new draw first) or the rate
/// is 1.
#[cold]
#[inline(never)]
fn due_slow(l: &Local, size: usize, rate: usize) -> bool {
    let gen = RATE_GEN.load(Ordering::Relaxed);
    if l.gen.get() != gen {
        l.gen.set(gen);
        let next = draw(l, rate);
        if rate != 1 && size < next {
            l.next.set(next - size);
            return false;
        }
    }
    l.next.set(draw(l, rate));
    true
}

/// Records the sampled block `p` of `size` bytes (asked for): its stack, walked with
/// the thread marked busy.
#[cold]
#[inline(never)]
pub(crate) fn record_sample(p: *mut u8, size: usize) {
    let was = LOCAL.try_with(|l| l.busy.replace(true)).unwrap_or(true);
    if was {
        return;
    }
    record(p, size);
    super::periodic_write();
    let _ = LOCAL.try_with(|l| l.busy.set(false));
}

/// A large block of `size` bytes at `p` (null: failed) allocated by a path that does
/// not give sampled objects a block of their own (a large resize): counted down, and
/// recorded if sampled.
#[inline]
fn after_alloc_large(p: *mut u8, size: usize) {
    if !p.is_null() && due(size) {
        record_sample(p, size);
    }
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

/// A block of its own for a sampled small object of `bytes` bytes (its class's size),
/// zeroed if `zero`, or null if there is none (`blocks.rs`).
pub(crate) fn block(bytes: usize, zero: bool) -> *mut u8 {
    table::alloc_block(bytes, zero)
}

/// The free of a sampled small object (`blocks::contains(p)`): counted in its bucket,
/// its block taken back.
#[cold]
#[inline(never)]
pub(crate) fn free_block(p: *mut u8) {
    table::free_block(p);
}

/// Before the large block at `p` is freed while profiling was on (`watching`): if it
/// was sampled, its free is counted in its bucket.
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
    after_alloc_large(q, new_size);
    q
}
