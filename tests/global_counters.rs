//! The heap counters of the process-wide heap are consistent once allocation is quiet.
//! One test in its own binary, so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// The atomic gauges against the consistent statistics, which are kept separately
/// (with no span operation in flight on other threads).
fn gauges_match_stats(c: &spanheap::__private::HeapCounters) {
    let st = spanheap::stats();
    assert_eq!(c.heap_inuse, st.heap_bytes);
    assert_eq!(c.heap_idle, st.arena_bytes - st.inuse_bytes, "{c:?} {st:?}");
}

#[test]
fn counters_are_consistent_after_a_mixed_workload() {
    let before = spanheap::__private::global_counters();
    let mut blocks = Vec::with_capacity(2000);
    for i in 0..2000usize {
        // Large blocks only (over 32 KiB): each is a page span of its own, so the page
        // count is exact. Small objects are covered by the invariant checks below.
        let layout =
            Layout::from_size_align((64 << 10) + (i * 4099) % (1 << 20), 1 << (i % 14)).unwrap();
        let p = unsafe { GLOBAL.alloc(layout) };
        assert!(!p.is_null());
        blocks.push((p, layout));
    }
    let mid = spanheap::__private::global_counters();
    let expect_pages: u64 = blocks
        .iter()
        .map(|(_, l)| l.size().div_ceil(8192) as u64)
        .sum();
    // The Vec holding the blocks is itself a span of the heap.
    let vec_pages = (2000 * std::mem::size_of::<(*mut u8, Layout)>()).div_ceil(8192) as u64;
    assert_eq!(
        mid.pages_in_use - before.pages_in_use,
        expect_pages + vec_pages
    );
    gauges_match_stats(&mid);
    for (p, l) in blocks.drain(..) {
        unsafe { GLOBAL.dealloc(p, l) };
    }
    // A mixed small-object workload on another thread (its cache is released when it
    // exits) must leave the invariants intact too.
    std::thread::spawn(|| {
        let v: Vec<Box<[u8]>> = (0..20_000usize)
            .map(|i| vec![i as u8; 1 + i % 3000].into_boxed_slice())
            .collect();
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, b)| b.len() == 1 + i % 3000 && b.iter().all(|&x| x == i as u8)));
    })
    .join()
    .unwrap();
    let after = spanheap::__private::global_counters();
    gauges_match_stats(&after);
    assert!(after.heap_released <= after.heap_idle);
    // Small-object spans emptied by the thread are retired, except at most one spare
    // span (at most 10 pages) per size class.
    assert!(after.pages_in_use >= before.pages_in_use + vec_pages);
    assert!(
        after.pages_in_use <= before.pages_in_use + vec_pages + 68 * 10,
        "{after:?}"
    );
    let manual: u64 = after.by_purpose.iter().skip(1).sum();
    assert_eq!(after.heap_sys + manual, after.arena_bytes);
}
