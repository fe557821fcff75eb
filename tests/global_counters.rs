//! The heap counters of the process-wide heap are consistent once allocation is quiet.
//! One test in its own binary, so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

#[test]
fn counters_are_consistent_after_a_mixed_workload() {
    let before = spanheap::__private::global_counters();
    let mut blocks = Vec::with_capacity(2000);
    for i in 0..2000usize {
        let layout = Layout::from_size_align(1 + (i * 4099) % (1 << 20), 1 << (i % 14)).unwrap();
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
    assert_eq!(mid.heap_inuse, mid.pages_in_use * 8192);
    assert_eq!(mid.heap_inuse + mid.heap_idle, mid.heap_sys);
    for (p, l) in blocks.drain(..) {
        unsafe { GLOBAL.dealloc(p, l) };
    }
    let after = spanheap::__private::global_counters();
    assert_eq!(after.heap_inuse + after.heap_idle, after.heap_sys);
    assert!(after.heap_released <= after.heap_idle);
    assert_eq!(after.pages_in_use, before.pages_in_use + vec_pages);
    let manual: u64 = after.by_purpose.iter().skip(1).sum();
    assert_eq!(after.heap_sys + manual, after.arena_bytes);
}
