//! The scavenger's forced pass (`MHeap::scavenge`, the real code `release_memory`
//! runs) against a concurrent allocation: the pass takes free runs under the heap lock
//! and marks them allocated, returns them to the memory source (MADV_DONTNEED, which
//! zeroes them) without the lock, and gives them back scavenged under the lock. No
//! interleaving may let it return a page that a live span uses.
//!
//! Set-up: a 2-page span is allocated, filled and freed, so the heap has two free
//! dirty pages at its bottom (the rest of the arena is fresh, already scavenged).
//! Thread A allocates a 1-page span (first fit: the lowest free page) and fills it;
//! the main thread meanwhile releases everything free. Afterwards:
//!
//! - A's span still holds what A wrote (a page decommitted under it would read zero);
//! - the pass released one or two pages (two if it ran before A took one, which A then
//!   re-committed);
//! - every free page of the heap is released (`heap_released == heap_idle`), and after
//!   A's span is freed a second pass releases exactly its page.
//!
//! Mutant it must catch: `scavenge_no_take` (the pass picks runs without marking them
//! allocated, so a concurrent allocation can be handed a page being decommitted).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::PageHeap;
use spanheap::os::PAGE_SIZE;
use spanheap::Purpose;

fn model() {
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    let s = heap.alloc_span(2, Purpose::Heap, 1).unwrap();
    let base = s.base();
    // SAFETY: the span's two pages are ours until freed.
    unsafe {
        core::ptr::write_bytes(base as *mut u8, 0xAB, 2 * PAGE_SIZE);
        heap.free_span(s);
    }
    let h = heap.clone();
    let a = spawn(move || {
        let x = h.alloc_span(1, Purpose::Heap, 1).unwrap();
        // SAFETY: x's page is ours.
        unsafe { core::ptr::write_bytes(x.base() as *mut u8, 0xCD, PAGE_SIZE) };
        x
    });
    let released = heap.release_free();
    let x = a.join().unwrap();
    // SAFETY: x is live; we only read it.
    let page = unsafe { core::slice::from_raw_parts(x.base() as *const u8, PAGE_SIZE) };
    assert!(
        page.iter().all(|&b| b == 0xCD),
        "a live span's page was returned to the OS under it"
    );
    assert!(
        released == PAGE_SIZE || released == 2 * PAGE_SIZE,
        "released {released} bytes"
    );
    assert_eq!(
        heap.released_bytes(),
        heap.idle_bytes(),
        "a free page is not released"
    );
    // SAFETY: x is live and freed once.
    unsafe { heap.free_span(x) };
    assert_eq!(heap.release_free(), PAGE_SIZE);
    assert_eq!(heap.released_bytes(), heap.idle_bytes());
}

#[test]
fn scavenge() {
    check(
        "scavenge",
        cfg!(spanheap_mutant = "scavenge_no_take"),
        model,
    );
}
