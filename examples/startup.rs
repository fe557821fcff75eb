//! Start-up cost of a short-lived Rust program, per allocator (issue 27, item 3): the
//! time to exec a small program that makes a few allocations and exits, many times
//! over.
//!
//! ```sh
//! cargo build --release --examples                     # the parent and its four children
//! target/release/examples/startup                      # 5 rounds of 300 execs each
//! target/release/examples/startup 7 500                # 7 rounds of 500
//! ```
//!
//! Each allocator has a child binary of its own (`startup_child_spanheap`,
//! `_system`, `_mimalloc`, `_jemalloc`, beside this one), with that allocator as its
//! `#[global_allocator]` and no other linked in: what a program that switches to it
//! gets. (One binary with a run-time switch, as the other comparisons use, would run
//! mimalloc's and jemalloc's load-time constructors in every child and so add their
//! start-up to everybody's.) The children do the same work (`common/startup_work.rs`):
//! a `String`, a `Vec` of 100 boxed integers and a `HashMap` of 100 entries, checked,
//! then exit. Within a round the allocators take turns exec by exec, so that a slow
//! spell of the machine hits them all alike; the parent prints each allocator's median
//! over all execs, in microseconds, and its ratio to the system allocator's (the
//! target of issue 27: at most 1.05x).

use std::process::Command;
use std::time::Instant;

const CHILDREN: [&str; 4] = ["spanheap", "system", "mimalloc", "jemalloc"];

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5);
    let execs = args.get(1).copied().unwrap_or(300);
    let dir = std::env::current_exe().unwrap();
    let dir = dir.parent().unwrap();
    let exes: Vec<_> = CHILDREN
        .iter()
        .map(|name| dir.join(format!("startup_child_{name}")))
        .collect();
    if let Some(missing) = exes.iter().find(|p| !p.exists()) {
        eprintln!(
            "{} is not built: run `cargo build --release --examples` first",
            missing.display()
        );
        std::process::exit(2);
    }
    let mut times = vec![Vec::with_capacity(rounds * execs); CHILDREN.len()];
    for _ in 0..rounds {
        for _ in 0..execs {
            for (i, exe) in exes.iter().enumerate() {
                let start = Instant::now();
                let st = Command::new(exe).status().unwrap();
                times[i].push(start.elapsed().as_secs_f64() * 1e6);
                assert!(st.success(), "{}: child failed", CHILDREN[i]);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med: Vec<f64> = times.iter_mut().map(median).collect();
    let system = med[1];
    println!(
        "median of {rounds} x {execs} execs per allocator, taking turns; ratio = allocator / system\n"
    );
    println!("| allocator | us per exec | ratio |");
    println!("|---|---:|---:|");
    for (name, m) in CHILDREN.iter().zip(&med) {
        println!("| {name} | {m:.0} | {:.3}x |", m / system);
    }
}
