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

/// `scale` is Go's `scaleHeapSample`: `count` objects of average size `avg` sampled at
/// `rate` stand for `count / (1 - exp(-avg / rate))`; rate 0 or 1 is unscaled.
#[test]
fn scale_is_gos_scale_heap_sample() {
    use spanheap::profile::scale;
    let rate = 512 << 10;
    // Objects of the rate's size are sampled with probability 1 - 1/e.
    let (n, b) = scale(1000, 1000 * rate as u64, rate);
    let f = 1.0 / (1.0 - (-1.0f64).exp());
    assert_eq!(n, (1000.0 * f) as u64);
    assert_eq!(b, (1000.0 * rate as f64 * f) as u64);
    // Small objects: about rate / size objects per sample.
    let (n, _) = scale(1, 16, rate);
    assert!((32_768..=32_769).contains(&n), "{n}");
    assert_eq!(scale(7, 700, 1), (7, 700));
    assert_eq!(scale(7, 700, 0), (7, 700));
    assert_eq!(scale(0, 0, rate), (0, 0));
    // A big object is always sampled: counted once.
    assert_eq!(scale(1, 64 << 20, rate).0, 1);
}

/// The output format follows the file name's extension.
#[test]
fn format_by_extension() {
    use spanheap::profile::Format;
    use std::path::Path;
    assert_eq!(Format::for_path(Path::new("h.pb.gz")), Format::Pprof);
    assert_eq!(Format::for_path(Path::new("h.pprof")), Format::Pprof);
    assert_eq!(Format::for_path(Path::new("h")), Format::Pprof);
    assert_eq!(Format::for_path(Path::new("h.folded")), Format::Collapsed);
    assert_eq!(
        Format::for_path(Path::new("h.collapsed")),
        Format::Collapsed
    );
    assert_eq!(Format::for_path(Path::new("h.txt")), Format::Top);
}
