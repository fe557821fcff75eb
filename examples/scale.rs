//! Allocation cost as the live heap grows: fills the heap with `live` bytes of objects
//! (mixed sizes 16 B..4 KiB plus 1 in 64 large blocks of 40..400 KiB, so the page heap
//! holds many spans and arenas), then times alloc+free pairs of several sizes and a
//! fragmenting churn against that heap.
//!
//! ```sh
//! cargo run --release --example scale -- 10M 1G 8G     # spanheap
//! cargo run --release --example scale -- --alloc mimalloc 10M 1G
//! ```
//!
//! Prints one line per live size: nanoseconds per pair for 16 B, 4 KiB, 64 KiB (page
//! cache), 256 KiB (page heap under the lock) and the churn step, best of 3 rounds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Instant;

fn parse_size(s: &str) -> usize {
    let (n, mul) = match s.as_bytes().last() {
        Some(b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<usize>().expect("size") * mul
}

/// splitmix64.
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

fn layout_for(r: &mut Rng) -> Layout {
    let size = if r.next() % 64 == 0 {
        (40 << 10) + (r.next() % (360 << 10)) as usize
    } else {
        16 << (r.next() % 9) // 16 B .. 4 KiB
    };
    Layout::from_size_align(size, 8).unwrap()
}

fn pair_ns<A: GlobalAlloc>(a: &A, size: usize, n: usize) -> f64 {
    let l = Layout::from_size_align(size, 8).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: a non-zero layout; freed with the same layout.
        unsafe {
            let p = a.alloc(black_box(l));
            assert!(!p.is_null());
            p.write(1);
            a.dealloc(black_box(p), l);
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn run<A: GlobalAlloc>(a: &A, name: &str, sizes: &[usize]) {
    println!(
        "{name}: ns per operation, best of 3\n{:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "live", "16B", "4KiB", "64KiB", "256KiB", "churn"
    );
    let mut live: Vec<(*mut u8, Layout)> = Vec::new();
    let mut bytes = 0usize;
    let mut r = Rng(42);
    for &target in sizes {
        while bytes < target {
            let l = layout_for(&mut r);
            // SAFETY: non-zero layout.
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null(), "out of memory at {bytes} bytes");
            // Touch every page so the live set is resident, as a real heap is.
            let mut off = 0;
            while off < l.size() {
                // SAFETY: inside the block.
                unsafe { p.add(off).write(off as u8) };
                off += 4096;
            }
            live.push((p, l));
            bytes += l.size();
        }
        let mut best = [f64::MAX; 5];
        for _ in 0..3 {
            let t = [
                pair_ns(a, 16, 2_000_000),
                pair_ns(a, 4096, 1_000_000),
                pair_ns(a, 64 << 10, 200_000),
                pair_ns(a, 256 << 10, 50_000),
                {
                    // Churn: replace a random live block with a new one of another size.
                    let n = 200_000;
                    let t = Instant::now();
                    for _ in 0..n {
                        let i = (r.next() % live.len() as u64) as usize;
                        let l = layout_for(&mut r);
                        // SAFETY: live blocks with their layouts; non-zero layout.
                        unsafe {
                            a.dealloc(live[i].0, live[i].1);
                            let p = a.alloc(l);
                            assert!(!p.is_null());
                            p.write(1);
                            bytes = bytes - live[i].1.size() + l.size();
                            live[i] = (p, l);
                        }
                    }
                    t.elapsed().as_nanos() as f64 / n as f64
                },
            ];
            for (b, x) in best.iter_mut().zip(t) {
                *b = b.min(x);
            }
        }
        println!(
            "{:>7}M {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1}",
            bytes >> 20,
            best[0],
            best[1],
            best[2],
            best[3],
            best[4]
        );
    }
    for (p, l) in live {
        // SAFETY: live blocks with their layouts.
        unsafe { a.dealloc(p, l) };
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut alloc = "spanheap".to_string();
    if args.first().map(String::as_str) == Some("--alloc") {
        alloc = args.get(1).cloned().expect("allocator");
        args.drain(..2);
    }
    let mut sizes: Vec<usize> = args.iter().map(|s| parse_size(s)).collect();
    if sizes.is_empty() {
        sizes = vec![10 << 20, 1 << 30];
    }
    sizes.sort_unstable();
    match alloc.as_str() {
        "spanheap" => run(&spanheap::SpanHeap, "spanheap", &sizes),
        "mimalloc" => run(&mimalloc::MiMalloc, "mimalloc", &sizes),
        "jemalloc" => run(&tikv_jemallocator::Jemalloc, "jemalloc", &sizes),
        "system" => run(&System, "system", &sizes),
        a => panic!("unknown allocator {a}"),
    }
}
