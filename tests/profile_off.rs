//! With the heap profile never turned on (no `SPANHEAP_PROF_*` in the environment, no
//! `set_rate`), nothing is sampled and the profile is empty. (Its own binary: the
//! profile is process-wide, and `tests/profile.rs` turns it on.)

#![cfg(feature = "profile")]

use std::hint::black_box;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

#[test]
fn sampling_off_gives_no_samples() {
    if std::env::var_os("SPANHEAP_PROF_RATE").is_some()
        || std::env::var_os("SPANHEAP_PROF_FILE").is_some()
    {
        eprintln!("skipped: the environment turns the profile on");
        return;
    }
    assert_eq!(spanheap::profile::rate(), 0);
    spanheap::profile::set_rate(0);
    let mut keep = Vec::new();
    for i in 0..20_000usize {
        keep.push(black_box(vec![i as u8; 1 + i % 5000]));
        if i % 3 == 0 {
            keep.swap_remove(i % keep.len());
        }
    }
    let big: Vec<Vec<u8>> = (0..20).map(|_| vec![0u8; 3 << 20]).collect();
    drop((keep, big));
    let p = spanheap::profile::snapshot();
    assert_eq!(spanheap::profile::sampled_allocations(), 0);
    assert!(p.buckets.is_empty(), "{:?}", p.totals);
    assert_eq!(p.totals, spanheap::profile::Totals::default());
    assert!(p.symbolize().stacks.is_empty());
}
