//! The scavenger: gives free memory back to the OS (Go's `mgcscavenge.go`, reshaped
//! for an allocator whose program frees explicitly and has no GC cycle to pace by).
//!
//! # What is returned, and when
//!
//! Free page runs are returned with `madvise(MADV_DONTNEED)` (see `os.rs` for why not
//! `MADV_FREE`: RSS drops at once, and the pages read back as zero, so a later
//! `alloc_zeroed` of them needs no clearing). The page allocator keeps, per 4 MiB
//! chunk, a dirty mark and the time of the last free into it (`pagealloc.rs`). A
//! *paced pass* returns, from the top of the heap down:
//!
//! - only pages in chunks nobody has freed into for at least the **delay** (default
//!   1 s): memory a program frees and takes again (a request buffer, a `Vec` grown and
//!   dropped in a loop) keeps its chunk young and is never returned, so there is no
//!   madvise per operation;
//! - only beyond a **retained headroom** of free memory (default 10% of the pages in
//!   use), so that a heap oscillating around its size keeps a cushion;
//! - never from *dense* chunks (at least 31/32 of their pages in use), whose few free
//!   pages are not worth breaking up the huge pages behind them.
//!
//! [`release_memory`](crate::release_memory) returns every free page now, ignoring all
//! three (Go's `debug.FreeOSMemory`).
//!
//! # Pacing and cost
//!
//! Passes are driven from the allocator's own slow paths (refilling a size class,
//! flushing a full local free list, large allocations and frees that reach the page
//! heap, not those served by the thread's large-block cache): each checks a coarse
//! clock against `next_due` (one vDSO read and one load) and, if due, one thread claims
//! the pass. A pass works for at most [`PASS_BUDGET_NS`]; if work remains, the next
//! pass is due after [`BACKLOG_WAIT`] (4) times the time spent, so the scavenger takes
//! at most about a fifth of the time of the threads that drive it while it has a
//! backlog, and delays any one allocation by at most about 2 ms. Otherwise the next pass is due a quarter
//! of the delay later. A page freed at time `t` is therefore returned between
//! `t + delay` and about `t + 1.25 * delay` plus the time to work off a backlog
//! (1 GiB takes ~64 ms of madvise in all), as long as the program reaches a slow path
//! now and then. A program that goes quiet reaches none; the optional background
//! thread covers that case. Nothing is started behind the program's back unless asked
//! for (`SPANHEAP_BACKGROUND_SCAVENGER=1` or [`ScavengerConfig::background`]).
//!
//! # Synchronisation
//!
//! The knobs and `next_due` are plain Relaxed atomics: they only steer heuristics, and
//! the pages a pass works on are protected by the heap lock (taken to pick pages and
//! to give them back, never held across the madvise). A stale knob only makes one
//! pass use the previous setting.

use core::time::Duration;

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Default delay before a free page is returned to the OS, in milliseconds.
pub(crate) const DEFAULT_DELAY_MS: u32 = 1000;
/// Default headroom of free memory kept committed, in percent of the pages in use.
pub(crate) const DEFAULT_RETAIN_PERCENT: u32 = 10;
/// The longest a paced pass works before it stops (and lets the program go on).
pub(crate) const PASS_BUDGET_NS: u64 = 2_000_000;
/// After a pass that stopped with work left, the next one waits this many times as
/// long as the pass took (bounds the scavenger's share of the driving threads' time).
pub(crate) const BACKLOG_WAIT: u64 = 4;
/// `delay_ms` value meaning "automatic scavenging off".
const OFF: u32 = u32::MAX;

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
    /// Run a background thread that scavenges on its own schedule, for programs that
    /// go idle after freeing (default off, environment
    /// `SPANHEAP_BACKGROUND_SCAVENGER=1`). Turning it off stops the thread within one
    /// of its sleeps (at most 100 ms).
    pub background: bool,
}

impl Default for ScavengerConfig {
    fn default() -> Self {
        ScavengerConfig {
            delay: Some(Duration::from_millis(DEFAULT_DELAY_MS as u64)),
            retain_percent: DEFAULT_RETAIN_PERCENT,
            background: false,
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
    /// Starts the background thread (the process-wide heap's); returns whether it runs.
    spawn: fn() -> bool,
    /// Under loom, which has no clock: whether a model asked for passes
    /// (`__private::PageHeap::scavenge_soon`). A plain atomic, so that models that do
    /// not ask see no extra step.
    #[cfg(spanheap_loom)]
    pub(crate) model_due: core::sync::atomic::AtomicBool,
}

impl Scavenger {
    crate::sync::const_fn! {
        /// Default settings; `env`: read the `SPANHEAP_*` variables on first use (the
        /// process-wide heap) or not (heaps built by tests). `spawn` starts a
        /// background thread for this heap.
        pub(crate) fn new(env: bool, spawn: fn() -> bool) -> Self {
            Scavenger {
                delay_ms: AtomicU32::new(DEFAULT_DELAY_MS),
                retain_percent: AtomicU32::new(DEFAULT_RETAIN_PERCENT),
                background: AtomicU32::new(0),
                env: AtomicU32::new(if env { 0 } else { 2 }),
                next_due: AtomicU64::new(0),
                spawn,
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

    pub(crate) fn background(&self) -> bool {
        self.load_env_once();
        self.background.load(Ordering::Relaxed) != 0
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
    /// slow path run a pass with it. Starts the background thread if asked for;
    /// returns false if it could not be started.
    pub(crate) fn set_config(&self, c: ScavengerConfig) -> bool {
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
        let due = self.next_due.load(Ordering::Relaxed);
        if due != u64::MAX {
            let _ = self
                .next_due
                .compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
        !c.background || (self.spawn)()
    }

    /// Reads the `SPANHEAP_*` variables once (without allocating), and starts the
    /// background thread if the environment asks for it.
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
        let start = self.read_env();
        self.env.store(2, Ordering::Relaxed);
        if start {
            (self.spawn)();
        }
    }
}

impl Scavenger {
    /// Applies the `SPANHEAP_*` variables; returns whether the background thread is
    /// asked for.
    #[cfg(not(spanheap_loom))]
    fn read_env(&self) -> bool {
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
        let bg = env(c"SPANHEAP_BACKGROUND_SCAVENGER").is_some_and(|v| v != b"0" && !v.is_empty());
        if bg {
            self.background.store(1, Ordering::Relaxed);
        }
        bg
    }

    /// Loom models have no environment.
    #[cfg(spanheap_loom)]
    fn read_env(&self) -> bool {
        false
    }
}

/// The value of an environment variable, without allocating.
#[cfg(not(spanheap_loom))]
fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv with a NUL-terminated name returns null or a pointer to a
    // NUL-terminated string in the environment, which we only read (the environment
    // is not modified concurrently by well-behaved programs; std's `set_var` has the
    // same caveat).
    unsafe {
        let v = libc::getenv(name.as_ptr());
        if v.is_null() {
            return None;
        }
        Some(core::ffi::CStr::from_ptr(v).to_bytes())
    }
}

/// A decimal `u32`, or None.
fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    u32::try_from(v).ok()
}

/// Heaps without a background thread (tests' heaps, loom).
pub(crate) fn no_spawn() -> bool {
    false
}

// ---------------------------------------------------------------------------------------
// The optional background thread (process-wide heap only).
// ---------------------------------------------------------------------------------------

#[cfg(not(spanheap_loom))]
pub(crate) mod background {
    // Process-wide thread bookkeeping, outside the modelled core (core atomics).
    use core::sync::atomic::{AtomicU32, Ordering};

    use crate::global::HEAP;

    /// 1 while the thread runs (or is being started).
    static RUNNING: AtomicU32 = AtomicU32::new(0);
    /// The longest the thread sleeps, so that it notices a new setting promptly.
    const MAX_SLEEP_NS: u64 = 100_000_000;

    /// Starts the background scavenger thread unless it runs. Returns whether it runs.
    /// Uses `pthread_create` directly (std's threads would allocate through the global
    /// allocator, and this may be called from inside it).
    pub(crate) fn start() -> bool {
        if RUNNING.swap(1, Ordering::Relaxed) == 1 {
            return true;
        }
        // SAFETY: plain pthread calls with valid pointers; the thread function has the
        // right signature and ignores its argument.
        unsafe {
            let mut t: libc::pthread_t = 0;
            if libc::pthread_create(&mut t, core::ptr::null(), main, core::ptr::null_mut()) != 0 {
                RUNNING.store(0, Ordering::Relaxed);
                return false;
            }
            libc::pthread_detach(t);
        }
        true
    }

    /// In the child of a fork: the thread was not copied.
    pub(crate) fn fork_child_reset() {
        RUNNING.store(0, Ordering::Relaxed);
    }

    /// Whether the background thread is running (for tests).
    pub(crate) fn running() -> bool {
        RUNNING.load(Ordering::Relaxed) == 1
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
        loop {
            if !HEAP.scavenger.background() {
                RUNNING.store(0, Ordering::Relaxed);
                // Turned back on meanwhile, and nobody started another: go on.
                if !HEAP.scavenger.background() || RUNNING.swap(1, Ordering::Relaxed) == 1 {
                    return core::ptr::null_mut();
                }
            }
            let now = crate::os::coarse_now_ns();
            let due = HEAP.scavenger.next_due.load(Ordering::Relaxed);
            if now >= due {
                HEAP.scavenge_due(now);
                continue;
            }
            let ns = (due - now).clamp(1_000_000, MAX_SLEEP_NS);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: ns as libc::c_long,
            };
            // SAFETY: a valid timespec; an early wake-up (signal) only shortens the sleep.
            unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_settings() {
        assert_eq!(parse_u32(b"0"), Some(0));
        assert_eq!(parse_u32(b"1500"), Some(1500));
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u32(b""), None);
        assert_eq!(parse_u32(b"12ms"), None);
        assert_eq!(parse_u32(b"-1"), None);
    }

    #[test]
    fn config_round_trips_and_off_is_none() {
        let s = Scavenger::new(false, no_spawn);
        assert_eq!(s.config(), ScavengerConfig::default());
        let c = ScavengerConfig {
            delay: Some(Duration::from_millis(250)),
            retain_percent: 0,
            background: false,
        };
        assert!(s.set_config(c));
        assert_eq!(s.config(), c);
        assert_eq!(s.delay_ms(), Some(250));
        let off = ScavengerConfig { delay: None, ..c };
        s.set_config(off);
        assert_eq!(s.delay_ms(), None);
        assert_eq!(s.config(), off);
        // A background thread that cannot be started is reported.
        assert!(!s.set_config(ScavengerConfig {
            background: true,
            ..c
        }));
    }
}
