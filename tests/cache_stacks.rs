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

/// Allocates and frees 1,000 objects of each of five classes, so the thread's stacks
/// of those classes hold 1,000 pointers each.
fn fill_stacks() {
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
}

#[test]
fn free_stacks_hold_no_memory_after_a_flush_or_thread_exit() {
    let (base, len, touched) = std::thread::spawn(|| {
        fill_stacks();
        let (base, len) = spanheap::__private::thread_stack_storage().expect("a live cache");
        // 5 classes x 1,000 pointers: several pages of stack in use.
        let touched = resident_pages(base, len);
        assert!(touched >= 5, "stacks barely touched: {touched} pages");
        spanheap::flush_thread_cache();
        assert_eq!(
            resident_pages(base, len),
            0,
            "flush_thread_cache kept stack pages"
        );
        fill_stacks();
        (base, len, resident_pages(base, len))
    })
    .join()
    .unwrap();
    assert!(touched >= 5, "stacks barely touched again: {touched} pages");
    assert_eq!(
        resident_pages(base, len),
        0,
        "the exited thread's stack pages are still resident"
    );
}
