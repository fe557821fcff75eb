//! A larson-like server simulation (Larson & Krishnan, "Memory allocation for
//! long-running server applications", ISMM 1998; as in mimalloc-bench's `larson`), for
//! each allocator: cross-thread frees and thread turnover.
//!
//! ```sh
//! cargo run --release --example larson                  # 1, 2, 4 threads, all allocators
//! cargo run --release --example larson -- 1 8 16        # chosen thread counts
//! DEMO_ALLOC=mimalloc cargo run --release --example larson -- 4   # one allocator, raw
//! ```
//!
//! T chains run at once. A chain owns an array of `SLOTS` blocks of random size
//! (16 .. 1000 bytes). In each of `ROUNDS` rounds a thread does `ROUND_PAIRS` steps:
//! free the block of a random slot and allocate a new random-size block there. After
//! its round the thread exits and hands the whole array to a new thread, which starts
//! by freeing blocks the previous thread allocated: most frees are cross-thread, and
//! every round a thread cache is born and dies. (larson spawns the next thread from the
//! finishing one and runs for a fixed time; here each chain's driver starts the next
//! thread, and the work is fixed, so the figures are repeatable.) The arrays are filled
//! before the clock starts and freed after it stops; an unmeasured short run warms the
//! process up first.
//!
//! Each block carries a tag (chain, slot, sequence number) in its first and last eight
//! bytes, written at allocation and checked before the block is freed: corruption (a
//! block handed out twice, a write that landed in the wrong block) stops the run.
//!
//! Prints million operations per second (a free or an allocation is one operation; all
//! chains together) per allocator and thread count, and spanheap's throughput as a
//! multiple of each peer's; under the table, spanheap's lock acquisitions and contended
//! acquisitions per 1,000 operations per lock kind (`spanheap::lock_stats`). The
//! allocator is chosen per process as in the demo (`DEMO_ALLOC`).

use std::alloc::{alloc, dealloc, Layout};
use std::time::Instant;

#[path = "common/switch.rs"]
mod switch;

#[path = "common/children.rs"]
mod children;

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

#[path = "common/locks.rs"]
mod locks;

/// Blocks per chain (mimalloc-bench's larson: 5,000 per thread).
const SLOTS: usize = 5_000;
/// Block sizes: `MIN_SIZE .. MAX_SIZE` bytes, uniform.
const MIN_SIZE: usize = 16;
const MAX_SIZE: usize = 1000;
/// Free-and-allocate steps per round (one thread's life).
const ROUND_PAIRS: usize = 100_000;
/// Rounds (threads) per chain.
const ROUNDS: usize = 100;

/// One slot: a block, its size and the tag written into it.
#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
    tag: u64,
}

/// What a chain hands from one thread to the next.
struct Chain {
    id: u64,
    rng: Rng,
    seq: u64,
    slots: Vec<Slot>,
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

impl Chain {
    /// A new block of random size in a slot: allocated and tagged.
    fn new_block(&mut self, slot: usize) -> Slot {
        let size = MIN_SIZE + self.rng.below(MAX_SIZE - MIN_SIZE);
        self.seq += 1;
        let tag = (self.id << 56) ^ ((slot as u64) << 32) ^ self.seq;
        // SAFETY: a non-zero size.
        let p = unsafe { alloc(layout(size)) };
        assert!(!p.is_null(), "out of memory");
        // SAFETY: `size >= 16` writable bytes.
        unsafe {
            p.cast::<u64>().write(tag);
            p.add(size - 8).cast::<u64>().write_unaligned(!tag);
        }
        Slot {
            ptr: p as usize,
            size,
            tag,
        }
    }

    /// Checks a block's tag and frees it.
    fn free_block(s: Slot) {
        let p = s.ptr as *mut u8;
        // SAFETY: a live block of `s.size` bytes that `new_block` tagged.
        let (head, tail) = unsafe {
            (
                p.cast::<u64>().read(),
                p.add(s.size - 8).cast::<u64>().read_unaligned(),
            )
        };
        if head != s.tag || tail != !s.tag {
            eprintln!(
                "larson: corrupted block {:#x} ({} bytes): tag {:#x}/{:#x}, expected {:#x}",
                s.ptr, s.size, head, !tail, s.tag
            );
            std::process::abort();
        }
        // SAFETY: allocated with this layout, freed once.
        unsafe { dealloc(p, layout(s.size)) };
    }

    fn filled(id: u64) -> Chain {
        let mut c = Chain {
            id,
            rng: Rng(0x4141 + id),
            seq: 0,
            slots: Vec::with_capacity(SLOTS),
        };
        for i in 0..SLOTS {
            let s = c.new_block(i);
            c.slots.push(s);
        }
        c
    }

    /// One round: `ROUND_PAIRS` times, free a random slot's block and put a new one
    /// there. Returns the operations done.
    fn round(&mut self) -> usize {
        for _ in 0..ROUND_PAIRS {
            let v = self.rng.below(SLOTS);
            Chain::free_block(self.slots[v]);
            self.slots[v] = self.new_block(v);
        }
        2 * ROUND_PAIRS
    }
}

/// Runs `t` chains of `rounds` threads each; returns million operations per second
/// and the operations done.
fn run(t: usize, rounds: usize) -> (f64, usize) {
    let chains: Vec<Chain> = (0..t as u64).map(Chain::filled).collect();
    let start = Instant::now();
    let drivers: Vec<_> = chains
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut ops = 0;
                for _ in 0..rounds {
                    // The array moves to a new thread, which frees the blocks the
                    // previous one allocated.
                    let h = std::thread::spawn(move || {
                        let n = c.round();
                        (c, n)
                    });
                    let (back, n) = h.join().unwrap();
                    c = back;
                    ops += n;
                }
                (c, ops)
            })
        })
        .collect();
    let mut done = Vec::new();
    let mut ops = 0;
    for d in drivers {
        let (c, n) = d.join().unwrap();
        done.push(c);
        ops += n;
    }
    let mops = ops as f64 / start.elapsed().as_secs_f64() / 1e6;
    for c in done {
        for s in c.slots {
            Chain::free_block(s);
        }
    }
    (mops, ops)
}

fn child(threads: &[usize]) {
    // Warm up (page faults of the first arrays, the allocator's start-up), unmeasured.
    run(1, 2);
    for &t in threads {
        let before = locks::snapshot(switch::mode() == switch::SPANHEAP);
        let (mops, ops) = run(t, ROUNDS);
        println!("{t} {mops:.2}");
        if let Some(b) = before {
            println!("{}", locks::line("larson", t, &b, ops));
        }
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = if args.is_empty() { vec![1, 2, 4] } else { args };
    if std::env::var_os("DEMO_ALLOC").is_some() {
        child(&threads);
        return;
    }
    let args: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let results = children::run_each(&args);
    println!(
        "larson: {SLOTS} blocks of {MIN_SIZE}..{MAX_SIZE} B per chain, {ROUNDS} threads of \
         {ROUND_PAIRS} free+malloc each; Mops/s (spanheap / allocator)"
    );
    print!("{:>8}", "threads");
    for (name, _) in &results {
        print!(" {name:>18}");
    }
    println!();
    let mops = |out: &str, i: usize| -> f64 {
        let line = out
            .lines()
            .filter(|l| !l.starts_with("locks "))
            .nth(i)
            .unwrap();
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    for (i, t) in threads.iter().enumerate() {
        print!("{t:>8}");
        let base = mops(&results[0].1, i);
        for (_, out) in &results {
            let v = mops(out, i);
            print!(" {:>10.2} ({:.2}x)", v, base / v);
        }
        println!();
    }
    locks::print_for("larson", &results[0].1);
}
