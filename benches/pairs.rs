//! spanheap side by side with mimalloc, jemalloc and the system allocator, each called
//! through its `GlobalAlloc` methods in one process (this bench's own global allocator
//! is the default one and is not measured):
//!
//! - `pair/<size>`: one `alloc` + `dealloc` of 16 B, 256 B, 4 KiB or 64 KiB;
//! - `batch-1000-mixed`: 1,000 blocks of mixed small sizes (8..=2048 B) allocated, then
//!   freed in reverse order (time per batch).
//!
//! Each group has one benchmark per allocator, so criterion's output reads as a table.
//!
//! Run: `cargo bench --bench pairs`

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Duration;

/// Runs `f` once per allocator with the allocator's concrete type, so each one's
/// `GlobalAlloc` methods are called directly (inlinable), not through a vtable.
trait ForEach {
    fn run<A: GlobalAlloc>(&mut self, name: &str, a: &A);
}

fn for_each_allocator(f: &mut impl ForEach) {
    f.run("spanheap", &spanheap::SpanHeap);
    f.run("mimalloc", &mimalloc::MiMalloc);
    f.run("jemalloc", &tikv_jemallocator::Jemalloc);
    f.run("system", &System);
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    g
}

struct Pair<'a, 'c> {
    g: &'a mut BenchmarkGroup<'c, WallTime>,
    layout: Layout,
}

impl ForEach for Pair<'_, '_> {
    fn run<A: GlobalAlloc>(&mut self, name: &str, a: &A) {
        let l = self.layout;
        self.g
            .bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| unsafe {
                    let p = a.alloc(black_box(l));
                    assert!(!p.is_null());
                    a.dealloc(black_box(p), l);
                })
            });
    }
}

fn pairs(c: &mut Criterion) {
    for (label, size) in [
        ("16B", 16usize),
        ("256B", 256),
        ("4KiB", 4 << 10),
        ("64KiB", 64 << 10),
    ] {
        let mut g = group(c, &format!("pair/{label}"));
        let layout = Layout::from_size_align(size, 8).unwrap();
        for_each_allocator(&mut Pair { g: &mut g, layout });
        g.finish();
    }
}

struct Batch<'a, 'c> {
    g: &'a mut BenchmarkGroup<'c, WallTime>,
    layouts: &'a [Layout],
    ptrs: &'a mut [*mut u8],
}

impl ForEach for Batch<'_, '_> {
    fn run<A: GlobalAlloc>(&mut self, name: &str, a: &A) {
        let (layouts, ptrs) = (self.layouts, &mut *self.ptrs);
        self.g
            .bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| unsafe {
                    for (p, &l) in ptrs.iter_mut().zip(layouts) {
                        *p = a.alloc(l);
                        assert!(!p.is_null());
                    }
                    black_box(&mut *ptrs);
                    for (p, &l) in ptrs.iter().zip(layouts).rev() {
                        a.dealloc(*p, l);
                    }
                })
            });
    }
}

fn batch(c: &mut Criterion) {
    const N: usize = 1000;
    // A fixed pseudo-random mix of sizes in 8..=2048 (xorshift64).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let layouts: Vec<Layout> = (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Layout::from_size_align(8 + (x % 2041) as usize, 8).unwrap()
        })
        .collect();
    let mut ptrs: Vec<*mut u8> = vec![std::ptr::null_mut(); N];
    let mut g = group(c, "batch-1000-mixed");
    for_each_allocator(&mut Batch {
        g: &mut g,
        layouts: &layouts,
        ptrs: &mut ptrs,
    });
    g.finish();
}

criterion_group!(benches, pairs, batch);
criterion_main!(benches);
