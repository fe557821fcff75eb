//! Thread exit (`mcache/lifecycle.rs` `release_all`, what the thread-exit hook does, against
//! remote frees; `mcentral.rs` `uncache_span`/`settle_locked`; the real code).
//!
//! Size class 12,288 B (two objects per span). Set-up: cache A allocates a0..a3; span X
//! = {a0, a1} went to the mcentral's full list when A moved on, span Y = {a2, a3} is A's
//! current span. Then, concurrently:
//!
//! - thread A frees a3 (its local free list) and releases its cache, as thread exit
//!   does: the local list is flushed (a remote free into Y, which A still owns), Y is
//!   swept and handed to the mcentral (placed, then its state word made "unowned",
//!   then settled: retired or kept as the spare if every object is already free);
//! - thread B frees a2 (Y's other object: A's span, before, while or after A gives it
//!   up) as a cache-less thread;
//! - the main thread frees a0 the same way (announces X: the mcentral lock and the
//!   pending stack are contended with A's hand-over of Y).
//!
//! Checks: after both threads, X is partial with a1 live, Y is retired or the spare, and
//! the mcentral and the heap agree (`loom_tests::settled`): nothing lost, nothing listed
//! twice; after freeing a1, only the spare is left.
//!
//! Mutant it must catch: `rstate_cas_relaxed` (the mcentral's state-word CAS Relaxed:
//! a freer that reads "unowned" from it may still load the span's old place, CACHED,
//! and not announce the span whose last object it freed, which then stays listed with
//! no live object).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{alloc_objects, check, settled, spawn, Objects, Settled, TestMem};
use spanheap::__private::{class_for_size, objects_per_span, PageHeap};

const SIZE: usize = 12288;
const NPAGES: usize = 3;

fn model() {
    let class = class_for_size(SIZE);
    assert_eq!(objects_per_span(class), 2);
    // A thread with a cache has its own statistics writer, as in the process-wide heap;
    // the cache-less threads count nothing here.
    let heap = Arc::new(PageHeap::with_thread_writers(TestMem::fresh()));
    let wa = heap.stats_writer();
    let objs = Arc::new(Objects::new(8));

    let mut a = heap.new_cache();
    let o = alloc_objects(&mut a, class, &objs, 4);
    let (a0, a1, a2, a3) = (o[0], o[1], o[2], o[3]);
    assert_eq!((a1 - a0, a3 - a2), (SIZE, SIZE));
    // SAFETY: no other thread exists yet.
    let s = unsafe { settled(&heap, class, NPAGES, &o) };
    assert_eq!(
        s,
        Settled {
            owned: 1,
            full: 1,
            ..Settled::default()
        }
    );

    let (h, ob) = (heap.clone(), objs.clone());
    let t = spawn(move || {
        let _ = &h;
        wa.bind();
        ob.freeing(a3 as *mut u8, 1);
        // SAFETY: a live object of the class, freed once.
        unsafe { a.free(a3 as *mut u8, class) };
        a.release();
    });

    let (h, ob) = (heap.clone(), objs.clone());
    let b = spawn(move || {
        ob.freeing(a2 as *mut u8, 2);
        // SAFETY: as above.
        unsafe { h.free_cacheless(a2 as *mut u8, class) };
    });
    objs.freeing(a0 as *mut u8, 2);
    // SAFETY: as above.
    unsafe { heap.free_cacheless(a0 as *mut u8, class) };

    t.join().unwrap();
    b.join().unwrap();
    // SAFETY: the other thread is done.
    let s = unsafe { settled(&heap, class, NPAGES, &o) };
    assert_eq!(s.owned + s.full, 0, "{s:?}");
    assert_eq!(s.partial, 1, "X with a1 live: {s:?}");
    assert_eq!(objs.live(), vec![a1]);

    objs.freeing(a1 as *mut u8, 3);
    // SAFETY: as above.
    unsafe { heap.free_cacheless(a1 as *mut u8, class) };
    let spare = Settled {
        spare: 1,
        ..Settled::default()
    };
    // SAFETY: as above.
    assert_eq!(unsafe { settled(&heap, class, NPAGES, &o) }, spare);
}

#[test]
fn released_spans_are_settled_against_remote_frees() {
    check(
        "thread_exit",
        cfg!(spanheap_mutant = "rstate_cas_relaxed"),
        model,
    );
}
