//! Consistent statistics (`src/stats.rs`, the real code): writers with a sequence
//! counter (a thread cache) and without one (the leaf lock) add to two counters in one
//! section each, while the reader rotates generations and takes snapshots. Every
//! snapshot must show both counters equal (never half of a section), snapshots never go
//! backwards, and after the writers finish a snapshot has every section.
//!
//! Mutant `spanheap_mutant="stats_no_fence"`: the writer's fence between its odd counter
//! and its load of `gen` is dropped; the reader can then miss a writer that still adds
//! to the generation being merged, and loom must find the torn or lost update.
#![cfg(spanheap_loom)]

use loom::sync::Arc;
use spanheap::__private::StatsPair;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Executions explored (reported with `--nocapture`).
static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn snapshots_never_see_half_a_section() {
    let result = std::panic::catch_unwind(|| {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(2);
        }
        b.check(|| {
            EXECUTIONS.fetch_add(1, Ordering::Relaxed);
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
    });
    eprintln!(
        "consistent_stats: {} executions",
        EXECUTIONS.load(Ordering::Relaxed)
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
