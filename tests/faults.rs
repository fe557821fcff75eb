//! Address-space exhaustion: in a child process with `RLIMIT_AS` lowered to what it
//! uses plus 512 MiB, allocations must fail with null (large, then small; realloc and
//! alloc_zeroed too, realloc leaving its block intact), the program
//! must go on, frees must work, blocks allocated before must be intact, allocation must
//! work again after frees, and the statistics must stay consistent.
//!
//! Under `mlockall` `madvise(MADV_DONTNEED)` fails: memory the scavenger could not
//! return keeps its contents, and `alloc_zeroed` must still hand out zeros (a child
//! locks its memory, frees blocks full of 0xAB, scavenges, allocates zeroed).
//!
//! The child never panics while the limit is down (a panic message needs memory, and
//! std's out-of-memory hook would then deadlock on the backtrace lock): a failed check
//! first raises the soft limit back, then panics. The parent kills a child that runs
//! longer than two minutes.

use std::alloc::{alloc, dealloc, Layout};
use std::time::{Duration, Instant};

mod common;
use common::{ensure, limit_address_space, restore_address_space, vm_size};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

const MIB: usize = 1 << 20;

#[test]
fn address_space_exhaustion_fails_cleanly() {
    if std::env::var_os("SPANHEAP_FAULTS_CHILD").is_some() {
        exhaust();
        return;
    }
    run_child("address_space_exhaustion_fails_cleanly", "exhaustion: ");
}

#[test]
fn address_space_exhaustion_with_threads() {
    if std::env::var_os("SPANHEAP_FAULTS_CHILD").is_some() {
        exhaust_threads();
        return;
    }
    run_child("address_space_exhaustion_with_threads", "exhaustion: ");
}

#[test]
fn alloc_zeroed_is_zero_when_madvise_fails_under_mlockall() {
    if std::env::var_os("SPANHEAP_FAULTS_CHILD").is_some() {
        locked_zeroing();
        return;
    }
    run_child(
        "alloc_zeroed_is_zero_when_madvise_fails_under_mlockall",
        "mlockall: ",
    );
}

/// Runs this test binary's test `name` in a child with the child variable set; it must
/// exit cleanly within two minutes and print a line starting with `marker` followed by
/// "ok" or "skipped".
fn run_child(name: &str, marker: &str) {
    let stdout = common::run_child(
        name,
        "SPANHEAP_FAULTS_CHILD",
        Duration::from_secs(120),
        &format!("in {name}"),
    );
    let (ok, skipped) = (format!("{marker}ok"), format!("{marker}skipped"));
    assert!(
        stdout.contains(&ok) || stdout.contains(&skipped),
        "{stdout}"
    );
    for l in stdout.lines().filter(|l| l.contains(marker)) {
        println!("{l}");
    }
}

fn pattern(i: usize) -> u8 {
    (i * 31 % 251) as u8
}

/// A 64-byte object on the intrusive list: next pointer, then its index's pattern.
const SMALL: usize = 64;

fn exhaust() {
    // Everything the test needs is allocated before the limit goes down.
    let large_l = Layout::from_size_align(MIB, 8).unwrap();
    let small_l = Layout::from_size_align(SMALL, 8).unwrap();
    let mut large: Vec<usize> = Vec::with_capacity(4096);
    let vm0 = vm_size();
    limit_address_space(vm0 + 512 * MIB);

    // Large blocks until the address space runs out: null, not a crash.
    loop {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(large_l) };
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh 1 MiB block.
        unsafe {
            p.write(pattern(large.len()));
            p.add(MIB - 1).write(pattern(large.len() + 1));
        }
        ensure(large.len() < large.capacity(), "the limit had no effect");
        large.push(p as usize);
    }
    // Small objects until they fail too (the free pages left are used up first). They
    // are chained through their first word: no Vec to grow while memory is exhausted.
    let mut head: *mut u8 = core::ptr::null_mut();
    let mut ns = 0usize;
    loop {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(small_l) };
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh 64-byte object.
        unsafe {
            p.cast::<*mut u8>().write(head);
            p.add(8).write_bytes(pattern(ns), SMALL - 8);
        }
        head = p;
        ns += 1;
        ensure(ns < 64 << 20, "small objects never failed");
    }
    let nl = large.len();
    ensure(
        nl > 0 && ns > 0,
        "nothing could be allocated under the limit",
    );
    ensure(
        spanheap::stats().check().is_ok(),
        "statistics inconsistent at exhaustion",
    );
    // Further requests of every kind are answered (null, or a usable block when free
    // pages remain: small objects can fail for want of metadata while a large block
    // still fits), and disturb nothing.
    let mut served = [false; 6];
    const LATER: [usize; 6] = [64 * MIB, 4 * MIB, MIB, 100_000, 4096, SMALL];
    for (k, size) in LATER.into_iter().enumerate() {
        let l = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero size. (black_box: an allocation freed unused may otherwise
        // be optimized away, "succeeding" without reaching the allocator.)
        let p = std::hint::black_box(unsafe { alloc(l) });
        if !p.is_null() {
            // SAFETY: just allocated with this layout.
            unsafe {
                p.write_bytes(0xAB, size);
                dealloc(p, l);
            }
            served[k] = true;
        }
    }

    // A realloc that cannot be served returns null and leaves the block alone (checked
    // with the other blocks below); alloc_zeroed fails the same way.
    if let Some(&p) = large.first() {
        // SAFETY: a live block of this layout; non-zero new size.
        let q = unsafe { std::alloc::realloc(p as *mut u8, large_l, 256 * MIB) };
        ensure(q.is_null(), "a 256 MiB realloc succeeded at exhaustion");
    }
    // SAFETY: non-zero size.
    let z = std::hint::black_box(unsafe {
        std::alloc::alloc_zeroed(Layout::from_size_align(256 * MIB, 8).unwrap())
    });
    ensure(
        z.is_null(),
        "a 256 MiB alloc_zeroed succeeded at exhaustion",
    );

    // Everything allocated before is intact.
    for (i, &p) in large.iter().enumerate() {
        let p = p as *mut u8;
        // SAFETY: live blocks written above.
        unsafe {
            ensure(p.read() == pattern(i), "large block corrupted");
            ensure(
                p.add(MIB - 1).read() == pattern(i + 1),
                "large block corrupted",
            );
        }
    }
    let mut p = head;
    let mut i = ns;
    while !p.is_null() {
        i -= 1;
        // SAFETY: a live object of the chain written above.
        unsafe {
            for k in 8..SMALL {
                ensure(p.add(k).read() == pattern(i), "small object corrupted");
            }
            p = p.cast::<*mut u8>().read();
        }
    }
    ensure(i == 0, "small object chain lost objects");

    // Free half of both, still under the limit.
    while large.len() > nl / 2 {
        let p = large.pop().unwrap();
        // SAFETY: live blocks of this layout, freed once.
        unsafe { dealloc(p as *mut u8, large_l) };
    }
    let mut freed_small = 0;
    while freed_small < ns / 2 {
        let p = head;
        // SAFETY: a live object of the chain; unlinked, then freed once.
        unsafe {
            head = p.cast::<*mut u8>().read();
            dealloc(p, small_l);
        }
        freed_small += 1;
    }
    ensure(
        spanheap::stats().check().is_ok(),
        "statistics inconsistent after frees",
    );
    // Allocation works again, still under the limit: large blocks into the freed
    // pages, small objects into the freed slots.
    let again = (nl / 2).min(large.capacity() - large.len());
    for _ in 0..again {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(large_l) };
        ensure(!p.is_null(), "no large block after frees");
        large.push(p as usize);
    }
    let mut again_small = Vec::with_capacity(1000);
    for _ in 0..1000 {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(small_l) };
        ensure(!p.is_null(), "no small object after frees");
        again_small.push(p as usize);
    }
    ensure(
        spanheap::stats().check().is_ok(),
        "statistics inconsistent after allocating again",
    );
    for p in large.drain(..) {
        // SAFETY: live blocks of this layout.
        unsafe { dealloc(p as *mut u8, large_l) };
    }
    for p in again_small {
        // SAFETY: as above.
        unsafe { dealloc(p as *mut u8, small_l) };
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a live object of the chain, freed once.
        unsafe {
            let next = p.cast::<*mut u8>().read();
            dealloc(p, small_l);
            p = next;
        }
    }
    spanheap::flush_thread_cache();
    let s = spanheap::stats();
    restore_address_space();
    s.check().expect("statistics consistent at the end");
    assert_eq!(s.large_live_objects(), 0, "large blocks still live: {s}");
    println!(
        "exhaustion: ok (limit VmSize {} MiB + 512 MiB; {nl} blocks of 1 MiB and {ns} \
         objects of 64 B before null; {again} large blocks and 1000 objects again after \
         freeing half; later requests of {LATER:?} bytes served: {served:?}; at the end {} small objects, \
         {} large blocks live)",
        vm0 / MIB,
        s.small_live_objects(),
        s.large_live_objects()
    );
}

/// Blocks of a thread's chain: a header (next, size, pattern) in the first 24 bytes.
const SIZES: [usize; 6] = [32, 64, 1000, 20_000, 100_000, MIB];

/// Allocates blocks of rotating sizes onto the chain at `head` until `misses`
/// consecutive nulls; returns (blocks, nulls seen).
fn fill_chain(head: &mut *mut u8, seed: usize, misses: usize) -> (usize, usize) {
    let (mut n, mut nulls, mut run) = (0, 0, 0);
    let mut i = seed;
    while run < misses {
        let size = SIZES[i % SIZES.len()];
        i += 1;
        // SAFETY: non-zero size.
        let p = unsafe { alloc(Layout::from_size_align(size, 8).unwrap()) };
        if p.is_null() {
            nulls += 1;
            run += 1;
            continue;
        }
        run = 0;
        // SAFETY: a fresh block of at least 24 bytes.
        unsafe {
            p.cast::<*mut u8>().write(*head);
            p.add(8).cast::<usize>().write(size);
            p.add(16).cast::<usize>().write(i);
            p.add(size - 1).write(pattern(i));
        }
        *head = p;
        n += 1;
    }
    (n, nulls)
}

/// Checks every block of the chain; frees all of them or every other one.
fn check_and_free(head: &mut *mut u8, free_all: bool) -> Result<usize, &'static str> {
    let mut kept: *mut u8 = core::ptr::null_mut();
    let mut p = *head;
    let mut k = 0usize;
    let mut freed = 0;
    while !p.is_null() {
        // SAFETY: a live block of the chain written by `fill_chain`.
        unsafe {
            let next = p.cast::<*mut u8>().read();
            let size = p.add(8).cast::<usize>().read();
            let i = p.add(16).cast::<usize>().read();
            if !SIZES.contains(&size) || p.add(size - 1).read() != pattern(i) {
                return Err("a block was corrupted under exhaustion");
            }
            if free_all || k % 2 == 0 {
                dealloc(p, Layout::from_size_align(size, 8).unwrap());
                freed += 1;
            } else {
                p.cast::<*mut u8>().write(kept);
                kept = p;
            }
            p = next;
        }
        k += 1;
    }
    *head = kept;
    Ok(freed)
}

/// Four threads exhaust the address space together (blocks of 32 B..1 MiB) while the
/// main thread takes statistics snapshots; then each checks its blocks, frees half,
/// allocates again until null, and frees everything.
fn exhaust_threads() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Barrier};
    const T: usize = 4;
    let start = Arc::new(Barrier::new(T + 1));
    let done = Arc::new(AtomicUsize::new(0));
    let failed: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    static ERRS: [&str; 2] = ["", "a block was corrupted under exhaustion"];
    let handles: Vec<_> = (0..T)
        .map(|t| {
            let (start, done, failed) = (start.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut head = core::ptr::null_mut();
                let (n1, nulls1) = fill_chain(&mut head, t, 64);
                let r1 = check_and_free(&mut head, false);
                let (n2, nulls2) = fill_chain(&mut head, t + 1, 64);
                let r2 = check_and_free(&mut head, true);
                if r1.is_err() || r2.is_err() {
                    failed.store(1, SeqCst);
                }
                done.fetch_add(1, SeqCst);
                (n1, nulls1, n2, nulls2)
            })
        })
        .collect();
    let vm0 = vm_size();
    limit_address_space(vm0 + 512 * MIB);
    start.wait();
    let mut snapshots = 0;
    let mut bad_stats = false;
    while done.load(SeqCst) < T {
        bad_stats |= spanheap::stats().check().is_err();
        snapshots += 1;
        std::thread::yield_now();
    }
    stop.store(true, SeqCst);
    restore_address_space();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(failed.load(SeqCst), 0, "{}", ERRS[1]);
    assert!(
        !bad_stats,
        "a statistics snapshot was inconsistent under exhaustion"
    );
    // Every thread ran into nulls and went on; between them they got blocks both times
    // (a thread that starts after the others filled the heap may get none at all).
    assert!(
        results.iter().all(|r| r.1 >= 64 && r.3 >= 64),
        "{results:?}"
    );
    assert!(
        results.iter().map(|r| r.0).sum::<usize>() > 0,
        "{results:?}"
    );
    assert!(
        results.iter().map(|r| r.2).sum::<usize>() > 0,
        "{results:?}"
    );
    spanheap::flush_thread_cache();
    let s = spanheap::stats();
    s.check().expect("statistics consistent at the end");
    assert_eq!(s.large_live_objects(), 0, "large blocks still live: {s}");
    println!(
        "threads exhaustion: ok (limit VmSize {} MiB + 512 MiB; {T} threads, (blocks, nulls) \
         first fill then refill after freeing half: {:?}; {snapshots} consistent snapshots \
         taken meanwhile)",
        vm0 / MIB,
        results
            .iter()
            .map(|r| ((r.0, r.1), (r.2, r.3)))
            .collect::<Vec<_>>()
    );
}

/// Sizes of the mlockall test: small (64 B, 4 KiB), large (40 KiB, 300 KiB) and big
/// (20 MiB) blocks, and how many of each (about 44 MiB in all: everything mapped is
/// locked, so the child stays small).
const LOCKED: [(usize, usize); 5] = [
    (64, 256),
    (4096, 64),
    (40 << 10, 32),
    (300 << 10, 8),
    (20 * MIB, 2),
];

/// Allocates every block of `LOCKED`, fills it with 0xAB and frees it.
fn dirty_and_free() {
    let mut blocks = Vec::new();
    for (size, n) in LOCKED {
        let l = Layout::from_size_align(size, 8).unwrap();
        for _ in 0..n {
            // SAFETY: non-zero size.
            let p = unsafe { alloc(l) };
            assert!(!p.is_null());
            // SAFETY: a fresh block of `size` bytes.
            unsafe { p.write_bytes(0xAB, size) };
            blocks.push((p, l));
        }
    }
    for (p, l) in blocks {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(p, l) };
    }
}

/// Allocates every block of `LOCKED` zeroed; returns how many were not all zero (each
/// is then dirtied and freed again).
fn count_dirty_zeroed() -> usize {
    let mut blocks = Vec::new();
    let mut dirty = 0;
    for (size, n) in LOCKED {
        let l = Layout::from_size_align(size, 8).unwrap();
        for _ in 0..n {
            // SAFETY: non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(l) };
            assert!(!p.is_null());
            // SAFETY: a fresh block of `size` bytes.
            let s = unsafe { std::slice::from_raw_parts(p, size) };
            if s.iter().any(|&b| b != 0) {
                dirty += 1;
            }
            blocks.push((p, l));
        }
    }
    for (p, l) in blocks {
        // SAFETY: allocated above with this layout.
        unsafe {
            p.write_bytes(0xAB, l.size());
            dealloc(p, l);
        }
    }
    dirty
}

fn locked_zeroing() {
    let total: usize = LOCKED.iter().map(|&(_, n)| n).sum();
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        let e = std::io::Error::last_os_error();
        println!(
            "mlockall: skipped: mlockall refused ({e}); needs CAP_IPC_LOCK or a memlock limit"
        );
        return;
    }
    // Frees alone: the pages come back dirty from the page heap and caches.
    dirty_and_free();
    let after_free = count_dirty_zeroed();

    // release_memory: every madvise fails; it must return (not retry forever).
    dirty_and_free();
    let s0 = spanheap::stats();
    let t0 = Instant::now();
    spanheap::release_memory();
    let release_time = t0.elapsed();
    let s1 = spanheap::stats();
    s1.check().unwrap();
    let after_release = count_dirty_zeroed();

    // Paced passes: delay 1 ms, nothing retained; large allocations and frees reach
    // the page heap's slow paths, which run the due passes.
    let mut c = spanheap::scavenger_config();
    c.delay = Some(Duration::from_millis(1));
    c.retain_percent = 0;
    c.background = false;
    spanheap::set_scavenger_config(c);
    dirty_and_free();
    spanheap::flush_thread_cache();
    let t1 = Instant::now();
    let l = Layout::from_size_align(2 * MIB, 8).unwrap();
    while t1.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(2));
        // SAFETY: non-zero size; freed at once.
        unsafe {
            let p = std::hint::black_box(alloc(l));
            assert!(!p.is_null());
            dealloc(p, l);
        }
    }
    let s2 = spanheap::stats();
    s2.check().unwrap();
    let after_paced = count_dirty_zeroed();
    let s3 = spanheap::stats();
    s3.check().unwrap();
    println!(
        "mlockall: {} dirty of {total} zeroed blocks after frees, {} after release_memory \
         (returned in {release_time:.2?}), {} after paced scavenging; decommit failures: {} \
         in release_memory, {} during paced passes, {} in all ({} MiB); scavenged {} MiB",
        after_free,
        after_release,
        after_paced,
        s1.decommit_failures - s0.decommit_failures,
        s2.decommit_failures - s1.decommit_failures,
        s3.decommit_failures,
        s3.decommit_failed_bytes / MIB as u64,
        s3.scavenged_bytes / MIB as u64,
    );
    assert_eq!(
        (after_free, after_release, after_paced),
        (0, 0, 0),
        "alloc_zeroed handed out dirty blocks"
    );
    assert!(s1.decommit_failures > s0.decommit_failures);
    assert!(s2.decommit_failures > s1.decommit_failures);
    assert!(release_time < Duration::from_secs(10));
    println!("mlockall: ok");
}
