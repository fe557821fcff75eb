//! The heap profile on a small program that leaks and churns from a few known call
//! sites (issue 23's demo):
//!
//! ```sh
//! cargo run --release --example profile                # profile at 512 KiB, write 6 files
//! cargo run --release --example profile -- off         # the same work, profiling off
//! cargo run --release --example profile -- nowrite     # profiling on, nothing written
//! go tool pprof -top target/profile-demo/heap.pb.gz    # or pprof -http=: ...
//! firefox target/profile-demo/heap-alloc.svg            # flame graphs drawn by spanheap
//! ```
//!
//! What it does (known answers): `load_config` leaks 2 MiB of strings for good;
//! `Cache::insert` keeps 24 MiB of values in a map; `handle_request` allocates and
//! drops about 400 MiB in 1-8 KiB buffers (churn: allocated, not in use);
//! `render_page` grows strings by `realloc` and drops them; four `worker` threads each
//! keep 4 MiB (`worker_buffer`) and churn. It prints the work's time, the peak RSS, and
//! the top of the profile, and writes `heap.pb.gz`, `heap.folded` and `heap.txt` (in-use
//! bytes) and `heap-alloc.folded` (allocated bytes) to `target/profile-demo` (or the
//! directory given as the first argument).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

#[path = "common/rss.rs"]
mod rss;
use rss::peak_rss_kib;
#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

#[inline(never)]
fn load_config() -> Vec<&'static str> {
    (0..2048)
        .map(|i| &*Box::leak(format!("{i:01023}").into_boxed_str()))
        .collect()
}

#[derive(Default)]
struct Cache {
    map: HashMap<u64, Vec<u8>>,
}

impl Cache {
    #[inline(never)]
    fn insert(&mut self, key: u64, len: usize) {
        self.map.insert(key, vec![key as u8; len]);
    }
}

#[inline(never)]
fn handle_request(r: &mut Rng) -> usize {
    let len = 1024 + r.below(7 * 1024);
    let buf = black_box(vec![1u8; len]);
    buf.iter().step_by(512).map(|&b| b as usize).sum()
}

#[inline(never)]
fn render_page(r: &mut Rng) -> usize {
    let mut s = String::new();
    for _ in 0..16 + r.below(48) {
        s.push_str("<div class=\"row\">some text of the page</div>\n");
    }
    black_box(s).len()
}

#[inline(never)]
fn worker_buffer() -> Vec<u64> {
    vec![7; 512 << 10]
}

#[inline(never)]
fn worker(seed: u64) -> usize {
    let keep = worker_buffer();
    let mut r = Rng(seed);
    let mut n = 0;
    for _ in 0..20_000 {
        n += handle_request(&mut r);
    }
    n + keep.len()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let off = args.iter().any(|a| a == "off");
    // `nowrite`: profile, but stop after the work (for measuring the sampling alone).
    let nowrite = args.iter().any(|a| a == "nowrite");
    if !off && spanheap::profile::rate() == 0 {
        spanheap::profile::set_rate(spanheap::profile::DEFAULT_RATE);
    }
    let dir = args
        .iter()
        .find(|a| *a != "off" && *a != "nowrite")
        .cloned()
        .unwrap_or_else(|| "target/profile-demo".to_string());
    let start = Instant::now();
    let config = load_config();
    let mut cache = Cache::default();
    let mut r = Rng(42);
    let mut sum = 0;
    for i in 0..60_000u64 {
        sum += handle_request(&mut r);
        sum += render_page(&mut r);
        if i % 10 == 0 {
            cache.insert(i, 4096);
        }
    }
    let workers: Vec<_> = (0..4)
        .map(|t| std::thread::spawn(move || worker(t + 1)))
        .collect();
    sum += workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .sum::<usize>();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "work: {secs:.3} s, peak RSS {} KiB, profiling {} ({} config strings, {} cached, checksum {sum})",
        peak_rss_kib(),
        if off { "off" } else { "on" },
        config.len(),
        cache.map.len()
    );
    if off || nowrite {
        return;
    }
    let p = spanheap::profile::snapshot().symbolize();
    let mut out = std::io::stdout();
    // (Errors writing to stdout, a closed pipe, are ignored.)
    let _ = p.write_top(&mut out, spanheap::profile::SampleType::InuseSpace, 8);
    println!();
    let _ = p.write_top(&mut out, spanheap::profile::SampleType::AllocSpace, 8);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["heap.pb.gz", "heap.folded", "heap.txt", "heap.svg"] {
        let path = std::path::Path::new(&dir).join(name);
        spanheap::profile::write_file(&path).unwrap();
        println!("wrote {}", path.display());
    }
    // The allocated bytes too (churn included), for a second flame graph.
    let path = std::path::Path::new(&dir).join("heap-alloc.folded");
    let mut f = std::fs::File::create(&path).unwrap();
    p.write_collapsed(&mut f, spanheap::profile::SampleType::AllocSpace)
        .unwrap();
    println!("wrote {}", path.display());
    let path = std::path::Path::new(&dir).join("heap-alloc.svg");
    let mut f = std::fs::File::create(&path).unwrap();
    p.write_svg(
        &mut f,
        spanheap::profile::SampleType::AllocSpace,
        "examples/profile.rs: bytes allocated",
    )
    .unwrap();
    println!("wrote {}", path.display());
    let t = spanheap::profile::totals();
    println!(
        "{} samples, {} freed, {} stacks, {} KiB of profile metadata, {} KiB of sampled \
         objects' blocks in use",
        t.sampled,
        t.freed,
        t.buckets,
        t.meta_bytes >> 10,
        t.block_bytes >> 10
    );
}
