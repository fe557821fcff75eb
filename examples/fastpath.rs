//! A fixed loop of allocator calls for instruction counting with callgrind:
//!
//! ```sh
//! cargo build --release --example fastpath
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/fastpath spanheap pair 16
//! ```
//!
//! `fastpath span <pages> [warmup]` instead times `alloc_span` + `free_span` through a
//! thread's page cache on a private page heap.
//!
//! Arguments: allocator (`spanheap`, `mimalloc`, `jemalloc`, `system`), workload (`pair`:
//! alloc + free of one block, repeated; `batch`: 64 allocations then 64 frees, repeated),
//! block size in bytes; `churn` is the suite's churned live set, one step = one free and
//! one allocation (the size argument is ignored); `scatter` frees 100,000 blocks in a
//! shuffled order, 50 times. The loop runs 1,000,000 operations pairs after a warm-up of
//! 10,000; divide callgrind's total instruction count by 1,000,000 after subtracting a
//! run with `warmup-only` as the workload.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

const N: usize = 1_000_000;

// One call boundary per operation, as a Rust program has (`__rust_alloc` /
// `__rust_dealloc` are calls into the global allocator's methods, which are inlined
// into them). Without it the comparison would depend on the inliner's mood here.
#[inline(never)]
fn do_alloc<A: GlobalAlloc>(a: &A, l: Layout) -> *mut u8 {
    // SAFETY: callers pass non-zero layouts.
    unsafe { a.alloc(l) }
}

#[inline(never)]
fn do_dealloc<A: GlobalAlloc>(a: &A, p: *mut u8, l: Layout) {
    // SAFETY: callers pass blocks from `do_alloc` with the same layout.
    unsafe { a.dealloc(p, l) }
}
const WARMUP: usize = 10_000;

fn pairs<A: GlobalAlloc>(a: &A, l: Layout, n: usize) {
    for _ in 0..n {
        let p = do_alloc(a, black_box(l));
        assert!(!p.is_null());
        do_dealloc(a, black_box(p), l);
    }
}

fn batches<A: GlobalAlloc>(a: &A, l: Layout, n: usize) {
    let mut ps = [std::ptr::null_mut::<u8>(); 64];
    for _ in 0..n / 64 {
        for p in ps.iter_mut() {
            *p = do_alloc(a, black_box(l));
            assert!(!p.is_null());
        }
        for &p in ps.iter() {
            do_dealloc(a, black_box(p), l);
        }
    }
}

/// The suite's `churn-10k`: a live set of 10,000 power-law sizes (8 B .. 128 KiB, half
/// under 16 B); each step frees a random block and allocates a new one in its place.
/// `steps` steps after building the set (the warm-up run builds it and takes none).
fn churn<A: GlobalAlloc>(a: &A, steps: usize) {
    let mut r = Rng(7);
    let mut size = || Layout::from_size_align(r.power_law_size(), 8).expect("layout");
    let mut live: Vec<(*mut u8, Layout)> = (0..10_000)
        .map(|_| {
            let l = size();
            let p = do_alloc(a, l);
            assert!(!p.is_null());
            (p, l)
        })
        .collect();
    let mut pick = Rng(8);
    for _ in 0..steps {
        let i = pick.below(live.len());
        let (p, l) = live[i];
        do_dealloc(a, p, l);
        let l = size();
        let p = do_alloc(a, l);
        assert!(!p.is_null());
        live[i] = (p, l);
    }
    for (p, l) in live {
        do_dealloc(a, p, l);
    }
}

/// Builds 100,000 blocks of `size` bytes and frees them in a shuffled order (a dropped
/// hash map), `rounds` times; prints the time per block (alloc + free) to stderr.
fn scatter<A: GlobalAlloc>(a: &A, size: usize, rounds: usize) {
    let l = Layout::from_size_align(size, 8).expect("layout");
    let mut r = Rng(11);
    let mut ps: Vec<*mut u8> = Vec::with_capacity(100_000);
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        ps.extend((0..100_000).map(|_| {
            let p = do_alloc(a, l);
            assert!(!p.is_null());
            p
        }));
        for i in (1..ps.len()).rev() {
            ps.swap(i, r.below(i + 1));
        }
        for p in ps.drain(..) {
            do_dealloc(a, p, l);
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / (rounds * 100_000) as f64;
    eprintln!("scatter {size} B: {ns:.1} ns per block (shuffle included)");
}

fn run<A: GlobalAlloc>(a: &A, workload: &str, size: usize) {
    let l = Layout::from_size_align(size, 8).expect("layout");
    match workload {
        "pair" => {
            pairs(a, l, WARMUP);
            pairs(a, l, N);
        }
        "batch" => {
            batches(a, l, WARMUP);
            batches(a, l, N);
        }
        // `size` is ignored: the sizes follow the power law.
        "churn" => churn(a, N),
        "scatter" => scatter(a, size, 50),
        "warmup-churn" => churn(a, 0),
        "warmup-pair" => pairs(a, l, WARMUP),
        "warmup-batch" => batches(a, l, WARMUP),
        w => panic!("unknown workload {w}"),
    }
}

/// `alloc_span` + `free_span` of `npages` pages through a thread page cache on a private
/// page heap (the lock-free span path; no global allocator involved). The thread has a
/// statistics writer, as a thread with a cache has in the process-wide heap (without
/// one, every statistics section would take the leaf lock).
fn spans(npages: usize, n: usize) {
    use spanheap::__private::{PageHeap, ThreadPages};
    let heap = PageHeap::with_thread_writers(spanheap::os::OsMemory);
    heap.stats_writer().bind();
    let mut tc = ThreadPages::new();
    for _ in 0..n {
        let s = heap
            .alloc_span_cached(black_box(npages), spanheap::Purpose::Heap, 0, &mut tc)
            .expect("span");
        // SAFETY: a live span of this heap, freed once.
        unsafe { heap.free_span_cached(black_box(s), &mut tc) };
    }
    heap.flush_cache(&mut tc);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("span") {
        // `fastpath span <pages> [warmup]`
        let npages = args.get(2).map_or(1, |s| s.parse().expect("pages"));
        let n = if args.get(3).is_some() {
            WARMUP
        } else {
            WARMUP + N
        };
        return spans(npages, n);
    }
    let alloc = args.get(1).map_or("spanheap", String::as_str);
    let workload = args.get(2).map_or("pair", String::as_str);
    let size: usize = args.get(3).map_or(16, |s| s.parse().expect("size"));
    match alloc {
        "spanheap" => run(&spanheap::SpanHeap, workload, size),
        "mimalloc" => run(&mimalloc::MiMalloc, workload, size),
        "jemalloc" => run(&tikv_jemallocator::Jemalloc, workload, size),
        "system" => run(&System, workload, size),
        a => panic!("unknown allocator {a}"),
    }
}
