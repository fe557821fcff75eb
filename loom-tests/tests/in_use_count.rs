//! `pageInUse` and `pagesInUse` (seed 001) under concurrent span allocation and free,
//! on the real `MHeap::alloc_span` / `free_span`. Thread A allocates the 1-page span X
//! and frees it; thread B allocates the 2-page span Y and keeps it; the reader loads
//! `pagesInUse`, the two spans' `pageInUse` bits, X's bit again and `pagesInUse` again.
//! (X and Y have different sizes, so a count tells which spans it includes: X is
//! counted iff it is odd.)
//!
//! Publication sets the bit before adding to `pagesInUse`; `free_span` subtracts from
//! `pagesInUse` before clearing the bit, both with Release. So for a reader (Acquire):
//!
//! - `pagesInUse` counts Y => Y's bit is set;
//! - the reader has seen X published (X counted, or X's bit set) and then sees X's bit
//!   clear => X's free is visible: the later `pagesInUse` does not count X.
//!
//! After both threads: `pagesInUse` is Y's 2 pages, only Y's bit is set, and the span
//! map answers Y for Y's page and nothing for X's.
//!
//! Mutants it must catch: `clear_in_use_relaxed` (pageInUse bit cleared Relaxed) and
//! `count_relaxed` (pagesInUse incremented Relaxed: a count that includes X no longer
//! shows X's bit). `in_use_relaxed` is beyond it: the reader reads no bit without
//! first reading a count that orders it.
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::{PageHeap, SpanView};
use spanheap::os::PAGE_SIZE;
use spanheap::Purpose;

fn model() {
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    // Set-up, before any other thread exists: grow the heap (arena, span records), and
    // leave a 1-page hole at `p`, closed by a live 1-page manual span (manual spans
    // have no pageInUse bit and are not in pagesInUse). X always lands in the hole and
    // Y (too large for it) after the guard, whatever the interleaving.
    let w = heap.alloc_span(1, Purpose::Heap, 1).unwrap();
    let p = w.base();
    let guard = heap.alloc_span(1, Purpose::SpanBitmaps, 1).unwrap();
    assert_eq!(guard.base(), p + PAGE_SIZE);
    // SAFETY: `w` is live and freed once.
    unsafe { heap.free_span(w) };
    assert_eq!(heap.pages_in_use(), 0);
    let (xb, yb) = (p, p + 2 * PAGE_SIZE);

    let h = heap.clone();
    let a = spawn(move || {
        let x = h.alloc_span(1, Purpose::Heap, 1).unwrap();
        assert_eq!(x.base(), xb);
        // SAFETY: `x` is live and freed once.
        unsafe { h.free_span(x) };
    });
    let h = heap.clone();
    let b = spawn(move || {
        let y = h.alloc_span(2, Purpose::Heap, 1).unwrap();
        assert_eq!(y.base(), yb);
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
    let x_seen = counts_x(c1) || x1;
    if x_seen && !x2 {
        assert!(
            !counts_x(c2),
            "X's pageInUse bit was cleared, but pagesInUse ({c2}) still counts X"
        );
    }

    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(heap.pages_in_use(), 2);
    assert!(!heap.page_in_use(xb));
    assert!(heap.page_in_use(yb));
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
fn page_in_use_and_pages_in_use_agree() {
    check(
        "in_use_count",
        cfg!(any(
            spanheap_mutant = "clear_in_use_relaxed",
            spanheap_mutant = "count_relaxed"
        )),
        model,
    );
}
