//! Lock ranks: the one lock order of spanheap (Go's `lockrank.go`).
//!
//! Every [`Mutex`](crate::sync::Mutex) is built with a [`Rank`] from [`TABLE`]. A thread
//! may wait for a lock only if its rank is above the rank of every lock it holds; the
//! fork handler's *prepare* takes every lock in rank order. `docs/design.md` ("Lock
//! order") shows this table; a test checks that the two agree.
//!
//! With the `lockrank` feature each thread keeps the locks it holds in a small array
//! (a `thread_local!` with const initialisation and no destructor: it never allocates)
//! and a lock taken out of order prints both locks and aborts. `try_lock` never waits,
//! so it may take a lock out of order (the mcentral drain does): it is recorded, not
//! checked. Locks may be released in any order. Without the feature a rank is a
//! constant that nothing stores. Under loom the check is off.

use crate::sizeclasses::NUM_CLASSES;

/// A lock's place in the lock order: lower ranks are taken first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank(pub(crate) u16);

/// `MHeap::reclaim`: taking back idle threads' heap caches.
pub(crate) const RECLAIM: Rank = Rank(1);
/// `ConsistentStats::reader`: one statistics reader at a time.
pub(crate) const STATS_READER: Rank = Rank(2);
/// `SharedCache`: the cache of threads without one.
pub(crate) const SHARED: Rank = Rank(3);
/// `MCentral::lists` of class 1; class `c` has `CENTRAL.0 + c - 1` (see [`central`]).
const CENTRAL: Rank = Rank(4);
/// `Heap::records`: the thread-cache record allocator (`mcache/heap.rs`).
pub(crate) const CACHE_RECORDS: Rank = Rank(CENTRAL.0 + NUM_CLASSES as u16 - 1);
/// `MHeap::locked`: the heap lock.
pub(crate) const HEAP: Rank = Rank(CACHE_RECORDS.0 + 1);
/// `ConsistentStats::nop`: cache-less statistics writers, the reader's flip.
pub(crate) const STATS_NOP: Rank = Rank(HEAP.0 + 1);
/// `profile::table::TABLES`: the heap profile's buckets and sampled objects (a leaf:
/// nothing is allocated or locked under it).
#[cfg_attr(not(feature = "profile"), allow(dead_code))]
pub(crate) const PROFILE: Rank = Rank(STATS_NOP.0 + 1);

/// The rank of the mcentral lock of size class `class` (1..NUM_CLASSES): in class
/// order, so that the fork handler can hold them all.
pub(crate) const fn central(class: usize) -> Rank {
    Rank(CENTRAL.0 + class as u16 - 1)
}

/// One row of the lock order: ranks `first..=last`, the lock, where it is taken.
#[allow(dead_code)] // `taken` (and, without `lockrank`, the rest) is for the tests
pub(crate) struct Entry {
    pub(crate) first: Rank,
    pub(crate) last: Rank,
    pub(crate) name: &'static str,
    pub(crate) taken: &'static str,
}

/// The lock order, lowest rank first. `docs/design.md` has the same table.
pub(crate) const TABLE: [Entry; 8] = [
    Entry {
        first: RECLAIM,
        last: RECLAIM,
        name: "reclaim",
        taken: "scavenger passes (`reclaim_caches`), `release_memory`",
    },
    Entry {
        first: STATS_READER,
        last: STATS_READER,
        name: "stats reader",
        taken: "`stats()`",
    },
    Entry {
        first: SHARED,
        last: SHARED,
        name: "shared cache",
        taken: "allocation by a thread without a cache (no scavenger pass under it)",
    },
    Entry {
        first: central(1),
        last: central(NUM_CLASSES - 1),
        name: "mcentral",
        taken: "span refills and hand-offs, drains (one per class, in class order)",
    },
    Entry {
        first: CACHE_RECORDS,
        last: CACHE_RECORDS,
        name: "cache records",
        taken: "a thread cache's birth and death (record chunks come from the heap under it)",
    },
    Entry {
        first: HEAP,
        last: HEAP,
        name: "heap",
        taken: "page allocation and frees, records, scavenger take/return",
    },
    Entry {
        first: STATS_NOP,
        last: STATS_NOP,
        name: "stats nop",
        taken: "statistics sections of cache-less writers, the reader's flip",
    },
    Entry {
        first: PROFILE,
        last: PROFILE,
        name: "profile",
        taken: "a sampled allocation's record, the free of a sampled object, a profile snapshot",
    },
];

/// The row of [`TABLE`] that rank `r` falls in: the lock's *kind*, by which
/// `spanheap::lock_stats` sums the counts of the locks (`TABLE.len()` for none).
pub(crate) fn kind(r: Rank) -> usize {
    TABLE
        .iter()
        .position(|e| e.first <= r && r <= e.last)
        .unwrap_or(TABLE.len())
}

/// The name of the lock of rank `r`.
#[cfg_attr(not(feature = "lockrank"), allow(dead_code))]
pub(crate) fn name(r: Rank) -> &'static str {
    TABLE
        .iter()
        .find(|e| e.first <= r && r <= e.last)
        .map_or("?", |e| e.name)
}

#[cfg(all(test, feature = "lockrank", not(spanheap_loom)))]
use held::held;
#[cfg(all(feature = "lockrank", not(spanheap_loom)))]
pub(crate) use held::{acquired, released, tried};

#[cfg(all(feature = "lockrank", not(spanheap_loom)))]
mod held {
    use super::{name, Rank};
    use core::cell::Cell;

    /// More than the fork handler holds (every lock at once).
    const MAX_HELD: usize = 96;

    /// The locks a thread holds: (address, rank), unordered (`try_lock` and
    /// out-of-order releases), the first `n` slots in use.
    struct Held {
        n: Cell<usize>,
        locks: [Cell<(usize, Rank)>; MAX_HELD],
    }

    thread_local! {
        // Const-initialised and without a destructor: no allocation, usable in any
        // thread-exit destructor.
        static HELD: Held = const {
            Held {
                n: Cell::new(0),
                locks: [const { Cell::new((0, Rank(0))) }; MAX_HELD],
            }
        };
    }

    /// Before waiting for lock `addr` of rank `rank`: aborts if a held lock's rank is
    /// not below it. Records it as held.
    pub(crate) fn acquired(addr: usize, rank: Rank) {
        HELD.with(|h| {
            for l in &h.locks[..h.n.get()] {
                let (_, r) = l.get();
                if r >= rank {
                    fail("taking", rank, r);
                }
            }
            push(h, addr, rank);
        });
    }

    /// After `try_lock` took lock `addr`: records it, without checking the order.
    pub(crate) fn tried(addr: usize, rank: Rank) {
        HELD.with(|h| push(h, addr, rank));
    }

    /// Lock `addr` was released (in any order).
    pub(crate) fn released(addr: usize, rank: Rank) {
        HELD.with(|h| {
            let n = h.n.get();
            match h.locks[..n].iter().rposition(|l| l.get().0 == addr) {
                Some(i) => {
                    h.locks[i].set(h.locks[n - 1].get());
                    h.n.set(n - 1);
                }
                None => fail("releasing a lock not held:", rank, rank),
            }
        });
    }

    /// How many locks the calling thread holds.
    #[cfg(test)]
    pub(crate) fn held() -> usize {
        HELD.with(|h| h.n.get())
    }

    fn push(h: &Held, addr: usize, rank: Rank) {
        let n = h.n.get();
        if n == MAX_HELD {
            fail("too many locks held, at", rank, rank);
        }
        h.locks[n].set((addr, rank));
        h.n.set(n + 1);
    }

    /// Writes `spanheap: lock order violation: <what> <lock> (rank r) while holding
    /// <lock> (rank r)` to stderr and aborts. Never allocates or unwinds.
    #[cold]
    #[inline(never)]
    fn fail(what: &str, rank: Rank, held: Rank) -> ! {
        crate::fatal::fatal(format_args!(
            "lock order violation: {what} {} (rank {}) while holding {} (rank {})",
            name(rank),
            rank.0,
            name(held),
            held.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_rank_order_without_gaps() {
        let mut next = 1;
        for e in &TABLE {
            assert_eq!(e.first.0, next, "{}", e.name);
            assert!(e.first <= e.last);
            next = e.last.0 + 1;
        }
        assert_eq!(name(central(7)), "mcentral");
        assert_eq!(name(HEAP), "heap");
        assert_eq!(kind(RECLAIM), 0);
        assert_eq!(kind(central(1)), 3);
        assert_eq!(kind(central(NUM_CLASSES - 1)), 3);
        assert_eq!(kind(CACHE_RECORDS), 4);
        assert_eq!(kind(HEAP), 5);
        assert_eq!(kind(STATS_NOP), TABLE.len() - 2);
        assert_eq!(kind(PROFILE), TABLE.len() - 1);
    }

    /// docs/design.md's "Lock order" table lists the same rows as `TABLE`: rank (or
    /// first..last), lock, where it is taken.
    #[test]
    fn design_doc_lists_this_lock_order() {
        let doc = include_str!("../docs/design.md");
        let section = doc
            .split("\n### Lock order\n")
            .nth(1)
            .expect("docs/design.md has a \"### Lock order\" section");
        let section = section.split("\n#").next().unwrap();
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.contains("| rank |"))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        let want: Vec<Vec<String>> = TABLE
            .iter()
            .map(|e| {
                let rank = if e.first == e.last {
                    e.first.0.to_string()
                } else {
                    format!("{}..{}", e.first.0, e.last.0)
                };
                vec![rank, e.name.to_string(), e.taken.to_string()]
            })
            .collect();
        assert_eq!(
            rows, want,
            "docs/design.md's lock order table differs from src/lockrank.rs's TABLE"
        );
    }
}

#[cfg(all(test, feature = "lockrank", not(spanheap_loom)))]
mod checked_tests {
    use super::*;
    use crate::sync::Mutex;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn in_order_try_lock_and_any_release_order_pass() {
        let (reclaim, shared, c5, c9) = (
            Mutex::new((), RECLAIM),
            Mutex::new((), SHARED),
            Mutex::new((), central(5)),
            Mutex::new((), central(9)),
        );
        let (heap, nop) = (Mutex::new((), HEAP), Mutex::new((), STATS_NOP));
        let before = held();
        let g1 = reclaim.lock();
        let g2 = shared.lock();
        let g3 = c9.lock();
        // Out of order, but never waits: recorded, not checked.
        let g4 = c5.try_lock().unwrap();
        let g5 = heap.lock();
        assert_eq!(held(), before + 5);
        drop(g2);
        drop(g4);
        drop(g1);
        let g6 = nop.lock();
        drop(g5);
        drop(g3);
        drop(g6);
        assert_eq!(held(), before);
        // The fork handlers' unguarded pairs too.
        heap.fork_lock();
        nop.fork_lock();
        // SAFETY: taken just above by this thread.
        unsafe {
            heap.fork_unlock();
            nop.fork_unlock();
        }
        assert_eq!(held(), before);
    }

    /// In a child process (this binary, re-run with `SPANHEAP_LOCKRANK_CHILD`): takes
    /// the heap lock, then the reclaim lock. It must die of SIGABRT naming both.
    #[test]
    #[cfg_attr(miri, ignore = "runs the test binary as a child process")]
    fn out_of_order_aborts() {
        if std::env::var_os("SPANHEAP_LOCKRANK_CHILD").is_some() {
            let (heap, reclaim) = (Mutex::new((), HEAP), Mutex::new((), RECLAIM));
            let _h = heap.lock();
            let _r = reclaim.lock();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "lockrank::checked_tests::out_of_order_aborts",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SPANHEAP_LOCKRANK_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
        assert!(
            stderr.contains(
                "spanheap: lock order violation: taking reclaim (rank 1) \
                 while holding heap (rank 72)"
            ),
            "{stderr}"
        );
    }
}
