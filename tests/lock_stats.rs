//! The lock counters (`spanheap::lock_stats`, `Stats::locks`) and the remote-free
//! counters (`spanheap::remote_free_stats`): spans moving through a size class's
//! mcentral between two threads are counted as mcentral acquisitions and the frees as
//! remote frees, counts only grow, and contended acquisitions never exceed
//! acquisitions, however busy the locks are.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use common::shared;
use spanheap::{LockStats, LOCK_KINDS};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

fn kind<'a>(t: &'a [LockStats; LOCK_KINDS], name: &str) -> &'a LockStats {
    t.iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no lock kind {name}: {t:?}"))
}

/// Every count of every kind is at least what `before` had.
fn assert_monotonic(before: &[LockStats; LOCK_KINDS], now: &[LockStats; LOCK_KINDS]) {
    for (b, n) in before.iter().zip(now) {
        assert_eq!(b.name, n.name);
        assert_eq!(b.locks, n.locks);
        assert!(
            n.acquisitions >= b.acquisitions
                && n.contended >= b.contended
                && n.sleeps >= b.sleeps
                && n.wait_ns >= b.wait_ns
                && n.try_busy >= b.try_busy,
            "{} went backwards: {b:?} -> {n:?}",
            n.name
        );
    }
}

fn assert_contended_within(t: &[LockStats; LOCK_KINDS]) {
    for l in t {
        assert!(
            l.contended <= l.acquisitions,
            "{}: more contended acquisitions than acquisitions: {l:?}",
            l.name
        );
    }
}

/// One thread allocates 200,000 objects of one size class (48 B) and hands them in
/// batches to a second thread, which frees them: full spans go to the class's mcentral,
/// the consumer's frees come back to it, and the producer refills from it. The main
/// thread reads the counters all along: they only grow, and the mcentral acquisitions
/// grow by at least one per span the producer filled.
#[test]
fn cross_thread_frees_through_one_mcentral_are_counted() {
    let _g = shared();
    const OBJECTS: usize = 200_000;
    const BATCH: usize = 500;
    let before = spanheap::lock_stats();
    let remote_before = spanheap::remote_free_stats();
    assert_eq!(kind(&before, "mcentral").locks, 67);
    assert_eq!(kind(&before, "heap").locks, 1);
    let done = AtomicBool::new(false);
    let mut readings = 0u64;
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Vec<Box<[u8; 48]>>>(8);
        s.spawn(move || {
            for _ in 0..OBJECTS / BATCH {
                let batch: Vec<Box<[u8; 48]>> =
                    (0..BATCH).map(|i| Box::new([i as u8; 48])).collect();
                tx.send(batch).unwrap();
            }
        });
        s.spawn(|| {
            for batch in rx {
                for (i, b) in batch.iter().enumerate() {
                    assert_eq!(b[47], i as u8);
                }
                drop(batch);
            }
            // Everything this thread freed goes back to the spans.
            spanheap::flush_thread_cache();
            done.store(true, Ordering::Release);
        });
        let mut last = before;
        while !done.load(Ordering::Acquire) {
            let now = spanheap::lock_stats();
            assert_monotonic(&last, &now);
            assert_contended_within(&now);
            last = now;
            readings += 1;
            std::thread::yield_now();
        }
    });
    let after = spanheap::lock_stats();
    assert_contended_within(&after);
    let d = kind(&after, "mcentral").since(kind(&before, "mcentral"));
    // 48-byte objects: 170 to an 8 KiB span, so the producer filled over 1,100 spans
    // and took each from (or through) the mcentral.
    let spans = (OBJECTS * 48 / 8192) as u64;
    assert!(
        d.acquisitions >= spans / 2,
        "mcentral acquisitions grew by {} over {OBJECTS} objects ({spans} spans), {readings} readings: {d:?}",
        d.acquisitions
    );
    assert!(d.contended <= d.acquisitions);
    // The consumer's frees were remote frees (of the producer's spans), counted with
    // the atomics they took: at most one state-word add per bitmap OR, at most one
    // bitmap OR per object, at most one announcement per state-word add.
    let r = spanheap::remote_free_stats().since(&remote_before);
    assert!(r.objects >= OBJECTS as u64 / 2, "{r:?}");
    assert!(r.announces <= r.state_rmws, "{r:?}");
    assert!(r.state_rmws <= r.bitmap_rmws, "{r:?}");
    assert!(r.bitmap_rmws <= r.objects, "{r:?}");
    eprintln!("cross-thread: mcentral {d:?}; remote {r:?}");
}

/// Four threads churn the same two size classes and large blocks (the mcentral locks
/// and the heap lock) while the main thread keeps reading the counters and taking
/// statistics snapshots: at every reading, for every kind, contended <= acquisitions;
/// and `Stats::locks` agrees with `lock_stats` in names and lock counts.
#[test]
fn contended_never_exceeds_acquisitions() {
    let _g = shared();
    let stop = AtomicBool::new(false);
    let before = spanheap::lock_stats();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 2_000_000 {
                    let size = match (i + t) % 3 {
                        0 => 32,
                        1 => 1024,
                        _ => 48 << 10,
                    };
                    keep.push(vec![t as u8; size]);
                    if keep.len() == 2_000 {
                        // Spans fill and empty, and the flush returns the thread's
                        // cache: every class visits its mcentral.
                        keep.clear();
                        spanheap::flush_thread_cache();
                    }
                    i += 1;
                }
            });
        }
        let mut last = before;
        for r in 0..2_000 {
            let now = if r % 10 == 0 {
                let st = spanheap::stats();
                assert!(st.check().is_ok());
                st.locks
            } else {
                spanheap::lock_stats()
            };
            assert_contended_within(&now);
            assert_monotonic(&last, &now);
            last = now;
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let after = spanheap::lock_stats();
    assert_contended_within(&after);
    assert_monotonic(&before, &after);
    let names: Vec<&str> = after.iter().map(|l| l.name).collect();
    assert_eq!(
        names,
        [
            "reclaim",
            "stats reader",
            "shared cache",
            "mcentral",
            "cache records",
            "heap",
            "stats nop",
            "profile"
        ]
    );
    let d = kind(&after, "mcentral").since(kind(&before, "mcentral"));
    assert!(d.acquisitions > 0, "{d:?}");
    assert!(
        kind(&after, "heap")
            .since(kind(&before, "heap"))
            .acquisitions
            > 0
    );
    // One snapshot took the statistics reader lock at least 200 times.
    assert!(
        kind(&after, "stats reader")
            .since(kind(&before, "stats reader"))
            .acquisitions
            >= 200
    );
    eprintln!(
        "mcentral since start: {} acquisitions, {} contended, {} sleeps, {} us waited, {} try_lock busy",
        d.acquisitions,
        d.contended,
        d.sleeps,
        d.wait_ns / 1000,
        d.try_busy
    );
}
