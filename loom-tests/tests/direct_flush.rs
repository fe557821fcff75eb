//! A cache's local free list flushed into unowned spans under the mcentral lock
//! (`mcentral.rs` `free_unowned`/`after_direct_free`, reached from `mcache/flush.rs` `flush`
//! through `release`; the real code), against remote frees of the same span and another
//! cache taking the span.
//!
//! Size class 12,288 B (two objects per span). Set-up: cache A allocates a0, a1 (span
//! X) and a2, a3 (span Y); X went to the mcentral's full list when A moved on to Y.
//! A frees a0: X was A's last, so a0 goes on A's local free list (X still counts it as
//! live). Then, concurrently:
//!
//! - thread A releases its cache, as thread exit does: the local list is flushed, and
//!   since X is unowned, a0 is freed directly into X's alloc bitmap under the mcentral
//!   lock (X moves to the partial list, then its live count drops, then it is settled);
//!   Y (a2, a3 live) is handed to the mcentral;
//! - thread B frees a1 as a cache-less thread (a remote free into X: with a0 it is X's
//!   last live object, so whichever of A and B comes second must see X completely free
//!   and retire it, or keep it as the spare);
//! - in the second model, the main thread allocates one object through cache C (taking
//!   X from the partial list if A's flush put it there: a0's slot is then handed out
//!   again, and A's last write of it must happen-before C's first) and frees it.
//!
//! Checks: no slot handed out while live; after the threads (and releasing C), X is
//! retired or the spare, Y is full with a2 and a3 live, and the mcentral and the heap
//! agree (`loom_tests::settled`): nothing lost, nothing listed twice.
//!
//! Mutant it must catch: `direct_place_late` (the span's place stored after its state
//! word instead of before: B's increment can read A's new live count, find that it freed
//! the last object, and still load X's old place, FULL; A then moves X to the partial
//! list, B's announcement CAS from FULL fails, and A's settle saw the count before B's
//! increment: X stays listed with no live object).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{alloc_objects, check, settled, spawn, Objects, Settled, TestMem};
use spanheap::__private::{class_for_size, objects_per_span, PageHeap};

const SIZE: usize = 12288;
const NPAGES: usize = 3;

fn model(other_cache: bool) {
    let class = class_for_size(SIZE);
    assert_eq!(objects_per_span(class), 2);
    let heap = Arc::new(PageHeap::with_thread_writers(TestMem::fresh()));
    let (wa, wc) = (heap.stats_writer(), heap.stats_writer());
    let objs = Arc::new(Objects::new(8));

    let mut a = heap.new_cache();
    let o = alloc_objects(&mut a, class, &objs, 4);
    let (a0, a1, a2, a3) = (o[0], o[1], o[2], o[3]);
    assert_eq!((a1 - a0, a3 - a2), (SIZE, SIZE));
    objs.freeing(a0 as *mut u8, 10);
    // SAFETY: a live object of the class, freed once.
    unsafe { a.free(a0 as *mut u8, class) };
    // SAFETY: no other thread exists yet.
    let s = unsafe { settled(&heap, class, NPAGES, &o) };
    assert_eq!(
        s,
        Settled {
            owned: 1,
            full: 1,
            ..Settled::default()
        },
        "a0 is on A's local list, X still counts it"
    );

    let h = heap.clone();
    let t = spawn(move || {
        let _ = &h;
        wa.bind();
        a.release();
    });

    let (h, ob) = (heap.clone(), objs.clone());
    let b = spawn(move || {
        ob.freeing(a1 as *mut u8, 11);
        // SAFETY: as above.
        unsafe { h.free_cacheless(a1 as *mut u8, class) };
    });

    let mut extra = Vec::new();
    if other_cache {
        wc.bind();
        let mut c = heap.new_cache();
        let q = c.alloc(class);
        objs.allocated(q, 12);
        extra.push(q as usize);
        objs.freeing(q, 13);
        // SAFETY: as above.
        unsafe { c.free(q, class) };
        c.release();
    }

    t.join().unwrap();
    b.join().unwrap();
    let mut addrs = o.clone();
    addrs.extend(extra);
    // SAFETY: the other threads are done.
    let s = unsafe { settled(&heap, class, NPAGES, &addrs) };
    assert_eq!(s.owned + s.partial, 0, "X settled, Y full: {s:?}");
    assert_eq!(s.full, 1, "Y with a2 and a3 live: {s:?}");
    let mut live = objs.live();
    live.sort_unstable();
    assert_eq!(live, vec![a2, a3]);
}

#[test]
fn flushed_objects_meet_a_remote_free_of_the_same_span() {
    check(
        "direct_flush",
        cfg!(spanheap_mutant = "direct_place_late"),
        || model(false),
    );
}

// (Not run against the mutant, which only the first model must catch.)
#[cfg(not(spanheap_mutant = "direct_place_late"))]
#[test]
fn flushed_objects_meet_a_cache_taking_the_span() {
    check("direct_flush_take", false, || model(true));
}
