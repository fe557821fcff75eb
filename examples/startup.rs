//! Start-up cost of a short-lived Rust program, per allocator (issue 27, item 3): the
//! time to exec this program as a child that makes a few allocations and exits, many
//! times over.
//!
//! ```sh
//! cargo run --release --example startup                # 5 rounds of 200 execs each
//! cargo run --release --example startup -- 7 300       # 7 rounds of 300
//! ```
//!
//! Every allocator runs the same binary (`DEMO_ALLOC`, see `common/switch.rs`), so what
//! differs between them is the allocator's own start: its first allocation (setting up
//! its heap, its thread cache) and whatever it does at exit; loading the binary costs
//! the same for all. A child allocates a `String`, a `Vec` of 100 boxed integers and a
//! `HashMap` of 100 entries, checks them, and exits. Each round runs every allocator's
//! `execs` children back to back, the allocators in turn; the parent prints each
//! allocator's best round as microseconds per exec and its ratio to the system
//! allocator's (the target of issue 27: at most 1.05x).

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

#[path = "common/switch.rs"]
mod switch;

fn child() {
    let s = String::from("start-up") + " cost";
    let v: Vec<Box<u64>> = (0..100).map(Box::new).collect();
    let m: HashMap<u64, String> = (0..100).map(|i| (i, i.to_string())).collect();
    let ok = s.len() == 13 && v.iter().map(|b| **b).sum::<u64>() == 4950 && m[&42] == "42";
    std::process::exit(if ok { 0 } else { 1 });
}

fn main() {
    if std::env::var_os("DEMO_ALLOC").is_some() {
        child();
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5);
    let execs = args.get(1).copied().unwrap_or(200);
    let exe = std::env::current_exe().unwrap();
    let mut best = vec![f64::MAX; switch::CHOICES.len()];
    for _ in 0..rounds {
        for (i, &(name, _)) in switch::CHOICES.iter().enumerate() {
            let start = Instant::now();
            for _ in 0..execs {
                let st = Command::new(&exe).env("DEMO_ALLOC", name).status().unwrap();
                assert!(st.success(), "{name}: child failed");
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / execs as f64;
            best[i] = best[i].min(us);
        }
    }
    let system = switch::CHOICES
        .iter()
        .position(|&(n, _)| n == "system")
        .unwrap();
    println!("best of {rounds} rounds of {execs} execs; ratio = allocator / system\n");
    println!("| allocator | us per exec | ratio |");
    println!("|---|---:|---:|");
    for (i, &(name, _)) in switch::CHOICES.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.3}x |",
            best[i],
            best[i] / best[system]
        );
    }
}
