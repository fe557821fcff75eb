//! Cost of `alloc_span` + `free_span` for 1, 8 and 64 pages, on an empty heap and on a
//! heap holding 1,000,000 live pages fragmented into single-page holes (the page
//! allocator's radix summaries should keep the cost roughly flat); and the same through
//! a thread's page cache (`page-cache/*`: spans under 16 pages take no lock; 64 pages
//! falls back to the locked path).
//!
//! Run: `cargo bench --bench alloc_span`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use spanheap::__private::{PageHeap, SpanRef, ThreadPages};
use spanheap::Purpose;
use std::hint::black_box;

const LIVE_PAGES: usize = 1_000_000;

fn fragmented_heap() -> (PageHeap, Vec<SpanRef>) {
    let heap = PageHeap::new(spanheap::os::OsMemory);
    // 2M single pages, then free every other one: 1M live pages, 1M one-page holes.
    let all: Vec<SpanRef> = (0..2 * LIVE_PAGES)
        .map(|_| heap.alloc_span(1, Purpose::Heap, 0).unwrap())
        .collect();
    let mut live = Vec::with_capacity(LIVE_PAGES);
    for (i, s) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            unsafe { heap.free_span(s) };
        } else {
            live.push(s);
        }
    }
    // The holes stay: a one-page request takes the lowest of them, and a multi-page
    // request must find a run past a million one-page holes (the radix summaries'
    // job).
    (heap, live)
}

fn bench(c: &mut Criterion) {
    let empty = PageHeap::new(spanheap::os::OsMemory);
    let (frag, _live) = fragmented_heap();
    let mut g = c.benchmark_group("alloc_span+free_span");
    for &npages in &[1usize, 8, 64] {
        for (name, heap) in [("empty", &empty), ("1M-live-fragmented", &frag)] {
            g.bench_with_input(BenchmarkId::new(name, npages), &npages, |b, &n| {
                b.iter(|| {
                    let s = heap.alloc_span(black_box(n), Purpose::Heap, 0).unwrap();
                    unsafe { heap.free_span(black_box(s)) };
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("page-cache");
    for &npages in &[1usize, 8, 64] {
        for (name, heap) in [("empty", &empty), ("1M-live-fragmented", &frag)] {
            let mut tc = ThreadPages::new();
            g.bench_with_input(BenchmarkId::new(name, npages), &npages, |b, &n| {
                b.iter(|| {
                    let s = heap
                        .alloc_span_cached(black_box(n), Purpose::Heap, 0, &mut tc)
                        .unwrap();
                    unsafe { heap.free_span_cached(black_box(s), &mut tc) };
                })
            });
            heap.flush_cache(&mut tc);
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
