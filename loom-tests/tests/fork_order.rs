//! The lock order of the fork handler against a thread without a cache (the real
//! code: `mcache/shared.rs` `SharedCache::alloc`, `refill`, `MHeap::maybe_scavenge` ->
//! `scavenge_due` -> `reclaim_caches` and `scavenge`; `MHeap::fork_lock_all` and
//! `fork_unlock_all`, what `fork.rs`'s *prepare* and *parent* run).
//!
//! Size class 12,288 B (two objects per span). Set-up: the shared cache allocates both
//! objects of a span, and a scavenger pass is made due. Then, concurrently:
//!
//! - thread A allocates from the shared cache: its span is exhausted, so the refill
//!   takes a new one (the shared cache's lock, then the mcentral's, the heap's and the
//!   statistics `nop` lock), and the due pass runs (the reclaim lock, then the heap
//!   lock);
//! - thread B takes every lock of the heap in rank order, as the fork handler's
//!   *prepare* does, and releases them.
//!
//! A lock order that could deadlock makes loom find the interleaving where both wait
//! for each other (loom reports a deadlock).
//!
//! Mutant it must catch: `shared_scavenge` (the pass runs under the shared cache's
//! lock, as before the fix: A holds the shared cache and waits for the reclaim lock,
//! B holds the reclaim lock and waits for the shared cache).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{check, spawn, TestMem};
use spanheap::__private::{class_for_size, objects_per_span, PageHeap};

const SIZE: usize = 12288;

fn model() {
    let class = class_for_size(SIZE);
    assert_eq!(objects_per_span(class), 2);
    let heap = Arc::new(PageHeap::new(TestMem::fresh()));
    let (x0, x1) = (heap.alloc_shared(class), heap.alloc_shared(class));
    assert!(!x0.is_null() && !x1.is_null());
    heap.scavenge_soon();

    let h = heap.clone();
    let a = spawn(move || h.alloc_shared(class) as usize);
    let h = heap.clone();
    let b = spawn(move || {
        h.fork_lock_all();
        // SAFETY: this thread took them just now.
        unsafe { h.fork_unlock_all() };
    });
    let p = a.join().unwrap();
    b.join().unwrap();
    assert!(p != 0 && p != x0 as usize && p != x1 as usize);
}

const NAME: &str = "fork_handler_and_shared_cache_take_locks_in_one_order";

#[test]
fn fork_handler_and_shared_cache_take_locks_in_one_order() {
    if !cfg!(spanheap_mutant = "shared_scavenge") || std::env::var_os("FORK_ORDER_CHILD").is_some()
    {
        check("fork_order", false, model);
        return;
    }
    // loom reports a deadlock by panicking in its scheduler, and the unwinding through
    // the parked threads then aborts the process (a panic in a destructor) instead of
    // returning to `check`: run the model in a child process and look for the report.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env("FORK_ORDER_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("deadlock"),
        "the mutant was not caught by model fork_order: {:?}\n{stderr}",
        out.status
    );
    eprintln!(
        "loom model fork_order: deadlock found (in a child process, {:?})",
        out.status
    );
}
