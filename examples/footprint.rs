//! Footprint while a program runs, for each allocator with its own defaults: the peak
//! resident set of four allocation-heavy workloads shaped like real programs, and what
//! stays resident once the program has freed what it would free at its end. Issue 26,
//! item 4 ("Measure it"), for spanheap, system (glibc), mimalloc and jemalloc.
//!
//! ```sh
//! cargo run --release --example footprint                # all four workloads
//! cargo run --release --example footprint -- btree       # one: strings, btree, pipeline or pool
//! DEMO_ALLOC=mimalloc cargo run --release --example footprint -- pool   # one child, raw
//! ```
//!
//! The parent runs each workload once per allocator, each in a child process of its own
//! (one after another), the allocator chosen by `DEMO_ALLOC` through
//! `common/switch.rs`; with `DEMO_ALLOC` set the program is that child and prints its
//! raw lines (workload `strings` when none is named). Children inherit the environment,
//! so `SPANHEAP_*` settings reach spanheap's child; none is set here.
//!
//! Workloads (every random choice from `common/rng.rs` with a fixed seed, so each
//! allocator's child does the same work):
//! - `strings`: like awk building two hash tables. A `HashMap<String, Vec<String>>`
//!   (SipHash with fixed keys) gets 800,000 values of 8 ..= 40 random letters appended
//!   under 200,000 keys of 8 ..= 40 letters (~90 MiB); then a second table of the same
//!   type is built from it, each value's first three letters mapping to copies of the
//!   keys it was stored under (~55 MiB); then the first table is dropped, then the
//!   second.
//! - `btree`: an index like sqlite's. A `BTreeMap<u64, [u8; 100]>` (nodes of ~1.2 KiB)
//!   gets 700,000 random keys (~110 MiB), then three rounds of 200,000 deletes of
//!   random live keys and 200,000 inserts of new ones; then it is dropped.
//! - `pipeline`: a producer thread sends 300,000 messages (`Vec<u8>`, every byte
//!   written) of 16 B ..= 4 KiB, one in 64 of 64 KiB, through a bounded channel (1,024)
//!   to a consumer that keeps the last 50 MiB of them in a `VecDeque` and frees older
//!   ones; at the end the consumer drops its window and both threads are joined.
//! - `pool`: a pool of 8 threads takes 2,000 jobs from a shared channel; each job builds
//!   a `Vec<Box<[u8]>>` of 500 ..= 1,499 records of 16 ..= 1,024 bytes (written), keeps
//!   a copy of every 20th record in one result buffer (~26 KiB) pushed to a shared
//!   `Mutex<Vec<..>>`, and drops its records; the results (~50 MiB) live until the pool
//!   is joined and they are checked, then are dropped.
//!
//! Each child prints a checksum of what its workload built (read back from the
//! structures, so a broken allocator cannot win by losing data); the parent checks
//! that the four allocators' checksums agree. Then the child's measurements, in MiB:
//! `peak` is `VmHWM` of `/proc/self/status` read at the child's end (the most it was
//! ever resident, the program's own ~2-3 MiB included), `final` is `VmRSS` after the
//! workload freed everything: sampled at once after the last drop (and the join), then
//! 1 s and 2 s later with the child idle (spanheap returns free memory after it stayed
//! free for its delay, 1 s by default, so its 1 s sample can still have it). `ms` is
//! the workload's wall time up to the last drop. Each table cell shows the MiB and the
//! ratio to the lowest of the four allocators in that row.
//!
//! Measuring allocates nothing: `/proc/self/status` is read into a stack buffer.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/switch.rs"]
mod switch;

#[path = "common/children.rs"]
mod children;

#[path = "common/table.rs"]
mod table;

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

const WORKLOADS: [&str; 4] = ["strings", "btree", "pipeline", "pool"];

/// The idle samples after the workload's end: at once, 1 s and 2 s later.
const FINAL_AFTER: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// `strings`: keys, values appended under them, letters per string.
const STR_KEYS: usize = 200_000;
const STR_VALUES: usize = 800_000;
const STR_MIN: usize = 8;
const STR_MAX: usize = 40;
/// `strings`: the second table's key is a value's first letters.
const PREFIX: usize = 3;

/// `btree`: first inserts, then rounds of deletes and inserts.
const BT_KEYS: usize = 700_000;
const BT_ROUNDS: usize = 3;
const BT_CHURN: usize = 200_000;
const BT_VALUE: usize = 100;

/// `pipeline`: messages, their sizes, the consumer's window, the channel's bound.
const PIPE_MESSAGES: usize = 300_000;
const PIPE_MIN: usize = 16;
const PIPE_MAX: usize = 4 * KIB;
const PIPE_BIG: usize = 64 * KIB;
const PIPE_BIG_ONE_IN: usize = 64;
const PIPE_WINDOW: usize = 50 * MIB;
const PIPE_BOUND: usize = 1024;

/// `pool`: threads, jobs, records per job, record sizes, every how many a record is kept.
const POOL_THREADS: usize = 8;
const POOL_JOBS: usize = 2000;
const POOL_RECORDS_MIN: usize = 500;
const POOL_RECORDS_SPREAD: usize = 1000;
const POOL_REC_MIN: usize = 16;
const POOL_REC_MAX: usize = 1024;
const POOL_KEEP_EVERY: usize = 20;

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

const FNV_START: u64 = 0xCBF2_9CE4_8422_2325;

/// Reads a small file into `buf` without allocating.
fn read_small<'a>(path: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let mut file = File::open(path).ok()?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).ok()? {
            0 => break,
            r => n += r,
        }
    }
    std::str::from_utf8(&buf[..n]).ok()
}

/// A `kB` field of `/proc/self/status` (`VmHWM`, `VmRSS`), in MiB.
fn status_mib(field: &str) -> f64 {
    let mut buf = [0u8; 4096];
    let status = read_small("/proc/self/status", &mut buf).expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

/// `len` random lowercase letters.
fn letters(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| (b'a' + rng.below(26) as u8) as char)
        .collect()
}

/// A string of `STR_MIN ..= STR_MAX` letters.
fn short_string(rng: &mut Rng) -> String {
    let len = STR_MIN + rng.below(STR_MAX - STR_MIN + 1);
    letters(rng, len)
}

type Table = HashMap<String, Vec<String>, BuildHasherDefault<DefaultHasher>>;

/// A table's contents, independent of its iteration order.
fn table_sum(t: &Table) -> u64 {
    t.iter()
        .map(|(k, vs)| {
            vs.iter().fold(fnv(FNV_START, k.as_bytes()), |h, v| {
                fnv(h ^ 0xFF, v.as_bytes())
            })
        })
        .fold(t.len() as u64, u64::wrapping_add)
}

fn strings() -> u64 {
    let mut rng = Rng(1);
    // The keys' spellings, drawn once; the values come in as awk's lines would, each
    // under a random key.
    let names: Vec<String> = (0..STR_KEYS).map(|_| short_string(&mut rng)).collect();
    let mut first = Table::default();
    for _ in 0..STR_VALUES {
        let key = &names[rng.below(STR_KEYS)];
        let value = short_string(&mut rng);
        match first.get_mut(key) {
            Some(values) => values.push(value),
            None => {
                first.insert(key.clone(), vec![value]);
            }
        }
    }
    drop(names);
    let mut sum = table_sum(&first);
    let mut second = Table::default();
    for (key, values) in &first {
        for v in values {
            second
                .entry(v[..PREFIX].to_string())
                .or_default()
                .push(key.clone());
        }
    }
    sum = sum.rotate_left(17) ^ table_sum(&second);
    drop(first);
    drop(second);
    sum
}

/// `btree`: one insert of a new random key, its value written from it.
fn insert(map: &mut BTreeMap<u64, [u8; BT_VALUE]>, rng: &mut Rng, keys: &mut Vec<u64>) {
    let k = rng.below(usize::MAX) as u64;
    let mut v = [(k >> 8) as u8; BT_VALUE];
    v[..8].copy_from_slice(&k.to_le_bytes());
    if map.insert(k, v).is_none() {
        keys.push(k);
    }
}

fn btree() -> u64 {
    let mut rng = Rng(2);
    let mut map: BTreeMap<u64, [u8; BT_VALUE]> = BTreeMap::new();
    let mut keys: Vec<u64> = Vec::new();
    for _ in 0..BT_KEYS {
        insert(&mut map, &mut rng, &mut keys);
    }
    for _ in 0..BT_ROUNDS {
        for _ in 0..BT_CHURN {
            let k = keys.swap_remove(rng.below(keys.len()));
            map.remove(&k).expect("a live key");
        }
        for _ in 0..BT_CHURN {
            insert(&mut map, &mut rng, &mut keys);
        }
    }
    let sum = map.iter().fold(map.len() as u64, |h, (k, v)| fnv(h ^ k, v));
    drop(map);
    drop(keys);
    sum
}

fn pipeline() -> u64 {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(PIPE_BOUND);
    let producer = std::thread::spawn(move || {
        let mut rng = Rng(3);
        for i in 0..PIPE_MESSAGES {
            let size = if rng.below(PIPE_BIG_ONE_IN) == 0 {
                PIPE_BIG
            } else {
                PIPE_MIN + rng.below(PIPE_MAX - PIPE_MIN + 1)
            };
            let mut m = vec![i as u8; size];
            m[..8].copy_from_slice(&(i as u64).to_le_bytes());
            tx.send(m).unwrap();
        }
    });
    let consumer = std::thread::spawn(move || {
        let mut window: VecDeque<Vec<u8>> = VecDeque::new();
        let mut bytes = 0;
        let mut sum = FNV_START;
        for m in rx {
            // The first 8 bytes, the length and the last byte, read back.
            sum = fnv(sum ^ m.len() as u64, &m[..8]);
            sum = fnv(sum, &m[m.len() - 1..]);
            bytes += m.len();
            window.push_back(m);
            while bytes > PIPE_WINDOW {
                bytes -= window.pop_front().unwrap().len();
            }
        }
        drop(window);
        sum
    });
    producer.join().unwrap();
    consumer.join().unwrap()
}

/// One `pool` job: its records built and dropped, the kept copy returned.
fn job(j: usize) -> Box<[u8]> {
    let mut rng = Rng(1000 + j as u64);
    let n = POOL_RECORDS_MIN + rng.below(POOL_RECORDS_SPREAD);
    let mut records: Vec<Box<[u8]>> = Vec::new();
    for i in 0..n {
        let size = POOL_REC_MIN + rng.below(POOL_REC_MAX - POOL_REC_MIN + 1);
        records.push(vec![(j + i) as u8; size].into_boxed_slice());
    }
    let kept: usize = records
        .iter()
        .step_by(POOL_KEEP_EVERY)
        .map(|r| r.len())
        .sum();
    let mut result = Vec::with_capacity(kept);
    for r in records.iter().step_by(POOL_KEEP_EVERY) {
        result.extend_from_slice(r);
    }
    result.into_boxed_slice()
}

/// `pool`: a job's index and what it kept.
type PoolResult = (usize, Box<[u8]>);

fn pool() -> u64 {
    let (tx, rx) = mpsc::channel::<usize>();
    let rx = Arc::new(Mutex::new(rx));
    let results: Arc<Mutex<Vec<PoolResult>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..POOL_THREADS)
        .map(|_| {
            let (rx, results) = (rx.clone(), results.clone());
            std::thread::spawn(move || loop {
                let next = rx.lock().unwrap().recv();
                let Ok(j) = next else { break };
                let r = job(j);
                results.lock().unwrap().push((j, r));
            })
        })
        .collect();
    for j in 0..POOL_JOBS {
        tx.send(j).unwrap();
    }
    drop(tx);
    for w in workers {
        w.join().unwrap();
    }
    let results = Arc::try_unwrap(results).unwrap().into_inner().unwrap();
    assert_eq!(results.len(), POOL_JOBS);
    // Jobs finish in any order: the sum of each result's own hash.
    let sum = results
        .iter()
        .map(|(j, r)| fnv(FNV_START ^ *j as u64, r))
        .fold(0u64, u64::wrapping_add);
    drop(results);
    sum
}

/// A child: the workload, then its raw lines.
fn child(workload: &str) {
    let t0 = Instant::now();
    let check = match workload {
        "strings" => strings(),
        "btree" => btree(),
        "pipeline" => pipeline(),
        _ => pool(),
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let end = Instant::now();
    let mut finals = [0.0; FINAL_AFTER.len()];
    for (f, after) in finals.iter_mut().zip(FINAL_AFTER) {
        if let Some(wait) = (end + after).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        *f = status_mib("VmRSS");
    }
    let peak = status_mib("VmHWM");
    println!("check {check:016x}");
    println!("ms {ms:.0}");
    println!("peak {peak:.1}");
    for (after, f) in FINAL_AFTER.iter().zip(finals) {
        println!("final{} {f:.1}", after.as_secs());
    }
}

/// One child's raw output, parsed back.
struct Parsed {
    check: String,
    ms: f64,
    peak: f64,
    finals: Vec<f64>,
}

fn parse(out: &str) -> Parsed {
    let mut p = Parsed {
        check: String::new(),
        ms: 0.0,
        peak: 0.0,
        finals: Vec::new(),
    };
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            ["check", c] => p.check = c.to_string(),
            ["ms", v] => p.ms = v.parse().unwrap(),
            ["peak", v] => p.peak = v.parse().unwrap(),
            [k, v] if k.starts_with("final") => p.finals.push(v.parse().unwrap()),
            _ => panic!("unexpected child line {line:?}"),
        }
    }
    assert_eq!(p.finals.len(), FINAL_AFTER.len(), "child output:\n{out}");
    p
}

/// Width of the label column and of each allocator's column.
const TABLE: table::Table = table::Table {
    label: 22,
    cell: 15,
};

/// A row of MiB figures, each with its ratio to the row's lowest.
fn ratio_row(label: &str, values: &[f64]) {
    let lowest = values.iter().copied().fold(f64::INFINITY, f64::min);
    TABLE.row(
        label,
        values
            .iter()
            .map(|v| format!("{v:.1} ({:.2}x)", v / lowest)),
    );
}

fn run_workload(name: &str) {
    let runs: Vec<(&str, Parsed)> = children::run_each(&[name])
        .into_iter()
        .map(|(alloc, out)| (alloc, parse(&out)))
        .collect();

    let check = &runs[0].1.check;
    for (alloc, p) in &runs {
        assert_eq!(
            &p.check, check,
            "{name}: {alloc}'s checksum differs from spanheap's"
        );
    }

    println!(
        "\n{name} (MiB, ratio to the lowest; peak = VmHWM at the child's end, final = VmRSS \
         after everything was freed, at once / 1 s / 2 s later; checksum {check})\n"
    );
    TABLE.row("", runs.iter().map(|(alloc, _)| alloc.to_string()));
    TABLE.rule(runs.len());
    let peaks: Vec<f64> = runs.iter().map(|(_, p)| p.peak).collect();
    ratio_row("peak (VmHWM)", &peaks);
    for (k, after) in FINAL_AFTER.iter().enumerate() {
        let finals: Vec<f64> = runs.iter().map(|(_, p)| p.finals[k]).collect();
        let label = match after.as_secs() {
            0 => "final, at once".to_string(),
            s => format!("final, {s} s later"),
        };
        ratio_row(&label, &finals);
    }
    TABLE.row(
        "workload ms",
        runs.iter().map(|(_, p)| format!("{:.0}", p.ms)),
    );
}

fn main() {
    let arg = std::env::args().nth(1);
    let chosen: Vec<&str> = match arg.as_deref() {
        None => WORKLOADS.to_vec(),
        Some(s) => match WORKLOADS.iter().find(|&&n| n == s) {
            Some(&w) => vec![w],
            None => {
                eprintln!("unknown workload {s:?}: strings, btree, pipeline or pool");
                std::process::exit(2);
            }
        },
    };
    if std::env::var_os("DEMO_ALLOC").is_some() {
        // A child: one workload (the first named, `strings` by default), raw lines.
        child(chosen[0]);
        return;
    }
    for w in chosen {
        run_workload(w);
    }
}
