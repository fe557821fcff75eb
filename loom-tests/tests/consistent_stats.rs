//! Consistent statistics (`src/stats.rs`, the real code): writers with a sequence
//! counter and deltas of their own (a thread cache) and without one (the leaf lock,
//! shared deltas) add to two counters in one section each, while the reader flips
//! generations, drains every writer's old generation and takes snapshots. Every
//! snapshot must show both counters equal (never half of a section), snapshots never go
//! backwards, and after the writers finish a snapshot has every section. The second
//! model has two writers with records of their own, so the reader drains two sets of
//! deltas per snapshot.
//!
//! Mutant `spanheap_mutant="stats_no_fence"`: the writer's fence between its odd counter
//! and its load of `gen` is dropped; the reader can then miss a writer that still adds
//! to the generation being merged, and loom must find the torn or lost update.
#![cfg(spanheap_loom)]

use loom::sync::Arc;
use spanheap::__private::StatsPair;
use std::sync::atomic::{AtomicUsize, Ordering};

#[test]
fn snapshots_never_see_half_a_section() {
    check_model("snapshots_never_see_half_a_section", || {
        let s = Arc::new(StatsPair::new());
        // A writer with a counter (a thread cache): two sections.
        let s1 = s.clone();
        let cached = loom::thread::spawn(move || {
            let w = s1.writer();
            s1.add(Some(w), 1);
            s1.add(Some(w), 1);
        });
        // A cache-less writer: one section under the leaf lock.
        let s2 = s.clone();
        let cacheless = loom::thread::spawn(move || s2.add(None, 10));
        // The reader: two snapshots while the writers run.
        let a = s.read();
        assert_eq!(a[0], a[1], "snapshot saw half a section: {a:?}");
        let b = s.read();
        assert_eq!(b[0], b[1], "snapshot saw half a section: {b:?}");
        assert!(b[0] >= a[0], "snapshots went backwards: {a:?} then {b:?}");
        cached.join().unwrap();
        cacheless.join().unwrap();
        assert_eq!(s.read(), [12, 12], "a section was lost");
    });
}

#[test]
fn two_writers_own_deltas_are_drained_whole() {
    check_model("two_writers_own_deltas_are_drained_whole", || {
        let s = Arc::new(StatsPair::new());
        let spawn = |v: u64| {
            let s = s.clone();
            loom::thread::spawn(move || {
                let w = s.writer();
                s.add(Some(w), v);
            })
        };
        let (a, b) = (spawn(1), spawn(2));
        let r = s.read();
        assert_eq!(r[0], r[1], "snapshot saw half a section: {r:?}");
        assert!([0, 1, 2, 3].contains(&r[0]), "impossible total: {r:?}");
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(s.read(), [3, 3], "a section was lost or counted twice");
    });
}

/// Runs `f` under loom (preemption bound 2 unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise); with the `stats_no_fence` mutant it must fail.
fn check_model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    // Executions explored (reported with `--nocapture`).
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(2);
        }
        b.check(move || {
            n.fetch_add(1, Ordering::Relaxed);
            f();
        });
    }));
    eprintln!(
        "consistent_stats::{name}: {} executions",
        executions.load(Ordering::Relaxed)
    );
    if cfg!(spanheap_mutant = "stats_no_fence") {
        assert!(
            result.is_err(),
            "mutant stats_no_fence was not caught by the model"
        );
    } else if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
