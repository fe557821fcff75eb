//! The public statistics (`spanheap::stats()`): exact counts for a known workload,
//! consistency of every snapshot under concurrent churn, counting on cache-less threads
//! (TLS destructors), and the `SPANHEAP_STATS=1` exit report.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use common::{shared, Rng};
use spanheap::Stats;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// The class whose size is exactly `size` (tests pick sizes that are class sizes).
fn class_of(s: &Stats, size: u64) -> usize {
    s.classes
        .iter()
        .position(|c| c.size == size)
        .unwrap_or_else(|| panic!("{size} is not a class size"))
}

/// A block of `size` bytes filled with a pattern derived from `tag`.
fn filled(size: usize, tag: usize) -> usize {
    let l = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { alloc(l) };
    assert!(!p.is_null());
    // SAFETY: `size` writable bytes.
    unsafe { std::ptr::write_bytes(p, tag as u8, size) };
    p as usize
}

fn check_and_free(p: usize, size: usize, tag: usize) {
    let l = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: a live block of this layout, filled by `filled`.
    unsafe {
        let s = std::slice::from_raw_parts(p as *const u8, size);
        assert!(s.iter().all(|&b| b == tag as u8), "block {p:#x} corrupted");
        dealloc(p as *mut u8, l);
    }
}

// ---------------------------------------------------------------------------------------
// Exact counts. Each runs in a child process running only that test, so no other
// test's thread (finishing, or flushing its cache at exit) changes the counts.
// ---------------------------------------------------------------------------------------

/// Whether this process is a child started by `in_child`.
fn is_child() -> bool {
    std::env::var_os("SPANHEAP_STATS_CHILD").is_some()
}

/// Runs the test `name` alone in a child process; returns its stdout and stderr.
fn in_child(name: &str, report: bool) -> (String, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("SPANHEAP_STATS_CHILD", "1");
    if report {
        cmd.env("SPANHEAP_STATS", "1");
    } else {
        cmd.env_remove("SPANHEAP_STATS");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "child {name} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "child {name} did not run:\n{stdout}"
    );
    (stdout, stderr)
}

#[test]
fn resident_breakdown_matches_rss() {
    let _g = shared();
    in_child("child_resident_breakdown", false);
}

/// The process's resident set (`Rss:` of /proc/self/smaps_rollup), in bytes.
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("Rss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn child_resident_breakdown() {
    if !is_child() {
        return;
    }
    // Small objects of five class sizes (so their class size is the request) and 1 MiB
    // blocks, every byte written; then every third small object freed.
    const SIZES: [usize; 5] = [32, 96, 640, 1280, 3072];
    const N: usize = 50_000;
    const LARGE: usize = 40;
    let mut small: Vec<usize> = Vec::with_capacity(N);
    let mut large: Vec<usize> = Vec::with_capacity(LARGE);
    spanheap::flush_thread_cache();
    let (s0, rss0) = (spanheap::stats(), rss_bytes());
    let r0 = s0.resident();
    for i in 0..N {
        small.push(filled(SIZES[i % SIZES.len()], i));
    }
    for i in 0..LARGE {
        large.push(filled(1 << 20, i));
    }
    let mut freed = 0;
    for i in (0..N).step_by(3) {
        check_and_free(small[i], SIZES[i % SIZES.len()], i);
        freed += SIZES[i % SIZES.len()] as u64;
    }
    // Freed objects on this thread's free stacks go back to their spans.
    spanheap::flush_thread_cache();
    let (s1, rss1) = (spanheap::stats(), rss_bytes());
    let r1 = s1.resident();
    println!("resident before {r0:?}\nafter {r1:?}\nrss {rss0} -> {rss1}");
    s1.check().unwrap();

    // The parts of the small-object spans make up those spans, class by class.
    for c in &s1.classes {
        assert_eq!(
            c.live_bytes() + c.free_slot_bytes() + c.tail_bytes(),
            c.spans_bytes(),
            "class of {} B",
            c.size
        );
    }
    // The live objects are the workload's (each at its class size), give or take the
    // harness's own few allocations.
    let live: u64 = (0..N)
        .filter(|i| i % 3 != 0)
        .map(|i| SIZES[i % SIZES.len()] as u64)
        .sum();
    let small_added = r1.small_objects - r0.small_objects;
    assert!(
        small_added.abs_diff(live) <= live / 100,
        "small objects grew by {small_added} B, the workload keeps {live} B"
    );
    // What was freed sits in the spans' free slots (none of them emptied: a third of
    // each is freed).
    let slots_added = r1.small_free_slots - r0.small_free_slots;
    assert!(
        slots_added >= freed * 9 / 10 && slots_added <= freed * 11 / 10 + (1 << 20),
        "free slots grew by {slots_added} B, {freed} B were freed"
    );
    // The 1 MiB blocks (and the two Vecs' buffers, large blocks too).
    let large_added = r1.large_blocks - r0.large_blocks;
    assert!(
        large_added >= (LARGE << 20) as u64 && large_added <= ((LARGE + 2) << 20) as u64,
        "large blocks grew by {large_added} B"
    );
    // And the whole breakdown accounts for what the process's resident set grew by:
    // every byte handed out was written, so committed pages are resident.
    let (grew, counted) = (rss1 - rss0, r1.total() - r0.total());
    assert!(
        grew.abs_diff(counted) <= grew / 20,
        "RSS grew by {grew} B, the breakdown by {counted} B"
    );
    for (i, &p) in large.iter().enumerate() {
        check_and_free(p, 1 << 20, i);
    }
    for i in (0..N).filter(|i| i % 3 != 0) {
        check_and_free(small[i], SIZES[i % SIZES.len()], i);
    }
}

#[test]
fn exact_workload_counts_after_threads_exit() {
    let _g = shared();
    in_child("child_exact_workload", false);
}

#[test]
fn reuse_from_the_local_free_list_is_counted_once_published() {
    let _g = shared();
    in_child("child_reuse", false);
}

#[test]
fn cacheless_allocations_and_frees_in_tls_destructors_are_counted() {
    let _g = shared();
    in_child("child_cacheless", false);
}

/// Sizes used only by this file's exact tests (class sizes nothing else here uses).
const SMALL: usize = 1536;
const LARGE: usize = 100 << 10; // 13 pages
const LARGE_PAGES_BYTES: u64 = 13 * 8192;

#[test]
fn child_exact_workload() {
    if !is_child() {
        return;
    }
    const THREADS: usize = 4;
    const K: usize = 1000; // small objects per thread
    const J: usize = 300; // freed by the allocating thread
    const M: usize = 200; // freed by the main thread (cross-thread)
    const KL: usize = 10; // large objects per thread
    const JL: usize = 4;
    let s0 = spanheap::stats();
    let c = class_of(&s0, SMALL as u64);
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let small: Vec<usize> = (0..K).map(|i| filled(SMALL, t + i)).collect();
                let large: Vec<usize> = (0..KL).map(|i| filled(LARGE, t * 7 + i)).collect();
                for (i, &p) in small.iter().enumerate().take(J) {
                    check_and_free(p, SMALL, t + i);
                }
                for (i, &p) in large.iter().enumerate().take(JL) {
                    check_and_free(p, LARGE, t * 7 + i);
                }
                (small[J..].to_vec(), large[JL..].to_vec())
            })
        })
        .collect();
    let kept: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    // The threads exited (their caches were flushed); free M of each thread's objects
    // here, then flush this thread's cache so they reach their spans.
    for (t, (small, _)) in kept.iter().enumerate() {
        for (i, &p) in small.iter().enumerate().take(M) {
            check_and_free(p, SMALL, t + J + i);
        }
    }
    spanheap::flush_thread_cache();
    let s1 = spanheap::stats();
    s1.check().unwrap();
    let (a, f) = (
        s1.classes[c].allocs - s0.classes[c].allocs,
        s1.classes[c].frees - s0.classes[c].frees,
    );
    assert_eq!(a, (THREADS * K) as u64, "small allocations");
    assert_eq!(f, (THREADS * (J + M)) as u64, "small frees");
    assert_eq!(s1.large_allocs - s0.large_allocs, (THREADS * KL) as u64);
    assert_eq!(s1.large_frees - s0.large_frees, (THREADS * JL) as u64);
    assert_eq!(
        s1.large_alloc_bytes - s0.large_alloc_bytes,
        (THREADS * KL) as u64 * LARGE_PAGES_BYTES
    );
    assert!(s1.heap_bytes >= s1.small_live_bytes() + s1.large_live_bytes());

    // Free the rest; every count balances.
    for (t, (small, large)) in kept.into_iter().enumerate() {
        for (i, p) in small.into_iter().enumerate().skip(M) {
            check_and_free(p, SMALL, t + J + i);
        }
        for (i, p) in large.into_iter().enumerate() {
            check_and_free(p, LARGE, t * 7 + JL + i);
        }
    }
    spanheap::flush_thread_cache();
    let s2 = spanheap::stats();
    s2.check().unwrap();
    assert_eq!(
        s2.classes[c].allocs - s0.classes[c].allocs,
        (THREADS * K) as u64
    );
    assert_eq!(
        s2.classes[c].frees - s0.classes[c].frees,
        (THREADS * K) as u64
    );
    assert_eq!(s2.classes[c].live(), s0.classes[c].live());
    assert_eq!(s2.large_frees - s0.large_frees, (THREADS * KL) as u64);
    assert_eq!(
        s2.large_free_bytes - s0.large_free_bytes,
        (THREADS * KL) as u64 * LARGE_PAGES_BYTES
    );
}

#[test]
fn child_reuse() {
    if !is_child() {
        return;
    }
    // A size nothing else in this binary uses.
    const SIZE: usize = 3072;
    let s0 = spanheap::stats();
    let c = class_of(&s0, SIZE as u64);
    let keep = filled(SIZE, 1);
    for i in 0..10_000 {
        let p = filled(SIZE, i);
        check_and_free(p, SIZE, i);
    }
    // `stats()` publishes this thread's reuse counts.
    let s1 = spanheap::stats();
    let (a, f) = (
        s1.classes[c].allocs - s0.classes[c].allocs,
        s1.classes[c].frees - s0.classes[c].frees,
    );
    // 10,001 allocations and 10,000 frees happened; the window counts ahead by its
    // unused objects (at most a 64-object window), the free list's one object
    // counts as live.
    assert!((10_001..10_001 + 64).contains(&a), "allocs {a}");
    assert!((10_000 - 1..=10_000).contains(&f), "frees {f}");
    check_and_free(keep, SIZE, 1);
    spanheap::flush_thread_cache();
    let s2 = spanheap::stats();
    assert_eq!(s2.classes[c].allocs - s0.classes[c].allocs, 10_001);
    assert_eq!(s2.classes[c].frees - s0.classes[c].frees, 10_001);
}

#[test]
fn snapshots_are_consistent_while_four_threads_churn() {
    let _g = shared();
    const WRITERS: usize = 4;
    const SNAPSHOTS: usize = 1000;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    // Objects handed from each writer to the next, so frees are cross-thread too.
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..WRITERS)
        .map(|_| std::sync::mpsc::channel::<Vec<(usize, usize, usize)>>())
        .unzip();
    let mut rxs: Vec<_> = rxs.into_iter().map(Some).collect();
    let hs: Vec<_> = (0..WRITERS)
        .map(|w| {
            let stop = stop.clone();
            let ops = ops.clone();
            let tx = txs[(w + 1) % WRITERS].clone();
            let rx = rxs[w].take().unwrap();
            std::thread::spawn(move || {
                let mut r = Rng(w as u64 + 1);
                let mut live: Vec<(usize, usize, usize)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let size = match r.below(16) {
                            0 => 33_000 + r.below(200_000) as usize, // large
                            1..=3 => 1 + r.below(1024) as usize,
                            _ => 1 + r.below(256) as usize,
                        };
                        let tag = r.next() as usize;
                        live.push((filled(size, tag), size, tag));
                        if live.len() > 256 {
                            let i = r.below(live.len() as u64) as usize;
                            let (p, s, t) = live.swap_remove(i);
                            check_and_free(p, s, t);
                        }
                    }
                    ops.fetch_add(64, Ordering::Relaxed);
                    if r.below(4) == 0 {
                        let give = live.split_off(live.len() / 2);
                        let _ = tx.send(give);
                    }
                    while let Ok(v) = rx.try_recv() {
                        for (p, s, t) in v {
                            check_and_free(p, s, t);
                        }
                    }
                }
                drop(tx);
                (live, rx)
            })
        })
        .collect();
    drop(txs);
    let mut violations = Vec::new();
    let mut prev: Option<Stats> = None;
    // At least SNAPSHOTS snapshots, and until the writers made MIN_OPS allocations.
    const MIN_OPS: u64 = 300_000;
    let mut i = 0;
    while i < SNAPSHOTS || ops.load(Ordering::Relaxed) < MIN_OPS {
        i += 1;
        let s = spanheap::stats();
        if let Err(e) = s.check() {
            violations.push(format!("snapshot {i}: {e}"));
        }
        if let Some(p) = prev {
            // Frees and large allocations only ever grow.
            if p.small_frees() > s.small_frees()
                || p.large_allocs > s.large_allocs
                || p.large_frees > s.large_frees
            {
                violations.push(format!("snapshot {i}: a cumulative count went down"));
            }
        }
        prev = Some(s);
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let (live, rx) = h.join().unwrap();
        for (p, s, t) in live {
            check_and_free(p, s, t);
        }
        for v in rx.try_iter() {
            for (p, s, t) in v {
                check_and_free(p, s, t);
            }
        }
    }
    eprintln!(
        "stats churn: {i} snapshots while {WRITERS} threads made {} allocations",
        ops.load(Ordering::Relaxed)
    );
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(ops.load(Ordering::Relaxed) > 0);
}

// ---------------------------------------------------------------------------------------
// Cache-less threads: allocation in a destructor that runs after spanheap's teardown.
// ---------------------------------------------------------------------------------------

const PLESS_SIZE: usize = 2688; // a class size used nowhere else in this binary
static PLESS_SEEN: AtomicU64 = AtomicU64::new(0);

/// A pthread key created after spanheap's own (spanheap creates its key at the first
/// small allocation, long before any test), so glibc runs its destructor after the
/// cache teardown: the thread is cache-less by then.
fn late_key() -> libc::pthread_key_t {
    extern "C" fn dtor(_: *mut libc::c_void) {
        if !spanheap::__private::thread_has_cache() {
            PLESS_SEEN.fetch_add(1, Ordering::Relaxed);
        }
        // 10 small objects (7 freed) and 2 large ones (1 freed), on a cache-less thread.
        let small: Vec<usize> = (0..10).map(|i| filled(PLESS_SIZE, i)).collect();
        let large: Vec<usize> = (0..2).map(|i| filled(LARGE, 50 + i)).collect();
        for (i, &p) in small.iter().enumerate().take(7) {
            check_and_free(p, PLESS_SIZE, i);
        }
        check_and_free(large[0], LARGE, 50);
        // The rest stays live; the test frees it from the main thread.
        LEFT.lock().unwrap().push((small[7..].to_vec(), large[1]));
    }
    static KEY: std::sync::OnceLock<libc::pthread_key_t> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: a plain key creation with a valid destructor.
        assert_eq!(unsafe { libc::pthread_key_create(&mut k, Some(dtor)) }, 0);
        k
    })
}

#[allow(clippy::type_complexity)]
static LEFT: std::sync::Mutex<Vec<(Vec<usize>, usize)>> = std::sync::Mutex::new(Vec::new());

#[test]
fn child_cacheless() {
    if !is_child() {
        return;
    }
    let _ = filled(8, 0); // make sure spanheap's key exists before ours
    let key = late_key();
    let s0 = spanheap::stats();
    let c = class_of(&s0, PLESS_SIZE as u64);
    std::thread::spawn(move || {
        let v: Vec<u64> = (0..100).collect(); // the thread gets a cache
        assert_eq!(v.iter().sum::<u64>(), 4950);
        // SAFETY: setting this thread's value of our key (non-null, so the
        // destructor runs at exit).
        assert_eq!(
            unsafe { libc::pthread_setspecific(key, 1 as *const libc::c_void) },
            0
        );
    })
    .join()
    .unwrap();
    assert_eq!(
        PLESS_SEEN.load(Ordering::Relaxed),
        1,
        "the destructor ran cache-less"
    );
    let s1 = spanheap::stats();
    s1.check().unwrap();
    // Frees by a cache-less thread are counted one by one; its allocations come from
    // the shared cache's window, counted when the window was loaded (up to its size).
    assert_eq!(s1.classes[c].frees - s0.classes[c].frees, 7);
    let a = s1.classes[c].allocs - s0.classes[c].allocs;
    assert!(a >= 10, "cache-less allocations counted: {a}");
    assert_eq!(s1.large_allocs - s0.large_allocs, 2);
    assert_eq!(s1.large_frees - s0.large_frees, 1);
    let (small, large) = LEFT.lock().unwrap().pop().unwrap();
    for (i, p) in small.into_iter().enumerate() {
        check_and_free(p, PLESS_SIZE, 7 + i);
    }
    check_and_free(large, LARGE, 51);
    spanheap::flush_thread_cache();
    let s2 = spanheap::stats();
    assert_eq!(s2.classes[c].frees - s0.classes[c].frees, 10);
    assert_eq!(s2.large_frees - s0.large_frees, 2);
}

// ---------------------------------------------------------------------------------------
// Thread-cache count and the exit report, in a child process (no other test running).
// ---------------------------------------------------------------------------------------

/// Runs only in the child started by `exit_report_names_spanheap`.
#[test]
fn child_workload() {
    if !is_child() {
        return;
    }
    let before = spanheap::stats().thread_caches;
    let barrier = Arc::new(Barrier::new(4));
    let hs: Vec<_> = (0..3)
        .map(|t| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let v: Vec<String> = (0..1000).map(|i| format!("{t}:{i}")).collect();
                b.wait(); // live caches here
                b.wait();
                v.len()
            })
        })
        .collect();
    barrier.wait();
    let during = spanheap::stats().thread_caches;
    barrier.wait();
    for h in hs {
        assert_eq!(h.join().unwrap(), 1000);
    }
    let after = spanheap::stats().thread_caches;
    println!("CACHES {before} {during} {after}");
}

#[test]
fn exit_report_names_spanheap() {
    let _g = shared();
    let (stdout, stderr) = in_child("child_workload", true);
    // Three threads with live caches were counted, and their exit was.
    let caches: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.find("CACHES ").map(|i| &l[i + 7..]))
        .expect("child printed its counts")
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(caches[1], caches[0] + 3, "{caches:?}");
    assert_eq!(caches[2], caches[0], "{caches:?}");
    // The report: its first line names spanheap, then totals and a class table.
    let start = stderr
        .find("spanheap statistics\n")
        .unwrap_or_else(|| panic!("no report in stderr:\n{stderr}"));
    let report = &stderr[start..];
    assert!(report.lines().any(|l| l.trim_start().starts_with("in use")));
    assert!(report
        .lines()
        .any(|l| l.contains("class") && l.contains("live bytes")));
    // The lock table: a header, then the mcentral row with its 67 locks and a
    // non-zero acquisition count.
    assert!(report
        .lines()
        .any(|l| l.contains("lock") && l.contains("acquisitions") && l.contains("contended")));
    let mcentral: Vec<u64> = report
        .lines()
        .find(|l| l.trim_start().starts_with("mcentral"))
        .unwrap_or_else(|| panic!("no mcentral row:\n{report}"))
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(mcentral[0] > 1 && mcentral[1] > 0, "{report}");
    assert!(report.lines().count() > 12, "{report}");
}

#[test]
fn no_report_without_the_variable() {
    let _g = shared();
    let (_, stderr) = in_child("child_workload", false);
    assert!(!stderr.contains("spanheap statistics"));
}
