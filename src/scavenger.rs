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
//! **The background thread** (on by default; Go's `bgscavenge`, in `bgscavenge.rs`:
//! it drives the process-wide heap, so it lives above it, reached here through the
//! `Background` hooks the heap is built with). It is started lazily,
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
    /// Free memory kept committed regardless of age, in percent of the heap in use
    /// (the pages of heap spans; the allocator's own record chunks do not count;
    /// default 10, environment `SPANHEAP_RETAIN_PERCENT`).
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
    /// pass runs (claimed by CAS, so one thread scavenges at a time); `NOT_STARTED` in
    /// the process-wide heap until its first slow path. Relaxed: it only steers who
    /// works when; the pages are protected by the heap lock.
    pub(crate) next_due: AtomicU64,
    /// The heap's background thread (the process-wide heap's; none for others).
    pub(crate) bg: Background,
    /// Under loom, which has no clock: whether a model asked for passes
    /// (`__private::PageHeap::scavenge_soon`). A plain atomic, so that models that do
    /// not ask see no extra step.
    #[cfg(spanheap_loom)]
    pub(crate) model_due: core::sync::atomic::AtomicBool,
}

/// `Scavenger::next_due` of the process-wide heap before its first slow path: that path
/// only schedules the first pass (a quarter of the delay later). A pass at a process's
/// first allocation finds nothing to return and no idle thread, and its visit read the
/// thread's own `/proc` files: two `openat`s and reads at every start of a short-lived
/// program (issue 27).
pub(crate) const NOT_STARTED: u64 = 1;

/// How long after a pass that finished its work the next one is due (ns): a quarter of
/// the delay `delay_ms`, between 10 ms and 1 s.
pub(crate) fn quiet_wait_ns(delay_ms: u32) -> u64 {
    (u64::from(delay_ms) * 250_000).clamp(10_000_000, 1_000_000_000)
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
                next_due: AtomicU64::new(if env && !cfg!(spanheap_loom) {
                    NOT_STARTED
                } else {
                    0
                }),
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
