//! Throughput as threads grow, for each allocator: how the shared parts (mcentral
//! locks, the page heap, statistics slots, remote frees) hold up on many cores.
//!
//! ```sh
//! cargo run --release --example threads                 # 1, 2, 4, .. nproc threads, all allocators
//! cargo run --release --example threads -- 1 8 16       # chosen thread counts
//! DEMO_ALLOC=mimalloc cargo run --release --example threads -- 16   # one allocator, raw
//! THREADS_ONLY=remote cargo run --release --example threads -- 16 64  # one workload
//! ```
//!
//! Three workloads, each run with T threads for a fixed number of operations per
//! thread (so perfect scaling keeps the wall time constant):
//!
//! - `local`: each thread allocates batches of 256 mixed small objects (16 B .. 2 KiB),
//!   writes them and frees them in allocation order: thread caches and, as spans fill
//!   and empty, the mcentrals and page caches.
//! - `spans`: each thread allocates and frees blocks of 40 KiB .. 1 MiB: the page heap.
//! - `remote`: threads in pairs; one allocates 64-byte .. 1 KiB messages, the other
//!   frees them (every free is cross-thread).
//!
//! Prints million operations per second (all threads together) per allocator and
//! thread count; the allocator is chosen per process as in the demo (`DEMO_ALLOC`).
//! Under each table, spanheap's lock acquisitions and contended acquisitions per 1,000
//! operations per lock kind (`spanheap::lock_stats`, read before and after each run).

use std::hint::black_box;
use std::sync::mpsc;
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

const LOCAL_OPS: usize = 4_000_000;
const SPAN_OPS: usize = 200_000;
const REMOTE_OPS: usize = 2_000_000;

fn local(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(256);
    let mut n = 0;
    while n < LOCAL_OPS {
        for _ in 0..256 {
            let size = 16 + rng.below(2048 - 16);
            let mut v = Vec::<u8>::with_capacity(size);
            v.push(n as u8);
            batch.push(v);
        }
        black_box(&batch);
        batch.clear();
        n += 512;
    }
    n
}

fn spans(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let mut n = 0;
    let mut keep: Vec<Vec<u8>> = Vec::new();
    while n < SPAN_OPS {
        let size = (40 << 10) + rng.below(1 << 20);
        let mut v = Vec::<u8>::with_capacity(size);
        v.push(1);
        keep.push(v);
        if keep.len() == 8 {
            keep.clear();
        }
        n += 2;
    }
    n
}

fn remote_pair(seed: u64) -> usize {
    let (tx, rx) = mpsc::sync_channel::<Vec<Box<[u8]>>>(64);
    let consumer = std::thread::spawn(move || {
        let mut n = 0;
        for batch in rx {
            n += batch.len();
            drop(batch);
        }
        n
    });
    let mut rng = Rng(seed);
    let mut sent = 0;
    while sent < REMOTE_OPS / 2 {
        let batch: Vec<Box<[u8]>> = (0..64)
            .map(|_| vec![7u8; 64 + rng.below(1024 - 64)].into_boxed_slice())
            .collect();
        sent += batch.len();
        tx.send(batch).unwrap();
    }
    drop(tx);
    consumer.join().unwrap() * 2
}

/// Runs `f` on `t` threads at once; returns million operations per second and the
/// operations done.
fn run(t: usize, f: fn(u64) -> usize) -> (f64, usize) {
    let start = Instant::now();
    let handles: Vec<_> = (0..t)
        .map(|i| std::thread::spawn(move || f(i as u64 + 1)))
        .collect();
    let ops: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    (ops as f64 / start.elapsed().as_secs_f64() / 1e6, ops)
}

/// Runs workload `w` (`f` on `n` threads) of the table's row `t`; on spanheap, adds
/// its `locks` line.
fn measured(w: &str, t: usize, n: usize, f: fn(u64) -> usize, lines: &mut Vec<String>) -> f64 {
    let before = locks::snapshot(switch::mode() == switch::SPANHEAP);
    let (mops, ops) = run(n, f);
    if let Some(b) = before {
        lines.push(locks::line(w, t, &b, ops));
    }
    mops
}

fn child(threads: &[usize]) {
    // `THREADS_ONLY=remote` (or `local`, `spans`): run that workload alone; the
    // others print 0 (for repeated runs of one workload).
    let only = std::env::var("THREADS_ONLY").ok();
    for &t in threads {
        let mut lines = Vec::new();
        let mut measure = |w: &str, n: usize, f: fn(u64) -> usize| {
            if only.as_deref().is_some_and(|o| o != w) {
                return 0.0;
            }
            measured(w, t, n, f, &mut lines)
        };
        let l = measure("local", t, local);
        let s = measure("spans", t, spans);
        // Pairs: t/2 producers each with its consumer (at least one pair).
        let r = measure("remote", (t / 2).max(1), remote_pair);
        println!("{t} {l:.1} {s:.2} {r:.1}");
        for line in lines {
            println!("{line}");
        }
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = if args.is_empty() {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut v = vec![1];
        while v.last().unwrap() * 2 <= n {
            v.push(v.last().unwrap() * 2);
        }
        if *v.last().unwrap() != n {
            v.push(n);
        }
        v
    } else {
        args
    };
    if std::env::var_os("DEMO_ALLOC").is_some() {
        child(&threads);
        return;
    }
    let args: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let results = children::run_each(&args);
    for (w, name, title) in [
        (1, "local", "local: small objects, Mops/s"),
        (2, "spans", "spans: 40 KiB .. 1 MiB blocks, Mops/s"),
        (3, "remote", "remote: every free cross-thread, Mops/s"),
    ] {
        println!("\n{title} (ratio = allocator / spanheap)");
        print!("{:>8}", "threads");
        for (name, _) in &results {
            print!(" {name:>16}");
        }
        println!();
        // Field `w` of line `i` of a child's output.
        let field = |out: &str, i: usize| -> f64 {
            let line = out
                .lines()
                .filter(|l| !l.starts_with("locks "))
                .nth(i)
                .unwrap();
            line.split(' ').nth(w).unwrap().parse().unwrap()
        };
        for (i, t) in threads.iter().enumerate() {
            print!("{t:>8}");
            let base = field(&results[0].1, i);
            for (_, out) in &results {
                let v = field(out, i);
                print!(" {:>9.2} ({:.2}x)", v, v / base);
            }
            println!();
        }
        locks::print_for(name, &results[0].1);
    }
}
