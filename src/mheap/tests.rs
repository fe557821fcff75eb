//! Unit tests of the page heap (`mod.rs` and its child modules), on `TestMem`.

use super::records::SPAN_CHUNK_PAGES;
use super::*;
use crate::os::{TestMem, PAGE_SIZE};
use crate::pagecache::HeapCache;
use crate::sizeclasses::{CLASS_TO_NPAGES, NUM_CLASSES};

fn new_heap() -> &'static MHeap<TestMem> {
    Box::leak(Box::new(MHeap::new(TestMem)))
}

/// Checks every counter invariant that holds when no span operation is in flight,
/// against the page allocator's own view and a list of the live spans.
fn check_counters<M: MemSource>(h: &MHeap<M>, live: &[(NonNull<MSpan>, Purpose)]) {
    let c = h.counters();
    let (free_pages, scav_pages, records) = h.page_state();
    assert_eq!(
        c.heap_inuse,
        c.pages_in_use * PAGE_SIZE as u64,
        "heap_inuse is pages_in_use: {c:?}"
    );
    assert_eq!(
        c.heap_idle,
        (free_pages * PAGE_SIZE) as u64,
        "idle bytes == free pages: {c:?}"
    );
    assert_eq!(
        c.heap_released,
        (scav_pages * PAGE_SIZE) as u64,
        "released == scavenged pages: {c:?}"
    );
    assert!(c.heap_released <= c.heap_idle);
    let manual: u64 = Purpose::ALL
        .iter()
        .filter(|p| p.is_manual())
        .map(|&p| c.by_purpose[p as usize])
        .sum();
    assert_eq!(c.heap_sys + manual, c.arena_bytes, "{c:?}");
    let mut by_purpose = [0u64; Purpose::COUNT];
    let mut heap_pages = 0u64;
    for &(s, p) in live {
        let n = unsafe { s.as_ref() }.npages();
        by_purpose[p as usize] += (n * PAGE_SIZE) as u64;
        if !p.is_manual() {
            heap_pages += n as u64;
        }
    }
    assert_eq!(
        c.by_purpose[Purpose::Heap as usize],
        by_purpose[Purpose::Heap as usize]
    );
    assert_eq!(c.pages_in_use, heap_pages);
    // Besides the spans listed, SpanRecords bytes are whole record chunks, enough
    // for every record in use (one per listed span plus one per chunk).
    let chunk = SPAN_CHUNK_PAGES * PAGE_SIZE;
    let chunks_bytes = (c.by_purpose[Purpose::SpanRecords as usize]
        - by_purpose[Purpose::SpanRecords as usize]) as usize;
    assert_eq!(chunks_bytes % chunk, 0);
    // Chunks of other record kinds (bitmaps, thread caches) each hold a span record.
    let other_chunks: usize = [Purpose::SpanBitmaps, Purpose::ThreadCaches]
        .iter()
        .map(|&p| (c.by_purpose[p as usize] - by_purpose[p as usize]) as usize / chunk)
        .sum();
    assert_eq!(records, live.len() + chunks_bytes / chunk + other_chunks);
    assert!(chunks_bytes / core::mem::size_of::<MSpan>() >= records);
}

#[test]
fn counters_stay_consistent_through_alloc_free_and_growth() {
    let h = new_heap();
    let mut live = Vec::new();
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..3000 {
        if live.len() > 50 && next() % 3 == 0 {
            let k = (next() as usize) % live.len();
            let (s, _) = live.swap_remove(k);
            unsafe { h.free_span(s) };
        } else {
            // Mostly small runs, some larger than an arena to force multi-arena growth.
            let n = match next() % 100 {
                0 => 9000 + (next() % 3000) as usize,
                1..=10 => 100 + (next() % 900) as usize,
                _ => 1 + (next() % 16) as usize,
            };
            let align = if next() % 10 == 0 {
                PAGE_SIZE << (next() % 8)
            } else {
                1
            };
            let s = h
                .alloc_span(n, Purpose::Heap, 0, align)
                .expect("alloc_span");
            let span = unsafe { s.as_ref() };
            assert_eq!(span.base() % align.max(PAGE_SIZE), 0);
            assert_eq!(span.npages(), n);
            live.push((s, Purpose::Heap));
        }
        if i % 100 == 0 {
            check_counters(h, &live);
        }
    }
    check_counters(h, &live);
    for (s, _) in live.drain(..) {
        unsafe { h.free_span(s) };
    }
    check_counters(h, &live);
    let c = h.counters();
    assert_eq!(c.heap_inuse, 0);
    assert_eq!(c.pages_in_use, 0);
}

#[test]
fn manual_spans_are_counted_by_purpose_and_leave_heap_sys() {
    let h = new_heap();
    let a = h.alloc_span(4, Purpose::Heap, 0, 1).unwrap();
    let c0 = h.counters();
    let m = h.alloc_span(3, Purpose::SpanRecords, 0, 1).unwrap();
    let c1 = h.counters();
    assert_eq!(
        c1.by_purpose[Purpose::SpanRecords as usize],
        c0.by_purpose[Purpose::SpanRecords as usize] + 3 * PAGE_SIZE as u64
    );
    assert_eq!(c1.heap_sys, c0.heap_sys - 3 * PAGE_SIZE as u64);
    assert_eq!(c1.heap_inuse, c0.heap_inuse);
    assert_eq!(
        c1.pages_in_use, c0.pages_in_use,
        "manual spans are not in pagesInUse"
    );
    assert_eq!(unsafe { m.as_ref() }.state(), SpanState::Manual);
    assert!(
        !h.page_marked_in_use(unsafe { m.as_ref() }.base()),
        "manual spans have no pageInUse bit"
    );
    check_counters(h, &[(a, Purpose::Heap), (m, Purpose::SpanRecords)]);
    unsafe { h.free_span(m) };
    let c2 = h.counters();
    assert_eq!(
        (c2.heap_sys, c2.heap_inuse, c2.heap_idle, c2.by_purpose),
        (c0.heap_sys, c0.heap_inuse, c0.heap_idle, c0.by_purpose)
    );
    // The manual span's pages were fresh (released); they come back dirty.
    assert_eq!(c2.heap_released, c0.heap_released - 3 * PAGE_SIZE as u64);
    unsafe { h.free_span(a) };
}

#[test]
fn span_map_and_page_in_use_answer_for_every_page() {
    let h = new_heap();
    // Spans of several sizes, one crossing into a second arena.
    let sizes = [1usize, 2, 7, 64, 513, 9000];
    let spans: Vec<_> = sizes
        .iter()
        .map(|&n| h.alloc_span(n, Purpose::Heap, 0, 1).unwrap())
        .collect();
    // One arena memo for every lookup below: it moves between the two arenas and
    // must answer as the index does.
    let mut hint = crate::arena::NO_ARENA;
    for &s in &spans {
        let span = unsafe { s.as_ref() };
        let (base, n) = (span.base(), span.npages());
        assert!(h.page_marked_in_use(base));
        for p in 0..n {
            let page = base + p * PAGE_SIZE;
            assert!(
                p == 0 || !h.page_marked_in_use(page),
                "only the first page carries the bit"
            );
            // First byte, an interior byte and the last byte of every page.
            for addr in [page, page + 1234, page + PAGE_SIZE - 1] {
                assert_eq!(h.span_of(addr), Some(s), "page {p} of a {n}-page span");
                assert_eq!(h.span_of_unchecked(addr), s.as_ptr());
                assert_eq!(h.span_of_hinted(addr, &mut hint), s.as_ptr());
            }
        }
    }
    // Foreign pointers: stack, static, the system allocator, null, high addresses.
    let local = 5u64;
    static STATIC: u64 = 7;
    let boxed = Box::new(9u64);
    for addr in [
        &local as *const u64 as usize,
        &STATIC as *const u64 as usize,
        &*boxed as *const u64 as usize,
        0,
        usize::MAX,
        1 << 48,
    ] {
        assert_eq!(h.span_of(addr), None, "{addr:#x} is not ours");
        assert!(h.span_of_hinted(addr, &mut hint).is_null());
        // A miss leaves the memo usable.
        let last = *spans.last().unwrap();
        let end = unsafe { last.as_ref().base() + (last.as_ref().npages() << PAGE_SHIFT) };
        assert_eq!(h.span_of_hinted(end - 1, &mut hint), last.as_ptr());
        assert_eq!(h.span_of_hinted(end - 1, &mut hint), last.as_ptr());
    }
    // A freed span's pages are no longer answered for, even though the map still
    // points at the dead record.
    let s = spans[2];
    let base = unsafe { s.as_ref() }.base();
    unsafe { h.free_span(s) };
    assert_eq!(h.span_of(base), None);
    assert!(!h.page_marked_in_use(base));
    for &s in &spans[..2] {
        unsafe { h.free_span(s) };
    }
    for &s in &spans[3..] {
        unsafe { h.free_span(s) };
    }
}

#[test]
fn scavenged_pages_are_committed_and_accounted() {
    let h = new_heap();
    let s = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
    let span = unsafe { s.as_ref() };
    // Fresh from the OS: fully scavenged, zero, needs no clearing.
    assert!(!unsafe { span.info() }.needzero);
    let base = span.base();
    unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 16 * PAGE_SIZE) };
    let released_before = h.counters().heap_released;
    unsafe { h.free_span(s) };
    // The same pages come back dirty: not scavenged, so they need zeroing.
    let s2 = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
    let span2 = unsafe { s2.as_ref() };
    assert_eq!(span2.base(), base, "first fit reuses the lowest run");
    assert!(unsafe { span2.info() }.needzero);
    assert_eq!(
        h.counters().heap_released,
        released_before,
        "reusing dirty pages releases nothing"
    );
    unsafe { h.free_span(s2) };
}

/// The tests' memory source (`TestMem`), whose `decommit` fails while `refuse` is
/// set (as under `mlockall`).
struct Refusing {
    refuse: std::sync::atomic::AtomicBool,
}

// SAFETY: every call is forwarded to `TestMem` unchanged, or fails before it.
unsafe impl MemSource for Refusing {
    fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError> {
        TestMem.reserve(size, align, hint)
    }
    unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.map(ptr, size) }
    }
    unsafe fn commit(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.commit(ptr, size) }
    }
    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
        // SAFETY: forwarded from our caller.
        !self.refuse.load(Ordering::Relaxed) && unsafe { TestMem.decommit(ptr, size) }
    }
    fn decommit_zeroes(&self) -> bool {
        TestMem.decommit_zeroes()
    }
    unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.release(ptr, size) }
    }
}

#[test]
fn refused_decommit_keeps_pages_dirty_and_counted_as_committed() {
    let h: &MHeap<Refusing> = Box::leak(Box::new(MHeap::new(Refusing {
        refuse: std::sync::atomic::AtomicBool::new(true),
    })));
    let stats = || {
        let mut t = [0u64; crate::stats::field::N];
        h.stats.read(&mut t);
        let s = crate::stats::Stats::from_totals(&t, h.gauges());
        s.check().unwrap();
        s
    };
    let s = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
    let base = unsafe { s.as_ref() }.base();
    unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 16 * PAGE_SIZE) };
    unsafe { h.free_span(s) };
    std::thread::sleep(std::time::Duration::from_millis(30));
    let (st0, scav0) = (stats(), h.page_state().1);
    // A forced pass sees the failure and stops (it would take the run again at once
    // otherwise); nothing is released.
    assert_eq!(h.scavenge(true, 0, u64::MAX), (0, false));
    let st1 = stats();
    assert_eq!(h.page_state().1, scav0, "no page became scavenged");
    assert_eq!(st1.released_bytes, st0.released_bytes);
    assert_eq!(st1.scavenged_bytes, st0.scavenged_bytes);
    assert!(st1.decommit_failures > st0.decommit_failures);
    assert!(st1.decommit_failed_bytes >= 16 * PAGE_SIZE as u64);
    assert_eq!(h.counters().heap_released, st1.released_bytes);
    // The run was freed 30 ms ago, but the failure stamped it afresh: a paced pass
    // with a 20 ms delay leaves it alone.
    h.scavenger.set_config(crate::ScavengerConfig {
        delay: Some(std::time::Duration::from_millis(20)),
        retain_percent: 0,
        background: false,
    });
    let now = crate::os::coarse_now_ns();
    assert_eq!(h.scavenge(false, now, u64::MAX), (0, false));
    assert_eq!(stats().decommit_failures, st1.decommit_failures);
    // The run is free again, dirty: reused, it must be cleared.
    let s2 = h.alloc_span(16, Purpose::Heap, 0, 1).unwrap();
    assert_eq!(unsafe { s2.as_ref() }.base(), base);
    assert!(unsafe { s2.as_ref().info() }.needzero);
    unsafe { h.free_span(s2) };
    // Once the OS agrees, everything goes.
    h.mem.refuse.store(false, Ordering::Relaxed);
    assert!(h.scavenge(true, 0, u64::MAX).0 >= 16 * PAGE_SIZE);
    assert_eq!(stats().committed_bytes, stats().inuse_bytes);
}

#[test]
fn resize_in_place_updates_pages_and_counters() {
    let h = new_heap();
    let s = h.alloc_span(10, Purpose::Heap, 0, 1).unwrap();
    let base = unsafe { s.as_ref() }.base();
    unsafe { h.shrink_span(s, 4) };
    assert_eq!(unsafe { s.as_ref() }.npages(), 4);
    assert_eq!(
        h.span_of(base + 5 * PAGE_SIZE),
        None,
        "the tail left the span"
    );
    assert_eq!(h.counters().pages_in_use, 4);
    assert!(unsafe { h.grow_span_in_place(s, 12) });
    assert_eq!(h.span_of(base + 11 * PAGE_SIZE), Some(s));
    assert_eq!(h.counters().pages_in_use, 12);
    // A neighbour blocks growth.
    let t = h.alloc_span(1, Purpose::Heap, 0, 1).unwrap();
    assert_eq!(unsafe { t.as_ref() }.base(), base + 12 * PAGE_SIZE);
    assert!(!unsafe { h.grow_span_in_place(s, 13) });
    check_counters(h, &[(s, Purpose::Heap), (t, Purpose::Heap)]);
    unsafe {
        h.free_span(s);
        h.free_span(t);
    }
}

#[test]
fn impossible_requests_fail_cleanly() {
    let h = new_heap();
    assert!(h.alloc_span(0, Purpose::Heap, 0, 1).is_none());
    assert!(h.alloc_span(usize::MAX, Purpose::Heap, 0, 1).is_none());
    assert!(h
        .alloc_span((MAX_SPAN_BYTES >> PAGE_SHIFT) + 1, Purpose::Heap, 0, 1)
        .is_none());
    assert!(h.alloc_span(1, Purpose::Heap, 0, MAX_ALIGN * 2).is_none());
    // The heap is still usable and consistent afterwards.
    let s = h.alloc_span(1, Purpose::Heap, 0, 1).unwrap();
    check_counters(h, &[(s, Purpose::Heap)]);
    unsafe { h.free_span(s) };
}

#[test]
fn four_threads_never_get_overlapping_pages() {
    use std::sync::Mutex as StdMutex;
    let h = new_heap();
    // Each page's owner tag is written into the page itself and checked before free:
    // an overlap would overwrite another thread's tag.
    let seen = StdMutex::new(0usize);
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let seen = &seen;
            sc.spawn(move || {
                let mut rng = 0x1234_5678_9ABC_DEF0u64 ^ (t + 1).wrapping_mul(0x9E3779B97F4A7C15);
                let mut live: Vec<(NonNull<MSpan>, u64)> = Vec::new();
                for i in 0..20_000u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() > 64 || (rng % 2 == 0 && !live.is_empty()) {
                        let (s, tag) = live.swap_remove((rng >> 8) as usize % live.len());
                        let span = unsafe { s.as_ref() };
                        for p in 0..span.npages() {
                            let w = (span.base() + p * PAGE_SIZE) as *const u64;
                            assert_eq!(
                                unsafe { w.read() },
                                tag,
                                "page overwritten by another span"
                            );
                        }
                        unsafe { h.free_span(s) };
                    } else {
                        let n = 1 + (rng >> 20) as usize % 20;
                        let s = h.alloc_span(n, Purpose::Heap, 0, 1).unwrap();
                        let span = unsafe { s.as_ref() };
                        let tag = (t << 56) | i;
                        for p in 0..n {
                            unsafe { ((span.base() + p * PAGE_SIZE) as *mut u64).write(tag) };
                        }
                        live.push((s, tag));
                    }
                }
                for (s, _) in live {
                    unsafe { h.free_span(s) };
                }
                *seen.lock().unwrap() += 1;
            });
        }
    });
    assert_eq!(*seen.lock().unwrap(), 4);
    check_counters(h, &[]);
    assert_eq!(h.counters().heap_inuse, 0);
}

/// The consistent statistics of `h`, checked.
fn checked_stats<M: MemSource>(h: &MHeap<M>) -> crate::stats::Stats {
    let mut t = [0u64; crate::stats::field::N];
    h.stats.read(&mut t);
    let s = crate::stats::Stats::from_totals(&t, h.gauges());
    s.check().unwrap();
    s
}

#[test]
fn four_threads_with_page_caches_never_overlap_and_flush_everything() {
    use std::sync::Mutex as StdMutex;
    let h = new_heap();
    // Spans handed between threads, freed by whoever takes them.
    let pool: StdMutex<Vec<(usize, u64)>> = StdMutex::new(Vec::new());
    let (cached, total) = (StdMutex::new(0u64), StdMutex::new(0u64));
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let (pool, cached, total) = (&pool, &cached, &total);
            sc.spawn(move || {
                let mut tc = HeapCache::new();
                let mut rng = 0x0F1E_2D3C_4B5A_6978u64 ^ (t + 1).wrapping_mul(0x9E3779B97F4A7C15);
                let mut live: Vec<(NonNull<MSpan>, u64)> = Vec::new();
                let free = |tc: &mut HeapCache, s: NonNull<MSpan>, tag: u64| {
                    let span = unsafe { s.as_ref() };
                    for p in 0..span.npages() {
                        let w = (span.base() + p * PAGE_SIZE) as *const u64;
                        assert_eq!(unsafe { w.read() }, tag, "page overwritten");
                    }
                    unsafe { h.free_span_with(s, tc) };
                };
                for i in 0..20_000u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() > 64 || (rng % 2 == 0 && !live.is_empty()) {
                        let (s, tag) = live.swap_remove((rng >> 8) as usize % live.len());
                        if rng % 8 == 1 {
                            pool.lock().unwrap().push((s.as_ptr() as usize, tag));
                        } else {
                            free(&mut tc, s, tag);
                        }
                    } else if rng % 16 == 3 {
                        // Someone else's span.
                        let got = pool.lock().unwrap().pop();
                        if let Some((s, tag)) = got {
                            free(&mut tc, NonNull::new(s as *mut MSpan).unwrap(), tag);
                        }
                    } else {
                        // Mostly small spans (some of them small-object spans, which
                        // need bitmap records too); some of 16..=128 pages, from the
                        // chunk cache, and a few larger, which bypass both caches.
                        let class = (rng >> 32) as usize % NUM_CLASSES;
                        let (n, sc) = if rng % 5 == 0 && class != 0 {
                            (
                                crate::sizeclasses::CLASS_TO_NPAGES[class] as usize,
                                class as u8,
                            )
                        } else if rng % 7 == 0 {
                            (16 + (rng >> 24) as usize % 125, 0)
                        } else {
                            (1 + (rng >> 20) as usize % 20, 0)
                        };
                        let s = h.alloc_span_with(n, Purpose::Heap, sc, 1, &mut tc).unwrap();
                        let span = unsafe { s.as_ref() };
                        assert_eq!(span.npages(), n);
                        let tag = (t << 56) | i;
                        for p in 0..n {
                            unsafe { ((span.base() + p * PAGE_SIZE) as *mut u64).write(tag) };
                        }
                        live.push((s, tag));
                        if i % 1000 == 0 {
                            checked_stats(h);
                        }
                    }
                }
                for (s, tag) in live {
                    free(&mut tc, s, tag);
                }
                *cached.lock().unwrap() +=
                    u64::from(tc.pages.cache.count_ones()) + tc.chunk.count() as u64;
                h.flush_heap_cache(&mut tc);
                assert!(tc.pages.is_empty() && tc.chunk.base == 0 && tc.nspans == 0);
                *total.lock().unwrap() += 1;
            });
        }
    });
    let mut tc = HeapCache::new();
    for (s, tag) in pool.into_inner().unwrap() {
        let s = NonNull::new(s as *mut MSpan).unwrap();
        let span = unsafe { s.as_ref() };
        assert_eq!(unsafe { (span.base() as *const u64).read() }, tag);
        unsafe { h.free_span_with(s, &mut tc) };
    }
    h.flush_heap_cache(&mut tc);
    assert_eq!(*total.lock().unwrap(), 4);
    assert!(*cached.lock().unwrap() > 0, "the page caches were used");
    check_counters(h, &[]);
    assert_eq!(h.counters().heap_inuse, 0);
    let st = checked_stats(h);
    assert_eq!(
        (
            st.page_cache_bytes,
            st.inuse_bytes - st.span_record_bytes - st.span_bitmap_bytes
        ),
        (0, 0)
    );
}

const CHUNK_SIZE_BYTES: usize = 512 * PAGE_SIZE;

#[test]
fn blocks_of_the_previous_chunk_come_back_without_the_lock() {
    // 1 MiB spans until the thread takes a second chunk: the first becomes its
    // previous chunk. A block of it freed then goes back to that chunk's bitmap in
    // the thread's cache (it went to the page allocator under the lock, with a
    // summary update, when a thread kept one chunk), and serves a later allocation.
    let h = new_heap();
    let mut tc = HeapCache::new();
    let base_of = |s: NonNull<MSpan>| unsafe { s.as_ref() }.base();
    let mut spans = vec![h
        .alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
        .unwrap()];
    let first = tc.chunk.base;
    while tc.chunk.base == first {
        assert!(spans.len() < 8, "a chunk holds four 1 MiB spans");
        spans.push(
            h.alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
                .unwrap(),
        );
    }
    assert_eq!(tc.prev.base, first);
    let i = spans
        .iter()
        .position(|&s| (first..first + CHUNK_SIZE_BYTES).contains(&base_of(s)))
        .unwrap();
    let x = spans.swap_remove(i);
    let (xbase, before) = (base_of(x), tc.prev.count());
    unsafe { h.free_span_with(x, &mut tc) };
    // In the thread's cache, so not in the page allocator: no lock was needed.
    assert_eq!(tc.prev.count(), before + 128, "back in the previous chunk");
    assert!(!h.page_marked_in_use(xbase));
    let st = checked_stats(h);
    let held = tc.chunk.count() + tc.prev.count() + tc.pages.cache.count_ones() as usize;
    assert_eq!(st.page_cache_bytes as usize, held * PAGE_SIZE);
    // The current chunk's runs first, then the previous chunk's.
    loop {
        let s = h
            .alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
            .unwrap();
        spans.push(s);
        if base_of(s) == xbase {
            break;
        }
        assert!(spans.len() < 16, "the freed run was not reused");
    }
    assert_eq!(tc.prev.base, first, "no chunk was replaced on the way");
    for &s in &spans {
        unsafe { h.free_span_with(s, &mut tc) };
    }
    h.flush_heap_cache(&mut tc);
    check_counters(h, &[]);
    assert_eq!(checked_stats(h).page_cache_bytes, 0);
    assert_eq!(h.counters().heap_inuse, 0);
}

#[test]
fn chunk_cache_serves_medium_spans_without_the_lock() {
    let h = new_heap();
    let mut tc = HeapCache::new();
    let a = h.alloc_span_with(40, Purpose::Heap, 0, 1, &mut tc).unwrap();
    let base = unsafe { a.as_ref() }.base();
    assert!(tc.chunk.base != 0 && tc.chunk.contains(base, 40));
    let left = tc.chunk.count();
    assert!(left >= 100, "the chunk holds the rest of its free pages");
    unsafe { h.free_span_with(a, &mut tc) };
    assert_eq!(tc.chunk.count(), left + 40);
    // Hold the heap lock: a cached allocation must not need it.
    let mut g = h.locked.lock();
    let b = h
        .alloc_span_with(100, Purpose::Heap, 0, 1, &mut tc)
        .unwrap();
    let c = h.alloc_span_with(16, Purpose::Heap, 0, 1, &mut tc).unwrap();
    assert_eq!(unsafe { b.as_ref() }.base(), base, "first fit in the chunk");
    assert!(h.page_marked_in_use(base));
    unsafe {
        h.free_span_with(b, &mut tc);
        h.free_span_with(c, &mut tc);
    }
    g.with(|_| ());
    drop(g);
    // A block from the chunk grows in place into the cache's free pages, no lock.
    let gspan = h.alloc_span_with(20, Purpose::Heap, 0, 1, &mut tc).unwrap();
    assert_eq!(unsafe { gspan.as_ref() }.base(), base);
    let mut probe = tc.chunk;
    assert!(probe.take_range(base + 20 * PAGE_SIZE, 20).is_some());
    let mut g = h.locked.lock();
    assert!(unsafe { h.grow_span_in_place_with(gspan, 40, Some(&mut tc)) });
    g.with(|_| ());
    drop(g);
    assert_eq!(unsafe { gspan.as_ref() }.npages(), 40);
    assert!(h.span_of(base + 39 * PAGE_SIZE) == Some(gspan));
    unsafe { h.free_span_with(gspan, &mut tc) };
    let st = checked_stats(h);
    let held = tc.chunk.count() + tc.pages.cache.count_ones() as usize;
    assert_eq!(st.page_cache_bytes as usize, held * PAGE_SIZE);
    // A span too long for what is left takes a new chunk, the old one's pages go back.
    let spans: Vec<_> = (0..5)
        .map(|_| {
            h.alloc_span_with(128, Purpose::Heap, 0, 1, &mut tc)
                .unwrap()
        })
        .collect();
    let bases: Vec<usize> = spans.iter().map(|s| unsafe { s.as_ref() }.base()).collect();
    assert!(
        bases[4] >= base + CHUNK_SIZE_BYTES,
        "a fifth 1 MiB span needs a new chunk"
    );
    for s in spans {
        unsafe { h.free_span_with(s, &mut tc) };
    }
    h.flush_heap_cache(&mut tc);
    check_counters(h, &[]);
    let st = checked_stats(h);
    assert_eq!(st.page_cache_bytes, 0);
    assert_eq!(h.counters().heap_inuse, 0);
}

#[test]
fn page_cache_reuses_a_freed_span_without_the_lock() {
    let h = new_heap();
    let mut tc = HeapCache::new();
    let a = h.alloc_span_with(8, Purpose::Heap, 0, 1, &mut tc).unwrap();
    let base = unsafe { a.as_ref() }.base();
    let before = tc.pages;
    assert!(!before.is_empty());
    unsafe { h.free_span_with(a, &mut tc) };
    assert_eq!(tc.pages.cache.count_ones(), before.cache.count_ones() + 8);
    // Hold the heap lock: a cached allocation must not need it.
    let mut g = h.locked.lock();
    let b = h.alloc_span_with(8, Purpose::Heap, 0, 1, &mut tc).unwrap();
    g.with(|_| ());
    drop(g);
    assert_eq!(
        unsafe { b.as_ref() }.base(),
        base,
        "the same pages come back"
    );
    assert!(h.span_of(base).is_some());
    unsafe { h.free_span_with(b, &mut tc) };
    h.flush_heap_cache(&mut tc);
    check_counters(h, &[]);
    assert_eq!(checked_stats(h).page_cache_bytes, 0);
}

#[test]
fn a_scattered_page_block_is_traded_for_one_with_a_run() {
    let h = new_heap();
    let mut tc = HeapCache::new();
    // Fill the thread's block with one-page spans, then give every other one back
    // into it: 32 free pages, no two in a row.
    let spans: Vec<_> = (0..64)
        .map(|_| h.alloc_span_with(1, Purpose::Heap, 0, 1, &mut tc).unwrap())
        .collect();
    let old = tc.pages.base;
    assert!(spans
        .iter()
        .all(|s| tc.pages.contains(unsafe { s.as_ref() }.base(), 1)));
    let mut kept = Vec::new();
    for (i, s) in spans.into_iter().enumerate() {
        if i % 2 == 0 {
            unsafe { h.free_span_with(s, &mut tc) };
        } else {
            kept.push(s);
        }
    }
    assert_eq!(tc.pages.cache.count_ones(), 32);
    // A large block of two pages does not trade the block: it is allocated outside it.
    let big = h.alloc_span_with(2, Purpose::Heap, 0, 1, &mut tc).unwrap();
    assert_eq!(tc.pages.base, old);
    assert!(!tc.pages.contains(unsafe { big.as_ref() }.base(), 2));
    // A small-object span of several pages: the scattered block is traded for one
    // that can serve it, so that the thread's next spans need no lock either.
    let class = (1..NUM_CLASSES).find(|&c| CLASS_TO_NPAGES[c] > 1).unwrap();
    let n = usize::from(CLASS_TO_NPAGES[class]);
    let s = h
        .alloc_span_with(n, Purpose::Heap, class as u8, 1, &mut tc)
        .unwrap();
    let base = unsafe { s.as_ref() }.base();
    assert_ne!(tc.pages.base, old, "a new block");
    assert!(
        tc.pages.contains(base, n),
        "the span came from the new block"
    );
    assert_eq!(
        checked_stats(h).page_cache_bytes as usize,
        tc.pages.cache.count_ones() as usize * PAGE_SIZE
    );
    // The old block's free pages went back to the page allocator, which hands them out.
    let one = h.alloc_span(1, Purpose::Heap, 0, 1).unwrap();
    assert_eq!(
        unsafe { one.as_ref() }.base(),
        old,
        "first fit finds the old block's pages"
    );
    unsafe {
        h.free_span(one);
        h.free_span(big);
        h.free_span_with(s, &mut tc);
        for s in kept {
            h.free_span_with(s, &mut tc);
        }
    }
    h.flush_heap_cache(&mut tc);
    check_counters(h, &[]);
    assert_eq!(checked_stats(h).page_cache_bytes, 0);
    assert_eq!(h.counters().heap_inuse, 0);
}

#[test]
fn a_reclaimed_caches_kept_block_is_as_old_as_the_cache() {
    // A reclaimer flushes an idle thread's cache stamped with the time the thread last
    // used it; the large block the cache kept for reuse has been unused as long, so a
    // paced pass returns its pages at once instead of a delay later.
    let h = new_heap();
    h.scavenger.set_config(crate::ScavengerConfig {
        delay: Some(std::time::Duration::from_millis(100)),
        retain_percent: 0,
        background: false,
    });
    let mut tc = HeapCache::new();
    let s = h.alloc_span(64, Purpose::Heap, 0, 1).unwrap();
    let base = unsafe { s.as_ref() }.base();
    unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 64 * PAGE_SIZE) };
    tc.big = s.as_ptr();
    let now = crate::os::coarse_now_ns();
    let last_used = ((now / 1_000_000) as u32).wrapping_sub(500);
    h.flush_heap_cache_at(&mut tc, last_used);
    let (released, _) = h.scavenge(false, now, u64::MAX);
    assert!(
        released >= 64 * PAGE_SIZE,
        "the kept block's pages were stamped young: {released} B released"
    );
    check_counters(h, &[]);
}

#[test]
fn the_retained_headroom_is_a_share_of_the_heap_not_of_metadata() {
    // 100 pages of the allocator's own records and a 10-page heap: with a 50% headroom
    // a paced pass keeps 5 free pages committed, not 55.
    let h = new_heap();
    h.scavenger.set_config(crate::ScavengerConfig {
        delay: Some(std::time::Duration::from_millis(10)),
        retain_percent: 50,
        background: false,
    });
    let meta = h.alloc_span(100, Purpose::SpanRecords, 0, 1).unwrap();
    let live = h.alloc_span(10, Purpose::Heap, 0, 1).unwrap();
    let freed = h.alloc_span(40, Purpose::Heap, 0, 1).unwrap();
    let base = unsafe { freed.as_ref() }.base();
    unsafe { core::ptr::write_bytes(base as *mut u8, 0xCD, 40 * PAGE_SIZE) };
    unsafe { h.free_span(freed) };
    let later = crate::os::coarse_now_ns() + 10_000_000_000;
    let (released, _) = h.scavenge(false, later, u64::MAX);
    assert!(
        released >= 35 * PAGE_SIZE,
        "only {} of the 40 free pages went back",
        released / PAGE_SIZE
    );
    check_counters(h, &[(meta, Purpose::SpanRecords), (live, Purpose::Heap)]);
}

/// The tests' memory source (`TestMem`) under an address-space limit, as `RLIMIT_AS`
/// sets one: arena reservations (alignment of an arena or more) fail with `NoMemory`
/// once `budget` bytes of them are held; metadata reservations pass. Each arena
/// reservation is made between two guard reservations of its own that are never
/// released, so that no two are contiguous and a free run never crosses from one into
/// the next (a request longer than an arena cannot be served by adjacent free arenas).
/// A released arena's address is tried first by the next one-arena reservation, so
/// that the heap grows back into a range it gave away.
struct Budgeted {
    budget: usize,
    /// Arena reservations held: (base, bytes), split as arenas are released.
    held: std::sync::Mutex<Vec<(usize, usize)>>,
    /// Addresses of released arenas, not reserved again yet.
    released: std::sync::Mutex<Vec<usize>>,
    /// One-arena reservations that landed on a released arena's address.
    reused: std::sync::atomic::AtomicUsize,
}

impl Budgeted {
    fn new(budget: usize) -> Self {
        Budgeted {
            budget,
            held: std::sync::Mutex::new(Vec::new()),
            released: std::sync::Mutex::new(Vec::new()),
            reused: std::sync::atomic::AtomicUsize::new(0),
        }
    }
    fn held_bytes(&self) -> usize {
        self.held.lock().unwrap().iter().map(|r| r.1).sum()
    }
    /// Whether `[base, base + bytes)` lies inside an arena reservation held now.
    fn holds(&self, base: usize, bytes: usize) -> bool {
        self.held
            .lock()
            .unwrap()
            .iter()
            .any(|&(b, n)| base >= b && base + bytes <= b + n)
    }
}

// SAFETY: every call is forwarded to `TestMem`, or fails before it; a reservation
// handed out is a fresh one of `TestMem` (the guards around it stay reserved).
unsafe impl MemSource for Budgeted {
    fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError> {
        if align < ARENA_SIZE {
            return TestMem.reserve(size, align, hint);
        }
        if self.held_bytes() + size > self.budget {
            return Err(OsError::NoMemory(12));
        }
        if size == ARENA_SIZE && align == ARENA_SIZE {
            let again = self.released.lock().unwrap().pop();
            if let Some(r) = again {
                let p = TestMem.reserve(size, align, r)?;
                if p.as_ptr() as usize == r {
                    self.reused.fetch_add(1, Ordering::Relaxed);
                    self.held.lock().unwrap().push((r, size));
                    return Ok(p);
                }
                // Somebody else's mapping took the range: no reuse this time.
                // SAFETY: the reservation just made, unused.
                unsafe { TestMem.release(p, size) };
            }
        }
        let g = TestMem.reserve(size + 2 * align, align, 0)?;
        let base = g.as_ptr() as usize + align;
        self.held.lock().unwrap().push((base, size));
        // SAFETY: inside the reservation just made, so not null.
        Ok(unsafe { NonNull::new_unchecked(base as *mut u8) })
    }
    unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.map(ptr, size) }
    }
    unsafe fn commit(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.commit(ptr, size) }
    }
    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.decommit(ptr, size) }
    }
    fn decommit_zeroes(&self) -> bool {
        TestMem.decommit_zeroes()
    }
    unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
        let base = ptr.as_ptr() as usize;
        {
            let mut held = self.held.lock().unwrap();
            if let Some(i) = held
                .iter()
                .position(|&(b, n)| base >= b && base + size <= b + n)
            {
                let (b, n) = held.swap_remove(i);
                if base > b {
                    held.push((b, base - b));
                }
                if base + size < b + n {
                    held.push((base + size, b + n - base - size));
                }
                if size == ARENA_SIZE {
                    self.released.lock().unwrap().push(base);
                }
            }
        }
        // SAFETY: forwarded from our caller.
        unsafe { TestMem.release(ptr, size) }
    }
}

/// Issue 26: a heap filled to an address-space limit and then freed must serve a
/// request longer than any of its free runs, by giving its wholly free arenas back to
/// the OS and growing again; nothing released is handed out before it is reserved
/// again, and the counters stay consistent throughout.
#[test]
#[cfg_attr(miri, ignore = "reserves hundreds of MiB of address space")]
fn a_freed_heap_gives_arenas_back_when_growth_is_refused() {
    let h: &MHeap<Budgeted> = Box::leak(Box::new(MHeap::new(Budgeted::new(4 * ARENA_SIZE))));
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Every live span lies in an arena the memory source holds now, no two overlap,
    // and each page still carries the tag written when the span was handed out.
    let check_live = |live: &[(NonNull<MSpan>, Purpose)]| {
        let mut ranges: Vec<(usize, usize)> = live
            .iter()
            .map(|(s, _)| {
                let span = unsafe { s.as_ref() };
                (span.base(), span.npages() * PAGE_SIZE)
            })
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "spans overlap: {w:x?}");
        }
        for &(b, n) in &ranges {
            assert!(
                h.mem.holds(b, n),
                "span {b:#x}+{n:#x} outside the held arenas"
            );
            for p in (b..b + n).step_by(PAGE_SIZE) {
                assert_eq!(unsafe { *(p as *const usize) }, p, "page {p:#x} was reused");
            }
        }
    };
    let take = |live: &mut Vec<(NonNull<MSpan>, Purpose)>, npages: usize| -> bool {
        let Some(s) = h.alloc_span(npages, Purpose::Heap, 0, 1) else {
            return false;
        };
        let span = unsafe { s.as_ref() };
        let (b, n) = (span.base(), span.npages() * PAGE_SIZE);
        let fresh = !unsafe { span.info() }.needzero;
        for p in (b..b + n).step_by(PAGE_SIZE) {
            if fresh {
                // Zero from the OS (a regrown arena's pages included): needzero is
                // false only for memory known to be zero.
                assert_eq!(unsafe { *((p + PAGE_SIZE - 8) as *const usize) }, 0);
            }
            unsafe { *(p as *mut usize) = p };
        }
        live.push((s, Purpose::Heap));
        true
    };

    // 1. Fill to the limit with spans of 8 KiB .. 3 MiB. A refused growth with every
    //    arena in use gives nothing back.
    let mut live = Vec::new();
    while take(&mut live, 1 + (next() % 384) as usize) {}
    assert!(live.len() > 50);
    assert_eq!(h.counters().arena_bytes, (4 * ARENA_SIZE) as u64);
    assert_eq!(
        checked_stats(h).unmapped_bytes,
        0,
        "arenas in use were given back"
    );
    check_live(&live);
    check_counters(h, &live);

    // 2. Free everything. The largest free run is now at most an arena (reservations
    //    are apart), so 100 MiB needs a growth the limit refuses, until the heap gives
    //    its free arenas back.
    for (s, _) in live.drain(..) {
        unsafe { h.free_span(s) };
    }
    check_counters(h, &live);
    let before = checked_stats(h);
    let big_pages = (100 << 20) / PAGE_SIZE;
    assert!(
        take(&mut live, big_pages),
        "100 MiB after freeing a full heap"
    );
    check_live(&live);
    check_counters(h, &live);
    let after = checked_stats(h);
    let c = h.counters();
    assert!(
        after.unmapped_bytes >= 2 * ARENA_SIZE as u64,
        "{} bytes unmapped",
        after.unmapped_bytes
    );
    assert_eq!(
        c.arena_bytes,
        before.arena_bytes - after.unmapped_bytes + 2 * ARENA_SIZE as u64
    );
    assert_eq!(c.arena_bytes, h.mem.held_bytes() as u64);
    assert_eq!(after.arena_bytes, c.arena_bytes);
    assert!(c.arena_bytes <= (4 * ARENA_SIZE) as u64);

    // 3. Fill again: the heap grows back (into a released range where the OS allows),
    //    and no page is handed out twice.
    while take(&mut live, 1 + (next() % 384) as usize) {}
    check_live(&live);
    check_counters(h, &live);
    assert_eq!(h.counters().arena_bytes, h.mem.held_bytes() as u64);
    if h.mem.reused.load(Ordering::Relaxed) == 0 {
        std::eprintln!("note: no arena was grown again at a released address");
    }
    for (s, _) in live.drain(..) {
        unsafe { h.free_span(s) };
    }
    check_counters(h, &live);
    // Everything free: the whole limit is at hand again for one request.
    assert!(
        take(&mut live, 3 * ARENA_SIZE / PAGE_SIZE - 8),
        "three arenas"
    );
    check_live(&live);
    check_counters(h, &live);
    for (s, _) in live.drain(..) {
        unsafe { h.free_span(s) };
    }
    check_counters(h, &live);
}
