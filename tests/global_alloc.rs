//! spanheap installed as this test binary's global allocator: std collections, threads,
//! a sweep of sizes and alignments, realloc and alloc_zeroed, all with contents checked.

mod common;

use common::{exclusive, shared};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{mpsc, Arc};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// A byte pattern that depends on the block and the offset, so that overlapping or
/// moved blocks are noticed.
fn pattern(seed: usize, i: usize) -> u8 {
    (seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) % 251) as u8
}

fn fill(p: *mut u8, n: usize, seed: usize) {
    for i in 0..n {
        unsafe { p.add(i).write(pattern(seed, i)) };
    }
}

fn check(p: *const u8, n: usize, seed: usize) {
    for i in 0..n {
        let got = unsafe { p.add(i).read() };
        assert_eq!(got, pattern(seed, i), "byte {i} of block {seed} at {p:p}");
    }
}

/// Samples of a block's bytes (all of small blocks; head, tail and every 4 KiB of big ones).
fn sample_offsets(n: usize) -> impl Iterator<Item = usize> {
    let step = if n <= 1 << 16 { 1 } else { 4093 };
    (0..n).step_by(step).chain(n.saturating_sub(64)..n)
}

#[test]
fn std_collections_work_and_keep_their_contents() {
    let _g = shared();
    let mut v: Vec<u64> = Vec::new();
    for i in 0..200_000u64 {
        v.push(i * 3);
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));

    let mut map: HashMap<String, Vec<u32>> = HashMap::new();
    for i in 0..5_000u32 {
        map.insert(format!("key-{i}"), (0..(i % 17)).collect());
    }
    for i in 0..5_000u32 {
        let e = &map[&format!("key-{i}")];
        assert_eq!(e.len() as u32, i % 17);
        assert!(e.iter().enumerate().all(|(j, &x)| x == j as u32));
    }

    let mut tree: BTreeMap<u32, String> = BTreeMap::new();
    for i in (0..5_000u32).rev() {
        tree.insert(i, i.to_string().repeat(3));
    }
    for (k, v) in &tree {
        assert_eq!(*v, k.to_string().repeat(3));
    }
    // Remove half, then check the rest is intact.
    for i in (0..5_000u32).step_by(2) {
        tree.remove(&i);
    }
    assert_eq!(tree.len(), 2_500);
    assert!(tree
        .iter()
        .all(|(k, v)| k % 2 == 1 && *v == k.to_string().repeat(3)));

    let mut dq: VecDeque<Box<[u8; 100]>> = VecDeque::new();
    for i in 0..2_000usize {
        dq.push_back(Box::new([(i % 256) as u8; 100]));
        if i % 3 == 0 {
            dq.pop_front();
        }
    }
    let first = 667usize; // 2000 pushes, 667 pops from the front
    assert_eq!(dq.len(), 2_000 - first);
    for (j, b) in dq.iter().enumerate() {
        assert!(b.iter().all(|&x| x == ((first + j) % 256) as u8));
    }

    let s: String = (0..10_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert_eq!(s.len(), 10_000);
    assert!(s
        .bytes()
        .enumerate()
        .all(|(i, b)| b == b'a' + (i % 26) as u8));
}

#[test]
fn threads_allocate_free_and_exchange_blocks() {
    let _g = shared();
    let (tx, rx) = mpsc::channel::<(usize, Vec<u8>)>();
    let shared = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..4usize {
        let tx = tx.clone();
        let shared = Arc::clone(&shared);
        handles.push(std::thread::spawn(move || {
            let mut local: Vec<(usize, Vec<u8>)> = Vec::new();
            for i in 0..400usize {
                let n = 1 + (i * 37 + t * 101) % 20_000;
                let seed = t * 100_000 + i;
                let v: Vec<u8> = (0..n).map(|j| pattern(seed, j)).collect();
                if i % 4 == 0 {
                    // Freed by the receiving thread: a cross-thread free.
                    tx.send((seed, v)).unwrap();
                } else {
                    local.push((seed, v));
                }
                if i % 50 == 0 {
                    shared.lock().unwrap().push(format!("thread {t} step {i}"));
                }
                if local.len() > 30 {
                    let (seed, v) = local.remove(i % local.len());
                    assert!(
                        v.iter().enumerate().all(|(j, &b)| b == pattern(seed, j)),
                        "block {seed} corrupted"
                    );
                }
            }
            for (seed, v) in &local {
                assert!(
                    v.iter().enumerate().all(|(j, &b)| b == pattern(*seed, j)),
                    "block {seed} corrupted"
                );
            }
            local.len()
        }));
    }
    drop(tx);
    let mut received = 0;
    for (seed, v) in rx {
        assert!(
            v.iter().enumerate().all(|(j, &b)| b == pattern(seed, j)),
            "block {seed} corrupted"
        );
        received += 1;
    }
    for h in handles {
        assert!(h.join().unwrap() > 0);
    }
    assert_eq!(received, 4 * 100);
    assert_eq!(shared.lock().unwrap().len(), 4 * 8);
}

#[test]
fn sweep_of_sizes_and_alignments_gives_aligned_disjoint_writable_blocks() {
    let _g = shared();
    let mut sizes: Vec<usize> = Vec::new();
    let mut s = 1usize;
    while s <= 16 << 20 {
        sizes.extend([s - 1, s, s + 1, s + s / 2]);
        s *= 2;
    }
    sizes.retain(|&n| n > 0 && n <= 16 << 20);
    let aligns: Vec<usize> = (0..=20).map(|k| 1usize << k).collect(); // up to 1 MiB
    let mut live: Vec<(*mut u8, Layout, usize)> = Vec::new();
    let mut seed = 0usize;
    for &size in &sizes {
        for &align in &aligns {
            // Large blocks only with a few alignments, to keep the test quick.
            if size > 1 << 20 && align > 1 && align != 4096 && align != 1 << 20 {
                continue;
            }
            let layout = Layout::from_size_align(size, align).unwrap();
            let p = unsafe { GLOBAL.alloc(layout) };
            assert!(!p.is_null(), "{layout:?}");
            assert_eq!(p as usize % align, 0, "{layout:?} misaligned at {p:p}");
            for i in sample_offsets(size) {
                unsafe { p.add(i).write(pattern(seed, i)) };
            }
            live.push((p, layout, seed));
            seed += 1;
            // Keep a bounded live set; check and free the oldest half when it grows.
            if live.len() >= 64 {
                for (p, layout, sd) in live.drain(..32) {
                    for i in sample_offsets(layout.size()) {
                        assert_eq!(unsafe { p.add(i).read() }, pattern(sd, i), "{layout:?}");
                    }
                    unsafe { GLOBAL.dealloc(p, layout) };
                }
            }
        }
    }
    // No two live blocks overlap.
    let mut ranges: Vec<(usize, usize)> = live
        .iter()
        .map(|&(p, l, _)| (p as usize, p as usize + l.size()))
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap: {:x?}", w);
    }
    for (p, layout, sd) in live {
        for i in sample_offsets(layout.size()) {
            assert_eq!(unsafe { p.add(i).read() }, pattern(sd, i));
        }
        unsafe { GLOBAL.dealloc(p, layout) };
    }
}

#[test]
fn realloc_keeps_contents_and_alignment() {
    let _g = shared();
    for &align in &[8usize, 4096, 64 << 10, 1 << 20] {
        let mut layout = Layout::from_size_align(100, align).unwrap();
        let mut p = unsafe { GLOBAL.alloc(layout) };
        fill(p, 100, align);
        let mut kept = 100usize;
        // Grow across many page counts, then shrink back, then grow again.
        for &n in &[
            5_000usize, 9_000, 70_000, 300_000, 2_000_000, 40_000, 8_000, 100, 3_000_000,
        ] {
            let q = unsafe { GLOBAL.realloc(p, layout, n) };
            assert!(!q.is_null());
            assert_eq!(
                q as usize % align,
                0,
                "realloc must keep the old alignment {align}"
            );
            kept = kept.min(n);
            check(q, kept, align);
            fill(q, n, align);
            kept = n;
            p = q;
            layout = Layout::from_size_align(n, align).unwrap();
        }
        unsafe { GLOBAL.dealloc(p, layout) };
    }
}

#[test]
fn realloc_grows_in_place_when_the_next_pages_are_free() {
    // Alone in the binary: other threads' small spans and page-cache blocks are taken
    // first fit too, and could land right behind the block.
    let _g = exclusive();
    // An 8 MiB block shrunk in place to 2 MiB has 6 MiB of free pages right after it
    // (wherever first fit placed it); growing it back to 6 MiB must not move it. Retry a
    // few times in case a thread of the test harness takes those pages in between.
    let moved_every_time = (0..20).all(|_| {
        let big = Layout::from_size_align(8 << 20, 8).unwrap();
        let p = unsafe { GLOBAL.alloc(big) };
        assert!(!p.is_null());
        fill(p, 2 << 20, 3);
        let s = unsafe { GLOBAL.realloc(p, big, 2 << 20) };
        assert_eq!(s, p, "shrinking a large block moved it");
        let q = unsafe { GLOBAL.realloc(s, Layout::from_size_align(2 << 20, 8).unwrap(), 6 << 20) };
        check(q, 2 << 20, 3);
        unsafe { GLOBAL.dealloc(q, Layout::from_size_align(6 << 20, 8).unwrap()) };
        q != p
    });
    assert!(!moved_every_time, "realloc never grew in place");
}

#[test]
fn realloc_at_the_top_of_the_heap_grows_past_its_end() {
    let _g = exclusive();
    // A block larger than the whole heap grown in 64 MiB steps to three times that: it
    // reaches the top of the heap (arenas ascend), where each growth must grow the heap
    // right behind it and keep it in place, not copy it. Before, each time it reached
    // the top it was copied to a new place. Only the first and last page of each size
    // are touched. (A thread of the test harness could take pages behind the block in
    // between and cost a move; one is allowed.)
    let small = spanheap::stats().arena_bytes as usize + (64 << 20);
    let mut size = small;
    let mut l = Layout::from_size_align(size, 8).unwrap();
    let mut p = unsafe { GLOBAL.alloc(l) };
    assert!(!p.is_null());
    unsafe { p.write(0x5A) };
    let mut moves = 0;
    while size < 3 * small {
        let new = size + (64 << 20);
        let q = unsafe { GLOBAL.realloc(p, l, new) };
        assert!(!q.is_null());
        unsafe {
            assert_eq!(q.read(), 0x5A, "bytes lost");
            q.add(new - 1).write(1);
        }
        moves += usize::from(q != p);
        (p, size) = (q, new);
        l = Layout::from_size_align(size, 8).unwrap();
    }
    unsafe { GLOBAL.dealloc(p, l) };
    assert!(moves <= 1, "the block moved {moves} times to grow");
}

#[test]
fn alloc_zeroed_is_zero_even_over_dirty_memory() {
    let _g = shared();
    for round in 0..50usize {
        let size = 1 + (round * 7919) % (300 << 10);
        let layout = Layout::from_size_align(size, 8).unwrap();
        let p = unsafe { GLOBAL.alloc(layout) };
        unsafe { std::ptr::write_bytes(p, 0xA5, size) };
        unsafe { GLOBAL.dealloc(p, layout) };
        let z = unsafe { GLOBAL.alloc_zeroed(layout) };
        assert!(
            sample_offsets(size).all(|i| unsafe { z.add(i).read() } == 0),
            "round {round}: dirty bytes"
        );
        unsafe { std::ptr::write_bytes(z, 0x5A, size) };
        unsafe { GLOBAL.dealloc(z, layout) };
    }
}

#[test]
fn impossible_layouts_return_null() {
    let _g = shared();
    let huge = Layout::from_size_align(isize::MAX as usize - (1 << 20), 8).unwrap();
    assert!(unsafe { GLOBAL.alloc(huge) }.is_null());
    assert!(unsafe { GLOBAL.alloc_zeroed(huge) }.is_null());
    let over_aligned = Layout::from_size_align(8, 1 << 47).unwrap();
    assert!(unsafe { GLOBAL.alloc(over_aligned) }.is_null());
    // realloc to an impossible size fails and leaves the block intact.
    let l = Layout::from_size_align(64, 8).unwrap();
    let p = unsafe { GLOBAL.alloc(l) };
    fill(p, 64, 9);
    assert!(unsafe { GLOBAL.realloc(p, l, isize::MAX as usize - (1 << 20)) }.is_null());
    check(p, 64, 9);
    unsafe { GLOBAL.dealloc(p, l) };
    // And a plain Vec reports the failure through try_reserve instead of aborting.
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve(isize::MAX as usize / 2).is_err());
}

#[test]
fn blocks_are_ours_and_span_lookups_agree() {
    let _g = shared();
    let layout = Layout::from_size_align(100_000, 8).unwrap();
    let p = unsafe { GLOBAL.alloc(layout) } as usize;
    let (base, pages) =
        spanheap::__private::global_span_of(p + 50_000).expect("interior pointer of a live block");
    assert_eq!(base, p);
    assert_eq!(pages, 100_000usize.div_ceil(8192));
    let stack = 0u8;
    assert!(spanheap::__private::global_span_of(&stack as *const u8 as usize).is_none());
    unsafe { GLOBAL.dealloc(p as *mut u8, layout) };
}
