//! The small-object path under cross-thread frees and thread churn: memory is reused,
//! spans of exited threads are retired, and nothing is stranded in the mcentrals.

mod common;

use common::{exclusive, inuse};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

/// Spans listed in the mcentrals and the free objects in them.
fn stranded() -> (usize, usize) {
    spanheap::__private::central_census()
        .iter()
        .fold((0, 0), |a, c| (a.0 + c.1 + c.2, a.1 + c.4))
}

/// Whatever sits in the mcentrals has free objects (partial) or is a spare: no span is
/// left full of objects that were all freed.
fn assert_nothing_stranded() {
    let (spans, free) = stranded();
    assert!(
        spans <= 16 && (spans == 0 || free > 0),
        "{spans} listed spans with {free} free objects"
    );
}

#[test]
fn producer_consumer_memory_is_reused() {
    let _g = exclusive();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Box<[u8; 64]>>>(16);
    let prod = std::thread::spawn(move || {
        for b in 0..10_000u32 {
            let v: Vec<Box<[u8; 64]>> = (0..100u32)
                .map(|i| Box::new([(b * 100 + i) as u8; 64]))
                .collect();
            tx.send(v).unwrap();
        }
    });
    let (mut n, mut max) = (0u32, 0);
    for v in rx {
        for bx in v {
            assert!(bx.iter().all(|&x| x == n as u8), "object {n} corrupted");
            n += 1;
        }
        max = max.max(inuse());
    }
    prod.join().unwrap();
    assert_eq!(n, 1_000_000);
    // A million 64-byte objects went through; the steady footprint is a few spans.
    assert!(max < 8 << 20, "in-use peaked at {max} bytes");
}

#[test]
fn exited_threads_spans_retire_when_others_free_their_objects() {
    let _g = exclusive();
    let before = inuse();
    for _ in 0..100 {
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let keep: Vec<Box<u64>> = (0..50).map(|i| Box::new(i * t)).collect();
                    let tmp: Vec<String> = (0..100).map(|i| i.to_string()).collect();
                    let big = vec![7u8; 2400]; // a class with 3 objects per span
                    assert!(
                        tmp.iter().enumerate().all(|(i, s)| *s == i.to_string()) && big[2399] == 7
                    );
                    keep
                })
            })
            .collect();
        // The threads have exited; their objects are freed here, on another thread.
        for (t, h) in hs.into_iter().enumerate() {
            let keep = h.join().unwrap();
            assert!(keep.iter().enumerate().all(|(i, b)| **b == (i * t) as u64));
        }
    }
    let after = inuse();
    assert!(
        after <= before + (1 << 20),
        "in-use grew from {before} to {after}"
    );
    assert_nothing_stranded();
}

#[test]
fn scattered_drops_return_objects_to_their_spans() {
    // 100,000 small objects freed in a shuffled order (a dropped hash map): the local
    // free list overflows and is flushed mostly into spans no cache owns, under the
    // mcentral lock. Every object must come back to its span exactly once: with one in
    // seven kept, the spans stay listed with exactly the others free; once the rest go
    // too, the spans retire (in-use falls back), and the next round reuses the memory.
    let _g = exclusive();
    let mut rng = common::Rng(5);
    let before = inuse();
    let mut peak = 0;
    for round in 0..3u64 {
        let mut v: Vec<Box<[u64; 3]>> = (0..100_000u64).map(|i| Box::new([i, round, !i])).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        peak = peak.max(inuse());
        let (free0, mut kept, mut dropped) = (stranded().1, Vec::new(), 0);
        for b in v {
            assert_eq!((b[1], b[2]), (round, !b[0]), "object {} corrupted", b[0]);
            if b[0] % 7 == 0 {
                kept.push(b);
            } else {
                dropped += 1;
            }
        }
        spanheap::flush_thread_cache();
        // Every dropped object is a free object of a listed span now (its span kept a
        // live one), give or take the spans still cached when the objects left.
        let free = stranded().1 - free0;
        assert!(
            free >= dropped - dropped / 20 && free <= dropped + 1_000,
            "round {round}: {free} free objects listed after dropping {dropped}"
        );
        for b in kept {
            assert_eq!((b[1], b[2]), (round, !b[0]), "object {} corrupted", b[0]);
        }
        spanheap::flush_thread_cache();
        let after = inuse();
        assert!(
            after <= before + (1 << 20),
            "round {round}: in-use {after} after the drop, {before} before"
        );
        let s = spanheap::stats();
        assert!(s.check().is_ok(), "{:?}", s.check());
    }
    // 100,000 x 24 B is 2.4 MB; rounds 2 and 3 reuse what round 1 returned.
    assert!(peak < before + (4 << 20), "in-use peaked at {peak}");
    assert_nothing_stranded();
}

#[test]
fn a_thread_that_only_frees_gets_a_cache() {
    // A consumer that frees other threads' objects before it ever allocates gets a
    // cache at its first free, so its frees are batched in the remote buffer instead of
    // paying a locked statistics section each. The thread is a bare pthread: std's
    // thread start-up allocates before the closure runs.
    struct Work {
        // Boxed on purpose: each object is a separate allocation to free remotely.
        #[allow(clippy::vec_box)]
        objs: Vec<Box<[u64; 4]>>,
        before: bool,
        after: bool,
    }
    extern "C" fn consumer(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the `Work` the test keeps alive until the join.
        let w = unsafe { &mut *arg.cast::<Work>() };
        w.before = spanheap::__private::thread_has_cache();
        // Frees only: popping moves the box out without allocating.
        let first = w.objs.pop();
        drop(first);
        w.after = spanheap::__private::thread_has_cache();
        while let Some(b) = w.objs.pop() {
            drop(b);
        }
        std::ptr::null_mut()
    }
    let _g = exclusive();
    let mut w = Work {
        objs: (0..1000u64).map(|i| Box::new([i; 4])).collect(),
        before: true,
        after: false,
    };
    // SAFETY: a zeroed pthread_t is a valid out-parameter; `w` outlives the thread,
    // which is joined below.
    unsafe {
        let mut t: libc::pthread_t = std::mem::zeroed();
        let arg = (&mut w as *mut Work).cast();
        assert_eq!(
            libc::pthread_create(&mut t, std::ptr::null(), consumer, arg),
            0
        );
        assert_eq!(libc::pthread_join(t, std::ptr::null_mut()), 0);
    }
    assert!(!w.before, "the thread had a cache before its first free");
    assert!(w.after, "the thread has no cache after its first free");
    assert!(w.objs.is_empty());
}

#[test]
fn wide_mode_follows_whose_objects_a_thread_frees() {
    // A thread that frees what it allocated has the class in wide mode (its frees skip
    // the span-map lookup); once it frees many objects of another thread's spans, the
    // flush that returns them sees it and the class leaves wide mode (so a consumer
    // does not pin a producer's spans); after a stretch of its own objects again, the
    // class is back in wide mode. The objects keep their contents throughout.
    const N: usize = 6_000;
    let _g = exclusive();
    std::thread::spawn(|| {
        let own = |round: u8| {
            let v: Vec<Box<[u8; 48]>> = (0..N).map(|i| Box::new([i as u8 ^ round; 48])).collect();
            assert!(v
                .iter()
                .enumerate()
                .all(|(i, b)| b.iter().all(|&x| x == i as u8 ^ round)));
        };
        own(1);
        own(2);
        assert!(
            spanheap::__private::thread_class_wide(48),
            "a thread freeing its own objects stays on the owner test"
        );
        // Objects allocated by another thread, freed here.
        let theirs: Vec<Box<[u8; 48]>> =
            std::thread::spawn(|| (0..N).map(|i| Box::new([i as u8 ^ 0x5a; 48])).collect())
                .join()
                .unwrap();
        assert!(theirs
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == i as u8 ^ 0x5a)));
        drop(theirs);
        assert!(
            !spanheap::__private::thread_class_wide(48),
            "freeing another thread's objects did not leave wide mode"
        );
        for round in 3..8 {
            own(round);
        }
        assert!(
            spanheap::__private::thread_class_wide(48),
            "wide mode did not come back"
        );
    })
    .join()
    .unwrap();
    assert_nothing_stranded();
}
