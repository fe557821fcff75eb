//! Span publication (seed 003), on the real `MHeap::alloc_span`: two threads allocate
//! a span each while a third reads, lock-free, `pagesInUse`, the `pageInUse` bits and
//! the span map for the spans' pages. Whatever the reader sees of a span, it sees the
//! span fully initialised:
//!
//! - `pagesInUse` counts the span => its `pageInUse` bit is set;
//! - the bit is set => the span map leads to the span, in state InUse;
//! - the span map and state accept the span => base, npages and purpose are the ones
//!   the allocating thread wrote (the purpose is read from a loom-tracked cell, so a
//!   read that is not ordered after the write is reported as a data race).
//!
//! Set-up leaves a freed 2-page span at `p`: the 1-page span X lands there (first fit)
//! and the 3-page span Y after the guard that closes the run, in either order. One of them reuses the freed
//! span's record, whose stale span-map entry for page `p + 1` the reader follows, so
//! there the reader must rely on `state` alone; the other gets a fresh record.
//!
//! Mutants it must catch: `span_map_relaxed` (span-map entries stored Relaxed: the
//! reader then loads the `state` of a freshly carved record whose construction it is not
//! ordered after), `state_relaxed` (span state stored Relaxed: the reader that found the
//! reused record through the stale entry reads its fields racing with their writes),
//! `in_use_relaxed` (pageInUse bit set Relaxed), `count_relaxed` (pagesInUse incremented
//! Relaxed).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::{PageHeap, SpanView};
use spanheap::os::PAGE_SIZE;
use spanheap::Purpose;

fn model() {
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    // Set-up, before any other thread exists: grow the heap (arena, span records), and
    // leave a freed 2-page span at `p`, closed by a live 1-page manual span (manual
    // spans have no pageInUse bit and are not in pagesInUse).
    let w = heap.alloc_span(2, Purpose::Heap, 1).unwrap();
    let p = w.base();
    let guard = heap.alloc_span(1, Purpose::SpanBitmaps, 1).unwrap();
    assert_eq!(guard.base(), p + 2 * PAGE_SIZE);
    // SAFETY: `w` is live and freed once.
    unsafe { heap.free_span(w) };
    assert_eq!(heap.pages_in_use(), 0);
    let view = |base, npages| SpanView {
        base,
        npages,
        purpose: Purpose::Heap,
        spanclass: 0,
    };
    let (x, y) = (view(p, 1), view(p + 3 * PAGE_SIZE, 3));

    let ths: Vec<_> = [x, y]
        .into_iter()
        .map(|want| {
            let h = heap.clone();
            spawn(move || {
                let s = h.alloc_span(want.npages, Purpose::Heap, 1).unwrap();
                assert_eq!((s.base(), s.npages()), (want.base, want.npages));
            })
        })
        .collect();

    // The reader: each observation implies the next ones. X counts 1 page, Y 3.
    let count = heap.pages_in_use();
    let bits = [heap.page_in_use(x.base), heap.page_in_use(y.base)];
    // SAFETY: no span is freed while the model's threads run.
    let seen = unsafe { [heap.span_at(x.base), heap.span_at(y.base)] };
    // SAFETY: as above. Page p + 1: a stale span-map entry; page Y's last.
    let (gap, y_last) = unsafe { (heap.span_at(p + PAGE_SIZE), heap.span_at(p + 5 * PAGE_SIZE)) };
    assert!(matches!(count, 0 | 1 | 3 | 4), "pagesInUse {count}");
    let counted = [count % 3 == 1, count >= 3];
    for (i, want) in [x, y].into_iter().enumerate() {
        if counted[i] {
            assert!(
                bits[i],
                "pagesInUse counts {want:?} but its pageInUse bit is clear"
            );
        }
        if bits[i] {
            assert_eq!(
                seen[i],
                Some(want),
                "pageInUse is set but the span is not published"
            );
        }
        if let Some(v) = seen[i] {
            assert_eq!(v, want, "a published span with other fields");
        }
    }
    assert_eq!(gap, None, "page p + 1 is in no live span");
    if let Some(v) = y_last {
        assert_eq!(v, y, "a published span with other fields");
    }

    for t in ths {
        t.join().unwrap();
    }
    assert_eq!(heap.pages_in_use(), 4);
    for want in [x, y] {
        assert!(heap.page_in_use(want.base));
        // SAFETY: as above.
        assert_eq!(unsafe { heap.span_at(want.base) }, Some(want));
    }
}

#[test]
fn span_is_published_fully_initialised() {
    check(
        "publication",
        cfg!(any(
            spanheap_mutant = "span_map_relaxed",
            spanheap_mutant = "state_relaxed",
            spanheap_mutant = "in_use_relaxed",
            spanheap_mutant = "count_relaxed"
        )),
        model,
    );
}
