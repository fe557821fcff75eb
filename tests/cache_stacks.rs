//! A thread cache's free stacks (its local free lists: stacks of pointers in a mapping
//! the cache record keeps) hold resident memory only while the thread lives: at thread
//! exit the touched pages are dropped. One test per binary: another test's thread could
//! otherwise take the dead thread's record and touch its stacks again.

use std::alloc::{alloc, dealloc, Layout};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// Resident pages of `[base, base + len)` (4 KiB pages, `mincore`).
fn resident_pages(base: usize, len: usize) -> usize {
    let page = 4096;
    let n = len.div_ceil(page);
    let mut vec = vec![0u8; n];
    // SAFETY: the range is a mapping of this process (the cache record's stack storage,
    // never unmapped); `vec` has one byte per page.
    let r = unsafe { libc::mincore(base as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore failed");
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn a_dead_threads_free_stacks_hold_no_memory() {
    let (base, len, touched) = std::thread::spawn(|| {
        // Fill the stacks of a few classes: 1,000 objects freed each, kept locally.
        let sizes = [16usize, 48, 128, 512, 2048];
        let mut blocks = Vec::new();
        for &size in &sizes {
            let l = Layout::from_size_align(size, 8).unwrap();
            for _ in 0..1000 {
                // SAFETY: non-zero size.
                let p = unsafe { alloc(l) };
                assert!(!p.is_null());
                blocks.push((p, l));
            }
        }
        for (p, l) in blocks {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { dealloc(p, l) };
        }
        let (base, len) = spanheap::__private::thread_stack_storage().expect("a live cache");
        (base, len, resident_pages(base, len))
    })
    .join()
    .unwrap();
    // 5 classes x 1,000 pointers: at least a few pages of stack were in use.
    assert!(touched >= 5, "stacks barely touched: {touched} pages");
    assert_eq!(
        resident_pages(base, len),
        0,
        "the exited thread's stack pages are still resident"
    );
}
