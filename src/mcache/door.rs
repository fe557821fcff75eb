//! The door of a thread-cache record: its state and the notes visitors need, and the
//! owner's side of the protocol (`open` when the cache comes to life, `exit`, and
//! `reattach` after a visit). The protocol and the visitor's side are in `global/idle.rs`. The
//! door is a field of every record and the owner runs its side from the cache's own
//! life cycle (`lifecycle.rs`), so it lives with the cache; the visitor, above the
//! caches, reads the doors and the registry of records here.

use core::sync::atomic::{
    AtomicI32, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use super::MCache;
use crate::sizeclasses::NUM_CLASSES;

/// Not a thread's record yet.
const UNUSED: u8 = 0;
/// A live thread's record; visitors may claim it.
pub(crate) const OPEN: u8 = 1;
/// A visitor has claimed it (reclaim lock held).
pub(crate) const CLAIMED: u8 = 2;
/// Its thread exited (or it was taken as an orphan): never visited again until reused.
pub(crate) const EXITED: u8 = 3;
/// In a fork child, a record of a thread that was not copied.
pub(crate) const ORPHAN: u8 = 4;

/// `Door::tick_seen` before a visit has seen the class.
pub(crate) const NOT_SEEN: u32 = u32::MAX;

/// The door of one cache record (see `global/idle.rs`'s documentation).
pub(crate) struct Door {
    /// UNUSED, OPEN, CLAIMED, EXITED or ORPHAN. The owner moves it OPEN -> EXITED
    /// (and sets OPEN at creation); a visitor OPEN/ORPHAN -> CLAIMED -> OPEN/EXITED.
    pub(crate) state: AtomicU8,
    /// How deep the owner is in slow paths that use the record. Written by the owner,
    /// or by a visitor holding the door (Relaxed: a visitor reads it only while the
    /// owner is not running, and restores what it changes).
    pub(crate) slow: AtomicU32,
    /// The owner's kernel thread id. Owner, before OPEN (Release).
    pub(crate) tid: AtomicI32,
    /// The address of the owner's thread-local cache slot, and the value meaning "the
    /// empty cache" there. Owner, before OPEN.
    pub(crate) slot: AtomicUsize,
    pub(crate) empty: AtomicUsize,
    /// Signals 1..=64 the owner had blocked when it created the cache. Owner, before
    /// OPEN.
    pub(crate) sigmask: AtomicU64,
    /// The visitors' notes (reclaim lock): the owner's context switches when a visit
    /// first saw that count, and when (coarse ms); when it was last visited.
    pub(crate) seen_switches: AtomicU64,
    pub(crate) seen_at: AtomicU32,
    pub(crate) visited_at: AtomicU32,
    /// 1: a visitor took everything and the owner has not been back (nothing to visit).
    /// Set by a visitor, cleared by the owner's `reattach`.
    pub(crate) flushed: AtomicU8,
    /// Per class, the free stack's depth after the last visit (reclaim lock).
    pub(crate) low: [AtomicU16; NUM_CLASSES],
    /// Per class, the entry's `tick` (truncated) after the last visit, or `NOT_SEEN`:
    /// the same tick at the next visit means no allocation of the class in between, so
    /// none took from the stack (reclaim lock).
    pub(crate) tick_seen: [AtomicU32; NUM_CLASSES],
    /// Per class, the free stack's depth as of the class's last slow path (or visit):
    /// for the statistics' estimate of what threads hold. Written by the owner (or a
    /// visitor holding the door), read by anyone (Relaxed: an estimate).
    pub(crate) depth: [AtomicU16; NUM_CLASSES],
    /// Bytes the record's free stacks and remote buffers held after the last visit that
    /// got in; `u64::MAX` before the first (reclaim lock).
    pub(crate) held: AtomicU64,
    /// Next record in the registry (set once, before publication).
    pub(crate) next: AtomicPtr<MCache>,
    /// What this record's flushes did on the remote-free path, cumulative over every
    /// thread that used the record (never reset): objects, span bitmap `fetch_or`s,
    /// span state-word `fetch_add`s, mcentral announcements. Written by the owner (or a
    /// visitor holding the door) with a load and a store, read by anyone (Relaxed).
    #[cfg(not(spanheap_loom))]
    pub(crate) remote: [AtomicU64; 4],
}

impl Door {
    pub(crate) const fn new() -> Self {
        Door {
            state: AtomicU8::new(UNUSED),
            slow: AtomicU32::new(0),
            tid: AtomicI32::new(0),
            slot: AtomicUsize::new(0),
            empty: AtomicUsize::new(0),
            sigmask: AtomicU64::new(0),
            seen_switches: AtomicU64::new(u64::MAX),
            seen_at: AtomicU32::new(0),
            visited_at: AtomicU32::new(0),
            flushed: AtomicU8::new(0),
            low: [const { AtomicU16::new(0) }; NUM_CLASSES],
            tick_seen: [const { AtomicU32::new(NOT_SEEN) }; NUM_CLASSES],
            depth: [const { AtomicU16::new(0) }; NUM_CLASSES],
            held: AtomicU64::new(u64::MAX),
            next: AtomicPtr::new(core::ptr::null_mut()),
            #[cfg(not(spanheap_loom))]
            remote: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// Adds a flush's remote-path counts (see `remote`).
    #[cfg(not(spanheap_loom))]
    #[inline]
    pub(crate) fn count_remote(&self, v: [u64; 4]) {
        for (c, v) in self.remote.iter().zip(v) {
            if v != 0 {
                c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
            }
        }
    }

    /// The owner enters a slow path that uses its record; returns the depth to restore.
    #[inline]
    pub(crate) fn enter_slow(&self) -> u32 {
        let d = self.slow.load(Ordering::Relaxed);
        self.slow.store(d + 1, Ordering::Relaxed);
        d
    }

    /// Records that class `class`'s free stack holds `n` objects (at a slow path).
    #[inline]
    pub(crate) fn publish_depth(&self, class: usize, n: u32) {
        self.depth[class].store(n.min(u32::from(u16::MAX)) as u16, Ordering::Relaxed);
    }

    /// The owner leaves the slow path entered with `enter_slow` (which returned `d`).
    #[inline]
    pub(crate) fn exit_slow(&self, d: u32) {
        self.slow.store(d, Ordering::Relaxed);
    }
}

/// Every record that ever had a door opened, linked through `Door::next` (records
/// are never unmapped; a reused record keeps its place).
#[cfg(not(spanheap_loom))]
pub(crate) static RECORDS: AtomicPtr<MCache> = AtomicPtr::new(core::ptr::null_mut());

#[cfg(not(spanheap_loom))]
pub(crate) fn door<'a>(c: *mut MCache) -> &'a Door {
    // SAFETY: records are never unmapped; the door is only used atomically.
    unsafe { &(*c).door }
}

/// The remote-path counts of every record, summed (see `Door::remote`).
#[cfg(not(spanheap_loom))]
pub(crate) fn remote_totals() -> [u64; 4] {
    let mut t = [0u64; 4];
    // Acquire: pairs with `open`'s Release push.
    let mut c = RECORDS.load(Ordering::Acquire);
    while !c.is_null() {
        let d = door(c);
        for (t, r) in t.iter_mut().zip(&d.remote) {
            *t = t.wrapping_add(r.load(Ordering::Relaxed));
        }
        c = d.next.load(Ordering::Acquire);
    }
    t
}

/// The calling thread's record `c` becomes its live cache: notes what visitors need
/// and opens the door. `first`: the record was never registered.
#[cfg(not(spanheap_loom))]
pub(crate) fn open(c: *mut MCache, first: bool) {
    let d = door(c);
    // SAFETY: gettid has no preconditions.
    d.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    let (slot, empty) = super::tls::cache_slot();
    d.slot.store(slot, Ordering::Relaxed);
    d.empty.store(empty, Ordering::Relaxed);
    d.sigmask.store(blocked_signals(), Ordering::Relaxed);
    d.seen_switches.store(u64::MAX, Ordering::Relaxed);
    d.flushed.store(0, Ordering::Relaxed);
    d.held.store(u64::MAX, Ordering::Relaxed);
    for l in d.low.iter().chain(&d.depth) {
        l.store(0, Ordering::Relaxed);
    }
    // Release: a visitor that sees OPEN (Acquire) sees the fields above.
    d.state.store(OPEN, Ordering::Release);
    if first {
        crate::sync::push_linked(&RECORDS, c, &d.next, Ordering::Release);
    }
}

/// The owner of `c` is exiting: waits for a visit in progress to end, then closes
/// the door for good.
#[cfg(not(spanheap_loom))]
pub(crate) fn exit(c: *mut MCache) {
    let d = door(c);
    let mut w = crate::sync::SpinWait::new();
    // Acquire: the visitor's work on the record happens-before our exit path.
    while d
        .state
        .compare_exchange(OPEN, EXITED, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        if d.state.load(Ordering::Relaxed) != CLAIMED {
            return; // not open (never opened): nothing to close
        }
        w.spin();
    }
}

/// In a slow path of a thread whose cache slot is empty although its cache is live:
/// a visitor closed the door. Waits for the visit to end and re-installs the record
/// (the exit key's value). None if the thread has no record (it never had one).
#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
pub(crate) fn reattach() -> Option<*mut MCache> {
    let c = super::own_record()?;
    let d = door(c);
    let mut w = crate::sync::SpinWait::new();
    // Acquire: pairs with the visitor's Release when it reopens, so its work on
    // the record happens-before ours.
    while d.state.load(Ordering::Acquire) == CLAIMED {
        w.spin();
    }
    d.flushed.store(0, Ordering::Relaxed);
    super::tls::set_cache(c);
    Some(c)
}

/// Signals 1..=64 blocked in the calling thread, as a bit mask (bit n-1: signal n,
/// as `/proc`'s `SigBlk` shows them).
#[cfg(not(spanheap_loom))]
fn blocked_signals() -> u64 {
    // SAFETY: reading this thread's mask into a local set; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = core::mem::zeroed();
        if libc::pthread_sigmask(libc::SIG_BLOCK, core::ptr::null(), &mut set) != 0 {
            return u64::MAX; // unknown: never matches, so never visited
        }
        (1..=64).fold(0u64, |m, s| {
            m | (u64::from(libc::sigismember(&set, s) == 1) << (s - 1))
        })
    }
}
