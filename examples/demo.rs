//! Realistic workloads, each run once with each allocator: spanheap, the system
//! allocator, mimalloc and jemalloc.
//!
//! ```sh
//! cargo run --release --example demo            # all workloads x all four, a table
//! cargo run --release --example demo -- 3       # best of 3 runs each
//! DEMO_ALLOC=spanheap DEMO_WORKLOAD=parser cargo run --release --example demo  # one run
//! ```
//!
//! Workloads (`DEMO_WORKLOAD`): `maps` (maps and trees of strings: a HashMap of
//! String -> Vec<String> and a BTreeMap built, queried, updated and dropped, on 2
//! threads), `parser` (a generated program tokenised into Strings and parsed into a
//! tree of boxed nodes, evaluated and dropped, on 2 threads), `messages` (3 producer ->
//! consumer pairs passing Vec<u8> and String messages through channels) and `mixed`
//! (4 threads of strings, maps and trees plus 2 producer/consumer pairs).
//!
//! A process has one global allocator, fixed before `main`. So the demo re-executes
//! itself once per allocator with `DEMO_ALLOC` set; the global allocator below reads
//! that variable (with `getenv`, which does not allocate) on the first allocation of
//! the process, and every allocation of that process, from the first to the last, goes
//! to the allocator it names. Without the variable (the parent) it is the system
//! allocator. Each child runs the workload and reports its wall time, its peak RSS
//! (`VmHWM`) and a checksum of the results, which must be the same for every allocator.
//!
//! The workload: worker threads building, sorting and joining strings, filling and
//! querying `HashMap`s and `BTreeMap`s of strings and building and dropping binary
//! trees of boxed nodes; alongside them, producer threads sending messages (`Vec<u8>`
//! and `String`) through bounded channels to consumer threads that check and drop
//! them (every message is freed by a thread other than the one that allocated it).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// The global allocator: one choice per process, made at the first allocation.
// ---------------------------------------------------------------------------------------

#[path = "common/rss.rs"]
mod rss;
use rss::peak_rss_kib;
#[path = "common/switch.rs"]
mod switch;
use switch::{mode, CHOICES, SPANHEAP};

// ---------------------------------------------------------------------------------------
// The workload. Deterministic: its checksum depends on nothing but the constants below.
// ---------------------------------------------------------------------------------------

const WORKERS: usize = 4;
const ROUNDS: usize = 80;
const STRINGS: usize = 6_000;
const TREE_DEPTH: u32 = 14;
const PIPES: usize = 2;
const MESSAGES: usize = 800_000;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct Node {
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
    value: u64,
}

fn build(depth: u32, value: u64) -> Box<Node> {
    let (left, right) = if depth == 0 {
        (None, None)
    } else {
        (
            Some(build(depth - 1, value * 2)),
            Some(build(depth - 1, value * 2 + 1)),
        )
    };
    Box::new(Node { left, right, value })
}

fn walk(n: &Node) -> u64 {
    n.value
        .wrapping_add(n.left.as_deref().map_or(0, walk))
        .wrapping_add(n.right.as_deref().map_or(0, walk))
}

// ---------------------------------------------------------------------------------------
// maps: maps and trees of strings.
// ---------------------------------------------------------------------------------------

fn maps_thread(t: u64) -> u64 {
    let mut rng = Rng(t + 77);
    let mut sum = 0u64;
    for round in 0..6u64 {
        let mut hm: HashMap<String, Vec<String>> = HashMap::new();
        for i in 0..60_000u64 {
            let k = format!("key:{:x}", rng.next() % 40_000);
            hm.entry(k).or_default().push(format!("value-{i}-{round}"));
        }
        let mut bt: BTreeMap<String, usize> = BTreeMap::new();
        for (k, v) in &hm {
            bt.insert(format!("{k}/{}", v.len()), v.iter().map(String::len).sum());
        }
        for _ in 0..40_000 {
            let k = format!("key:{:x}", rng.next() % 40_000);
            if let Some(v) = hm.get_mut(&k) {
                sum = sum.wrapping_add(v.len() as u64);
                if v.len() > 2 {
                    v.remove(0);
                } else {
                    v.push(k.to_uppercase());
                }
            }
        }
        let lo = String::from("key:1");
        let hi = String::from("key:8");
        sum = sum.wrapping_add(bt.range(lo..hi).map(|(_, &n)| n as u64).sum::<u64>());
        bt.retain(|k, _| k.len() % 3 != 0);
        sum = sum.wrapping_add(bt.len() as u64 + hm.len() as u64);
    }
    sum
}

fn maps() -> u64 {
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2).map(|t| sc.spawn(move || maps_thread(t))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .fold(0, u64::wrapping_add)
    })
}

// ---------------------------------------------------------------------------------------
// parser: tokenise a generated program, parse it into boxed nodes, evaluate, drop.
// ---------------------------------------------------------------------------------------

enum Expr {
    Num(i64),
    Var(String),
    Bin(char, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

/// A deterministic program of `n` statements `name = expr;`.
fn program(seed: u64, n: usize) -> String {
    fn expr(r: &mut Rng, depth: u32, out: &mut String) {
        match if depth == 0 {
            r.next() % 2
        } else {
            r.next() % 5
        } {
            0 => out.push_str(&(r.next() % 1000).to_string()),
            1 => out.push_str(&format!("v{}", r.next() % 50)),
            2 => {
                out.push_str(&format!("f{}(", r.next() % 7));
                let k = 1 + r.next() % 3;
                for i in 0..k {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    expr(r, depth - 1, out);
                }
                out.push(')');
            }
            _ => {
                out.push('(');
                expr(r, depth - 1, out);
                out.push_str([" + ", " - ", " * "][(r.next() % 3) as usize]);
                expr(r, depth - 1, out);
                out.push(')');
            }
        }
    }
    let mut r = Rng(seed);
    let mut out = String::new();
    for i in 0..n {
        out.push_str(&format!("v{} = ", i % 50));
        expr(&mut r, 5, &mut out);
        out.push_str(";\n");
    }
    out
}

fn tokenize(src: &str) -> Vec<String> {
    let mut toks = Vec::new();
    let mut cur = String::new();
    for c in src.chars() {
        if c.is_alphanumeric() {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                toks.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                toks.push(c.to_string());
            }
        }
    }
    toks
}

struct Parser<'a> {
    toks: &'a [String],
    pos: usize,
}

impl Parser<'_> {
    fn next(&mut self) -> &str {
        self.pos += 1;
        &self.toks[self.pos - 1]
    }
    fn expr(&mut self) -> Expr {
        let t = self.next().to_string();
        if t == "(" {
            let a = self.expr();
            let op = self.next().chars().next().unwrap();
            let b = self.expr();
            self.next(); // ")"
            Expr::Bin(op, Box::new(a), Box::new(b))
        } else if t.starts_with('f') && self.toks[self.pos] == "(" {
            self.next();
            let mut args = vec![self.expr()];
            while self.next() == "," {
                args.push(self.expr());
            }
            Expr::Call(t, args)
        } else if let Ok(n) = t.parse() {
            Expr::Num(n)
        } else {
            Expr::Var(t)
        }
    }
}

fn eval(e: &Expr, env: &HashMap<String, i64>) -> i64 {
    match e {
        Expr::Num(n) => *n,
        Expr::Var(v) => env.get(v).copied().unwrap_or(1),
        Expr::Bin(op, a, b) => {
            let (a, b) = (eval(a, env), eval(b, env));
            match op {
                '+' => a.wrapping_add(b),
                '-' => a.wrapping_sub(b),
                _ => a.wrapping_mul(b) % 1_000_003,
            }
        }
        Expr::Call(f, args) => args
            .iter()
            .map(|a| eval(a, env))
            .fold(f.len() as i64, |x, y| x.wrapping_mul(31).wrapping_add(y)),
    }
}

fn parser_thread(t: u64) -> u64 {
    let mut sum = 0u64;
    for round in 0..20 {
        let src = program(t * 100 + round, 6_000);
        let toks = tokenize(&src);
        let mut p = Parser {
            toks: &toks,
            pos: 0,
        };
        let mut env: HashMap<String, i64> = HashMap::new();
        let mut stmts = Vec::new();
        while p.pos < toks.len() {
            let name = p.next().to_string();
            p.next(); // "="
            let e = p.expr();
            p.next(); // ";"
            stmts.push((name, e));
        }
        for (name, e) in &stmts {
            let v = eval(e, &env);
            env.insert(name.clone(), v);
            sum = sum.wrapping_add(v as u64);
        }
        sum = sum.wrapping_add(toks.len() as u64 + stmts.len() as u64);
    }
    sum
}

fn parser() -> u64 {
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2).map(|t| sc.spawn(move || parser_thread(t))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .fold(0, u64::wrapping_add)
    })
}

// ---------------------------------------------------------------------------------------
// messages: producer -> consumer pairs (every message freed by another thread).
// ---------------------------------------------------------------------------------------

fn messages() -> u64 {
    std::thread::scope(|sc| {
        let consumers: Vec<_> = (0..3)
            .map(|p| {
                let (tx, rx) = mpsc::sync_channel(256);
                sc.spawn(move || producer(p + 10, tx));
                sc.spawn(move || consumer(rx))
            })
            .collect();
        consumers
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(0, u64::wrapping_add)
    })
}

// ---------------------------------------------------------------------------------------
// mixed: strings, maps and trees on worker threads, plus producer/consumer pairs.
// ---------------------------------------------------------------------------------------

/// Strings, maps and trees on one thread.
fn worker(w: usize) -> u64 {
    let mut rng = Rng(w as u64 + 1);
    let mut sum = 0u64;
    for round in 0..ROUNDS {
        // Strings: build, sort, dedup, join, rewrite a third of them.
        let mut v: Vec<String> = (0..STRINGS)
            .map(|i| format!("user-{:05x}-{}", rng.next() % 0x40000, i % 97))
            .collect();
        v.sort_unstable();
        v.dedup();
        let joined = v[..v.len().min(500)].join(",");
        sum = sum.wrapping_add(joined.len() as u64 + v.len() as u64);
        for s in v.iter_mut().step_by(3) {
            s.push_str("-seen");
            *s = s.to_uppercase();
        }

        // HashMap of strings to vectors.
        let mut hm: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, s) in v.iter().enumerate() {
            hm.entry(s[..s.len().min(10)].to_string())
                .or_default()
                .push(i as u32);
        }
        for s in v.iter().step_by(2) {
            if let Some(x) = hm.get(&s[..s.len().min(10)]) {
                sum = sum.wrapping_add(x.len() as u64);
            }
        }
        hm.retain(|k, x| (k.len() + x.len()) % 3 != 0);
        sum = sum.wrapping_add(hm.values().map(|x| x.len() as u64).sum::<u64>());
        drop(hm);

        // BTreeMap of strings, a range query, removals.
        let mut bt: BTreeMap<String, String> = v
            .iter()
            .map(|s| (s.clone(), format!("{s}/{round}")))
            .collect();
        let lo = String::from("user-10000");
        let hi = String::from("user-30000");
        sum = sum.wrapping_add(bt.range(lo..hi).map(|(_, x)| x.len() as u64).sum::<u64>());
        for s in v.iter().step_by(4) {
            bt.remove(s);
        }
        sum = sum.wrapping_add(bt.len() as u64);
        drop(bt);
        drop(v);

        // A binary tree of boxed nodes, built, walked and dropped.
        let t = build(TREE_DEPTH, round as u64 + 1);
        sum = sum.wrapping_add(walk(&t));
    }
    sum
}

enum Msg {
    Bytes(Vec<u8>),
    Text(String),
}

fn producer(p: usize, tx: mpsc::SyncSender<Msg>) {
    let mut rng = Rng(1000 + p as u64);
    for i in 0..MESSAGES {
        let r = rng.next();
        // Mostly small messages, one in 64 up to 16 KiB.
        let len = if r % 64 == 0 {
            (r >> 8) % 16384
        } else {
            16 + (r >> 8) % 500
        } as usize;
        let m = if i % 2 == 0 {
            Msg::Bytes(vec![(i % 251) as u8; len])
        } else {
            Msg::Text(format!("message {i} from producer {p}: {len}"))
        };
        tx.send(m).unwrap();
    }
}

fn consumer(rx: mpsc::Receiver<Msg>) -> u64 {
    let mut sum = 0u64;
    for m in rx {
        sum = sum.wrapping_add(match m {
            Msg::Bytes(b) => b.iter().map(|&x| x as u64).sum::<u64>() + b.len() as u64,
            Msg::Text(s) => s.len() as u64,
        });
    }
    sum
}

/// A workload: its name and the function that runs it (returning a checksum).
type Workload = (&'static str, fn() -> u64);

/// The workloads, in table order.
const WORKLOADS: [Workload; 4] = [
    ("maps", maps),
    ("parser", parser),
    ("messages", messages),
    ("mixed", mixed),
];

fn mixed() -> u64 {
    std::thread::scope(|sc| {
        let workers: Vec<_> = (0..WORKERS).map(|w| sc.spawn(move || worker(w))).collect();
        let consumers: Vec<_> = (0..PIPES)
            .map(|p| {
                let (tx, rx) = mpsc::sync_channel(256);
                sc.spawn(move || producer(p, tx));
                sc.spawn(move || consumer(rx))
            })
            .collect();
        workers
            .into_iter()
            .chain(consumers)
            .map(|h| h.join().unwrap())
            .fold(0u64, u64::wrapping_add)
    })
}

// ---------------------------------------------------------------------------------------
// Parent and child.
// ---------------------------------------------------------------------------------------

struct Run {
    wall: Duration,
    rss_kib: u64,
    checksum: u64,
}

/// Runs workload `workload` in a child process with `DEMO_ALLOC=name`.
fn run_child(name: &str, workload: &str) -> Result<Run, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .env("DEMO_ALLOC", name)
        .env("DEMO_WORKLOAD", workload)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "child exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("no result line in {stdout:?}"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("bad result line {line:?}"))
    };
    Ok(Run {
        wall: Duration::from_nanos(num(1)?),
        rss_kib: num(2)?,
        checksum: num(3)?,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    if std::env::var_os("DEMO_ALLOC").is_some() {
        // Child: run the workload once with the allocator chosen at the first allocation.
        let name = CHOICES
            .iter()
            .find(|c| c.1 == mode())
            .map_or("system", |c| c.0);
        let wname = std::env::var("DEMO_WORKLOAD").unwrap_or_else(|_| "mixed".into());
        let work = WORKLOADS
            .iter()
            .find(|w| w.0 == wname)
            .unwrap_or_else(|| panic!("unknown workload {wname}"))
            .1;
        let t0 = Instant::now();
        let checksum = work();
        let wall = t0.elapsed();
        let rss = peak_rss_kib();
        // The dispatch really went where it says: spanheap has arenas iff it was chosen.
        let arenas = spanheap::__private::global_counters().arena_bytes;
        assert_eq!(
            arenas > 0,
            mode() == SPANHEAP,
            "{name}: spanheap holds {arenas} arena bytes"
        );
        println!("RESULT {name} {} {rss} {checksum}", wall.as_nanos());
        return;
    }

    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
        .max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "spanheap demo: {} workloads x 4 allocators, each run in its own process",
        WORKLOADS.len()
    );
    println!(
        "machine: {cpus} CPUs (nproc), {}; {} run(s) per cell, best wall time kept",
        cpu_model(),
        runs
    );
    println!();
    println!(
        "{:<9} | {:<9} | {:>9} | {:>17} | {:>9}",
        "workload", "allocator", "wall time", "ratio to spanheap", "peak RSS"
    );
    println!(
        "{:-<9}-+-{:-<9}-+-{:->9}-+-{:->17}-+-{:->9}",
        "", "", "", "", ""
    );
    for &(wname, _) in &WORKLOADS {
        // Round-robin: run i of every allocator before run i + 1 of any, so that a
        // slow or fast spell of a shared machine falls on all of them alike.
        let mut best: Vec<Option<Run>> = CHOICES.iter().map(|_| None).collect();
        for _ in 0..runs {
            for (&(name, _), b) in CHOICES.iter().zip(best.iter_mut()) {
                match run_child(name, wname) {
                    Ok(r) => {
                        if b.as_ref().map_or(true, |b| r.wall < b.wall) {
                            *b = Some(r);
                        }
                    }
                    Err(e) => {
                        eprintln!("{wname}/{name}: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
        let results: Vec<(&str, Run)> = CHOICES
            .iter()
            .zip(best)
            .map(|(&(name, _), b)| (name, b.expect("runs >= 1")))
            .collect();
        let reference = results[0].1.wall.as_secs_f64();
        for (name, r) in &results {
            println!(
                "{:<9} | {:<9} | {:>7.0}ms | {:>16.2}x | {:>6.1}MiB",
                wname,
                name,
                r.wall.as_secs_f64() * 1e3,
                r.wall.as_secs_f64() / reference,
                r.rss_kib as f64 / 1024.0
            );
        }
        let sums: Vec<u64> = results.iter().map(|(_, r)| r.checksum).collect();
        if sums.iter().any(|&s| s != sums[0]) {
            eprintln!("{wname}: checksums differ between allocators: {sums:?}");
            std::process::exit(1);
        }
    }
    println!("\nevery workload's checksum is the same for every allocator");
}
