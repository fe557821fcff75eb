//! Long runs of the randomized differential test (`tests/common/differential.rs`):
//!
//! ```sh
//! cargo run --release --example differential -- [seed] [ops-per-thread] [threads]
//! cargo run --release --example differential -- random 100000000 8   # a fresh seed
//! ```
//!
//! Defaults: seed 1, 25,000,000 operations per thread, 4 threads. Prints the seed first
//! so that a failure can be replayed; panics (with seed, thread and operation) on any
//! difference from the model.

#[path = "../tests/common/differential.rs"]
mod differential;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = match args.first().map(String::as_str) {
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        Some(s) => s.parse().expect("seed"),
        None => 1,
    };
    let ops_per_thread = args.get(1).map_or(25_000_000, |s| s.parse().expect("ops"));
    let threads = args.get(2).map_or(4, |s| s.parse().expect("threads"));
    println!("seed {seed} ({ops_per_thread} operations x {threads} threads)");
    let start = std::time::Instant::now();
    let r = differential::run(differential::Config {
        seed,
        threads,
        ops_per_thread,
        tolerate_null: false,
    });
    let s = spanheap::stats();
    s.check().expect("statistics invariants");
    println!("{r:?}");
    println!(
        "ok: {} operations in {:.1} s",
        r.ops,
        start.elapsed().as_secs_f64()
    );
}
