//! Resident memory over time after a 1 GiB peak, for each allocator with its default
//! settings: how promptly free memory goes back to the OS.
//!
//! ```sh
//! cargo run --release --example rss_timeline          # every allocator, a table
//! DEMO_ALLOC=jemalloc cargo run --release --example rss_timeline   # one, raw
//! ```
//!
//! Each child allocates 1 GiB (half small blocks of 16 B .. 32 KiB, half large ones of
//! 64 KiB .. 8 MiB, every byte written), frees it all, then keeps up light activity
//! (every 10 ms: 50 short strings and one buffer of 64 KiB .. 1 MiB, allocated and
//! freed) for 5 seconds, sampling its RSS every 250 ms. The allocator is chosen per
//! process as in the demo (`DEMO_ALLOC`).

use std::process::Command;
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
    if std::env::var_os("DEMO_ALLOC").is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for (name, _) in CHOICES {
        let out = Command::new(&exe).env("DEMO_ALLOC", name).output().unwrap();
        assert!(out.status.success(), "{name} failed");
        rows.push((name, String::from_utf8(out.stdout).unwrap()));
    }
    println!("RSS in MiB after freeing a 1 GiB peak, light activity continuing (defaults of each allocator)");
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
