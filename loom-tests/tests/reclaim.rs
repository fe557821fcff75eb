//! Taking back an idle thread's heap cache (`pagecache.rs` `GatedCache`,
//! `MHeap::reclaim_caches`, the real code): a reclaimer takes what a thread's page
//! cache holds only while the owner is outside it, and the owner never uses the cache
//! while a reclaimer is taking it.
//!
//! The cache lives in a loom cell (`sync::UnsafeCell`) that the owner writes inside
//! its gate and the reclaimer writes while taking the cache, so a hand-off that does
//! not order the two (both inside at once, or one's writes not visible to the other)
//! is a loom causality violation.
//!
//! Set-up: the owner's cache takes a 64-page block (one 1-page span allocated and freed
//! back into it). Then the owner allocates a 1-page span and frees it, each inside the
//! gate (from its block, or, if the cache was taken meanwhile, from a block refilled
//! under the heap lock), while the reclaimer runs `reclaim_caches` (claim, heavy
//! barrier, look at `busy`, take or let go). Afterwards the reclaimer took the cache
//! at most once, and once the owner flushes, the heap holds no live span.
//!
//! Mutants it must catch: `gate_no_fence` (the owner's light barrier dropped: its store
//! of `busy` and load of `claim` may pass each other, so both sides can miss the
//! other's store) and `gate_claim_relaxed` (the owner's load of `claim` Relaxed: it can
//! see a finished claim without the reclaimer's writes to the cache).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::PageHeap;
use spanheap::Purpose;

fn model() {
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    let g = heap.new_gated_pages();
    // SAFETY (all gated calls): this thread is the cache's only owner until the owner
    // thread starts, which is then its only owner until joined.
    let w = unsafe { heap.alloc_span_gated(1, Purpose::Heap, 1, &g) }.unwrap();
    // SAFETY: live, freed once (back into the cache).
    unsafe { heap.free_span_gated(w, &g) };
    assert_eq!(heap.pages_in_use(), 0);

    let h = heap.clone();
    let owner = spawn(move || {
        // SAFETY: see above.
        let x = unsafe { h.alloc_span_gated(1, Purpose::Heap, 1, &g) }.unwrap();
        assert_eq!(x.npages(), 1);
        // SAFETY: live, freed once.
        unsafe { h.free_span_gated(x, &g) };
    });
    let h = heap.clone();
    let reclaimer = spawn(move || h.reclaim_idle());
    owner.join().unwrap();
    let taken = reclaimer.join().unwrap();
    assert!(taken <= 1, "took the one cache {taken} times");
    assert_eq!(heap.pages_in_use(), 0);
    // SAFETY: the owner thread is done; this thread owns the cache again.
    unsafe { heap.flush_gated(&g) };
    assert_eq!(heap.heap_inuse(), 0, "a span is still live");
    // Nothing left to take.
    assert_eq!(heap.reclaim_idle(), 1);
}

#[test]
fn an_idle_cache_is_taken_only_while_its_owner_is_outside() {
    check(
        "reclaim",
        cfg!(any(
            spanheap_mutant = "gate_no_fence",
            spanheap_mutant = "gate_claim_relaxed"
        )),
        model,
    );
}
