//! The scavenger: gives free memory back to the OS (Go's `mgcscavenge.go`, reshaped
//! for an allocator whose program frees explicitly and has no GC cycle to pace by).
//!
//! # What is returned, and when
//!
//! Free page runs are returned with `madvise(MADV_DONTNEED)` (see `os.rs` for why not
//! `MADV_FREE`: RSS drops at once, and the pages read back as zero, so a later
//! `alloc_zeroed` of them needs no clearing). The page allocator keeps, per 4 MiB
//! chunk, a dirty mark and the time of the last free into it (`pagealloc/scav.rs`). A
//! *paced pass* returns, from the top of the heap down:
//!
//! - only pages in chunks nobody has freed into for at least the **delay** (default
//!   1 s): memory a program frees and takes again (a request buffer, a `Vec` grown and
//!   dropped in a loop) keeps its chunk young and is never returned, so there is no
//!   madvise per operation;
//! - only beyond a **retained headroom** of free memory (default 10% of the pages of
//!   heap spans in use: the program's heap, not the allocator's own record chunks), so
//!   that a heap oscillating around its size keeps a cushion;
//! - never from *dense* chunks (at least 31/32 of their pages in use), whose few free
//!   pages are not worth breaking up the huge pages behind them.
//!
//! [`release_memory`](crate::release_memory) returns every free page now, ignoring all
//! three (Go's `debug.FreeOSMemory`).
//!
//! # Who does the work
//!
//! **The background thread** (on by default; Go's `bgscavenge`). It is started lazily,
//! by the first slow path that finds more than [`START_BYTES`] of free committed memory
//! beyond the headroom: never at process start, never in a process that does not free
//! (small programs keep using the slow-path passes below). It then runs paced passes of
//! at most [`PASS_BUDGET_NS`] each, within a CPU budget of [`BG_CPU_PERCENT`]% of one
//! CPU on average (a token bucket of thread CPU time; an allowance saved up while there
//! was nothing to do, at most [`BG_BURST_NS`], lets it return a large burst at once:
//! `madvise` costs CPU time in proportion to what it returns; figures in
//! docs/benchmarks.md, "Figures moved from the design notes"). Between passes it sleeps until
//! the next free chunk becomes old enough, and when there is nothing left to return it
//! parks on a futex with no timeout: no periodic wakeups. A free that leaves more than
//! [`WAKE_BYTES`] of free committed memory beyond the headroom wakes it (one `futex`
//! call per parking, made by whichever free notices first). In a fork child it does
//! not exist; the child's first slow path that finds work starts it again. While it
//! runs, the slow paths do no passes. `SPANHEAP_BACKGROUND_SCAVENGER=0` (or
//! [`ScavengerConfig::background`] = false) turns it off; the trade-off: memory is then
//! returned only as the program reaches slow paths, so a program that frees a lot and
//! then does only light work keeps it.
//!
//! **Slow-path passes** (when the thread is off, not started yet, or could not be
//! started). Passes are driven from the allocator's own slow paths (refilling a size
//! class, flushing a full local free list, large allocations and frees that reach the
//! page heap, not those served by the thread's large-block cache): each checks a coarse
//! clock against `next_due` (one vDSO read and one load) and, if due, one thread claims
//! the pass. A pass works for at most [`PASS_BUDGET_NS`]; if work remains, the next
//! pass is due after [`BACKLOG_WAIT`] (4) times the time spent, so the scavenger takes
//! at most about a fifth of the time of the threads that drive it while it has a
//! backlog, and delays any one allocation by at most about 2 ms. Otherwise the next pass
//! is due a quarter of the delay later. A page freed at time `t` is therefore returned
//! between `t + delay` and about `t + 1.25 * delay` plus the time to work off a backlog,
//! as long as the program reaches a slow path now and then.
//!
//! # Synchronisation
//!
//! The knobs and `next_due` are plain Relaxed atomics: they only steer heuristics, and
//! the pages a pass works on are protected by the heap lock (taken to pick pages and
//! to give them back, never held across the madvise). A stale knob only makes one
//! pass use the previous setting.

use core::time::Duration;

#[cfg(not(spanheap_loom))]
use crate::env::{env, parse_u32};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Default delay before a free page is returned to the OS, in milliseconds.
pub(crate) const DEFAULT_DELAY_MS: u32 = 1000;
/// Default headroom of free memory kept committed, in percent of the pages of heap
/// spans in use.
pub(crate) const DEFAULT_RETAIN_PERCENT: u32 = 10;
/// The longest a paced pass works before it stops (and lets the program go on).
pub(crate) const PASS_BUDGET_NS: u64 = 2_000_000;
/// After a pass that stopped with work left, the next one waits this many times as
/// long as the pass took (bounds the scavenger's share of the driving threads' time).
pub(crate) const BACKLOG_WAIT: u64 = 4;
/// `delay_ms` value meaning "automatic scavenging off".
const OFF: u32 = u32::MAX;
/// `next_due` while the background thread does the passes (or will be started by the
/// next slow path that finds work, see `scavenge_due`): no slow path is due.
pub(crate) const BG_OWNED: u64 = u64::MAX - 1;
/// Free committed memory beyond the headroom that starts the background thread.
pub(crate) const START_BYTES: usize = 4 << 20;
/// Free committed memory beyond the headroom that wakes the parked background thread.
pub(crate) const WAKE_BYTES: usize = 1 << 20;
/// The background thread's average CPU budget, in percent of one CPU (Go's
/// `scavengePercent`).
pub(crate) const BG_CPU_PERCENT: u64 = 1;
/// The most CPU time (ns) the background thread may save up while idle and then spend
/// at once on a burst of freed memory.
pub(crate) const BG_BURST_NS: u64 = 100_000_000;

/// The scavenger's settings: see [`set_scavenger_config`](crate::set_scavenger_config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScavengerConfig {
    /// Free memory is returned to the OS once it has stayed free this long (rounded
    /// to milliseconds; default 1 s, environment `SPANHEAP_SCAVENGE_DELAY_MS`). `None`
    /// turns automatic returning off (environment `SPANHEAP_SCAVENGE_DELAY_MS=off`);
    /// [`release_memory`](crate::release_memory) still works.
    pub delay: Option<Duration>,
    /// Free memory kept committed regardless of age, in percent of the memory in use
    /// (default 10, environment `SPANHEAP_RETAIN_PERCENT`).
    pub retain_percent: u32,
    /// Let a background thread do the scavenging (default on; environment
    /// `SPANHEAP_BACKGROUND_SCAVENGER=0` turns it off). The thread is started only once
    /// there is free memory to return, costs at most about 1% of one CPU, and sleeps
    /// without wakeups while there is nothing to return. Off, memory is returned only
    /// from the allocator's slow paths, so a program that frees a lot and then does
    /// little keeps it. Turning it off stops the thread promptly.
    pub background: bool,
}

impl Default for ScavengerConfig {
    fn default() -> Self {
        ScavengerConfig {
            delay: Some(Duration::from_millis(DEFAULT_DELAY_MS as u64)),
            retain_percent: DEFAULT_RETAIN_PERCENT,
            background: true,
        }
    }
}

/// One heap's scavenger state: settings and pacing.
pub(crate) struct Scavenger {
    /// Delay in milliseconds before free pages are returned; [`OFF`]: never
    /// automatically. Relaxed: a setting.
    delay_ms: AtomicU32,
    /// Retained headroom in percent of pages in use. Relaxed: a setting.
    retain_percent: AtomicU32,
    /// Whether the background thread is wanted. Relaxed: a setting.
    background: AtomicU32,
    /// 0: the environment has not been read; 1: being read; 2: read (or not to be).
    env: AtomicU32,
    /// Coarse-clock time (ns) before which no paced pass starts; `u64::MAX` while a
    /// pass runs (claimed by CAS, so one thread scavenges at a time). Relaxed: it only
    /// steers who works when; the pages are protected by the heap lock.
    pub(crate) next_due: AtomicU64,
    /// The heap's background thread (the process-wide heap's; none for others).
    pub(crate) bg: Background,
    /// Under loom, which has no clock: whether a model asked for passes
    /// (`__private::PageHeap::scavenge_soon`). A plain atomic, so that models that do
    /// not ask see no extra step.
    #[cfg(spanheap_loom)]
    pub(crate) model_due: core::sync::atomic::AtomicBool,
}

impl Scavenger {
    crate::sync::const_fn! {
        /// Default settings; `env`: read the `SPANHEAP_*` variables on first use (the
        /// process-wide heap) or not (heaps built by tests). `bg`: the heap's
        /// background thread ([`NO_BACKGROUND`] for none; the setting is then ignored).
        pub(crate) fn new(env: bool, bg: Background) -> Self {
            Scavenger {
                delay_ms: AtomicU32::new(DEFAULT_DELAY_MS),
                retain_percent: AtomicU32::new(DEFAULT_RETAIN_PERCENT),
                background: AtomicU32::new(1),
                env: AtomicU32::new(if env { 0 } else { 2 }),
                next_due: AtomicU64::new(0),
                bg,
                #[cfg(spanheap_loom)]
                model_due: core::sync::atomic::AtomicBool::new(false),
            }
        }
    }

    /// In the child of a fork: a pass another thread's copy had claimed will never
    /// finish; let the child's slow paths claim passes again. Likewise a reading of the
    /// environment another thread's copy had started (`env == 1`) will never finish,
    /// and `set_scavenger_config` would wait for it forever: it is read again.
    #[cfg(not(spanheap_loom))]
    pub(crate) fn fork_child_reset(&self) {
        self.next_due.store(0, Ordering::Relaxed);
        // Relaxed: single-threaded now.
        let _ = self
            .env
            .compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Delay in milliseconds, or None if automatic scavenging is off.
    pub(crate) fn delay_ms(&self) -> Option<u32> {
        self.load_env_once();
        let d = self.delay_ms.load(Ordering::Relaxed);
        (d != OFF).then_some(d)
    }

    pub(crate) fn retain_percent(&self) -> u32 {
        self.load_env_once();
        self.retain_percent.load(Ordering::Relaxed)
    }

    /// Whether the background thread is wanted (the setting).
    pub(crate) fn background(&self) -> bool {
        self.load_env_once();
        self.background.load(Ordering::Relaxed) != 0
    }

    /// Whether passes are the background thread's to run: wanted, and this heap has
    /// one.
    pub(crate) fn background_wanted(&self) -> bool {
        self.bg.exists && self.background()
    }

    /// Free pages beyond the retained headroom that are not returned yet, given the
    /// pages of heap spans in use and the page allocator's free and scavenged counts.
    pub(crate) fn excess_pages(&self, in_use: usize, free: usize, scavenged: usize) -> usize {
        let keep = in_use.saturating_mul(self.retain_percent() as usize) / 100;
        (free - scavenged).saturating_sub(keep)
    }

    /// Called after a free that left `excess` bytes of free committed memory beyond the
    /// headroom (any lock may be held): wakes the parked background thread if there is
    /// enough to do, or asks the next slow path to start it.
    #[inline]
    pub(crate) fn note_excess(&self, excess: usize) {
        if excess >= WAKE_BYTES && self.background_wanted() {
            (self.bg.wake)(excess >= START_BYTES);
        }
    }

    /// Makes the next slow path evaluate the scavenger (`scavenge_due`): run a pass, or
    /// start the background thread. A pass in progress (`u64::MAX`) is left alone.
    pub(crate) fn make_due(&self) {
        let due = self.next_due.load(Ordering::Relaxed);
        if due != u64::MAX && due != 0 {
            let _ = self
                .next_due
                .compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// The settings now.
    pub(crate) fn config(&self) -> ScavengerConfig {
        ScavengerConfig {
            delay: self
                .delay_ms()
                .map(|ms| Duration::from_millis(u64::from(ms))),
            retain_percent: self.retain_percent(),
            background: self.background(),
        }
    }

    /// Applies `c` (after the environment, so that the call wins) and makes the next
    /// slow path look at the scavenger with it (run a pass, or start the background
    /// thread if there is work for it). A running background thread notices at once.
    pub(crate) fn set_config(&self, c: ScavengerConfig) {
        self.load_env_once();
        // If another thread is reading the environment right now, let it finish, or
        // it would overwrite this call's settings.
        while self.env.load(Ordering::Relaxed) != 2 {
            core::hint::spin_loop();
        }
        let ms = match c.delay {
            Some(d) => d.as_millis().min(u128::from(OFF - 1)) as u32,
            None => OFF,
        };
        self.delay_ms.store(ms, Ordering::Relaxed);
        self.retain_percent
            .store(c.retain_percent, Ordering::Relaxed);
        self.background
            .store(u32::from(c.background), Ordering::Relaxed);
        // Re-evaluate soon; a pass in progress (u64::MAX) sets its own next time.
        self.make_due();
        (self.bg.nudge)();
    }

    /// Reads the `SPANHEAP_*` variables once (without allocating).
    fn load_env_once(&self) {
        if self.env.load(Ordering::Relaxed) == 2 {
            return;
        }
        if self
            .env
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another thread is reading it; its values arrive in a moment, and until
            // then the defaults apply.
            return;
        }
        self.read_env();
        self.env.store(2, Ordering::Relaxed);
    }
}

impl Scavenger {
    /// Applies the `SPANHEAP_*` variables.
    #[cfg(not(spanheap_loom))]
    fn read_env(&self) {
        if let Some(v) = env(c"SPANHEAP_SCAVENGE_DELAY_MS") {
            if v == b"off" {
                self.delay_ms.store(OFF, Ordering::Relaxed);
            } else if let Some(ms) = parse_u32(v) {
                self.delay_ms.store(ms.min(OFF - 1), Ordering::Relaxed);
            }
        }
        if let Some(p) = env(c"SPANHEAP_RETAIN_PERCENT").and_then(parse_u32) {
            self.retain_percent.store(p, Ordering::Relaxed);
        }
        // "0" turns the thread off; any other value (or none) leaves it on.
        if env(c"SPANHEAP_BACKGROUND_SCAVENGER") == Some(b"0") {
            self.background.store(0, Ordering::Relaxed);
        }
    }

    /// Loom models have no environment.
    #[cfg(spanheap_loom)]
    fn read_env(&self) {}
}

/// A heap's background thread, as hooks (the thread itself is process-wide state,
/// outside the modelled core).
#[derive(Clone, Copy)]
pub(crate) struct Background {
    /// Whether the heap has one (the process-wide heap).
    pub(crate) exists: bool,
    /// Starts the thread unless it runs; returns whether it runs. No allocator lock may
    /// be held (`pthread_create` allocates).
    pub(crate) start: fn() -> bool,
    /// Whether the thread runs.
    pub(crate) running: fn() -> bool,
    /// There is memory to return: wakes the thread if it is parked; if it does not run
    /// and the argument says there is enough to start it for, asks the next slow path to
    /// start it. Any lock may be held.
    pub(crate) wake: fn(bool),
    /// The settings changed: wakes the thread from any sleep so that it sees them.
    pub(crate) nudge: fn(),
    /// Visits other threads' small-object caches (`idle::visit_threads`): `(force,
    /// now_ms, delay_ms)` -> (threads that gave something back, threads to look at
    /// again later). No allocator lock may be held.
    pub(crate) visit: fn(bool, u32, u32) -> (usize, usize),
}

/// No background thread (tests' heaps, loom).
pub(crate) const NO_BACKGROUND: Background = Background {
    exists: false,
    start: never,
    running: never,
    wake: |_| {},
    nudge: || {},
    visit: |_, _, _| (0, 0),
};

fn never() -> bool {
    false
}

// ---------------------------------------------------------------------------------------
// The background thread (process-wide heap only).
// ---------------------------------------------------------------------------------------

#[cfg(not(spanheap_loom))]
pub(crate) mod background {
    //! The process-wide heap's background scavenger thread.
    //!
    //! Parking: the thread stores `PARKED` in `STATE`, then looks for work under the
    //! heap lock, and waits on the futex only if it found none. A free adds its pages
    //! under the heap lock and reads `STATE` afterwards; the lock orders the two, so
    //! either the thread's look sees the pages or the free sees `PARKED`, swaps it for
    //! `RUNNING` and wakes the futex (a wait that starts after the swap returns at once,
    //! the word no longer being `PARKED`). The state is process bookkeeping outside the
    //! modelled core (core atomics, Relaxed: the heap lock provides the ordering).

    use core::sync::atomic::{AtomicU32, Ordering};

    use super::{BG_BURST_NS, BG_CPU_PERCENT, PASS_BUDGET_NS};
    use crate::global::HEAP;

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
    pub(crate) const HOOKS: super::Background = super::Background {
        exists: true,
        start,
        running,
        wake,
        nudge,
        visit: crate::idle::visit_threads,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_off_is_none() {
        let s = Scavenger::new(false, NO_BACKGROUND);
        assert_eq!(s.config(), ScavengerConfig::default());
        let c = ScavengerConfig {
            delay: Some(Duration::from_millis(250)),
            retain_percent: 0,
            background: false,
        };
        s.set_config(c);
        assert_eq!(s.config(), c);
        assert_eq!(s.delay_ms(), Some(250));
        let off = ScavengerConfig { delay: None, ..c };
        s.set_config(off);
        assert_eq!(s.delay_ms(), None);
        assert_eq!(s.config(), off);
        // A heap without a background thread never hands passes to one.
        s.set_config(ScavengerConfig {
            background: true,
            ..c
        });
        assert!(s.background() && !s.background_wanted());
    }
}
