//! Small objects (and their boundary with large ones) through spanheap installed as the
//! global allocator: every size and alignment, realloc chains across classes and across
//! the small/large boundary, `alloc_zeroed` over dirty memory, a multi-threaded stress
//! with cross-thread frees, and a producer/consumer whose footprint must stay bounded.
//!
//! Every block is filled with a pattern derived from a seed and checked when it is freed.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

mod common;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

use common::{exclusive, inuse, shared, Rng};

// ---------------------------------------------------------------------------------------
// Patterns. Byte `i` of a block with seed `s` is `TABLE[off(s) + (i & 0xFFFF)]` with a
// random 128 KiB table, so filling and checking are memcpy/memcmp (fast in debug builds
// too) and two blocks with different seeds almost surely differ in every 64 KiB window.
// ---------------------------------------------------------------------------------------

const WINDOW: usize = 1 << 16;

fn table() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let mut r = Rng(0x5EED);
        (0..2 * WINDOW).map(|_| r.next() as u8).collect()
    })
}

fn off(seed: u64) -> usize {
    // Mix the seed so that consecutive seeds land far apart in the table.
    (Rng(seed).next() as usize) % WINDOW
}

/// Writes the pattern of `seed` into bytes `start..end` of the block at `p`.
fn fill_range(p: *mut u8, start: usize, end: usize, seed: u64) {
    let (t, o) = (table(), off(seed));
    let mut pos = start;
    while pos < end {
        let j = pos & (WINDOW - 1);
        let len = (end - pos).min(WINDOW - j);
        // SAFETY: the caller owns bytes start..end of the block; the table slice is in
        // bounds (o + j + len <= 2 * WINDOW).
        unsafe { std::ptr::copy_nonoverlapping(t[o + j..].as_ptr(), p.add(pos), len) };
        pos += len;
    }
}

/// The first offset in `start..end` whose byte differs from the pattern of `seed`.
fn check_range(p: *const u8, start: usize, end: usize, seed: u64) -> Option<usize> {
    let (t, o) = (table(), off(seed));
    let mut pos = start;
    while pos < end {
        let j = pos & (WINDOW - 1);
        let len = (end - pos).min(WINDOW - j);
        // SAFETY: the caller owns bytes start..end of the block.
        let got = unsafe { std::slice::from_raw_parts(p.add(pos), len) };
        let want = &t[o + j..o + j + len];
        if got != want {
            let k = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            return Some(pos + k);
        }
        pos += len;
    }
    None
}

/// Blocks up to this size are filled and checked completely; larger ones in three
/// 4 KiB windows (head, middle, tail).
const FULL_CHECK: usize = 64 << 10;

fn regions(n: usize) -> [(usize, usize); 3] {
    if n <= FULL_CHECK {
        [(0, n), (n, n), (n, n)]
    } else {
        let mid = (n / 2) & !7;
        [(0, 4096), (mid, mid + 4096), (n - 4096, n)]
    }
}

fn fill(p: *mut u8, n: usize, seed: u64) {
    for (a, b) in regions(n) {
        fill_range(p, a, b, seed);
    }
}

fn check(p: *const u8, n: usize, seed: u64) -> Option<usize> {
    regions(n)
        .into_iter()
        .find_map(|(a, b)| check_range(p, a, b, seed))
}

// ---------------------------------------------------------------------------------------
// 1. Every size 1..=65536 with every power-of-two alignment up to 64 KiB.
// ---------------------------------------------------------------------------------------

/// Offsets written in each block: first, last, middle and one byte per 4 KiB (so that
/// every page of the block is written), each with a tag of the block.
fn probe_offsets(size: usize) -> impl Iterator<Item = usize> {
    [0, size / 2, size - 1]
        .into_iter()
        .chain((4096..size).step_by(4096))
}

fn tag(align_shift: usize, size: usize, off: usize) -> u8 {
    (size
        .wrapping_mul(131)
        .wrapping_add(off.wrapping_mul(7))
        .wrapping_add(align_shift * 29)
        % 251) as u8
        + 1
}

/// Checks one batch of live blocks (address order: no overlap; probes intact), then
/// frees it.
fn check_and_free_batch(batch: &mut Vec<(usize, usize)>, align_shift: usize) {
    let align = 1usize << align_shift;
    batch.sort_unstable();
    for w in batch.windows(2) {
        let ((a, n), (b, m)) = (w[0], w[1]);
        assert!(
            a + n <= b,
            "blocks overlap: [{a:#x}, +{n}) and [{b:#x}, +{m}) (align {align})"
        );
    }
    for &(a, n) in batch.iter() {
        for o in probe_offsets(n) {
            let got = unsafe { (a as *const u8).add(o).read() };
            assert_eq!(
                got,
                tag(align_shift, n, o),
                "byte {o} of the {n}-byte block at {a:#x} (align {align}) changed"
            );
        }
        unsafe { GLOBAL.dealloc(a as *mut u8, Layout::from_size_align(n, align).unwrap()) };
    }
    batch.clear();
}

#[test]
fn every_size_and_alignment_is_aligned_writable_and_disjoint() {
    let _q = shared();
    const MAX_SIZE: usize = 65536;
    const BATCH_BLOCKS: usize = 4096;
    const BATCH_BYTES: usize = 16 << 20;
    let t0 = Instant::now();
    let mut batch: Vec<(usize, usize)> = Vec::with_capacity(BATCH_BLOCKS);
    let mut total = 0usize;
    for align_shift in 0..=16usize {
        let align = 1usize << align_shift;
        let mut bytes = 0usize;
        for size in 1..=MAX_SIZE {
            let layout = Layout::from_size_align(size, align).unwrap();
            let p = unsafe { GLOBAL.alloc(layout) };
            assert!(!p.is_null(), "null for size {size} align {align}");
            assert_eq!(
                p as usize % align,
                0,
                "{p:p} misaligned for size {size} align {align}"
            );
            for o in probe_offsets(size) {
                unsafe { p.add(o).write(tag(align_shift, size, o)) };
            }
            batch.push((p as usize, size));
            total += 1;
            bytes += size;
            if batch.len() == BATCH_BLOCKS || bytes >= BATCH_BYTES {
                check_and_free_batch(&mut batch, align_shift);
                bytes = 0;
            }
        }
        check_and_free_batch(&mut batch, align_shift);
    }
    assert_eq!(total, 65536 * 17);
    eprintln!(
        "every_size_and_alignment: {total} blocks in {:.2?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Realloc chains across class boundaries and small <-> large.
// ---------------------------------------------------------------------------------------

#[test]
fn realloc_chains_keep_contents_and_alignment() {
    let _q = shared();
    // Class boundaries (8, 16, 32 KiB), the small/large boundary (32 KiB / 32 KiB + 1),
    // multi-page large blocks, and shrinking back down to one byte.
    const CHAIN: &[usize] = &[
        1, 7, 8, 9, 16, 17, 100, 1024, 1025, 4096, 8192, 8193, 32768, 32769, 100_000, 40, 1, 65536,
        2_000_000, 24, 300_000, 32768, 500, 32769, 1,
    ];
    let t0 = Instant::now();
    let mut steps = 0;
    for align_shift in 0..=16usize {
        let align = 1usize << align_shift;
        // The chain forwards, and backwards (so every transition is taken both ways).
        for chain in [
            CHAIN.to_vec(),
            CHAIN.iter().rev().copied().collect::<Vec<_>>(),
        ] {
            let mut seed = (align_shift as u64) << 32;
            let mut size = chain[0];
            let mut layout = Layout::from_size_align(size, align).unwrap();
            let mut p = unsafe { GLOBAL.alloc(layout) };
            assert!(!p.is_null() && p as usize % align == 0);
            fill_range(p, 0, size, seed);
            for &new in &chain[1..] {
                let q = unsafe { GLOBAL.realloc(p, layout, new) };
                assert!(
                    !q.is_null(),
                    "realloc {size} -> {new} (align {align}) failed"
                );
                assert_eq!(
                    q as usize % align,
                    0,
                    "realloc {size} -> {new} lost alignment {align}: {q:p}"
                );
                let keep = size.min(new);
                if let Some(o) = check_range(q, 0, keep, seed) {
                    panic!(
                        "realloc {size} -> {new} (align {align}, {p:p} -> {q:p}): byte {o} of \
                         the kept {keep} changed"
                    );
                }
                seed += 1;
                size = new;
                layout = Layout::from_size_align(size, align).unwrap();
                p = q;
                fill_range(p, 0, size, seed);
                steps += 1;
            }
            assert_eq!(check_range(p, 0, size, seed), None);
            unsafe { GLOBAL.dealloc(p, layout) };
        }
    }
    eprintln!("realloc_chains: {steps} steps in {:.2?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------
// 3. alloc_zeroed over memory that was used and dirtied before.
// ---------------------------------------------------------------------------------------

#[test]
fn alloc_zeroed_is_zero_over_dirty_memory() {
    let _q = shared();
    let t0 = Instant::now();
    for &align in &[8usize, 64, 4096] {
        for &size in &[
            8usize,
            24,
            48,
            100,
            256,
            1000,
            4096,
            32768,
            100_000,
            1 << 20,
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // Enough blocks to cover several spans of the class (at least 256 KiB).
            let n = ((256 << 10) / size).clamp(8, 4096);
            let dirty: Vec<usize> = (0..n)
                .map(|_| {
                    let p = unsafe { GLOBAL.alloc(layout) };
                    assert!(!p.is_null());
                    unsafe { p.write_bytes(0xFF, size) };
                    p as usize
                })
                .collect();
            for &p in &dirty {
                unsafe { GLOBAL.dealloc(p as *mut u8, layout) };
            }
            // The same count again, zeroed, all live at once (so each is a distinct block).
            let mut zeroed: Vec<usize> = Vec::with_capacity(n);
            for _ in 0..n {
                let p = unsafe { GLOBAL.alloc_zeroed(layout) };
                assert!(!p.is_null() && p as usize % align == 0);
                let b = unsafe { std::slice::from_raw_parts(p, size) };
                if let Some(o) = b.iter().position(|&x| x != 0) {
                    panic!(
                        "alloc_zeroed({size}, align {align}) at {p:p}: byte {o} is {:#x}",
                        b[o]
                    );
                }
                // Dirty it too, so the next round (and the next size) meets dirt.
                unsafe { p.write_bytes(0xFF, size) };
                zeroed.push(p as usize);
            }
            // The test only means something if dirty blocks came back. Small objects are
            // reused by this thread's cache; large spans may be taken by a concurrent
            // test, so reuse is required only for small sizes.
            let mut d = dirty.clone();
            d.sort_unstable();
            let reused = zeroed.iter().filter(|p| d.binary_search(p).is_ok()).count();
            if size <= 32768 {
                assert!(
                    reused > 0,
                    "no dirty {size}-byte block was reused by alloc_zeroed"
                );
            }
            for &p in &zeroed {
                unsafe { GLOBAL.dealloc(p as *mut u8, layout) };
            }
        }
    }
    eprintln!("alloc_zeroed_dirty: {:.2?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------
// 4. Multi-threaded stress with cross-thread frees through an exchange array.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Obj {
    addr: usize,
    layout: Layout,
    seed: u64,
}

/// Checks an object's pattern, then frees it. Returns whether the pattern was intact.
fn check_free(o: Obj, mismatch: &Mutex<Option<String>>) -> bool {
    let bad = check(o.addr as *const u8, o.layout.size(), o.seed);
    unsafe { GLOBAL.dealloc(o.addr as *mut u8, o.layout) };
    if let Some(at) = bad {
        let mut m = mismatch.lock().unwrap_or_else(|e| e.into_inner());
        m.get_or_insert_with(|| {
            format!(
                "object {:#x} ({:?}, seed {}): byte {at} wrong",
                o.addr, o.layout, o.seed
            )
        });
        return false;
    }
    true
}

fn random_layout(r: &mut Rng) -> Layout {
    let size = match r.below(1000) {
        0..=699 => 1 + r.below(256),
        700..=929 => 257 + r.below(4096 - 256),
        930..=989 => 4097 + r.below(32768 - 4096),
        990..=997 => 32769 + r.below(256 << 10),
        _ => (256 << 10) + r.below(4 << 20),
    } as usize;
    // Mostly small alignments; one in sixteen anywhere up to 4 KiB.
    let align = if r.below(16) == 0 {
        1 << r.below(13)
    } else {
        1 << r.below(5)
    };
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn stress_threads_with_cross_thread_frees() {
    let _q = shared();
    // 5,000,000 operations (an allocation or a free each) in both debug and release.
    const TARGET_OPS: u64 = 5_000_000;
    const THREADS: usize = 4;
    const ROUNDS: usize = 10;
    const SLOTS: usize = 1024;
    const MAX_LIVE: usize = 2000;
    let per_thread = TARGET_OPS / (THREADS * ROUNDS) as u64 + 1;

    let t0 = Instant::now();
    let slots: Vec<Mutex<Option<Obj>>> = (0..SLOTS).map(|_| Mutex::new(None)).collect();
    let ops = AtomicU64::new(0);
    let good = AtomicU64::new(0);
    let bad = AtomicU64::new(0);
    let exchanged = AtomicU64::new(0);
    let mismatch: Mutex<Option<String>> = Mutex::new(None);

    for round in 0..ROUNDS {
        std::thread::scope(|sc| {
            for t in 0..THREADS {
                let (slots, ops, good, bad, exchanged, mismatch) =
                    (&slots, &ops, &good, &bad, &exchanged, &mismatch);
                sc.spawn(move || {
                    let mut r = Rng(((round * THREADS + t) as u64) << 40 | 0xABCD);
                    let mut seed = ((round * THREADS + t) as u64) << 40;
                    let mut live: Vec<Obj> = Vec::with_capacity(MAX_LIVE + 1);
                    let (mut n, mut ok, mut ko, mut ex) = (0u64, 0u64, 0u64, 0u64);
                    let free_one = |o: Obj, ok: &mut u64, ko: &mut u64| {
                        if check_free(o, mismatch) {
                            *ok += 1;
                        } else {
                            *ko += 1;
                        }
                    };
                    while n < per_thread {
                        let grow = live.len() < 16 || (live.len() < MAX_LIVE && r.below(2) == 0);
                        if grow {
                            let layout = random_layout(&mut r);
                            let p = unsafe { GLOBAL.alloc(layout) };
                            assert!(!p.is_null(), "alloc {layout:?} failed");
                            assert_eq!(p as usize % layout.align(), 0);
                            seed += 1;
                            fill(p, layout.size(), seed);
                            let o = Obj {
                                addr: p as usize,
                                layout,
                                seed,
                            };
                            n += 1;
                            if r.below(4) == 0 {
                                // Hand it to whichever thread looks at this slot next; take
                                // what was there (another thread's object) as ours.
                                let i = r.below(SLOTS as u64) as usize;
                                let prev = slots[i]
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .replace(o);
                                ex += 1;
                                if let Some(prev) = prev {
                                    live.push(prev);
                                }
                            } else {
                                live.push(o);
                            }
                        } else {
                            let i = r.below(live.len() as u64) as usize;
                            let o = live.swap_remove(i);
                            free_one(o, &mut ok, &mut ko);
                            n += 1;
                        }
                    }
                    // The thread ends: free what it holds (objects in the slots live on).
                    for o in live.drain(..) {
                        free_one(o, &mut ok, &mut ko);
                        n += 1;
                    }
                    ops.fetch_add(n, Ordering::Relaxed);
                    good.fetch_add(ok, Ordering::Relaxed);
                    bad.fetch_add(ko, Ordering::Relaxed);
                    exchanged.fetch_add(ex, Ordering::Relaxed);
                });
            }
        });
    }
    // Whatever is left in the slots is freed here, by yet another thread.
    let mut n = 0u64;
    for s in &slots {
        if let Some(o) = s.lock().unwrap().take() {
            if check_free(o, &mismatch) {
                good.fetch_add(1, Ordering::Relaxed);
            } else {
                bad.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        }
    }
    ops.fetch_add(n, Ordering::Relaxed);
    let (ops, good, bad, ex) = (
        ops.into_inner(),
        good.into_inner(),
        bad.into_inner(),
        exchanged.into_inner(),
    );
    eprintln!(
        "stress: {ops} operations ({good} objects checked, {ex} exchanged) in {:.2?}",
        t0.elapsed()
    );
    assert_eq!(
        bad,
        0,
        "{bad} corrupted objects, first: {:?}",
        mismatch.lock().unwrap()
    );
    assert!(ops >= TARGET_OPS, "only {ops} operations");
    // Every allocation was freed exactly once: frees are half of the operations.
    assert_eq!(good * 2, ops);
    assert!(
        ex >= ops / 2 / 5,
        "only {ex} objects went through the exchange"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Producer/consumer: the consumer frees everything the producer allocates.
// ---------------------------------------------------------------------------------------

#[test]
fn producer_consumer_ten_million_objects_bounded_footprint() {
    let _q = exclusive();
    const OBJECTS: u64 = 10_000_000;
    const BATCH: u64 = 128;
    const LIMIT: u64 = 64 << 20;
    let t0 = Instant::now();
    let start = inuse();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Box<[u8; 64]>>>(1024);
    let producer = std::thread::spawn(move || {
        let mut n = 0u64;
        while n < OBJECTS {
            let mut v = Vec::with_capacity(BATCH as usize);
            for _ in 0..BATCH {
                let mut b = Box::new([0u8; 64]);
                fill_range(b.as_mut_ptr(), 0, 64, n);
                v.push(b);
                n += 1;
            }
            tx.send(v).unwrap();
        }
    });
    let (mut n, mut peak, mut batches) = (0u64, start, 0u64);
    for v in rx {
        for b in v {
            if let Some(o) = check_range(b.as_ptr(), 0, 64, n) {
                panic!("object {n} at {:p}: byte {o} wrong", b.as_ptr());
            }
            n += 1;
        }
        batches += 1;
        if batches % 8 == 0 {
            peak = peak.max(inuse());
        }
    }
    producer.join().unwrap();
    peak = peak.max(inuse());
    eprintln!(
        "producer_consumer: {n} objects in {:.2?}, in-use {start} at start, peak {peak}",
        t0.elapsed()
    );
    assert_eq!(n, OBJECTS);
    assert!(
        peak < LIMIT,
        "in-use peaked at {peak} bytes (limit {LIMIT})"
    );
}
