//! Checked mode (`--features checked`): each abuse runs in a child process, which must
//! abort (SIGABRT) with the expected one-line report on stderr; a clean exit fails the
//! test. A clean workload (threads, cross-thread frees, realloc, C-style calls) must
//! run without a report.
//!
//! `cargo test --features checked --test checked`
#![cfg(feature = "checked")]

use std::alloc::{GlobalAlloc, Layout};

mod common;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

// The abuses call the allocator's methods directly rather than `std::alloc::alloc` and
// friends: an optimised build may drop an allocation it sees unused together with its
// free (they are the language's allocation functions), leaving only the abuse's second
// free, which then has nothing to report.
unsafe fn alloc(l: Layout) -> *mut u8 {
    unsafe { GLOBAL.alloc(l) }
}
unsafe fn dealloc(p: *mut u8, l: Layout) {
    unsafe { GLOBAL.dealloc(p, l) }
}
unsafe fn realloc(p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
    unsafe { GLOBAL.realloc(p, l, new_size) }
}

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// The abuses: name, what the report must say, and the abuse itself.
const CASES: &[(&str, &str, fn())] = &[
    ("double_free_small", "double free", || unsafe {
        let p = alloc(l(48, 8));
        dealloc(p, l(48, 8));
        dealloc(p, l(48, 8));
    }),
    (
        "double_free_small_after_reuse_elsewhere",
        "double free",
        || unsafe {
            // The first free puts it on this thread's local free list; other objects are
            // allocated meanwhile; the second free must still be caught.
            let p = alloc(l(100, 8));
            let q = alloc(l(200, 8));
            dealloc(p, l(100, 8));
            let r = alloc(l(300, 8));
            dealloc(q, l(200, 8));
            dealloc(r, l(300, 8));
            dealloc(p, l(100, 8));
        },
    ),
    ("double_free_cross_thread", "double free", || unsafe {
        let p = alloc(l(64, 8)) as usize;
        std::thread::spawn(move || dealloc(p as *mut u8, l(64, 8)))
            .join()
            .unwrap();
        dealloc(p as *mut u8, l(64, 8));
    }),
    ("double_free_large", "double free", || unsafe {
        let p = alloc(l(100_000, 8));
        dealloc(p, l(100_000, 8));
        dealloc(p, l(100_000, 8));
    }),
    ("double_free_large_via_realloc", "double free", || unsafe {
        let p = alloc(l(200_000, 8));
        let q = realloc(p, l(200_000, 8), 5_000_000);
        assert!(!q.is_null());
        dealloc(q, l(5_000_000, 8));
        dealloc(q, l(5_000_000, 8));
    }),
    ("foreign_stack_pointer", "never handed out", || unsafe {
        let mut x = [0u8; 64];
        dealloc(x.as_mut_ptr(), l(64, 8));
    }),
    ("foreign_libc_malloc", "never handed out", || unsafe {
        let p = libc::malloc(64).cast::<u8>();
        dealloc(p, l(64, 8));
    }),
    ("interior_small", "interior pointer", || unsafe {
        let p = alloc(l(256, 8));
        dealloc(p.add(16), l(256, 8));
    }),
    ("interior_large", "interior pointer", || unsafe {
        let p = alloc(l(300_000, 8));
        dealloc(p.add(8192), l(300_000, 8));
    }),
    (
        "layout_size_class_mismatch",
        "layout does not match",
        || unsafe {
            let p = alloc(l(48, 8));
            dealloc(p, l(1000, 8));
        },
    ),
    (
        "layout_small_for_large",
        "layout does not match",
        || unsafe {
            let p = alloc(l(100_000, 8));
            dealloc(p, l(100, 8));
        },
    ),
    (
        "layout_large_pages_mismatch",
        "layout does not match",
        || unsafe {
            let p = alloc(l(100_000, 8));
            dealloc(p, l(300_000, 8));
        },
    ),
    (
        "realloc_with_wrong_layout",
        "layout does not match",
        || unsafe {
            let p = alloc(l(24, 8));
            let _ = realloc(p, l(4000, 8), 8000);
        },
    ),
    (
        "layout_align_mismatch",
        "layout does not match",
        || unsafe {
            // Same size, an alignment that puts the layout in another size class.
            let p = alloc(l(48, 8));
            dealloc(p, l(48, 4096));
        },
    ),
    (
        "free_of_a_slot_never_handed_out",
        "double free (or free of an object never allocated)",
        || unsafe {
            // The object after this one in a fresh span of a big class: a valid object
            // start that was never allocated.
            let p = alloc(l(20_000, 8));
            let next = p.add(spanheap::raw::usable_size(p));
            dealloc(next, l(20_000, 8));
        },
    ),
    (
        "free_inside_a_freed_large_block",
        "double free",
        || unsafe {
            let p = alloc(l(1 << 20, 8));
            dealloc(p, l(1 << 20, 8));
            dealloc(p.add(4096), l(100, 8));
        },
    ),
    ("c_free_twice", "double free", || unsafe {
        let p = spanheap::raw::malloc(40);
        spanheap::raw::free(p);
        spanheap::raw::free(p);
    }),
    ("c_free_interior", "interior pointer", || unsafe {
        let p = spanheap::raw::malloc(512);
        spanheap::raw::free(p.add(8));
    }),
];

fn run_case(name: &str) {
    let (_, _, f) = CASES.iter().find(|c| c.0 == name).unwrap();
    f();
    // Reaching here means the abuse went unnoticed: exit cleanly, which fails the test.
    std::process::exit(0);
}

#[test]
fn abuses_abort_with_a_report() {
    if let Ok(name) = std::env::var("SPANHEAP_CHECKED_CASE") {
        run_case(&name);
        return;
    }
    let mut table = Vec::new();
    for &(name, expect, _) in CASES {
        let line = common::expect_abort(
            "abuses_abort_with_a_report",
            "SPANHEAP_CHECKED_CASE",
            name,
            expect,
        );
        assert!(
            line.contains(" at 0x"),
            "{name}: report {line:?} has no address"
        );
        table.push((name, line));
    }
    for (name, line) in table {
        println!("{name:<42} {line}");
    }
}

/// No false positives: threads, cross-thread frees, reallocs across classes and into
/// large blocks, zeroed allocations, C-style calls, aligned layouts.
#[test]
fn clean_workload_passes() {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut v: Vec<(usize, Layout)> = Vec::new();
                for i in 0..20_000usize {
                    let size = [8, 24, 100, 1000, 5000, 40_000, 300_000][(i * 7 + t) % 7];
                    let align = [1, 8, 16, 64, 4096][(i + t) % 5];
                    let lay = l(size, align);
                    let p = unsafe { alloc(lay) };
                    assert!(!p.is_null());
                    v.push((p as usize, lay));
                    if i % 3 == 0 {
                        let (q, ql) = v.swap_remove(i % v.len());
                        let ns = ql.size() * 2 + 1;
                        let r = unsafe { realloc(q as *mut u8, ql, ns) };
                        assert!(!r.is_null());
                        v.push((r as usize, l(ns, ql.align())));
                    }
                    if v.len() > 64 {
                        let (q, ql) = v.swap_remove(0);
                        unsafe { dealloc(q as *mut u8, ql) };
                    }
                }
                v
            })
        })
        .collect();
    // Free every thread's leftovers on this thread (cross-thread frees).
    for h in handles {
        for (p, lay) in h.join().unwrap() {
            unsafe { dealloc(p as *mut u8, lay) };
        }
    }
    unsafe {
        let z = spanheap::SpanHeap.alloc_zeroed(l(4096, 64));
        assert!(std::slice::from_raw_parts(z, 4096).iter().all(|&b| b == 0));
        spanheap::SpanHeap.dealloc(z, l(4096, 64));
        let c = spanheap::raw::malloc(100);
        let c = spanheap::raw::realloc(c, 100_000, 16);
        let c = spanheap::raw::realloc(c, 10, 16);
        spanheap::raw::free(c);
    }
    spanheap::stats().check().unwrap();
}
