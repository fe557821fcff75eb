//! `fork()` from a multi-threaded Rust program while other threads allocate: 100
//! rounds; every child must allocate, free, take a statistics snapshot and exit 0,
//! promptly (a lock held across the fork would hang it). The fork handlers are in
//! `src/fork.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
