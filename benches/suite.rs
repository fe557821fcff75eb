//! The side-by-side suite: spanheap, mimalloc, jemalloc (tikv-jemallocator) and the
//! system allocator (glibc), each called through its `GlobalAlloc` methods directly in
//! one process, with the same inputs. One criterion group per workload, one benchmark
//! per allocator in it, so the output (and `tools/bench-table.sh`) reads as a table.
//!
//! - `pair/<size>`: alloc + free of one block, 16 B .. 256 KiB;
//! - `batch-lifo`, `batch-fifo`, `batch-random`: 1,000 blocks of mixed sizes (8 B ..
//!   4 KiB, skewed small; a fixed sequence) allocated, then freed in reverse, in order,
//!   or in a fixed shuffled order (time per batch);
//! - `churn-10k`: a live set of 10,000 blocks with power-law sizes; each step frees a
//!   random block and allocates a new one in its place (time per step);
//! - `vec-growth`: a `Vec<u64>`-like buffer grown by `realloc` (doubling) to 1,000,000
//!   elements, then freed;
//! - `producer-consumer`: two threads, every free cross-thread: the producer allocates
//!   64 B blocks and passes them in batches of 256 through a channel to the consumer,
//!   which checks and frees them (time per block);
//! - `two-threads`: two threads each running their own alloc/free loop of mixed small
//!   sizes (time per operation, both threads together);
//! - `large/<size>`: alloc, touch one byte per 4 KiB page, free; 64 KiB .. 16 MiB.
//!
//! Every allocation is checked non-null and written, so no work can be optimised away.
//! Every allocator call is one out-of-line call (`alloc_call`, `dealloc_call`,
//! `realloc_call`), as `__rust_alloc` and friends are in a Rust program: inlined into
//! each workload's loop instead, an allocator's code was laid out anew in every loop,
//! and where it happened to fall moved rows by a few percent (by 30-60% once, see
//! `vec-growth`).
//!
//! Run: `cargo bench --bench suite` (about 5 minutes), then `tools/bench-table.sh` for
//! the ratio table. `SUITE_QUICK=1` shortens every measurement (a smoke test).

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

static SPANHEAP: spanheap::SpanHeap = spanheap::SpanHeap;
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static JEMALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
static SYSTEM: System = System;

/// Runs a workload once per allocator with its concrete type (static dispatch; each
/// allocator call is one out-of-line call, see the module note).
trait Workload {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    );
}

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn each(c: &mut Criterion, group: &str, w: &mut impl Workload) {
    let quick = std::env::var_os("SUITE_QUICK").is_some();
    let mut g = c.benchmark_group(group);
    if quick {
        g.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            .sample_size(10);
    } else {
        g.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }
    w.run(&mut g, "spanheap", &SPANHEAP);
    w.run(&mut g, "mimalloc", &MIMALLOC);
    w.run(&mut g, "jemalloc", &JEMALLOC);
    w.run(&mut g, "system", &SYSTEM);
    g.finish();
}

/// splitmix64: a fixed, fast generator so every allocator sees the same inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Mixed small sizes, 8 B .. 4 KiB, skewed small (log-uniform).
fn small_size(r: &mut Rng) -> usize {
    let shift = 3 + r.next() % 10; // 8 .. 4096
    let base = 1usize << shift;
    (base + (r.next() as usize % base)).min(4096)
}

/// Power-law sizes 8 B .. 64 KiB: each size class of twice the size is half as likely.
fn power_law_size(r: &mut Rng) -> usize {
    let lead = (r.next() | (1 << 13)).trailing_zeros() as usize; // 0..=13, P ~ 2^-k
    let base = 8usize << lead;
    base + (r.next() as usize % base)
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// `a.alloc(l)` behind one call boundary (see the module note).
#[inline(never)]
fn alloc_call<A: GlobalAlloc>(a: &A, l: Layout) -> *mut u8 {
    // SAFETY: callers pass non-zero layouts.
    unsafe { a.alloc(l) }
}

/// `a.dealloc(p, l)` behind one call boundary.
///
/// # Safety
/// As for `GlobalAlloc::dealloc`.
#[inline(never)]
unsafe fn dealloc_call<A: GlobalAlloc>(a: &A, p: *mut u8, l: Layout) {
    // SAFETY: forwarded.
    unsafe { a.dealloc(p, l) }
}

/// `a.realloc(p, l, new_size)` behind one call boundary.
///
/// # Safety
/// As for `GlobalAlloc::realloc`.
#[inline(never)]
unsafe fn realloc_call<A: GlobalAlloc>(a: &A, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: forwarded.
    unsafe { a.realloc(p, l, new_size) }
}

/// Allocates and writes the first byte; panics on null.
#[inline]
fn get<A: GlobalAlloc>(a: &A, l: Layout) -> *mut u8 {
    let p = alloc_call(a, l);
    assert!(!p.is_null(), "allocation failed");
    // SAFETY: at least one byte.
    unsafe { p.write(l.size() as u8) };
    p
}

#[inline]
fn put<A: GlobalAlloc>(a: &A, p: *mut u8, l: Layout) {
    // SAFETY: `p` came from `get` with this layout; the check keeps the write alive.
    unsafe {
        assert_eq!(p.read(), l.size() as u8, "block corrupted");
        dealloc_call(a, p, l);
    }
}

struct Pair(usize);
impl Workload for Pair {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        let l = layout(self.0);
        g.bench_function(name, |b| b.iter(|| put(a, get(a, black_box(l)), l)));
    }
}

#[derive(Clone, Copy)]
enum Order {
    Lifo,
    Fifo,
    Random,
}

struct Batch {
    order: Order,
    sizes: Vec<Layout>,
    perm: Vec<usize>,
}
impl Workload for Batch {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        let mut ps = vec![std::ptr::null_mut(); self.sizes.len()];
        g.bench_function(name, |b| {
            b.iter(|| {
                for (p, &l) in ps.iter_mut().zip(&self.sizes) {
                    *p = get(a, l);
                }
                match self.order {
                    Order::Lifo => {
                        for (&p, &l) in ps.iter().zip(&self.sizes).rev() {
                            put(a, p, l);
                        }
                    }
                    Order::Fifo => {
                        for (&p, &l) in ps.iter().zip(&self.sizes) {
                            put(a, p, l);
                        }
                    }
                    Order::Random => {
                        for &i in &self.perm {
                            put(a, ps[i], self.sizes[i]);
                        }
                    }
                }
            })
        });
    }
}

struct Churn;
impl Workload for Churn {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        let mut r = Rng(7);
        let mut live: Vec<(*mut u8, Layout)> = (0..10_000)
            .map(|_| {
                let l = layout(power_law_size(&mut r));
                (get(a, l), l)
            })
            .collect();
        g.bench_function(name, |b| {
            b.iter(|| {
                let i = (r.next() % live.len() as u64) as usize;
                let (p, l) = live[i];
                put(a, p, l);
                let l = layout(power_law_size(&mut r));
                live[i] = (get(a, l), l);
            })
        });
        for (p, l) in live {
            put(a, p, l);
        }
    }
}

/// Writes `i` to element `i` of `p` for `i` in `from..to`: the element stores of
/// `vec-growth`, out of line so that every allocator runs the same machine code at the
/// same address. (Inlined, each allocator's copy of the loop sat at its own alignment;
/// spanheap's once crossed a 64-byte boundary and its row read 450 µs instead of 270
/// with no change in the allocator.)
///
/// # Safety
/// `p` is valid for writes of `to` elements.
#[inline(never)]
unsafe fn fill(p: *mut u64, from: usize, to: usize) {
    for i in from..to {
        // SAFETY: i < to.
        unsafe { p.add(i).write(i as u64) };
    }
}

struct VecGrowth;
impl Workload for VecGrowth {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut cap = 4usize;
                let mut p = get(a, layout(cap * 8));
                let mut len = 0usize;
                while len < 1_000_000 {
                    if len == cap {
                        // SAFETY: `p` is live with this layout; the new size is non-zero.
                        p = unsafe { realloc_call(a, p, layout(cap * 8), cap * 16) };
                        assert!(!p.is_null());
                        cap *= 2;
                    }
                    let end = cap.min(1_000_000);
                    // SAFETY: end <= cap elements of 8 bytes.
                    unsafe { fill(p.cast::<u64>(), len, end) };
                    len = end;
                }
                // SAFETY: as above.
                assert_eq!(unsafe { p.cast::<u64>().add(999_999).read() }, 999_999);
                // SAFETY: `p` is live with this layout.
                unsafe { dealloc_call(a, p, layout(cap * 8)) };
            })
        });
    }
}

/// Pointers sent between threads (they stay owned by whoever holds the batch).
struct Ptrs(Vec<*mut u8>);
// SAFETY: the blocks are handed over whole; only the receiver uses them afterwards.
unsafe impl Send for Ptrs {}

struct ProducerConsumer;
impl Workload for ProducerConsumer {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        const BATCH: usize = 256;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let batches = (iters as usize).div_ceil(BATCH).max(1);
                let (tx, rx) = mpsc::sync_channel::<Ptrs>(64);
                let l = layout(64);
                let start = Instant::now();
                let consumer = std::thread::spawn(move || {
                    for Ptrs(v) in rx {
                        for p in v {
                            put(a, p, l);
                        }
                    }
                });
                for _ in 0..batches {
                    let v = (0..BATCH).map(|_| get(a, l)).collect();
                    tx.send(Ptrs(v)).unwrap();
                }
                drop(tx);
                consumer.join().unwrap();
                start.elapsed() * (iters as u32).max(1) / (batches * BATCH) as u32
            })
        });
    }
}

struct TwoThreads;
impl Workload for TwoThreads {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per = (iters as usize).div_ceil(2).max(1);
                let start = Instant::now();
                let hs: Vec<_> = (0..2u64)
                    .map(|t| {
                        std::thread::spawn(move || {
                            let mut r = Rng(t + 100);
                            let mut ring = [(std::ptr::null_mut::<u8>(), layout(8)); 32];
                            for i in 0..per {
                                let slot = &mut ring[i % 32];
                                if !slot.0.is_null() {
                                    put(a, slot.0, slot.1);
                                }
                                let l = layout(small_size(&mut r).min(512));
                                *slot = (get(a, l), l);
                            }
                            for (p, l) in ring {
                                if !p.is_null() {
                                    put(a, p, l);
                                }
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
                start.elapsed() * (iters as u32).max(1) / (2 * per) as u32
            })
        });
    }
}

struct Large(usize);
impl Workload for Large {
    fn run<A: GlobalAlloc + Sync + 'static>(
        &mut self,
        g: &mut Group<'_>,
        name: &str,
        a: &'static A,
    ) {
        let l = layout(self.0);
        g.bench_function(name, |b| {
            b.iter(|| {
                let p = get(a, l);
                let mut off = 4096;
                while off < l.size() {
                    // SAFETY: inside the block.
                    unsafe { p.add(off).write(1) };
                    off += 4096;
                }
                put(a, p, l);
            })
        });
    }
}

fn suite(c: &mut Criterion) {
    for (label, size) in [
        ("16B", 16),
        ("64B", 64),
        ("256B", 256),
        ("1KiB", 1 << 10),
        ("4KiB", 4 << 10),
        ("16KiB", 16 << 10),
        ("64KiB", 64 << 10),
        ("256KiB", 256 << 10),
    ] {
        each(c, &format!("pair/{label}"), &mut Pair(size));
    }
    let mut r = Rng(1);
    let sizes: Vec<Layout> = (0..1000).map(|_| layout(small_size(&mut r))).collect();
    let mut perm: Vec<usize> = (0..1000).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    for (label, order) in [
        ("batch-lifo", Order::Lifo),
        ("batch-fifo", Order::Fifo),
        ("batch-random", Order::Random),
    ] {
        each(
            c,
            label,
            &mut Batch {
                order,
                sizes: sizes.clone(),
                perm: perm.clone(),
            },
        );
    }
    each(c, "churn-10k", &mut Churn);
    each(c, "vec-growth", &mut VecGrowth);
    each(c, "producer-consumer", &mut ProducerConsumer);
    each(c, "two-threads", &mut TwoThreads);
    for (label, size) in [
        ("64KiB", 64 << 10),
        ("256KiB", 256 << 10),
        ("1MiB", 1 << 20),
        ("4MiB", 4 << 20),
        ("16MiB", 16 << 20),
    ] {
        each(c, &format!("large/{label}"), &mut Large(size));
    }
}

criterion_group!(benches, suite);
criterion_main!(benches);
