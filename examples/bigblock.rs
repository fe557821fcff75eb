//! Growing one big block, for each allocator with its own defaults (issue 27, item 3):
//! what `realloc` costs when a buffer grows to hundreds of MiB, and how often it moves.
//!
//! ```sh
//! cargo run --release --example bigblock                  # all allocators, 3 rounds
//! cargo run --release --example bigblock -- 5             # 5 rounds
//! DEMO_ALLOC=jemalloc cargo run --release --example bigblock   # one child, raw
//! ```
//!
//! Three workloads, each run in a child process per allocator (`DEMO_ALLOC`, see
//! `common/switch.rs`), the children of one round one after another:
//! - `realloc`: one block grown from 64 KiB to 512 MiB by `realloc` in 64 KiB steps
//!   (8,192 calls), its last byte written after each step; the block is freed at the
//!   end. Reports the wall time and how many of the calls moved the block.
//! - `vec`: a `Vec<u8>` grown to 2 GiB by `extend_from_slice` of 64 KiB chunks
//!   (`Vec`'s doubling, through `GlobalAlloc::realloc`), then dropped. Reports the wall
//!   time and how many growths moved the buffer.
//! - `pair`: two blocks grown by `realloc` in turns, 64 KiB at a time, to 256 MiB
//!   each (8,190 calls): at most one of them can be at the top of the heap, so the
//!   other has to move whenever a neighbour is in the way (a moved block's pages
//!   move by `mremap` in spanheap from 4 MiB on, and in glibc for its mmapped blocks).
//!
//! Each child prints `realloc <ms> <moves>`, `vec <ms> <moves>`, `pair <ms> <moves>`
//! and `peak <MiB>`
//! (`VmHWM`); the parent prints the best time of the rounds per allocator, the moves of
//! that run, the ratio to spanheap's time, and the peaks.

use std::alloc::{realloc, Layout};
use std::time::Instant;

#[path = "common/switch.rs"]
mod switch;

#[path = "common/children.rs"]
mod children;

const STEP: usize = 64 << 10;
const REALLOC_TO: usize = 512 << 20;
const VEC_TO: usize = 2 << 30;
const PAIR_TO: usize = 256 << 20;

fn realloc_growth() -> (f64, usize) {
    let start = Instant::now();
    let mut size = STEP;
    let layout = Layout::from_size_align(size, 16).unwrap();
    // SAFETY: non-zero size.
    let mut p = unsafe { std::alloc::alloc(layout) };
    assert!(!p.is_null());
    let mut moves = 0;
    while size < REALLOC_TO {
        let new = size + STEP;
        // SAFETY: `p` is live with this layout's alignment and `size` bytes.
        let q = unsafe { realloc(p, Layout::from_size_align(size, 16).unwrap(), new) };
        assert!(!q.is_null());
        moves += usize::from(q != p);
        // SAFETY: `q` has `new` bytes.
        unsafe { q.add(new - 1).write(1) };
        p = q;
        size = new;
    }
    // SAFETY: live, allocated with this layout.
    unsafe { std::alloc::dealloc(p, Layout::from_size_align(size, 16).unwrap()) };
    (start.elapsed().as_secs_f64() * 1e3, moves)
}

fn vec_growth() -> (f64, usize) {
    let chunk = vec![7u8; STEP];
    let start = Instant::now();
    let mut v: Vec<u8> = Vec::new();
    let (mut moves, mut last) = (0, v.as_ptr());
    while v.len() < VEC_TO {
        v.extend_from_slice(&chunk);
        if v.as_ptr() != last {
            moves += 1;
            last = v.as_ptr();
        }
    }
    assert_eq!(v[VEC_TO - 1], 7);
    drop(v);
    (start.elapsed().as_secs_f64() * 1e3, moves)
}

fn pair_growth() -> (f64, usize) {
    let start = Instant::now();
    let layout = |n| Layout::from_size_align(n, 16).unwrap();
    // SAFETY: non-zero sizes.
    let mut p = unsafe {
        [
            std::alloc::alloc(layout(STEP)),
            std::alloc::alloc(layout(STEP)),
        ]
    };
    assert!(!p[0].is_null() && !p[1].is_null());
    let (mut size, mut moves) = (STEP, 0);
    while size < PAIR_TO {
        let new = size + STEP;
        for b in &mut p {
            // SAFETY: `*b` is live with this layout's alignment and `size` bytes.
            let q = unsafe { realloc(*b, layout(size), new) };
            assert!(!q.is_null());
            moves += usize::from(q != *b);
            // SAFETY: `q` has `new` bytes.
            unsafe { q.add(new - 1).write(1) };
            *b = q;
        }
        size = new;
    }
    for b in p {
        // SAFETY: live, allocated with this layout.
        unsafe { std::alloc::dealloc(b, layout(size)) };
    }
    (start.elapsed().as_secs_f64() * 1e3, moves)
}

fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn child() {
    let (ms, moves) = realloc_growth();
    println!("realloc {ms:.1} {moves}");
    let (ms, moves) = vec_growth();
    println!("vec {ms:.1} {moves}");
    let (ms, moves) = pair_growth();
    println!("pair {ms:.1} {moves}");
    println!("peak {:.1}", peak_mib());
}

/// An allocator's name, its best (ms, moves) per workload, and its highest peak (MiB).
type Best = (&'static str, [(f64, f64); 3], f64);

/// Field `k` (1-based) of the line starting with `key` in a child's output.
fn field(out: &str, key: &str, k: usize) -> f64 {
    out.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(' ').nth(k))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn main() {
    if std::env::var_os("DEMO_ALLOC").is_some() {
        child();
        return;
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    // Per allocator: the best (time, moves) of each workload, and the highest peak.
    let mut best: Vec<Best> = Vec::new();
    for _ in 0..rounds {
        for (name, out) in children::run_each::<&str>(&[]) {
            let i = match best.iter().position(|b| b.0 == name) {
                Some(i) => i,
                None => {
                    best.push((name, [(f64::MAX, 0.0); 3], 0.0));
                    best.len() - 1
                }
            };
            for (w, key) in ["realloc", "vec", "pair"].into_iter().enumerate() {
                let t = field(&out, key, 1);
                if t < best[i].1[w].0 {
                    best[i].1[w] = (t, field(&out, key, 2));
                }
            }
            best[i].2 = f64::max(best[i].2, field(&out, "peak", 1));
        }
    }
    println!("best of {rounds} rounds; ratio = allocator's time / spanheap's\n");
    println!("| allocator | realloc to 512 MiB in 64 KiB steps | moves | vec to 2 GiB | moves | two blocks to 256 MiB in turns | moves | peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let base = best[0].1;
    for (name, w, peak) in &best {
        println!(
            "| {name} | {:.1} ms ({:.2}x) | {} | {:.1} ms ({:.2}x) | {} | {:.1} ms ({:.2}x) | {} | {peak:.0} MiB |",
            w[0].0,
            w[0].0 / base[0].0,
            w[0].1,
            w[1].0,
            w[1].0 / base[1].0,
            w[1].1,
            w[2].0,
            w[2].0 / base[2].0,
            w[2].1
        );
    }
}
