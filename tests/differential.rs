//! Randomized differential test (engine: `tests/common/differential.rs`): a fixed seed,
//! 4 threads handing blocks around a ring, every result checked against a model of the
//! live blocks. Release builds run 10,000,000 operations (2,500,000 per thread, ~5 s on
//! the 2-core VM); debug builds, whose pattern loops are ~30x slower, run 400,000
//! (100,000 per thread). Longer runs, any seed:
//! `cargo run --release --example differential -- <seed> <ops-per-thread> <threads>`.

#[path = "common/differential.rs"]
mod differential;

use differential::{run, Config};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

#[test]
fn ten_million_random_operations_match_the_model() {
    let ops_per_thread = if cfg!(debug_assertions) {
        100_000
    } else {
        2_500_000
    };
    let start = std::time::Instant::now();
    let r = run(Config {
        seed: 0x5EED_0009,
        threads: 4,
        ops_per_thread,
        tolerate_null: false,
    });
    println!("{r:?} in {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(r.ops, 4 * ops_per_thread);
    // Every kind of operation happened, and everything allocated was freed.
    assert!(r.allocs > 0 && r.zeroed > 0 && r.reallocs > 0 && r.handed_over > 0);
    assert_eq!(r.allocs + r.zeroed, r.frees);
    let s = spanheap::stats();
    s.check().unwrap();
}
