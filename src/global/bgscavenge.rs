//! The process-wide heap's background scavenger thread (`scavenger.rs` has the
//! settings and pacing every heap has; this is the thread that drives the global heap's
//! passes, so it sits above the heap and the thread caches it visits, beside `lib.rs`).
//!
//! Parking: the thread stores `PARKED` in `STATE`, then looks for work under the
//! heap lock, and waits on the futex only if it found none. A free adds its pages
//! under the heap lock and reads `STATE` afterwards; the lock orders the two, so
//! either the thread's look sees the pages or the free sees `PARKED`, swaps it for
//! `RUNNING` and wakes the futex (a wait that starts after the swap returns at once,
//! the word no longer being `PARKED`). The state is process bookkeeping outside the
//! modelled core (core atomics, Relaxed: the heap lock provides the ordering).

use core::sync::atomic::{AtomicU32, Ordering};

use super::HEAP;
use crate::scavenger::{Background, BG_BURST_NS, BG_CPU_PERCENT, PASS_BUDGET_NS};

/// Not running (never started, turned off, or in a fork child).
const STOPPED: u32 = 0;
/// Running a pass or deciding what to do next (also while being started).
const RUNNING: u32 = 1;
/// Waiting on the futex for a free that leaves work (no timeout).
const PARKED: u32 = 2;
/// Waiting on the futex until a time (work that is not due yet).
const SLEEPING: u32 = 3;
/// Waiting on the futex until a time, after looks that found only busy threads'
/// caches (a longer wait): a free that leaves work ends it, as it ends `PARKED`.
const DOZING: u32 = 4;
/// The thread's state, and the futex word it waits on.
static STATE: AtomicU32 = AtomicU32::new(STOPPED);

/// The process-wide heap's hooks.
pub(crate) const HOOKS: Background = Background {
    exists: true,
    start,
    running,
    wake,
    nudge,
    visit: super::idle::visit_threads,
};

/// Starts the background scavenger thread unless it runs. Returns whether it runs.
/// Uses `pthread_create` directly (std's threads would allocate through the global
/// allocator, and this may be called from inside it). No allocator lock may be held.
pub(crate) fn start() -> bool {
    if STATE
        .compare_exchange(STOPPED, RUNNING, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return true;
    }
    // SAFETY: plain pthread calls with valid pointers; the thread function has the
    // right signature and ignores its argument. A small stack: the thread's frames
    // are shallow (the scavenger's batch arrays are the largest, a few KiB).
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 256 << 10);
        let mut t: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut t, &attr, main, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            STATE.store(STOPPED, Ordering::Relaxed);
            return false;
        }
        libc::pthread_detach(t);
    }
    true
}

/// Whether the background thread is running.
pub(crate) fn running() -> bool {
    STATE.load(Ordering::Relaxed) != STOPPED
}

/// Whether the background thread is parked with no timeout (for tests).
pub(crate) fn parked() -> bool {
    STATE.load(Ordering::Relaxed) == PARKED
}

/// See `Background::wake`.
fn wake(start_wanted: bool) {
    match STATE.load(Ordering::Relaxed) {
        s @ (PARKED | DOZING)
            if STATE
                .compare_exchange(s, RUNNING, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok() =>
        {
            futex_wake()
        }
        STOPPED if start_wanted => HEAP.scavenger.make_due(),
        _ => {}
    }
}

/// See `Background::nudge`.
fn nudge() {
    for from in [PARKED, SLEEPING, DOZING] {
        if STATE
            .compare_exchange(from, RUNNING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            futex_wake();
        }
    }
}

/// In the child of a fork: the thread was not copied.
pub(crate) fn fork_child_reset() {
    STATE.store(STOPPED, Ordering::Relaxed);
}

fn futex_wake() {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32; no other memory is touched.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            STATE.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

/// Waits while `STATE` is `state` (set by the caller), for at most `ns` if given.
/// Returns early on a wake, a signal or a spurious wake-up; the caller looks again.
fn futex_wait(state: u32, ns: Option<u64>) {
    let ts = ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let tp = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 with a valid (or null) relative
    // timeout; no other memory is touched.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            STATE.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            state,
            tp,
        );
    }
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

extern "C" fn main(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: blocking every signal in this thread only (they go to the program's
    // threads), and naming it; both take valid pointers.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, core::ptr::null_mut());
        libc::pthread_setname_np(libc::pthread_self(), c"spanheap-scav".as_ptr());
    }
    // Register for the heavy barrier now (the registration waits for an RCU grace
    // period, tens of milliseconds): a visit's two looks at a thread must be close
    // together, and the first visit made them a registration apart, long enough for
    // a thread that wakes every few milliseconds to run in between.
    crate::sync::heavy_barrier();
    // The CPU budget: a token bucket of CPU nanoseconds, filled at BG_CPU_PERCENT
    // of the time that passes, holding at most BG_BURST_NS, emptied by the CPU
    // time each pass takes.
    let mut tokens = BG_BURST_NS;
    let mut last = crate::os::now_ns();
    // How many times in a row a look at other threads' caches found only caches
    // in use: the first few looks come a quarter of the delay apart (a cache idle
    // for the delay is taken within 1.25 delays), later ones twice as far apart
    // each time, up to 16 delays (a busy program costs few wakeups).
    let mut backoff = 0u32;
    loop {
        if !HEAP.scavenger.background() {
            STATE.store(STOPPED, Ordering::Relaxed);
            // Turned back on meanwhile, and nobody started another: go on.
            if !HEAP.scavenger.background()
                || STATE
                    .compare_exchange(STOPPED, RUNNING, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                // The slow paths take over (set_config made them due).
                return core::ptr::null_mut();
            }
        }
        let Some(delay) = HEAP.scavenger.delay_ms() else {
            // Automatic returning off: nothing to do until the settings change.
            park(None);
            continue;
        };
        let now = crate::os::now_ns();
        tokens = (tokens + (now - last) * BG_CPU_PERCENT / 100).min(BG_BURST_NS);
        last = now;
        if tokens < PASS_BUDGET_NS {
            // Over budget: wait until a whole pass is paid for.
            sleep((PASS_BUDGET_NS - tokens) * 100 / BG_CPU_PERCENT, SLEEPING);
            continue;
        }
        let cpu = thread_cpu_ns();
        let coarse = crate::os::coarse_now_ns();
        let look = HEAP.background_pass(coarse, delay);
        tokens = tokens.saturating_sub(thread_cpu_ns() - cpu);
        if look.more {
            continue;
        }
        if look.taken != 0 {
            backoff = 0;
        }
        // Nothing more now. Sleep until the first free chunk becomes old enough, or
        // until other threads' caches may have gone idle; park if neither. While
        // free pages are waiting for their age anyway, caches are looked at every
        // quarter of the delay, so that a cache last used in a burst of frees is
        // known idle (and its pages returned) within a quarter delay of the pages
        // freed with it. With only caches left to look at, the looks back off:
        // a thread that keeps using its cache costs ever fewer wakeups.
        let caches = (look.pending != 0).then(|| {
            let quarter = u64::from(delay) / 4;
            if look.wait_ms.is_some() {
                return quarter;
            }
            let ms = quarter << backoff.saturating_sub(4).min(6);
            backoff += 1;
            ms
        });
        // Only a long wait (backing off) may be cut short by a free: while frees
        // come in bulk, each would otherwise wake the thread.
        let doze = if backoff > 5 { DOZING } else { SLEEPING };
        let (wait_ms, state) = match (look.wait_ms, caches) {
            (Some(a), Some(b)) if b < u64::from(a) => (Some(b), doze),
            (Some(a), _) => (Some(u64::from(a)), SLEEPING),
            (None, b) => (b, doze),
        };
        match wait_ms {
            Some(ms) => {
                if sleep(ms.max(1) * 1_000_000 + 1_000_000, state) {
                    backoff = 0;
                }
            }
            None => {
                backoff = 0;
                park(Some(delay));
            }
        }
    }
}

/// Sleeps for `ns` as `state` (SLEEPING or DOZING) unless woken; returns whether
/// something woke it (a settings change, or for DOZING a free that left work).
fn sleep(ns: u64, state: u32) -> bool {
    if STATE
        .compare_exchange(RUNNING, state, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return true;
    }
    futex_wait(state, Some(ns));
    // Still ours: the time ran out (or a spurious wake-up); otherwise a waker set
    // RUNNING.
    STATE
        .compare_exchange(state, RUNNING, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
}

/// Parks until a free leaves work (see the module's documentation), unless there is
/// work already; `delay`: the setting, to judge that (None: never any).
fn park(delay: Option<u32>) {
    if STATE
        .compare_exchange(RUNNING, PARKED, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // After PARKED is stored: a free from now on either is seen here or sees PARKED.
    let now = crate::os::coarse_now_ns();
    if delay.is_some_and(|d| HEAP.scavenge_wait(now, d).is_some()) {
        let _ = STATE.compare_exchange(PARKED, RUNNING, Ordering::Relaxed, Ordering::Relaxed);
        return;
    }
    while STATE.load(Ordering::Relaxed) == PARKED {
        futex_wait(PARKED, None);
    }
}
