//! Resident memory over time after a 1 GiB peak, for each allocator with its default
//! settings: how promptly free memory goes back to the OS.
//!
//! ```sh
//! cargo run --release --example rss_timeline          # every allocator, a table
//! cargo run --release --example rss_timeline -- workers   # idle worker threads
//! DEMO_ALLOC=jemalloc cargo run --release --example rss_timeline   # one, raw
//! ```
//!
//! Each child allocates 1 GiB (half small blocks of 16 B .. 32 KiB, half large ones of
//! 64 KiB .. 8 MiB, every byte written), frees it all, then keeps up light activity
//! (every 10 ms: 50 short strings and one buffer of 64 KiB .. 1 MiB, allocated and
//! freed) for 5 seconds, sampling its RSS every 250 ms. The allocator is chosen per
//! process as in the demo (`DEMO_ALLOC`).
//!
//! `workers`: memory that idle threads keep. Eight worker threads each run four rounds
//! of 24 buffers of 40 .. 640 KiB and 20,000 strings of 8 .. 208 bytes (every byte
//! written, all freed at the end of the round), then park for the rest of the run;
//! "peak" is taken when all have parked, and the main thread's light activity follows
//! as above. What stays resident is what the allocator keeps for threads that may never
//! allocate again.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[path = "common/switch.rs"]
mod switch;
use switch::CHOICES;

const MIB: usize = 1 << 20;
const SAMPLE: Duration = Duration::from_millis(250);
const LENGTH: Duration = Duration::from_secs(5);

fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

fn child() {
    let mut rng = Rng(1);
    let start = rss();
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let (mut small, mut large) = (0, 0);
    while small + large < 1 << 30 {
        let size = if small <= large {
            16 + rng.below(32 << 10)
        } else {
            (64 << 10) + rng.below(8 * MIB)
        };
        blocks.push(vec![0xA5; size]);
        if size <= 32 << 10 {
            small += size;
        } else {
            large += size;
        }
    }
    let peak = rss();
    drop(blocks);
    activity(&mut rng, start, peak);
}

/// Eight threads allocate and free a burst each, then park until `activity` is over.
fn child_workers() {
    const WORKERS: usize = 8;
    let start = rss();
    let parked = Arc::new(Barrier::new(WORKERS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|t| {
            let (parked, done) = (parked.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t as u64 + 2);
                for _ in 0..4 {
                    let bufs: Vec<Vec<u8>> = (0..24)
                        .map(|_| vec![7; (40 << 10) + rng.below(600 << 10)])
                        .collect();
                    let strings: Vec<String> =
                        (0..20_000).map(|i| "y".repeat(8 + i % 200)).collect();
                    std::hint::black_box((&bufs, &strings));
                }
                parked.wait();
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    parked.wait();
    activity(&mut Rng(1), start, rss());
    done.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

/// Light activity on this thread for `LENGTH`, sampling RSS; prints the child's line.
fn activity(rng: &mut Rng, start: usize, peak: usize) {
    let t0 = Instant::now();
    let mut samples = vec![(0u128, rss())];
    let mut next = SAMPLE;
    while t0.elapsed() < LENGTH {
        let strings: Vec<String> = (0..50).map(|i| "x".repeat(1 + i * 7)).collect();
        let buf = vec![1u8; (64 << 10) + rng.below(MIB)];
        std::hint::black_box((&strings, &buf));
        drop((strings, buf));
        std::thread::sleep(Duration::from_millis(10));
        if t0.elapsed() >= next {
            samples.push((next.as_millis(), rss()));
            next += SAMPLE;
        }
    }
    print!("start {} peak {}", start / MIB, peak / MIB);
    for (t, r) in samples {
        print!(" {t}:{}", r / MIB);
    }
    println!();
}

fn main() {
    let workers = std::env::args().nth(1).as_deref() == Some("workers");
    if std::env::var_os("DEMO_ALLOC").is_some() {
        if workers {
            child_workers();
        } else {
            child();
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for (name, _) in CHOICES {
        let out = Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("DEMO_ALLOC", name)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} failed");
        rows.push((name, String::from_utf8(out.stdout).unwrap()));
    }
    if workers {
        println!("RSS in MiB after eight worker threads' bursts, the workers parked, light activity on the main thread (defaults of each allocator)");
    } else {
        println!("RSS in MiB after freeing a 1 GiB peak, light activity continuing (defaults of each allocator)");
    }
    print!("{:>8}", "ms");
    for (name, _) in &rows {
        print!(" {name:>9}");
    }
    println!();
    let parsed: Vec<Vec<&str>> = rows
        .iter()
        .map(|(_, s)| s.split_whitespace().collect())
        .collect();
    for (label, idx) in [("start", 1), ("peak", 3)] {
        print!("{label:>8}");
        for p in &parsed {
            print!(" {:>9}", p[idx]);
        }
        println!();
    }
    let n = parsed.iter().map(|p| p.len()).min().unwrap();
    for i in 4..n {
        let t = parsed[0][i].split(':').next().unwrap();
        print!("{t:>8}");
        for p in &parsed {
            print!(" {:>9}", p[i].split(':').nth(1).unwrap());
        }
        println!();
    }
}
