//! Cross-thread frees against the owner's reuse (`mcache/flush.rs` `remote_free`,
//! `buffer_remote`/`flush_remote`, `refill`/`normalize`; `mcentral.rs` `merge_remote`;
//! the real code).
//!
//! Size class 12,288 B (two objects per span; a cache's remote buffer holds two). Set-up:
//! cache A allocates a0 and a1, the whole of span X, which A keeps owning; both objects
//! are handed to thread B. Then, concurrently:
//!
//! - thread B writes each object and frees it through its own cache: X is not B's, so
//!   both go on B's remote buffer, which is flushed (two remote frees: remote bit, then
//!   the span's state word) when the second arrives;
//! - the main thread (A) allocates two objects and writes them: each refill finds X
//!   exhausted and sweeps it, merging whatever remote frees arrived (reusing a0/a1's
//!   slots), or gives X to the mcentral and takes another span; then it frees one of
//!   them (its local free list).
//!
//! Every object slot has a model-side loom cell for its contents (`loom_tests::Objects`),
//! written by each user after allocating and before freeing: the hand-off of a slot from
//! B to A must order B's write before A's. Checks: no slot handed out while live; after
//! the threads and releasing both caches, X and every other span is retired or the
//! spare (`loom_tests::settled`): every free arrived exactly once.
//!
//! Mutants it must catch: `remote_relaxed` (the remote bitmap `fetch_or` Relaxed) and
//! `merge_relaxed` (the merge's `swap` Relaxed): B's write and A's are then unordered
//! when A's merge sees B's bit before B's state-word increment.
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, settled, spawn, Objects, Settled, TestMem};
use spanheap::__private::{class_for_size, objects_per_span, PageHeap};

const SIZE: usize = 12288;
const NPAGES: usize = 3;

fn model(a_has_writer: bool) {
    let class = class_for_size(SIZE);
    assert_eq!(objects_per_span(class), 2);
    // B has its own statistics writer, as a thread with a cache in the process-wide
    // heap; A too, or none (its statistics sections take the leaf lock, as those of
    // the shared cache of cache-less threads do).
    let heap = Arc::new(PageHeap::with_thread_writers(TestMem::fresh()));
    let (wa, wb) = (heap.stats_writer(), heap.stats_writer());
    if a_has_writer {
        wa.bind();
    }
    let objs = Arc::new(Objects::new(8));

    let mut a = heap.new_cache();
    let a0 = a.alloc(class);
    objs.allocated(a0, 1);
    let a1 = a.alloc(class);
    objs.allocated(a1, 1);
    let (a0, a1) = (a0 as usize, a1 as usize);
    assert_eq!(a1 - a0, SIZE);
    let mut bc = heap.new_cache();

    let (h, ob) = (heap.clone(), objs.clone());
    let b = spawn(move || {
        wb.bind();
        // a0: freed as a cache-less thread frees (a remote free, no statistics
        // section; see the module note on SeqCst fences).
        ob.freeing(a0 as *mut u8, 2);
        // SAFETY: a live object of the class, freed once.
        unsafe { h.free_cacheless(a0 as *mut u8, class) };
        // a1: through B's cache. X is not B's, so a1 goes on the remote buffer, which
        // B's release flushes (a statistics section, then the remote free).
        ob.freeing(a1 as *mut u8, 2);
        // SAFETY: as above.
        unsafe { bc.free(a1 as *mut u8, class) };
        bc.release();
        bc
    });

    let q1 = a.alloc(class);
    objs.allocated(q1, 3);
    let q2 = a.alloc(class);
    objs.allocated(q2, 3);
    objs.freeing(q1, 4);
    // SAFETY: live, freed once.
    unsafe { a.free(q1, class) };

    let mut bc = b.join().unwrap();
    let mut addrs = vec![a0, a1, q1 as usize, q2 as usize];
    // SAFETY: the other thread is done.
    let s = unsafe { settled(&heap, class, NPAGES, &addrs) };
    assert_eq!(s.owned, 1, "{s:?}");

    // Free the rest through A, give both caches back: only the spare is left.
    for p in objs.live() {
        objs.freeing(p as *mut u8, 5);
        // SAFETY: live, freed once.
        unsafe { a.free(p as *mut u8, class) };
    }
    a.release();
    bc.release();
    addrs.sort_unstable();
    let spare = Settled {
        spare: 1,
        ..Settled::default()
    };
    // SAFETY: as above.
    assert_eq!(unsafe { settled(&heap, class, NPAGES, &addrs) }, spare);
}

#[test]
fn remote_frees_hand_slots_over_in_order() {
    check(
        "remote_reuse (A a thread cache)",
        cfg!(spanheap_mutant = "remote_relaxed"),
        || model(true),
    );
}

#[test]
fn remote_frees_hand_slots_over_in_order_shared_cache() {
    check(
        "remote_reuse (A the shared cache)",
        cfg!(any(
            spanheap_mutant = "remote_relaxed",
            spanheap_mutant = "merge_relaxed"
        )),
        || model(false),
    );
}
