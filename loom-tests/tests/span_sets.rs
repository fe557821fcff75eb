//! The mcentral's span sets (`mcentral.rs`, the real code): the partial and full lists
//! under the mcentral lock, and the lock-free pending stack through which remote frees
//! announce spans (`announce`, `push_pending`, `try_drain`, `drain_locked`,
//! `settle_locked`, and the flush's `announce_deferred` with one `try_drain`).
//!
//! Size class 12,288 B: two objects per 3-page span, so a span fills and empties in
//! two operations. Set-up (one thread) allocates four objects through a cache and
//! releases it: spans X = {x0, x1} and Y = {y0, y1} are on the full list, every object
//! live. Then, concurrently:
//!
//! - thread 1 frees x0 and x1 as a cache-less thread (remote frees): the first announces
//!   X (full -> partial), the second frees X's last object (X is retired or becomes the
//!   spare, through whichever thread drains);
//! - thread 2 frees y0 the same way (announces Y);
//! - the main thread's cache allocates one object, taking the mcentral lock to refill
//!   (draining announcements before and after): it takes X or Y from the partial list,
//!   or the spare, or grows the heap with a new span.
//!
//! Checks: no object handed out while live; after the threads, every span is where its
//! state says and the mcentral lists hold exactly the unowned live spans (no
//! announcement left on the pending stack, no span lost or listed twice, heap in use
//! exactly the live spans, see `loom_tests::settled`); after freeing the rest and
//! releasing the cache, only the spare is left.
//!
//! A second variant (`Frees::Batched`) has thread 1 free x0 and y0 through a cache's
//! remote buffer instead: one flush announces X and Y (two pushes) and tries the lock
//! once, after the last push, and thread 2 frees x1.
//!
//! Mutants it must catch: `drain_fence` (the SeqCst fence of the pending hand-off
//! weakened to AcqRel: an announcement pushed while the lock is held is left behind),
//! `pending_push_relaxed` (the pending stack's push Relaxed: the drainer can read a
//! stale link and lose a span) and `rstate_cas_relaxed` (see `thread_exit.rs`); the
//! batched variant the same three and `batch_no_drain` (the flush's `try_drain` after
//! its announcements left out: they wait for the next lock holder, who may never come).
#![cfg(spanheap_loom)]

use std::sync::Arc;

use loom_tests::{alloc_objects, check, settled, spawn, Objects, Settled, TestMem};
use spanheap::__private::{class_for_size, objects_per_span, PageHeap};

const SIZE: usize = 12288;
const NPAGES: usize = 3;

/// How thread 1 frees: `Cacheless` frees x0 and x1 one by one as a cache-less thread
/// (each announcement pushes and tries the lock); `Batched` frees x0 and y0 through a
/// cache whose remote buffer holds two, so that one flush announces X and Y (two pushes)
/// and tries the lock once, after both (`remote_free_objs`); thread 2 then frees x1
/// instead of y0.
#[derive(Clone, Copy, PartialEq)]
enum Frees {
    Cacheless,
    Batched,
}

fn model(frees: Frees) {
    let class = class_for_size(SIZE);
    assert_eq!(objects_per_span(class), 2);
    // The thread with a cache has its own statistics writer, as in the process-wide
    // heap (cache-less frees here count nothing).
    let heap = Arc::new(PageHeap::with_thread_writers(TestMem::fresh()));
    heap.stats_writer().bind();
    let objs = Arc::new(Objects::new(8));

    // Set-up: X and Y full and unowned.
    let mut setup = heap.new_cache();
    let o = alloc_objects(&mut setup, class, &objs, 4);
    setup.release();
    let (x0, x1, y0, y1) = (o[0], o[1], o[2], o[3]);
    assert_eq!(x1 - x0, SIZE);
    assert_eq!(y1 - y0, SIZE);
    let full = Settled {
        full: 2,
        ..Settled::default()
    };
    // SAFETY: no other thread exists yet.
    assert_eq!(unsafe { settled(&heap, class, NPAGES, &o) }, full);

    let (h, ob) = (heap.clone(), objs.clone());
    let t1 = spawn(move || match frees {
        Frees::Cacheless => {
            for p in [x0, x1] {
                ob.freeing(p as *mut u8, 1);
                // SAFETY: a live object of the class, freed once.
                unsafe { h.free_cacheless(p as *mut u8, class) };
            }
        }
        Frees::Batched => {
            let mut c = h.new_cache();
            for p in [x0, y0] {
                ob.freeing(p as *mut u8, 1);
                // SAFETY: as above; neither span is this cache's: both go on its remote
                // buffer, flushed at the second.
                unsafe { c.free(p as *mut u8, class) };
            }
            // Nothing left to give back but the record (the buffer was flushed).
            c.release();
        }
    });
    let (h, ob) = (heap.clone(), objs.clone());
    let t2 = spawn(move || {
        let p = if frees == Frees::Batched { x1 } else { y0 };
        ob.freeing(p as *mut u8, 2);
        // SAFETY: as above.
        unsafe { h.free_cacheless(p as *mut u8, class) };
    });

    let mut c = heap.new_cache();
    let b = c.alloc(class);
    objs.allocated(b, 3);

    t1.join().unwrap();
    t2.join().unwrap();
    let mut addrs = o.clone();
    addrs.push(b as usize);
    // SAFETY: the other threads are done.
    let s = unsafe { settled(&heap, class, NPAGES, &addrs) };
    assert_eq!(s.owned, 1, "{s:?}");
    // X, Y and perhaps a new span: X is retired, the spare, or owned; Y partial or owned.
    assert!(s.spans() <= 3, "{s:?}");

    // Free what is live (y1 through the cache-less path, b through the cache), give the
    // cache back: every span empties; one is kept as the spare. (Y's last free is a
    // remote one in both variants: it had one object freed by thread 1 or 2.)
    let live = objs.live();
    assert_eq!(live.len(), 2, "{live:?}");
    objs.freeing(y1 as *mut u8, 4);
    // SAFETY: live, freed once.
    unsafe { heap.free_cacheless(y1 as *mut u8, class) };
    objs.freeing(b, 5);
    // SAFETY: as above.
    unsafe { c.free(b, class) };
    c.release();
    let spare = Settled {
        spare: 1,
        ..Settled::default()
    };
    // SAFETY: as above.
    assert_eq!(unsafe { settled(&heap, class, NPAGES, &addrs) }, spare);
}

#[test]
fn announced_spans_are_placed_once() {
    check(
        "span_sets",
        cfg!(any(
            spanheap_mutant = "drain_fence",
            spanheap_mutant = "pending_push_relaxed",
            spanheap_mutant = "rstate_cas_relaxed"
        )),
        || model(Frees::Cacheless),
    );
}

#[test]
fn announcements_of_one_flush_are_drained_once() {
    check(
        "span_sets_batched",
        cfg!(any(
            spanheap_mutant = "drain_fence",
            spanheap_mutant = "pending_push_relaxed",
            spanheap_mutant = "rstate_cas_relaxed",
            spanheap_mutant = "batch_no_drain"
        )),
        || model(Frees::Batched),
    );
}
