//! The checks that are always on (no feature): a double free found when a flush returns
//! objects to their spans, and a by-address free or realloc (`spanheap::raw`, the C
//! ABI) of a pointer that is not the start of a live block, abort with a one-line
//! report. Each misuse runs in a child process, which must be killed by SIGABRT with
//! the expected report on stderr; a child that exits cleanly fails the test. (Checked
//! mode, `--features checked`, catches more, at a cost on every free: `tests/checked.rs`.)

use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc;

mod common;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

// The allocator's methods directly: an optimised build may drop an allocation it sees
// unused together with its first free.
unsafe fn alloc(l: Layout) -> *mut u8 {
    unsafe { GLOBAL.alloc(l) }
}
unsafe fn dealloc(p: *mut u8, l: Layout) {
    unsafe { GLOBAL.dealloc(p, l) }
}

fn l64() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

/// The misuses: name, what the report must say, and the misuse itself.
const CASES: &[(&str, &str, fn())] = &[
    // Both frees land on the thread's free stack; the flush returns the object twice
    // (the second time in the same batch as the first).
    ("double_free_same_thread", "double free of 0x", || unsafe {
        let p = alloc(l64());
        dealloc(p, l64());
        dealloc(p, l64());
        spanheap::flush_thread_cache();
    }),
    // The object's span has left the thread's cache (used up, the cache moved on) while
    // the object sat twice on the free stack: the flush frees it straight into the
    // span's bitmap, where the second copy finds it free.
    ("double_free_rotated_span", "double free of 0x", || unsafe {
        let p = alloc(l64());
        let more: Vec<usize> = (0..1000).map(|_| alloc(l64()) as usize).collect();
        dealloc(p, l64());
        dealloc(p, l64());
        spanheap::flush_thread_cache();
        std::hint::black_box(more);
    }),
    // The first free is merged into the span's bitmap when its owner gives its spans
    // back; the second is merged when the owner takes the span again, and that merge
    // finds the object free already.
    ("double_free_merged", "double free of 0x", || unsafe {
        let (tx, rx) = mpsc::channel::<usize>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let owner = std::thread::spawn(move || {
            let objs: Vec<usize> = (0..10).map(|_| alloc(l64()) as usize).collect();
            tx.send(objs[5]).unwrap();
            go_rx.recv().unwrap(); // the first free happened
            spanheap::flush_thread_cache();
            tx.send(0).unwrap();
            go_rx.recv().unwrap(); // the second free happened
            let again: Vec<usize> = (0..1000).map(|_| alloc(l64()) as usize).collect();
            std::hint::black_box((objs, again));
        });
        let p = rx.recv().unwrap() as *mut u8;
        dealloc(p, l64());
        spanheap::flush_thread_cache();
        go_tx.send(()).unwrap();
        rx.recv().unwrap();
        dealloc(p, l64());
        spanheap::flush_thread_cache();
        go_tx.send(()).unwrap();
        owner.join().unwrap();
    }),
    // The span's owner is alive and idle: the first free is a remote free (a bit in the
    // span's remote bitmap, not merged yet); the second finds the bit set.
    (
        "double_free_remote_unmerged",
        "double free of 0x",
        || unsafe {
            let (tx, rx) = mpsc::channel::<usize>();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let owner = std::thread::spawn(move || {
                tx.send(alloc(l64()) as usize).unwrap();
                let _ = done_rx.recv();
            });
            let p = rx.recv().unwrap() as *mut u8;
            dealloc(p, l64());
            spanheap::flush_thread_cache();
            dealloc(p, l64());
            spanheap::flush_thread_cache();
            let _ = done_tx.send(());
            owner.join().unwrap();
        },
    ),
    (
        "raw_free_interior_small",
        "points inside a block",
        || unsafe {
            let p = spanheap::raw::malloc(512);
            spanheap::raw::free(p.add(16));
        },
    ),
    // The same once the thread's arena memo is set (by the first free), so that the
    // fast half of `free` looks at the block: it must leave an interior pointer of the
    // current span to the validating half.
    (
        "raw_free_interior_small_fast_half",
        "points inside a block",
        || unsafe {
            let (a, b) = (spanheap::raw::malloc(512), spanheap::raw::malloc(512));
            spanheap::raw::free(a);
            spanheap::raw::free(b.add(16));
        },
    ),
    (
        "raw_free_interior_large",
        "points inside a block",
        || unsafe {
            let p = spanheap::raw::malloc(300_000);
            spanheap::raw::free(p.add(8192));
        },
    ),
    ("raw_realloc_interior", "points inside a block", || unsafe {
        let p = spanheap::raw::malloc(100);
        spanheap::raw::realloc(p.add(8), 1000, 16);
    }),
    // A block too big for any cache: its span is dead after the first free.
    ("raw_free_twice_huge", "not a live block", || unsafe {
        let p = spanheap::raw::malloc(40 << 20);
        spanheap::raw::free(p);
        spanheap::raw::free(p);
    }),
];

fn run_case(name: &str) {
    let (_, _, f) = CASES.iter().find(|c| c.0 == name).unwrap();
    f();
    // Reaching here means the misuse went unnoticed: exit cleanly, which fails the test.
    std::process::exit(0);
}

#[test]
fn misuses_abort_with_a_report() {
    if let Ok(name) = std::env::var("SPANHEAP_MISUSE_CASE") {
        run_case(&name);
        return;
    }
    for &(name, expect, _) in CASES {
        let line = common::expect_abort(
            "misuses_abort_with_a_report",
            "SPANHEAP_MISUSE_CASE",
            name,
            expect,
        );
        println!("{name:<30} {line}");
    }
}

/// Frees of pointers spanheap never handed out stay ignored (C programs free memory
/// the dynamic loader allocated before the preload took over), and correct by-address
/// frees of every kind of block pass.
#[test]
fn foreign_pointers_are_still_ignored() {
    let mut x = [0u8; 64];
    let m = unsafe { libc::malloc(64) }.cast::<u8>();
    unsafe {
        spanheap::raw::free(x.as_mut_ptr());
        spanheap::raw::free(m);
        libc::free(m.cast());
        for n in [1, 100, 5000, 40_000, 300_000, 3 << 20, 40 << 20] {
            let p = spanheap::raw::malloc(n);
            assert!(!p.is_null());
            let q = spanheap::raw::realloc(p, n * 2, 16);
            assert!(!q.is_null());
            spanheap::raw::free(q);
        }
    }
    spanheap::flush_thread_cache();
    spanheap::stats().check().unwrap();
}
