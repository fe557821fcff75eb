//! `fork()` from a multi-threaded Rust program while other threads allocate: 100
//! rounds; every child must allocate, free, take a statistics snapshot and exit 0,
//! promptly (a lock held across the fork would hang it). The fork handlers are in
//! `src/fork.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// Churns small and large blocks (and the statistics) until `stop`.
fn churn(stop: Arc<AtomicBool>, seed: u64, done: Arc<AtomicU64>) {
    let mut x = seed;
    let mut keep: Vec<Vec<u8>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = match x >> 60 {
            0 => 40_000 + (x >> 40) as usize % 400_000, // large, often the page heap
            _ => 1 + (x >> 40) as usize % 3000,
        };
        keep.push(vec![seed as u8; size]);
        if keep.len() > 64 {
            keep.drain(..32);
        }
        if x % 4096 == 0 {
            let _ = spanheap::stats();
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a child does: allocate and free across sizes, check contents, snapshot the
/// statistics. Returns the exit code.
fn in_child() -> i32 {
    let mut v: Vec<Vec<u8>> = Vec::new();
    for i in 0..2000usize {
        v.push(vec![i as u8; 1 + (i * 37) % 5000]);
    }
    v.push(vec![7u8; 3 << 20]);
    for (i, b) in v.iter().enumerate().take(2000) {
        if b.iter().any(|&x| x != i as u8) {
            return 2;
        }
    }
    drop(v);
    let s = spanheap::stats();
    if s.small_allocs() == 0 {
        return 3;
    }
    0
}

#[test]
fn fork_while_other_threads_allocate() {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (s, d) = (stop.clone(), done.clone());
            std::thread::spawn(move || churn(s, i + 1, d))
        })
        .collect();
    // Fork from a third thread, not the main one.
    let forker = std::thread::spawn(move || {
        let mut codes = Vec::new();
        for _ in 0..100 {
            // SAFETY: fork in a multi-threaded program; the child only runs `in_child`
            // (allocation through spanheap, which the fork handlers make safe) and
            // leaves with `_exit`, running no destructors or atexit handlers.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let code = in_child();
                // SAFETY: ends the child immediately.
                unsafe { libc::_exit(code) };
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut status = 0;
            loop {
                // SAFETY: waiting for our own child.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    break;
                }
                if Instant::now() > deadline {
                    // SAFETY: killing our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("child {pid} hung (a lock held across fork?)");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            codes.push(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -libc::WTERMSIG(status)
            });
        }
        codes
    });
    let codes = forker.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(codes.len(), 100);
    assert!(codes.iter().all(|&c| c == 0), "children failed: {codes:?}");
    assert!(
        done.load(Ordering::Relaxed) > 1000,
        "the workers did not run"
    );
    // The parent's allocator is intact too.
    spanheap::stats().check().unwrap();
}

/// One key for every thread of the storm; created after spanheap's own key (made at the
/// process's first allocation), so glibc runs its destructor after spanheap's cache
/// teardown: the thread is cache-less by then and allocates from the shared cache.
fn late_key() -> libc::pthread_key_t {
    extern "C" fn dtor(_: *mut libc::c_void) {
        // 28 KiB objects: a span refill for nearly every one, each a chance for a
        // scavenger pass (due every millisecond here).
        let v: Vec<Box<[u8]>> = (0..64)
            .map(|i| vec![i as u8; 28 << 10].into_boxed_slice())
            .collect();
        std::hint::black_box(&v);
    }
    static KEY: std::sync::OnceLock<libc::pthread_key_t> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: a plain key creation with a valid destructor.
        assert_eq!(unsafe { libc::pthread_key_create(&mut k, Some(dtor)) }, 0);
        k
    })
}

/// How long the storm runs (5 s; `SPANHEAP_FORK_STORM_SECS` for longer runs: the old
/// code hung within half a second), and at most how many forks.
fn storm_secs() -> u64 {
    std::env::var("SPANHEAP_FORK_STORM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}
const STORM_FORKS: u64 = 20_000;

/// The child process's part of `fork_while_cacheless_threads_scavenge`: threads that
/// allocate from the shared cache in their last pthread-key destructor, with a
/// scavenger pass due every millisecond, while this thread forks as fast as it can.
/// Prints "storm: N forks in S s".
fn fork_storm() {
    assert!(spanheap::set_scavenger_config(spanheap::ScavengerConfig {
        delay: Some(Duration::from_millis(1)),
        retain_percent: 0,
        background: false,
    }));
    let key = late_key();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let spawner = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let ts: Vec<_> = (0..4)
                .map(|_| {
                    std::thread::spawn(move || {
                        // A cache of its own first, then the late destructor.
                        std::hint::black_box(Box::new(1u64));
                        // SAFETY: setting this thread's value of our key (non-null, so
                        // the destructor runs).
                        assert_eq!(unsafe { libc::pthread_setspecific(key, 1 as *const _) }, 0);
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
        }
    });
    let t0 = Instant::now();
    let mut forks = 0u64;
    while forks < STORM_FORKS && t0.elapsed() < Duration::from_secs(storm_secs()) {
        // SAFETY: fork in a multi-threaded program; the child leaves at once with
        // `_exit`, touching nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: ends the child immediately.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        forks += 1;
        if forks % 1000 == 0 {
            println!("{forks} forks at {:.2} s", t0.elapsed().as_secs_f64());
        }
    }
    stop.store(true, Ordering::Relaxed);
    spawner.join().unwrap();
    println!(
        "storm: {forks} forks in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// A thread without a cache takes the shared cache's lock; its refill must not run a
/// scavenger pass (which takes the reclaim lock) under it, or the fork handler, which
/// takes the reclaim lock first, deadlocks against it. Run in a child process that the
/// test kills if it hangs.
#[test]
fn fork_while_cacheless_threads_scavenge() {
    if std::env::var_os("SPANHEAP_FORK_CHILD").is_some() {
        fork_storm();
        return;
    }
    let stdout = common::run_child(
        "fork_while_cacheless_threads_scavenge",
        "SPANHEAP_FORK_CHILD",
        Duration::from_secs(storm_secs() + 25),
        "in the fork storm (a lock-order deadlock in fork?)",
    );
    // The report may follow the harness's "test ... " on the same line.
    let report = stdout.find("storm:").expect("no storm report");
    println!("{}", stdout[report..].lines().next().unwrap());
}
