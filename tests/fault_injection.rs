//! OS calls that fail on purpose (feature `fault-injection`): the randomized
//! differential engine (`tests/common/differential.rs`) runs while one in 1,000 of the
//! OS layer's reserve / map / decommit calls fails. Every allocation must be null or a
//! valid block, blocks keep their contents, zeroed blocks are zero (a failed decommit
//! leaves old contents behind), a checker thread takes statistics snapshots that must
//! pass `check()` and calls `release_memory()` so that decommits happen, and paced
//! passes run every few milliseconds. Then heap growth is tried with one call in three
//! failing. At the end the heap's in-use bytes are back where they were and every kind
//! of call had failures injected.
//!
//! Release builds run 1,000,000 operations (4 threads), debug builds 100,000.
//! `cargo test --release --features fault-injection --test fault_injection`
#![cfg(feature = "fault-injection")]

#[path = "common/differential.rs"]
mod differential;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use differential::{run, Config};
use spanheap::fault_injection;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

const MIB: usize = 1 << 20;

/// Bytes in live heap spans, with this thread's cache flushed and the spare spans and
/// free pages given back (all of which vary with what ran before).
fn heap_in_use() -> u64 {
    spanheap::release_memory();
    let s = spanheap::stats();
    s.check().unwrap();
    s.heap_bytes
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        fault_injection::off();
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn differential_run_with_failing_os_calls() {
    let threads = 4;
    let ops_per_thread = if cfg!(debug_assertions) {
        25_000
    } else {
        250_000
    };
    let cfg = |seed| Config {
        seed,
        threads,
        ops_per_thread,
        tolerate_null: true,
    };
    // Paced passes soon after frees, nothing retained: many decommits.
    let mut c = spanheap::scavenger_config();
    c.delay = Some(Duration::from_millis(1));
    c.retain_percent = 0;
    c.background = false;
    spanheap::set_scavenger_config(c);
    // A first run without failures grows the heap to the run's size and gives the
    // thread-cache records their stack storage, so that the measured run rarely needs
    // the OS for anything but decommits: the engine's own Vecs and channels (and std's)
    // cannot take a null.
    let warm = run(cfg(0xFA17_0001));
    assert_eq!(warm.nulls, 0);
    let before = heap_in_use();

    let done = AtomicBool::new(false);
    let (report, (snapshots, releases)) = std::thread::scope(|sc| {
        let checker = sc.spawn(|| {
            let (mut snapshots, mut releases) = (0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                spanheap::stats().check().unwrap();
                snapshots += 1;
                if snapshots % 8 == 0 {
                    spanheap::release_memory();
                    releases += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (snapshots, releases)
        });
        // Stops the checker even if the run panics (the scope waits for it).
        let stop = StopOnDrop(&done);
        fault_injection::set(1000, 0x5EED_FA17);
        let r = run(cfg(0xFA17_0002));
        fault_injection::off();
        drop(stop);
        (r, checker.join().unwrap())
    });
    let during = fault_injection::counts();

    // Growth with one call in three failing: big blocks that need new arenas (their
    // records, the page allocator's summaries). No allocation of the test's own in
    // between: a null there would abort.
    let l = Layout::from_size_align(256 * MIB, 8).unwrap();
    let mut big: Vec<(u8, *mut u8)> = Vec::with_capacity(32);
    let mut grown: Vec<(u8, *mut u8)> = Vec::with_capacity(8);
    let mut big_nulls = 0;
    fault_injection::set(3, 0x5EED_0003);
    for i in 0..32u8 {
        // SAFETY: non-zero size.
        let p = unsafe { GLOBAL.alloc(l) };
        if p.is_null() {
            big_nulls += 1;
            continue;
        }
        // SAFETY: a fresh block of 256 MiB.
        unsafe {
            p.write(i);
            p.add(l.size() - 1).write(!i);
        }
        big.push((i, p));
    }
    fault_injection::off();
    // Reallocs of a small block to a big one, each with injection on only around the
    // call: a null must leave the block intact.
    let sl = Layout::from_size_align(1000, 8).unwrap();
    let mut realloc_nulls = 0;
    for k in 0..8u64 {
        // SAFETY: non-zero size.
        let p = unsafe { GLOBAL.alloc(sl) };
        assert!(!p.is_null());
        // SAFETY: a fresh block of 1000 bytes.
        unsafe { p.write_bytes(k as u8 + 1, sl.size()) };
        fault_injection::set(3, 0x5EED_0100 + k);
        // SAFETY: a live block of layout `sl`; non-zero new size.
        let q = unsafe { GLOBAL.realloc(p, sl, l.size()) };
        fault_injection::off();
        let (keep, kl) = if q.is_null() {
            realloc_nulls += 1;
            (p, sl)
        } else {
            (q, l)
        };
        // SAFETY: `keep` is live with layout `kl`, its first 1000 bytes the pattern.
        unsafe {
            let head = std::slice::from_raw_parts(keep, sl.size());
            assert!(
                head.iter().all(|&b| b == k as u8 + 1),
                "realloc {k} lost data"
            );
            if q.is_null() {
                GLOBAL.dealloc(keep, kl);
            } else {
                // Kept, so that the next realloc needs growth too.
                keep.add(l.size() - 1).write(!(k as u8));
                grown.push((k as u8, keep));
            }
        }
    }
    let counts = fault_injection::counts();
    let got = big.len();
    for (i, p) in big {
        // SAFETY: a live block of layout `l`.
        unsafe {
            assert_eq!(
                (*p, *p.add(l.size() - 1)),
                (i, !i),
                "big block {i} corrupted"
            );
            GLOBAL.dealloc(p, l);
        }
    }
    for (k, p) in grown {
        // SAFETY: a live block of layout `l` (a successful realloc).
        unsafe {
            assert_eq!(
                (*p, *p.add(l.size() - 1)),
                (k + 1, !k),
                "realloc {k} corrupted"
            );
            GLOBAL.dealloc(p, l);
        }
    }

    let after = heap_in_use();
    let s = spanheap::stats();
    println!(
        "fault injection: {} operations ({} allocs, {} zeroed, {} reallocs, {} frees, {} \
         nulls, {} bytes checked); {snapshots} consistent snapshots, {releases} \
         release_memory calls; during the run {during:?}; big blocks: {got} of 32 \
         allocated, {big_nulls} null; reallocs to 256 MiB: {realloc_nulls} of 8 null; all in all {counts:?}; decommit failures in the \
         statistics: {} ({} MiB); heap in use {before} -> {after} bytes",
        report.ops,
        report.allocs,
        report.zeroed,
        report.reallocs,
        report.frees,
        report.nulls,
        report.bytes_checked,
        s.decommit_failures,
        s.decommit_failed_bytes / MIB as u64,
    );
    assert_eq!(report.ops, threads as u64 * ops_per_thread);
    assert_eq!(report.allocs + report.zeroed, report.frees);
    assert!(counts.reserve.injected > 0, "{counts:?}");
    assert!(counts.map.injected > 0, "{counts:?}");
    assert!(during.decommit.injected > 0, "{during:?}");
    // Here madvise fails only when told to, and each refusal is counted once.
    assert_eq!(s.decommit_failures, counts.decommit.injected);
    assert_eq!(after, before, "heap bytes in use did not come back");
}
