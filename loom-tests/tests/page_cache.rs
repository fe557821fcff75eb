//! The per-thread page cache (`pagecache.rs`, `MHeap::alloc_span_with` /
//! `free_span_with`, the real code): spans allocated and freed through threads' caches
//! take no lock, yet are published and unpublished exactly like locked ones.
//!
//! Set-up gives each of two threads a cache holding its own 64-page block (refilled
//! under the heap lock before the threads start). Thread A allocates the 1-page span X
//! from its block and frees it back into the block (pages and record stay in A's cache:
//! no lock at any point); thread B allocates the 2-page span Y from its block and keeps
//! it. The reader loads `pagesInUse`, both `pageInUse` bits, X's bit again and
//! `pagesInUse` again, with the invariants of `in_use_count`:
//!
//! - `pagesInUse` counts Y => Y's bit is set;
//! - X seen published (counted, or its bit set), then X's bit seen clear => the later
//!   `pagesInUse` does not count X.
//!
//! After both threads: A's cache has X's page back, both caches flush into the page
//! allocator under the lock, and the heap holds exactly Y.
//!
//! Mutants it must catch: `count_relaxed` (pagesInUse incremented Relaxed) and
//! `clear_in_use_relaxed` (pageInUse bit cleared Relaxed), the same steps as the locked
//! path, here reached without the heap lock on either side.
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::{PageHeap, SpanView, ThreadPages};
use spanheap::Purpose;

fn model() {
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    // Set-up, before any other thread exists: each cache takes a block (the lock is
    // taken here, and only here), leaving one span record and page run in the cache.
    let (mut ta, mut tb) = (ThreadPages::new(), ThreadPages::new());
    let w = heap
        .alloc_span_cached(1, Purpose::Heap, 1, &mut ta)
        .unwrap();
    let xb = w.base();
    // SAFETY: `w` is live and freed once (back into `ta`).
    unsafe { heap.free_span_cached(w, &mut ta) };
    let w = heap
        .alloc_span_cached(2, Purpose::Heap, 1, &mut tb)
        .unwrap();
    let yb = w.base();
    // SAFETY: as above, into `tb`.
    unsafe { heap.free_span_cached(w, &mut tb) };
    assert!(yb >= xb + 64 * spanheap::os::PAGE_SIZE, "separate blocks");
    assert_eq!(heap.pages_in_use(), 0);

    let h = heap.clone();
    let a = spawn(move || {
        let x = h.alloc_span_cached(1, Purpose::Heap, 1, &mut ta).unwrap();
        assert_eq!(x.base(), xb);
        // SAFETY: `x` is live and freed once.
        unsafe { h.free_span_cached(x, &mut ta) };
        ta
    });
    let h = heap.clone();
    let b = spawn(move || {
        let y = h.alloc_span_cached(2, Purpose::Heap, 1, &mut tb).unwrap();
        assert_eq!(y.base(), yb);
        tb
    });

    // The reader.
    let c1 = heap.pages_in_use();
    let x1 = heap.page_in_use(xb);
    let y1 = heap.page_in_use(yb);
    let x2 = heap.page_in_use(xb);
    let c2 = heap.pages_in_use();
    assert!(c1 <= 3 && c2 <= 3, "pagesInUse {c1}, {c2}");
    if c1 >= 2 {
        assert!(
            y1,
            "pagesInUse ({c1}) counts Y but Y's pageInUse bit is clear"
        );
    }
    let counts_x = |c: usize| c % 2 == 1;
    if (counts_x(c1) || x1) && !x2 {
        assert!(
            !counts_x(c2),
            "X's pageInUse bit was cleared, but pagesInUse ({c2}) still counts X"
        );
    }

    let mut ta = a.join().unwrap();
    let mut tb = b.join().unwrap();
    assert_eq!(heap.pages_in_use(), 2);
    // X's page went back to A's block: the next 1-page span there is X's page again.
    let again = heap
        .alloc_span_cached(1, Purpose::Heap, 1, &mut ta)
        .unwrap();
    assert_eq!(again.base(), xb);
    // SAFETY: live, freed once.
    unsafe { heap.free_span_cached(again, &mut ta) };
    heap.flush_cache(&mut ta);
    heap.flush_cache(&mut tb);
    assert_eq!(heap.heap_inuse(), 2 * spanheap::os::PAGE_SIZE as u64);
    // SAFETY: no span is being freed any more.
    let (x, y) = unsafe { (heap.span_at(xb), heap.span_at(yb)) };
    assert_eq!(x, None);
    assert_eq!(
        y,
        Some(SpanView {
            base: yb,
            npages: 2,
            purpose: Purpose::Heap,
            spanclass: 0
        })
    );
}

#[test]
fn cached_spans_are_published_and_unpublished_in_order() {
    check(
        "page_cache",
        cfg!(any(
            spanheap_mutant = "clear_in_use_relaxed",
            spanheap_mutant = "count_relaxed"
        )),
        model,
    );
}
