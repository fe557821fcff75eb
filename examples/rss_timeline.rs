//! Resident memory over time after a phase change, for each allocator with its own
//! defaults: how promptly memory a program stopped using goes back to the OS. The three
//! scenarios of issue 21, side by side for spanheap, system (glibc), mimalloc and
//! jemalloc.
//!
//! ```sh
//! cargo run --release --example rss_timeline              # all three scenarios
//! cargo run --release --example rss_timeline -- exits     # one: burst, exits or parks
//! DEMO_ALLOC=jemalloc cargo run --release --example rss_timeline -- parks   # one child, raw
//! ```
//!
//! The parent runs each scenario once per allocator, each in a child process of its own
//! (one after another), the allocator chosen by `DEMO_ALLOC` through
//! `common/switch.rs`; with `DEMO_ALLOC` set the program is that child and prints its
//! raw lines (scenario `burst` when none is named). Children inherit the environment,
//! so `SPANHEAP_*` settings reach spanheap's child; none is set here.
//!
//! Scenarios (the "phase change" is at t = 0):
//! - `burst`: 1 GiB in all of blocks whose sizes cycle through 48 B, 700 B, 20,000 B
//!   and 300,000 B, every byte written, then all freed; t = 0 right after the free.
//! - `exits`: 32 worker threads each allocate 16 MiB of objects of random sizes
//!   8 B ..= 8 KiB (every byte written) and free them in random order, twice, and exit;
//!   t = 0 right after the main thread has joined them all.
//! - `parks`: the same workers, but after their two rounds they block (a channel
//!   receive, no timed wakeups) until the timeline is over, then are released and
//!   joined; t = 0 when all 32 have reached the barrier before blocking.
//!
//! From t = 0 the main thread does light work for 5 s: every 5 ms it allocates a hundred
//! `Box<[u8; 64]>` (written), held in a reused `Vec`, and frees them. RSS
//! (`/proc/self/statm`) is sampled at t = 0 and every 250 ms up to 5000 ms. Each table
//! has a row "start" (the child's RSS before the scenario), "peak" (right before the
//! phase change: in `burst` with the 1 GiB live; in `exits` and `parks` with the
//! workers done with their memory and waiting), then one row per sample, in MiB.
//!
//! Background thread: at the end of the timeline each child looks for a thread named
//! `spanheap-scav` (spanheap's background scavenger, when it runs) and reports its CPU
//! time (`/proc/self/task/<tid>/schedstat`) and its context switches, voluntary and
//! not (`.../status`), so far; "-" when there is no such thread. In `burst` the child
//! then sleeps 2 s without allocating and reports the thread's context switches in
//! that window (its wakeups while the program is idle) and the RSS at its end.
//!
//! Last, a target line per scenario (issue 21), computed from the table: `burst`,
//! spanheap at 2000 ms / system at 2000 ms <= 1.2; `exits`, spanheap at 2000 ms /
//! the lowest of the other three at 2000 ms <= 1.2; `parks`, spanheap at 3000 ms / the
//! lowest of the other three at 3000 ms <= 0.5.
//!
//! Measuring allocates nothing, so the timeline and the idle window allocate nothing
//! beyond the scenario's boxes: `/proc` files are read into stack buffers (`File::open`
//! of a short path does not allocate) and `/proc/self/task` is listed with
//! `getdents64`.

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Barrier};
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

const SCENARIOS: [&str; 3] = ["burst", "exits", "parks"];

/// Sampling period and length of the timeline: samples at 0, 250, .., 5000 ms.
const SAMPLE: Duration = Duration::from_millis(250);
const SAMPLES: usize = 21;
/// Light work: `BOXES` boxes of 64 bytes every `WORK_EVERY`.
const WORK_EVERY: Duration = Duration::from_millis(5);
const BOXES: usize = 100;
/// `burst`: total bytes and the block sizes it cycles through.
const BURST_BYTES: usize = 1 << 30;
const BURST_SIZES: [usize; 4] = [48, 700, 20_000, 300_000];
/// `exits` and `parks`: worker threads, bytes each allocates per round, rounds.
const WORKERS: usize = 32;
const WORKER_BYTES: usize = 16 * MIB;
const ROUNDS: usize = 2;
/// `burst`: the idle window after the timeline.
const IDLE: Duration = Duration::from_secs(2);

/// Reads a small file into `buf` without allocating; `None` if it cannot be read (a
/// thread that has exited).
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

/// This process's resident set, in MiB.
fn rss_mib() -> f64 {
    let mut buf = [0u8; 128];
    let statm = read_small("/proc/self/statm", &mut buf).expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    (pages * page) as f64 / MIB as f64
}

/// `/proc/self/task/<tid>/<file>`, formatted into `buf` without allocating.
fn task_file<'a>(buf: &'a mut [u8; 64], tid: u32, file: &str) -> &'a str {
    let mut rest = &mut buf[..];
    write!(rest, "/proc/self/task/{tid}/{file}").unwrap();
    let len = 64 - rest.len();
    std::str::from_utf8(&buf[..len]).unwrap()
}

/// The background scavenger thread, found by name.
struct BgThread {
    tid: u32,
}

/// What the background thread has used so far.
#[derive(Clone, Copy)]
struct Usage {
    cpu_ms: f64,
    switches: u64,
}

impl BgThread {
    /// The thread named `spanheap-scav`, if this process has one. Lists
    /// `/proc/self/task` with `getdents64` into a stack buffer rather than
    /// `std::fs::read_dir`, which allocates: an allocation here, right before the
    /// idle window, could give the allocator a chance to return memory that an idle
    /// program would not give it.
    fn find() -> Option<Self> {
        let dir = File::open("/proc/self/task").ok()?;
        let mut entries = [0u8; 4096];
        loop {
            // SAFETY: `entries` is writable for its length; the descriptor is open.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    dir.as_raw_fd(),
                    entries.as_mut_ptr(),
                    entries.len(),
                )
            };
            if n <= 0 {
                return None; // the end, or an error: no such thread
            }
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16 (at 16), d_type u8,
            // then the NUL-terminated name (at 19).
            let mut at = 0;
            while at < n as usize {
                let len = u16::from_ne_bytes([entries[at + 16], entries[at + 17]]) as usize;
                let name = &entries[at + 19..at + len];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                // "." and ".." do not parse.
                if let Some(tid) = std::str::from_utf8(name).ok().and_then(|s| s.parse().ok()) {
                    let (mut path, mut comm) = ([0u8; 64], [0u8; 32]);
                    if read_small(task_file(&mut path, tid, "comm"), &mut comm)
                        .is_some_and(|c| c.trim_end() == "spanheap-scav")
                    {
                        return Some(BgThread { tid });
                    }
                }
                at += len;
            }
        }
    }

    /// CPU time (first field of schedstat, ns) and context switches so far, read
    /// without allocating; `None` once the thread is gone.
    fn usage(&self) -> Option<Usage> {
        let (mut path, mut buf) = ([0u8; 64], [0u8; 4096]);
        let stat = read_small(task_file(&mut path, self.tid, "schedstat"), &mut buf)?;
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        let status = read_small(task_file(&mut path, self.tid, "status"), &mut buf)?;
        let switches = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        Some(Usage {
            cpu_ms: ns as f64 / 1e6,
            switches,
        })
    }
}

/// What one child measured; printed as its raw output, one item a line.
struct Report {
    start: f64,
    peak: f64,
    timeline: [f64; SAMPLES],
    bg: Option<Usage>,
    /// `burst` only: the bg thread's context switches in the idle window ("-" if no
    /// thread) and the RSS at its end.
    idle: Option<(Option<u64>, f64)>,
}

impl Report {
    fn print(&self) {
        println!("start {:.1}", self.start);
        println!("peak {:.1}", self.peak);
        for (k, r) in self.timeline.iter().enumerate() {
            println!("{} {r:.1}", k as u128 * SAMPLE.as_millis());
        }
        match self.bg {
            Some(u) => println!("bg {:.1} {}", u.cpu_ms, u.switches),
            None => println!("bg - -"),
        }
        if let Some((wakeups, rss)) = self.idle {
            match wakeups {
                Some(w) => println!("idle {w} {rss:.1}"),
                None => println!("idle - {rss:.1}"),
            }
        }
    }
}

/// A hundred 64-byte boxes, written, held in `boxes` (capacity reserved by the
/// caller), then freed.
#[allow(clippy::vec_box)] // the boxes are the point: one 64-byte allocation each
fn light_work(boxes: &mut Vec<Box<[u8; 64]>>) {
    for i in 0..BOXES {
        boxes.push(Box::new([i as u8; 64]));
    }
    black_box(&*boxes);
    boxes.clear();
}

/// Light work on this thread from now for 5 s, RSS sampled every 250 ms (the first
/// sample at once).
fn timeline() -> [f64; SAMPLES] {
    let mut boxes = Vec::with_capacity(BOXES);
    let mut samples = [0.0; SAMPLES];
    let t0 = Instant::now();
    let mut next_work = t0;
    let mut k = 0;
    while k < SAMPLES {
        let now = Instant::now();
        let due = t0 + SAMPLE * k as u32;
        if now >= due {
            samples[k] = rss_mib();
            k += 1;
        } else if now >= next_work {
            light_work(&mut boxes);
            // Late (a slow round, a long sleep): skip the missed rounds.
            next_work = (next_work + WORK_EVERY).max(now);
        } else {
            std::thread::sleep(due.min(next_work) - now);
        }
    }
    samples
}

/// The bg thread's usage at the end of a timeline.
fn bg_usage() -> (Option<BgThread>, Option<Usage>) {
    let bg = BgThread::find();
    let usage = bg.as_ref().and_then(BgThread::usage);
    (bg, usage)
}

fn burst() -> Report {
    let start = rss_mib();
    let cycle: usize = BURST_SIZES.iter().sum();
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(BURST_BYTES / cycle * 4 + 4);
    let mut total = 0;
    for size in BURST_SIZES.iter().cycle() {
        if total >= BURST_BYTES {
            break;
        }
        blocks.push(vec![0xA5u8; *size]);
        total += size;
    }
    black_box(&blocks);
    let peak = rss_mib();
    drop(blocks);
    let timeline = timeline();
    let (bg, usage) = bg_usage();
    // Idle: no allocation, only the bg thread (if any) can run.
    std::thread::sleep(IDLE);
    let after = bg.as_ref().and_then(BgThread::usage);
    let wakeups = usage
        .zip(after)
        .map(|(before, after)| after.switches - before.switches);
    Report {
        start,
        peak,
        timeline,
        bg: usage,
        idle: Some((wakeups, rss_mib())),
    }
}

/// One worker's allocation: `ROUNDS` times, `WORKER_BYTES` of objects of 8 B ..= 8 KiB,
/// every byte written, freed in random order.
fn churn(rng: &mut Rng) {
    for _ in 0..ROUNDS {
        let mut objects: Vec<Vec<u8>> = Vec::new();
        let mut total = 0;
        while total < WORKER_BYTES {
            let size = 8 + rng.below(8 * KIB - 8 + 1);
            objects.push(vec![0x5Au8; size]);
            total += size;
        }
        black_box(&objects);
        // Fisher-Yates, then free one by one in the shuffled order.
        for i in (1..objects.len()).rev() {
            objects.swap(i, rng.below(i + 1));
        }
        objects.into_iter().for_each(drop);
    }
}

/// `exits` (`park` false) and `parks` (`park` true).
fn workers(park: bool) -> Report {
    let start = rss_mib();
    let ready = Arc::new(Barrier::new(WORKERS + 1));
    // Each worker blocks on its channel until the sender is dropped: no timed wakeups.
    let (releases, handles): (Vec<_>, Vec<_>) = (0..WORKERS)
        .map(|w| {
            let (release, blocked) = mpsc::channel::<()>();
            let ready = ready.clone();
            let handle = std::thread::spawn(move || {
                churn(&mut Rng(w as u64 + 2));
                ready.wait();
                let _ = blocked.recv();
            });
            (release, handle)
        })
        .unzip();
    // All workers done with their memory and waiting: right before the phase change.
    ready.wait();
    let peak = rss_mib();
    let release_and_join = move || {
        drop(releases);
        for h in handles {
            h.join().unwrap();
        }
    };
    let (samples, bg) = if park {
        let samples = timeline();
        let bg = bg_usage().1;
        release_and_join();
        (samples, bg)
    } else {
        release_and_join();
        let samples = timeline();
        (samples, bg_usage().1)
    };
    Report {
        start,
        peak,
        timeline: samples,
        bg,
        idle: None,
    }
}

/// One child's raw output, parsed back.
struct Parsed {
    start: f64,
    peak: f64,
    /// (ms, MiB)
    timeline: Vec<(u32, f64)>,
    bg: String,
    idle: Option<String>,
}

fn parse(out: &str) -> Parsed {
    let mut p = Parsed {
        start: 0.0,
        peak: 0.0,
        timeline: Vec::new(),
        bg: "-".into(),
        idle: None,
    };
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            ["start", v] => p.start = v.parse().unwrap(),
            ["peak", v] => p.peak = v.parse().unwrap(),
            ["bg", "-", "-"] => p.bg = "-".into(),
            ["bg", ms, n] => p.bg = format!("{ms} / {n}"),
            ["idle", n, rss] => p.idle = Some(format!("{n} / {rss}")),
            [t, v] => p.timeline.push((t.parse().unwrap(), v.parse().unwrap())),
            _ => panic!("unexpected child line {line:?}"),
        }
    }
    p
}

const TITLES: [&str; 3] = [
    "burst: 1 GiB of 48 B / 700 B / 20 KB / 300 KB blocks freed at t=0, light work after",
    "exits: 32 threads churned 16 MiB each twice and exited (joined at t=0), light work after",
    "parks: 32 threads churned 16 MiB each twice and parked at t=0, light work on the main thread",
];

/// Width of the label column and of each allocator's column.
const TABLE: table::Table = table::Table {
    label: 26,
    cell: 10,
};

/// RSS of one allocator's child at `ms`.
fn at(p: &Parsed, ms: u32) -> f64 {
    p.timeline.iter().find(|(t, _)| *t == ms).unwrap().1
}

/// The target line: spanheap at `ms` against the system allocator or the lowest peer.
fn target(runs: &[(&str, Parsed)], ms: u32, against_system_only: bool, limit: f64) {
    let ours = at(&runs[0].1, ms);
    let (peer, theirs) = runs[1..]
        .iter()
        .filter(|(name, _)| !against_system_only || *name == "system")
        .map(|(name, p)| (*name, at(p, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let what = if against_system_only {
        "system".to_string()
    } else {
        format!("lowest peer, {peer}")
    };
    let ratio = ours / theirs;
    let verdict = if ratio <= limit { "met" } else { "missed" };
    println!(
        "target: spanheap / {what} at {ms} ms = {ours:.1} / {theirs:.1} MiB = {ratio:.2} \
         (target <= {limit}): {verdict}"
    );
}

fn run_scenario(i: usize) {
    let runs: Vec<(&str, Parsed)> = children::run_each(&[SCENARIOS[i]])
        .into_iter()
        .map(|(name, out)| (name, parse(&out)))
        .collect();

    println!("\n{} (RSS in MiB, defaults of each allocator)\n", TITLES[i]);
    TABLE.row("ms", runs.iter().map(|(name, _)| name.to_string()));
    TABLE.rule(runs.len());
    TABLE.row("start", runs.iter().map(|(_, p)| format!("{:.1}", p.start)));
    TABLE.row("peak", runs.iter().map(|(_, p)| format!("{:.1}", p.peak)));
    for (k, (ms, _)) in runs[0].1.timeline.iter().enumerate() {
        TABLE.row(
            &ms.to_string(),
            runs.iter().map(|(_, p)| format!("{:.1}", p.timeline[k].1)),
        );
    }
    TABLE.row(
        "bg cpu ms / switches",
        runs.iter().map(|(_, p)| p.bg.clone()),
    );
    if SCENARIOS[i] == "burst" {
        TABLE.row(
            "idle 2 s: bg wakeups / RSS",
            runs.iter().map(|(_, p)| p.idle.clone().unwrap()),
        );
    }
    println!();
    match SCENARIOS[i] {
        "burst" => target(&runs, 2000, true, 1.2),
        "exits" => target(&runs, 2000, false, 1.2),
        _ => target(&runs, 3000, false, 0.5),
    }
}

fn main() {
    let arg = std::env::args().nth(1);
    let chosen: Vec<usize> = match arg.as_deref() {
        None => (0..SCENARIOS.len()).collect(),
        Some(s) => match SCENARIOS.iter().position(|&n| n == s) {
            Some(i) => vec![i],
            None => {
                eprintln!("unknown scenario {s:?}: burst, exits or parks");
                std::process::exit(2);
            }
        },
    };
    if std::env::var_os("DEMO_ALLOC").is_some() {
        // A child: one scenario (the first named, `burst` by default), raw lines.
        let report = match SCENARIOS[chosen[0]] {
            "burst" => burst(),
            "exits" => workers(false),
            _ => workers(true),
        };
        report.print();
        return;
    }
    for i in chosen {
        run_scenario(i);
    }
}
