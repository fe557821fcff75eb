use super::*;
use crate::os::TestMem;
use crate::sizeclasses::CLASS_TO_NOBJS;

/// `spans` spans' worth of class `class` objects from cache `c`.
fn fill(h: &Heap<TestMem>, c: *mut MCache, class: usize, spans: usize) -> Vec<*mut u8> {
    let n = CLASS_TO_NOBJS[class] as usize * spans;
    let objs: Vec<*mut u8> = (0..n).map(|_| unsafe { alloc_from(h, c, class) }).collect();
    assert!(objs.iter().all(|p| !p.is_null()));
    objs
}

/// A heap of its own for one test.
fn test_heap() -> &'static Heap<TestMem> {
    Box::leak(Box::new(Heap::new(TestMem)))
}

/// Frees `objs`, live objects of class `class`, through cache `c`, in order.
fn free_all<'a>(
    h: &Heap<TestMem>,
    c: *mut MCache,
    class: usize,
    objs: impl IntoIterator<Item = &'a *mut u8>,
) {
    for &p in objs {
        let s = NonNull::new(h.span_of_unchecked(p as usize)).unwrap();
        unsafe { free_to(h, c, p, s, class) };
    }
}

/// Frees the objects of `objs` whose index passes `free` through cache `c` and gives
/// the cache's spans back (`release_all`), so that they sit in the partial list with
/// `c` as their last owner.
fn free_and_release(
    h: &Heap<TestMem>,
    c: *mut MCache,
    class: usize,
    objs: &[*mut u8],
    free: impl Fn(usize) -> bool,
) {
    let chosen = objs.iter().enumerate().filter(|&(i, _)| free(i));
    free_all(h, c, class, chosen.map(|(_, p)| p));
    unsafe { release_all(h, c) };
}

#[test]
fn scaled_limits_fit_the_share() {
    let bytes = |t: &[u16; NUM_CLASSES]| -> usize {
        (1..NUM_CLASSES)
            .map(|c| t[c] as usize * CLASS_TO_SIZE[c] as usize)
            .sum()
    };
    println!("full stacks {FULL_STACK_BYTES} B, floor {FLOOR_STACK_BYTES} B");
    let full = scaled_limits(FULL_STACK_BYTES);
    assert!((1..NUM_CLASSES).all(|c| u32::from(full[c]) == FREE_LIMIT[c]));
    assert_eq!(bytes(&full), FULL_STACK_BYTES);
    for share in [
        FLOOR_STACK_BYTES,
        1 << 20,
        4 << 20,
        16 << 20,
        FULL_STACK_BYTES - 1,
    ] {
        let t = scaled_limits(share);
        assert!(bytes(&t) <= share, "share {share}: {} B", bytes(&t));
        assert!((1..NUM_CLASSES).all(|c| t[c] >= 1 && u32::from(t[c]) <= FREE_LIMIT[c]));
        // Not needlessly small: at least half the share is used.
        assert!(
            bytes(&t) * 2 >= share,
            "share {share}: only {} B",
            bytes(&t)
        );
    }
    let tiny = scaled_limits(1000);
    assert!((1..NUM_CLASSES).all(|c| tiny[c] == 1));
    assert_eq!(bytes(&tiny), FLOOR_STACK_BYTES);
}

#[test]
fn a_local_free_leaves_the_object_alone() {
    // The local free list is a stack of pointers: a free writes nothing into the
    // object (a list linked through the objects would overwrite its first word),
    // the next allocation of the class hands it back, and a flush past the limit
    // loses nothing.
    let h = test_heap();
    let c = MCache::leaked();
    let class = 5;
    let size = CLASS_TO_SIZE[class] as usize;
    let p = unsafe { alloc_from(h, c, class) };
    unsafe { p.write_bytes(0xA5, size) };
    free_all(h, c, class, [&p]);
    // SAFETY: the object is still heap memory of ours (it sits on the stack).
    let bytes = unsafe { core::slice::from_raw_parts(p, size) };
    assert!(
        bytes.iter().all(|&b| b == 0xA5),
        "the free wrote into the object"
    );
    assert_eq!(unsafe { alloc_from(h, c, class) }, p);
    // Past the limit: every object comes back exactly once.
    let limit = FREE_LIMIT[class] as usize;
    let objs: Vec<*mut u8> = (0..limit * 2)
        .map(|_| unsafe { alloc_from(h, c, class) })
        .collect();
    free_all(h, c, class, &objs);
    assert!(unsafe { entry(c, class) }.nfree as usize <= limit);
    let mut again: Vec<*mut u8> = (0..limit * 2)
        .map(|_| unsafe { alloc_from(h, c, class) })
        .collect();
    again.sort();
    again.dedup();
    assert_eq!(again.len(), limit * 2, "an object was handed out twice");
    unsafe { release_all(h, c) };
}

#[test]
fn an_exhausted_span_is_exchanged_for_a_partial_one_in_one_step() {
    // A cache whose span is exhausted gives it back and takes the next in one hold
    // of the mcentral lock (`exchange_span`): the old span must land in the full
    // list, and the new one be the partial span this cache owned last, not a
    // fresh one.
    let h = test_heap();
    let (c, other) = (MCache::leaked(), MCache::leaked());
    let class = 5;
    let n = CLASS_TO_NOBJS[class] as usize;
    let objs = fill(h, c, class, 2);
    let span = |p: *mut u8| h.span_of_unchecked(p as usize);
    let (a, b) = (span(objs[0]), span(objs[n]));
    assert_ne!(a, b);
    assert!(objs[..n].iter().all(|&p| span(p) == a));
    // Span A was given up full when B was taken; B is exhausted but still cached.
    assert_eq!(h.central[class].census(), (0, 1, 0, 0));
    // Another thread frees half of A: announced, A becomes partial (last owner c).
    let half: Vec<*mut u8> = objs[..n].iter().step_by(2).copied().collect();
    free_all(h, other, class, &half);
    unsafe { release_all(h, other) };
    let (partial, full, _, _) = h.central[class].census();
    assert_eq!((partial, full), (1, 0));
    // The next allocation exchanges B for A.
    let p = unsafe { alloc_from(h, c, class) };
    assert_eq!(span(p), a, "the partial span owned last was not taken");
    assert!(half.contains(&p));
    assert_eq!(
        h.central[class].census(),
        (0, 1, 0, 0),
        "the exhausted span was not given back as full"
    );
    unsafe { release_all(h, c) };
}

#[test]
fn spans_other_threads_empty_are_kept_as_spares() {
    // Six full 8 KiB spans of 16-byte objects, given up by cache `c`, then emptied
    // by another thread's frees: each last free announces its span, the drain
    // retires it, and 32 KiB of them (four) are kept for the class's refills; the
    // rest go back to the page heap. A refill takes a spare, not a fresh span.
    let h = test_heap();
    let (c, other) = (MCache::leaked(), MCache::leaked());
    let class = 2;
    let objs = fill(h, c, class, 6);
    unsafe { release_all(h, c) };
    assert_eq!(h.central[class].census(), (0, 6, 0, 0));
    let inuse = h.counters().heap_inuse;
    free_all(h, other, class, &objs);
    unsafe { release_all(h, other) };
    assert_eq!(h.central[class].census(), (0, 0, 4, 0));
    let page = crate::os::PAGE_SIZE as u64;
    assert_eq!(
        inuse - h.counters().heap_inuse,
        2 * page,
        "two spans retired"
    );
    let spares: Vec<usize> = objs
        .iter()
        .map(|&p| h.span_of_unchecked(p as usize) as usize)
        .collect();
    let p = unsafe { alloc_from(h, c, class) };
    assert!(spares.contains(&(h.span_of_unchecked(p as usize) as usize)));
    assert_eq!(h.central[class].census().2, 3);
    free_all(h, c, class, [&p]);
    unsafe { release_all(h, c) };
}

#[test]
fn a_push_past_the_limit_returns_three_quarters() {
    // The push that takes a stack past its limit returns all but a quarter of the
    // limit to the spans, in one hold of the mcentral lock (`FLUSH_CHUNK`): for the
    // 16-byte class, 3,072 objects. The spans no cache owns get them straight into
    // their alloc bitmaps, so they show as free in the mcentral's census.
    let h = test_heap();
    let c = MCache::leaked();
    let class = 2;
    let limit = FREE_LIMIT[class] as usize;
    assert_eq!(limit, MAX_FREE_LIMIT as usize);
    let per_span = CLASS_TO_NOBJS[class] as usize;
    // Whole spans, and one object of the next, which the cache then owns: every
    // earlier span went to the mcentral's full list.
    let objs: Vec<*mut u8> = (0..limit + 1)
        .map(|_| unsafe { alloc_from(h, c, class) })
        .collect();
    assert_eq!((limit + 1) % per_span, 1);
    assert_eq!(h.central[class].census().3, 0, "full spans");
    // Oldest first: the flush returns the most recently freed, which (but for the
    // last, of the current span) lie in spans the mcentral holds.
    free_all(h, c, class, &objs);
    let kept = unsafe { entry(c, class) }.nfree as usize;
    assert_eq!(kept, limit / 4 + 1);
    // objs[1025..4097] went back: spans 0 and 1 stay full, span 2 has its last 511
    // objects free, spans 3..7 are completely free (one kept as the spare, the rest
    // retired: this thread emptied them), and the current span's object took the
    // remote path.
    assert_eq!((kept, per_span), (1025, 512));
    assert_eq!(
        h.central[class].census(),
        (1, 2, 1, 511),
        "(partial, full, spare, free objects in listed spans)"
    );
    unsafe { release_all(h, c) };
    let (partial, full, spares, free) = h.central[class].census();
    assert_eq!((partial, full, free), (0, 0, 0), "every span retired");
    // `release_memory` gives the spares back to the page heap.
    let inuse = h.counters().heap_inuse;
    assert_eq!(h.release_spares(), spares);
    assert_eq!(h.central[class].census(), (0, 0, 0, 0));
    assert_eq!(
        inuse - h.counters().heap_inuse,
        (spares * crate::os::PAGE_SIZE) as u64,
        "the spares' pages are not free"
    );
}

#[test]
fn a_cache_takes_back_a_span_it_owned_last() {
    // Cache A's and then cache B's partial spans sit in the mcentral, B's nearer
    // the head. A's next refill must take one of A's own spans (whose live objects
    // A holds), not B's: two threads trading spans turn each other's frees into
    // remote frees.
    let h = test_heap();
    let a = MCache::leaked();
    let b = MCache::leaked();
    let class = 5;
    let span_of = |p: usize| h.span_of_unchecked(p) as usize;
    let (a_objs, b_objs) = (fill(h, a, class, 3), fill(h, b, class, 3));
    let a_spans: Vec<usize> = a_objs.iter().map(|&p| span_of(p as usize)).collect();
    let b_spans: Vec<usize> = b_objs.iter().map(|&p| span_of(p as usize)).collect();
    assert!(a_spans.iter().all(|s| !b_spans.contains(s)));
    free_and_release(h, a, class, &a_objs, |i| i % 2 == 0);
    free_and_release(h, b, class, &b_objs, |i| i % 2 == 0);
    let p = unsafe { alloc_from(h, a, class) };
    assert!(!p.is_null());
    assert!(
        a_spans.contains(&span_of(p as usize)),
        "cache A was handed a span it never owned (B's: {})",
        b_spans.contains(&span_of(p as usize))
    );
    let p = unsafe { alloc_from(h, b, class) };
    assert!(
        b_spans.contains(&span_of(p as usize)),
        "and B one of its own"
    );
    unsafe {
        release_all(h, a);
        release_all(h, b);
    }
}

#[test]
fn many_caches_each_take_back_their_own_spans() {
    // Sixteen caches leave four partly free spans each in the mcentral, one cache
    // after the other. Each must get one of its own back: in a single partial list
    // the first caches' spans would lie 48 deep, past any bounded search for one's
    // own, and they would be handed fresh spans (or others') while theirs waited.
    let h = test_heap();
    let class = 5;
    let span_of = |p: usize| h.span_of_unchecked(p) as usize;
    let caches: Vec<*mut MCache> = (0..16).map(|_| MCache::leaked()).collect();
    let mut owned: Vec<Vec<usize>> = Vec::new();
    for &c in &caches {
        let objs = fill(h, c, class, 4);
        owned.push(objs.iter().map(|&p| span_of(p as usize)).collect());
        // A third free: too little for the later caches to take them.
        free_and_release(h, c, class, &objs, |i| i % 3 == 0);
    }
    let (partial, _, _, _) = h.central[class].census();
    assert_eq!(partial, 64);
    for (i, &c) in caches.iter().enumerate() {
        let p = unsafe { alloc_from(h, c, class) };
        assert!(
            owned[i].contains(&span_of(p as usize)),
            "cache {i} got a span not its own"
        );
    }
    for &c in &caches {
        unsafe { release_all(h, c) };
    }
    h.central[class].census();
}

#[test]
fn another_caches_span_is_taken_only_when_mostly_free() {
    // Cache A leaves spans in the mcentral with a quarter of their objects free
    // (class 5) and with three quarters free (class 6). A cache that owned none of
    // them gets a fresh span of class 5 (taking one would make A's frees of the
    // live three quarters remote) but reuses one of A's class 6 spans (few live
    // objects: the memory is worth more than the locality).
    let h = test_heap();
    let a = MCache::leaked();
    let b = MCache::leaked();
    let span_of = |p: usize| h.span_of_unchecked(p) as usize;
    // (class, whether A frees its object i, whether B reuses one of A's spans)
    type Case = (usize, fn(usize) -> bool, bool);
    let cases: [Case; 2] = [(5, |i| i % 4 == 0, false), (6, |i| i % 4 != 0, true)];
    for (class, free, reused) in cases {
        let objs = fill(h, a, class, 3);
        let a_spans: Vec<usize> = objs.iter().map(|&p| span_of(p as usize)).collect();
        free_and_release(h, a, class, &objs, free);
        let (partial, _, _, _) = h.central[class].census();
        assert!(
            partial >= 3,
            "A's spans are not in the partial list ({partial})"
        );
        let p = unsafe { alloc_from(h, b, class) };
        assert!(!p.is_null());
        assert_eq!(
            a_spans.contains(&span_of(p as usize)),
            reused,
            "class {class}: whether B took one of A's spans"
        );
    }
    unsafe {
        release_all(h, a);
        release_all(h, b);
    }
}

/// Wide mode's range (`set_span`) takes every address but the heap profile's sampled
/// blocks, whose frees must reach the slow path that counts them.
#[test]
fn wide_range_takes_every_address_but_the_sampled_blocks() {
    let e = ClassCache {
        span_base: 0x00a0 << 32,
        range_base: WIDE_BASE,
        span_len: WIDE_LEN,
        ..EMPTY_CLASS
    };
    let takes = |p: usize| p.wrapping_sub(e.range_base) < e.span_len;
    let (end, size) = (
        crate::mheap::SAMPLED_BLOCKS_END,
        crate::mheap::SAMPLED_BLOCKS_SIZE,
    );
    for p in [
        0x1000,
        end,
        end + (64 << 20),
        end - size - 16,
        0x7fff_ffff_f000,
    ] {
        assert!(takes(p), "{p:#x}");
    }
    for p in [end - size, end - 16, end - size / 2] {
        assert!(!takes(p), "{p:#x}");
    }
    assert!(is_wide(&e));
}

/// The tick counts every take, from the stack or the window; the stack pops derived
/// from it (`tick.rs`) count only the stack's, through window loads, a countdown being
/// set and a window dropped unused, and the countdown runs out at the take it names.
#[test]
fn the_tick_yields_the_stack_pops_and_the_countdown() {
    let h = test_heap();
    let c = MCache::leaked();
    let class = 5;
    let pending = || unsafe { tick::pending_pops(c, entry(c, class), class) };
    // Ten objects from the first window (its load published nothing): no pops.
    let objs: Vec<*mut u8> = (0..10)
        .map(|_| unsafe { alloc_from(h, c, class) })
        .collect();
    assert_eq!(pending(), 0);
    // Four freed to the stack, three taken back: three pops.
    free_all(h, c, class, &objs[..4]);
    let back: Vec<*mut u8> = (0..3).map(|_| unsafe { alloc_from(h, c, class) }).collect();
    assert_eq!(pending(), 3);
    // A countdown of five takes leaves the pops alone; the fifth take runs it out.
    #[cfg(feature = "profile")]
    {
        unsafe { tick::set_tick(c, class, 5u64.wrapping_neg()) };
        assert_eq!(pending(), 3);
        let outs: Vec<bool> = (0..6)
            .map(|_| {
                let mut out = false;
                let p = unsafe {
                    take_then(c, class, true, |p| {
                        out = true;
                        p
                    })
                };
                assert!(!p.is_null());
                out
            })
            .collect();
        // The first take pops the stack's last object, the others come from the
        // window; a countdown not reset stays run out.
        assert_eq!(outs, [false, false, false, false, true, true]);
        assert_eq!(pending(), 4);
    }
    // Publishing takes the pops; dropping the window's unused objects keeps it at 0.
    let want = pending();
    assert_eq!(want, if cfg!(feature = "profile") { 4 } else { 3 });
    assert_eq!(unsafe { tick::take_pops(c, entry(c, class), class) }, want);
    assert_eq!(pending(), 0);
    unsafe { release_classes(h, c) };
    assert_eq!(pending(), 0);
    let _ = back;
}
