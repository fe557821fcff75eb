//! `MCentral`: the spans of one size class that no thread cache owns (Go's `mcentral`).
//!
//! A span not owned by a cache is in one of: the **partial** list (it has free
//! objects), the **full** list (no free object known), the **spares** (completely
//! free, up to 32 KiB of them kept so that a class that oscillates around a span
//! boundary, or whose spans another thread empties in bursts, does not free a span to
//! the page heap and allocate one again each time; see `SPARE_BYTES`), or the
//! **pending** stack (a remote free announced it).
//!
//! Lists and spares are protected by the mcentral lock. The pending stack is a
//! lock-free Treiber stack: remote freers push (CAS), the lock holder takes the whole
//! stack at once (swap), so there is no ABA. A span is pushed at most once per
//! announcement because a push is preceded by a CAS of the span's `place` from
//! PARTIAL/FULL to PENDING, and only the lock holder moves it out of PENDING.
//!
//! Remote frees (see `mcache/flush.rs`) announce a span when they free the first object of a
//! span that was full, or the last live object of any unowned span. The announcing
//! thread then *tries* to take the lock and drain the stack; if the lock is busy, the
//! holder drains after unlocking (a SeqCst fence on both sides makes one of them see the
//! other), so no announcement is left behind and no freeing thread ever waits.
//!
//! Orderings: `place` carries no data; its CASes only decide who acts on a span (an
//! announcer or the lock holder). The data hand-offs are the remote bits (freer's
//! Release `fetch_or` -> merger's Acquire `swap`), the SeqCst `rstate` word, the pending
//! stack (Release push -> Acquire take) and the mcentral lock. The lock holder's stores of
//! `place` are Release and the CASes AcqRel so that whoever wins a CAS also sees the
//! placement it replaces. The loom models `span_sets`, `remote_reuse` and
//! `direct_flush` check these orderings, with mutants that weaken the ones they need
//! (`docs/loom.md`).
//!
//! Lock order: mcentral lock -> heap lock (retiring a span frees it to the mheap). A
//! thread never holds two mcentral locks except through `try_lock`, which never waits.
//!
//! An mcentral does not own the page heap, nor do the page heap's records own the
//! mcentrals: both belong to the level above (`mcache::Heap`), which the mcentral
//! reaches through [`SpanSource`] (the page heap, and a sibling mcentral for a span
//! announced to the wrong class).

use core::ptr::{self, NonNull};

use crate::mheap::MHeap;
use crate::mspan::{place, rstate, rstate_parts, MSpan, SmallPrivate, NO_LIST, RSTATE_OWNED};
use crate::os::{MemSource, PAGE_SHIFT};
use crate::sizeclasses::{div_magic, obj_index_by, CLASS_TO_NPAGES};
use crate::sync::{fence, AtomicPtr, Mutex, Ordering};

/// What an mcentral needs of the heap that owns it: the page heap its spans come from
/// and go back to, and the mcentral of another class (a stale announcement goes to the
/// class the span has now). The owner is above this module; the trait lets the mcentral
/// call up without naming it (Go's mcentral names `mheap_` instead: one package).
pub(crate) trait SpanSource {
    /// The page heap's memory source.
    type Mem: MemSource;
    /// The page heap.
    fn pages(&self) -> &MHeap<Self::Mem>;
    /// The mcentral of size class `class` (1..NUM_CLASSES).
    fn central(&self, class: usize) -> &MCentral;
}

/// What the mcentral lock protects.
struct Lists {
    /// Spans with free objects (doubly linked through `SmallPrivate::{prev,next}`), in
    /// `PARTIAL_BUCKETS` lists by their last owner (`bucket`), so that a cache finds
    /// the spans it owned last without walking everyone else's.
    partial: [*mut MSpan; PARTIAL_BUCKETS],
    /// Bit `b` set: `partial[b]` is not empty.
    nonempty: u64,
    /// Spans with no free object known.
    full: *mut MSpan,
    /// Completely free spans kept for the class's next refills (singly linked through
    /// `SmallPrivate::next`; `list` is `NO_LIST`), at most `max_spares` of them.
    spares: *mut MSpan,
    /// How many spans `spares` holds.
    nspares: usize,
}

/// Bytes of completely free spans an mcentral keeps when other threads' frees empty
/// them (at least one span; one when the spans' own users empty them).
///
/// A span whose last object another thread frees (an announcement) is kept for the
/// class's next refill instead of going back to the page heap, which takes the heap
/// lock and republishes the pages, and the refill that replaces it takes them again
/// (from a page cache that, fed by no free, runs dry and refills under the heap lock).
/// When one thread allocates and another frees (a pipeline), spans empty in bursts, as
/// a batch of frees arrives, while the allocating thread takes them one at a time: one
/// spare caught few of them. (64-byte .. 1 KiB messages passed between two threads:
/// heap-lock acquisitions with one spare and with these, docs/benchmarks.md,
/// "Threads", 2026-12-02.) The scavenger
/// cannot reach these pages; `release_memory` gives them back.
const SPARE_BYTES: usize = 32 << 10;

/// How many spare spans the mcentral of a class with `npages`-page spans keeps.
const fn max_spares(npages: usize) -> usize {
    let n = SPARE_BYTES / (npages << PAGE_SHIFT);
    if n == 0 {
        1
    } else {
        n
    }
}

/// Spans one drain collects to retire before freeing them to the page heap together.
const RETIRE_BATCH: usize = 16;

// SAFETY: the pointers are span records of the heap; access is serialised by the lock.
unsafe impl Send for Lists {}

pub(crate) struct MCentral {
    /// The mcentral lock and the lists it protects.
    lists: Mutex<Lists>,
    /// Spans announced by remote frees: Treiber stack through `SmallSpan::pending_next`.
    /// Pushed by any thread; taken whole by the lock holder.
    pending: AtomicPtr<MSpan>,
}

impl core::fmt::Debug for MCentral {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MCentral").finish_non_exhaustive()
    }
}

/// The private state of a span the caller owns.
///
/// # Safety
/// The caller owns the span's private state (a cache owning the span, or the mcentral
/// lock holder for an unowned span of that class).
#[inline]
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn private<'a>(s: NonNull<MSpan>) -> &'a mut SmallPrivate {
    // SAFETY: forwarded; span records are never unmapped.
    unsafe { s.as_ref().small.private_mut() }
}

/// Merges the remote-free bits into the alloc bitmap; returns how many objects it freed.
/// Aborts with a double-free report if a remote bit names an object the (exact) alloc
/// bitmap shows free. `base` is the span's base, for the report.
///
/// # Safety
/// The caller owns the span's private state, and its alloc bitmap is exact (every
/// object handed out is marked: no window of a cache is outstanding).
pub(crate) unsafe fn merge_remote(p: &mut SmallPrivate, base: usize) -> usize {
    /// The merge's ordering. The loom mutant `merge_relaxed` weakens it to show that a
    /// model catches it.
    #[cfg(not(spanheap_mutant = "merge_relaxed"))]
    const MERGE_ACQUIRE: Ordering = Ordering::Acquire;
    #[cfg(spanheap_mutant = "merge_relaxed")]
    const MERGE_ACQUIRE: Ordering = Ordering::Relaxed;
    let mut m = 0;
    for w in 0..p.words as usize {
        // SAFETY: w < words; the caller owns the private state.
        unsafe {
            // Acquire pairs with the freers' Release fetch_or: their use of the
            // object happens-before we hand it out again.
            let r = p.remote(w).swap(0, MERGE_ACQUIRE);
            if r != 0 {
                // The alloc bitmap is exact here (see the callers): an object freed
                // remotely that it already shows free was freed twice.
                let twice = r & !*p.alloc(w);
                if twice != 0 {
                    let idx = w * 64 + twice.trailing_zeros() as usize;
                    let size = p.elemsize as usize;
                    crate::fatal::double_free(base + idx * size, size);
                }
                *p.alloc(w) &= !r;
                m += r.count_ones() as usize;
            }
        }
    }
    if m != 0 {
        p.dirty = true;
    }
    m
}

/// Free objects according to the alloc bitmap.
///
/// # Safety
/// The caller owns the span's private state.
pub(crate) unsafe fn count_free(p: &SmallPrivate) -> usize {
    // SAFETY: w < words; owned by the caller.
    (0..p.words as usize)
        .map(|w| unsafe { (!*p.alloc(w)).count_ones() as usize })
        .sum()
}

/// Applies `f` to the remote-free state word with a CAS loop; returns the new value.
fn update_rstate(s: NonNull<MSpan>, f: impl Fn(u32, i64) -> (u32, i64)) -> u64 {
    /// The CAS's ordering. The loom mutant `rstate_cas_relaxed` weakens it to show that
    /// the thread-exit model catches it.
    #[cfg(not(spanheap_mutant = "rstate_cas_relaxed"))]
    const RSTATE_CAS: Ordering = Ordering::SeqCst;
    #[cfg(spanheap_mutant = "rstate_cas_relaxed")]
    const RSTATE_CAS: Ordering = Ordering::Relaxed;
    // SAFETY: span records are never unmapped.
    let word = unsafe { &s.as_ref().small.rstate };
    let mut old = word.load(Ordering::Relaxed);
    loop {
        let (h, l) = rstate_parts(old);
        let (nh, nl) = f(h, l);
        let new = rstate(nh, nl);
        // SeqCst: orders the ownership change against the freers' SeqCst increments
        // and place CASes (see `MCentral::settle_locked`).
        match word.compare_exchange_weak(old, new, RSTATE_CAS, Ordering::Relaxed) {
            Ok(_) => return new,
            Err(x) => old = x,
        }
    }
}

impl MCentral {
    /// The counts of this class's lock, with its rank (`spanheap::lock_stats`).
    pub(crate) fn lock_counts(&self) -> (crate::sync::Rank, crate::sync::LockCount) {
        self.lists.counts()
    }

    /// Fork handlers: take and release this class's lock (see `global/fork.rs`).
    pub(crate) fn fork_lock(&self) {
        self.lists.fork_lock();
    }
    /// # Safety
    /// The calling thread holds the lock (`fork_lock`).
    pub(crate) unsafe fn fork_unlock(&self) {
        // SAFETY: forwarded.
        unsafe { self.lists.fork_unlock() };
    }

    crate::sync::const_fn! {
        /// The empty mcentral of size class `class` (its lock's rank is the class's).
        pub(crate) fn new(class: usize) -> Self {
            MCentral {
                lists: Mutex::new(
                    Lists {
                        partial: [ptr::null_mut(); PARTIAL_BUCKETS],
                        nonempty: 0,
                        full: ptr::null_mut(),
                        spares: ptr::null_mut(),
                        nspares: 0,
                    },
                    crate::lockrank::central(class),
                ),
                pending: AtomicPtr::new(ptr::null_mut()),
            }
        }
    }

    /// Gives the spare spans back to the page heap (for `release_memory`); returns how
    /// many. Takes the mcentral lock, then the heap lock for each span (the lock order).
    pub(crate) fn release_spares<H: SpanSource>(&self, heap: &H) -> usize {
        self.lists.lock().with(|l| {
            let n = l.nspares;
            // SAFETY: we hold the lock.
            while let Some(s) = unsafe { pop_spare(l) } {
                // SAFETY: unchained, nobody else can reach the span (no live object, no
                // owner, in no list).
                unsafe { heap.pages().free_span(s) };
            }
            n
        })
    }

    /// (partial spans, full spans, spare spans, free objects in listed spans), for tests.
    pub(crate) fn census(&self) -> (usize, usize, usize, usize) {
        self.lists.lock().with(|l| {
            for (b, head) in l.partial.iter().enumerate() {
                assert_eq!(
                    head.is_null(),
                    l.nonempty & (1 << b) == 0,
                    "bucket {b}'s bit"
                );
            }
            let mut r = (0, 0, l.nspares, 0);
            let (mut cur, mut n) = (l.spares, 0);
            while let Some(s) = NonNull::new(cur) {
                // SAFETY: spare spans are ours under the lock.
                let p = unsafe { private(s) };
                assert_eq!(p.list, NO_LIST, "a spare span is listed");
                n += 1;
                cur = p.next;
            }
            assert_eq!(n, l.nspares, "spare count");
            let heads = l.partial.iter().map(|&h| (h, 0)).chain([(l.full, 1)]);
            for (head, slot) in heads {
                let mut cur = head;
                while let Some(s) = NonNull::new(cur) {
                    // SAFETY: listed spans are ours under the lock.
                    let p = unsafe { private(s) };
                    if slot == 0 {
                        r.0 += 1
                    } else {
                        r.1 += 1
                    }
                    // SAFETY: as above.
                    r.3 += unsafe { count_free(p) };
                    cur = p.next;
                }
            }
            r
        })
    }

    /// A span of class `class` with free objects, now owned by the cache `owner`, or
    /// `None` if the mcentral has none the cache should take (the caller grows with
    /// `alloc_span`).
    ///
    /// Spans keep to the cache that owned them last. A cache takes, in order: a partial
    /// span it owned last; a partial span of another cache of which at least half is
    /// free (`mostly_free`); the spare emptied last. Otherwise it gets a fresh span.
    /// Objects a cache allocated then stay on spans it owns when it frees them, and the
    /// frees are local. When two threads traded spans through the mcentral instead (any partial
    /// span to any cache), a thread's frees of objects in spans the other had taken
    /// went down the remote path: a large share of the frees of the `maps` demo, where
    /// the threads share nothing (docs/benchmarks.md, "Figures moved from the design
    /// notes"). The half-free rule bounds what the preference costs in
    /// memory: a span another cache (or a thread that has exited) keeps partly live is
    /// reused by others once half of it or less is live. (Asking for three quarters
    /// free instead raised `parser`'s peak RSS: docs/benchmarks.md, "Whole program",
    /// the fourth session.)
    pub(crate) fn cache_span<H: SpanSource>(
        &self,
        heap: &H,
        class: u8,
        owner: usize,
    ) -> Option<NonNull<MSpan>> {
        // SAFETY: the lock is held inside `with_lock`.
        self.with_lock(heap, class, |l| unsafe { take_span_locked(l, owner) })
    }

    /// `uncache_span(old)` then `cache_span(owner)` in one hold of the lock: a cache
    /// whose span is exhausted gives it up and takes the next (one lock acquisition
    /// instead of two, on the path every span a thread uses goes through).
    ///
    /// # Safety
    /// As for `uncache_span` with `old`.
    pub(crate) unsafe fn exchange_span<H: SpanSource>(
        &self,
        heap: &H,
        class: u8,
        old: NonNull<MSpan>,
        owner: usize,
    ) -> Option<NonNull<MSpan>> {
        self.with_lock(heap, class, |l| {
            // SAFETY: the caller gives `old` up (contract); we hold the lock.
            unsafe {
                self.uncache_locked(heap, l, old);
                take_span_locked(l, owner)
            }
        })
    }

    /// Takes back a span from a cache that has normalised it (its alloc bitmap is exact,
    /// local frees flushed) and merged `m` remote frees since its state word was last
    /// adjusted.
    ///
    /// # Safety
    /// The calling thread's cache owns `s`, of class `class`, and gives it up.
    pub(crate) unsafe fn uncache_span<H: SpanSource>(
        &self,
        heap: &H,
        class: u8,
        s: NonNull<MSpan>,
    ) {
        // SAFETY: forwarded; the lock is held inside `with_lock`.
        self.with_lock(heap, class, |l| unsafe { self.uncache_locked(heap, l, s) });
    }

    /// The body of `uncache_span`. Needs the mcentral lock (`l`).
    ///
    /// # Safety
    /// As for `uncache_span`.
    unsafe fn uncache_locked<H: SpanSource>(&self, heap: &H, l: &mut Lists, s: NonNull<MSpan>) {
        // SAFETY: still owned by the caller until the state word says otherwise; the
        // lock makes us the next owner of the private state.
        let p = unsafe { private(s) };
        // SAFETY: as above.
        let free = unsafe { count_free(p) };
        let live = p.nelems as usize - free;
        // `owner` keeps naming the last owner: that thread's frees stay local.
        // Place it before freers can see it unowned.
        // SAFETY: we own the private state now; the span is in no list.
        unsafe { place_locked(l, s, free) };
        // Publish "unowned, `live` objects live": from here remote frees count
        // toward announcing the span.
        let new = update_rstate(s, |_, low| (live as u32, low));
        // SAFETY: the span is in our lists.
        if let Some(s) = unsafe { self.settle_locked(l, s, new, false) } {
            // SAFETY: settled as retired: no live object, no owner, in no list.
            unsafe { heap.pages().free_span(s) };
        }
    }

    /// Returns objects of class `class` that a cache flushes from its local free stack
    /// (already counted as freed) to their spans. Gives back `(kept, foreign)`: the
    /// objects it did not take are moved to `objs[..kept]` (for the remote path), and
    /// `foreign` is how many of those it took belong to spans whose last owner is not
    /// `owner` (the flushing cache); `None`, having taken nothing, if the lock is busy
    /// (never waits, like every path of a free).
    ///
    /// Under the mcentral lock, the private state of every span of the class that no
    /// cache owns (place PARTIAL, FULL or PENDING) belongs to the lock holder, and a
    /// span only becomes owned (CACHED) under the lock. So objects of such spans are
    /// freed here directly: their alloc bits cleared with plain stores, and each span's
    /// live count (the high half of its state word) lowered once for all of its objects
    /// (jemalloc's tcache flush works the same way under its bin lock). The remote path
    /// would cost two atomic read-modify-writes per object, and objects freed in no
    /// particular order (a dropped hash map) has almost no two consecutive objects of
    /// one span to batch. Objects of spans a cache owns (this one's current span, or a
    /// span another cache took meanwhile) are returned for the remote path.
    ///
    /// # Safety
    /// The objects are live small objects of class `class` of `heap`, given up, and
    /// counted as freed.
    pub(crate) unsafe fn free_unowned<H: SpanSource>(
        &self,
        heap: &H,
        class: u8,
        objs: &mut [*mut u8],
        owner: usize,
    ) -> Option<(usize, u64)> {
        let mut g = self.lists.try_lock()?;
        let out = g.with(|l| {
            self.drain_locked(heap, class, l);
            let mut kept = 0;
            let mut touched = ptr::null_mut::<MSpan>();
            let mut hint = crate::arena::NO_ARENA;
            let mut foreign = 0u64;
            // Looked up once: the compiler reloaded it (and its bounds test) per object.
            let magic = div_magic(class);
            // The span of the previous object, if no cache owns it: the next object, if
            // it lies in `[run_base, run_base + run_bytes)`, is freed with no span
            // lookup (a structure freed in the order it was built comes in runs of one
            // span). `run_bytes` is 0 when there is none.
            let span_bytes = usize::from(CLASS_TO_NPAGES[usize::from(class)]) << PAGE_SHIFT;
            let (mut run_base, mut run_bytes) = (0usize, 0usize);
            let mut run_pv: *mut SmallPrivate = ptr::null_mut();
            for i in 0..objs.len() {
                let p = objs[i];
                let mut off = (p as usize).wrapping_sub(run_base);
                if off >= run_bytes {
                    let Some(s) = NonNull::new(heap.pages().span_of_hinted(p as usize, &mut hint))
                    else {
                        run_bytes = 0;
                        continue;
                    };
                    // SAFETY: span records are never unmapped.
                    let small = unsafe { &s.as_ref().small };
                    // Relaxed: CACHED is entered and left only under the lock we hold;
                    // announcers move PARTIAL/FULL to PENDING, which is as good here.
                    if small.place.load(Ordering::Relaxed) == place::CACHED {
                        // Kept for the remote path, at the front (kept <= i).
                        objs[kept] = p;
                        kept += 1;
                        run_bytes = 0;
                        continue;
                    }
                    // SAFETY: an unowned span of our class: its private state is ours
                    // under the lock; its base is immutable while it is live.
                    let (pv, base) = unsafe { (private(s), s.as_ref().base()) };
                    // The span's first object in this call chains it on `touched`.
                    // Written as indexed selects, not a branch (which the compiler kept
                    // for `if`): objects freed in no order make it unpredictable (the
                    // scatter benchmark's mispredictions under callgrind --branch-sim,
                    // before and after: docs/benchmarks.md, "Scattered frees").
                    let first = usize::from(pv.flushed == 0);
                    pv.flush_next = [pv.flush_next, touched][first];
                    touched = [touched, s.as_ptr()][first];
                    (run_base, run_bytes, run_pv) = (base, span_bytes, pv);
                    off = p as usize - base;
                }
                // SAFETY: `run_pv` is the private state of the object's span, set above
                // for this object or an earlier one of the same span.
                let pv = unsafe { &mut *run_pv };
                let idx = obj_index_by(magic, off);
                // SAFETY: idx < nelems, so the word is in the record; the object is
                // allocated (its span counts it live until this free).
                unsafe {
                    let w = pv.alloc(idx / 64);
                    let bit = 1u64 << (idx % 64);
                    // Already free in an exact bitmap: freed twice.
                    if *w & bit == 0 {
                        crate::fatal::double_free(p as usize, pv.elemsize as usize);
                    }
                    *w &= !bit;
                }
                pv.flushed += 1;
            }
            while let Some(s) = NonNull::new(touched) {
                // SAFETY: touched above: unowned, ours under the lock.
                let pv = unsafe { private(s) };
                touched = core::mem::replace(&mut pv.flush_next, ptr::null_mut());
                let k = core::mem::take(&mut pv.flushed);
                // Its freed objects will be handed out again.
                pv.dirty = true;
                if last_owner(s) != owner {
                    foreign += u64::from(k);
                }
                // SAFETY: as above.
                unsafe { self.after_direct_free(heap, l, s, k) };
            }
            (kept, foreign)
        });
        drop(g);
        // Announcements pushed while we held the lock are ours to place.
        self.try_drain(heap, class);
        Some(out)
    }

    /// Publishes `k` objects freed directly into the alloc bitmap of the unowned span
    /// `s` (see `free_unowned`): a full span moves to the partial list, then the state
    /// word's live count drops by `k`, then the span is settled (retired if every object
    /// is free). The same order as `uncache_span`: the place is stored before the SeqCst
    /// state-word CAS, so a freer whose increment reads the new count (and finds that it
    /// freed the last object) also sees the place it must announce from. Needs the
    /// mcentral lock (`l`).
    ///
    /// # Safety
    /// `s` is an unowned span of this class whose private state the caller holds under
    /// the lock.
    unsafe fn after_direct_free<H: SpanSource>(
        &self,
        heap: &H,
        l: &mut Lists,
        s: NonNull<MSpan>,
        k: u16,
    ) {
        /// Whether the place is stored before the state word. The loom mutant
        /// `direct_place_late` stores it after, to show that a model catches it.
        const PLACE_FIRST: bool = !cfg!(spanheap_mutant = "direct_place_late");
        let lower = |h: u32, low: i64| {
            debug_assert!(h >= u32::from(k) && h != RSTATE_OWNED);
            (h - u32::from(k), low)
        };
        // SAFETY: per the contract.
        let p = unsafe { private(s) };
        // (Whatever its place: a drain that places it again counts afresh.)
        p.nfree += k;
        let list = p.list;
        let early = (!PLACE_FIRST).then(|| update_rstate(s, lower));
        // Whether the span sits in the list its place names: then we settle it; if it
        // was announced meanwhile (PENDING), the drain that takes it from the pending
        // stack does.
        let placed = match list {
            NO_LIST => false,
            // It has free objects now.
            // SAFETY: linked in our lists.
            place::FULL => unsafe { promote_locked(l, s) },
            // SAFETY: span records are never unmapped.
            _ => unsafe { s.as_ref() }.small.place.load(Ordering::Relaxed) == list,
        };
        let new = early.unwrap_or_else(|| update_rstate(s, lower));
        if placed {
            // SAFETY: linked in our lists.
            if let Some(s) = unsafe { self.settle_locked(l, s, new, false) } {
                // SAFETY: settled as retired: no live object, no owner, in no list.
                unsafe { heap.pages().free_span(s) };
            }
        }
    }

    /// A remote free has freed the first object of a full span, or (`last`) the last
    /// live object of an unowned span: announce it to the lock holder.
    pub(crate) fn announce<H: SpanSource>(
        &self,
        heap: &H,
        class: u8,
        s: NonNull<MSpan>,
        last: bool,
    ) {
        if self.announce_deferred(s, last) {
            self.try_drain(heap, class);
        }
    }

    /// The first half of `announce`: puts the span on the pending stack unless someone
    /// else acts on it, without trying to drain. Returns whether it pushed; if so the
    /// caller must call `try_drain` afterwards (it may announce other spans of the class
    /// first, so that a run of announcements takes the lock once): the hand-off that
    /// leaves no announcement behind is "push, then fence and try the lock".
    pub(crate) fn announce_deferred(&self, s: NonNull<MSpan>, last: bool) -> bool {
        // SAFETY: span records are never unmapped.
        let small = unsafe { &s.as_ref().small };
        // Relaxed: the caller's SeqCst increment already ordered this load after the
        // placement it observed in `rstate`; the CAS below re-checks the value.
        let cur = small.place.load(Ordering::Relaxed);
        if !(cur == place::FULL || (last && cur == place::PARTIAL)) {
            return false;
        }
        if small
            .place
            .compare_exchange(cur, place::PENDING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.push_pending(s);
        true
    }

    fn push_pending(&self, s: NonNull<MSpan>) {
        /// The push's ordering. The loom mutant `pending_push_relaxed` weakens it to show
        /// that the span-set model catches it.
        #[cfg(not(spanheap_mutant = "pending_push_relaxed"))]
        const PUSH: Ordering = Ordering::Release;
        #[cfg(spanheap_mutant = "pending_push_relaxed")]
        const PUSH: Ordering = Ordering::Relaxed;
        // SAFETY: span records are never unmapped.
        let link = unsafe { &s.as_ref().small.pending_next };
        // Release: the link (and the PENDING state) are visible to the drainer.
        crate::sync::push_linked(&self.pending, s.as_ptr(), link, PUSH);
    }

    /// Drains the pending stack if the lock is free; never waits.
    pub(crate) fn try_drain<H: SpanSource>(&self, heap: &H, class: u8) {
        /// The hand-off fence. The loom mutant `drain_fence` weakens it (AcqRel orders
        /// no store before a later load) to show that the span-set model catches it.
        #[cfg(not(spanheap_mutant = "drain_fence"))]
        const DRAIN_FENCE: Ordering = Ordering::SeqCst;
        #[cfg(spanheap_mutant = "drain_fence")]
        const DRAIN_FENCE: Ordering = Ordering::AcqRel;
        loop {
            // Pairs with the fence in the other side of the hand-off: a pusher fences
            // between its push and its try_lock, an unlocker between its unlock and this
            // load, so whichever runs second sees the other's write.
            fence(DRAIN_FENCE);
            if self.pending.load(Ordering::Relaxed).is_null() {
                return;
            }
            let Some(mut g) = self.lists.try_lock() else {
                return;
            };
            g.with(|l| self.drain_locked(heap, class, l));
        }
    }

    /// Runs `f` under the lock, draining announcements first and after.
    fn with_lock<H: SpanSource, R>(
        &self,
        heap: &H,
        class: u8,
        f: impl FnOnce(&mut Lists) -> R,
    ) -> R {
        let r = self.lists.lock().with(|l| {
            self.drain_locked(heap, class, l);
            f(l)
        });
        self.try_drain(heap, class);
        r
    }

    /// Places every announced span. Needs the mcentral lock (`l`).
    fn drain_locked<H: SpanSource>(&self, heap: &H, class: u8, l: &mut Lists) {
        // Acquire pairs with the pushers' Release.
        let mut cur = self.pending.swap(ptr::null_mut(), Ordering::Acquire);
        if cur.is_null() {
            return;
        }
        // Spans the drain empties beyond the spares, freed to the page heap together
        // (one hold of the heap lock for up to `RETIRE_BATCH`, not one each).
        let mut retired = [NonNull::<MSpan>::dangling(); RETIRE_BATCH];
        let mut nretired = 0;
        while let Some(s) = NonNull::new(cur) {
            // SAFETY: span records are never unmapped.
            let small = unsafe { &s.as_ref().small };
            // Read the link first: once re-placed, the span can be announced again.
            cur = small.pending_next.load(Ordering::Relaxed);
            // SAFETY: a PENDING span is live and unowned; its class never changes.
            let sc = unsafe { s.as_ref().info() }.spanclass;
            if sc != class {
                // A stale announcement raced with the span's retirement and the
                // record's reuse for another class: hand it to its own mcentral.
                let other = heap.central(sc as usize);
                other.push_pending(s);
                other.try_drain(heap, sc);
                continue;
            }
            // SAFETY: PENDING spans of our class are ours under the lock.
            let p = unsafe { private(s) };
            if p.list != NO_LIST {
                // SAFETY: linked in our lists.
                unsafe { unlink(l, s) };
            }
            // SAFETY: we own the private state.
            let m = unsafe { merge_remote(p, s.as_ref().base()) };
            // SAFETY: as above.
            let free = unsafe { count_free(p) };
            // SAFETY: as above; unlinked just now.
            unsafe { place_locked(l, s, free) };
            let new = update_rstate(s, |h, low| (h - m as u32, low - m as i64));
            // SAFETY: the span is in our lists.
            if let Some(s) = unsafe { self.settle_locked(l, s, new, true) } {
                if nretired == retired.len() {
                    // SAFETY: settled as retired: nobody uses these spans.
                    unsafe { heap.pages().free_spans(&retired) };
                    nretired = 0;
                }
                retired[nretired] = s;
                nretired += 1;
            }
        }
        // SAFETY: as above.
        unsafe { heap.pages().free_spans(&retired[..nretired]) };
    }

    /// After a span was placed in a list and its state word published as `state`:
    /// retire (or keep as a spare) a span whose every object is free, and move a "full"
    /// span that has pending remote frees to the partial list. Every move out of the
    /// list is a CAS from the list's place, so a concurrent announcement (PENDING) wins
    /// and the next drain handles the span. Returns the span if it is to be retired:
    /// the caller frees it to the page heap (`free_span`). `remote`: remote frees
    /// emptied the span
    /// (an announcement), so it may join up to `max_spares`; otherwise it is kept only
    /// if there is no spare (a thread that frees its own objects empties spans as it
    /// goes, and one spare caught its oscillation; more held on to pages other classes
    /// could use: `parser`'s peak RSS grew; docs/benchmarks.md, "Figures moved from the
    /// design notes"). Needs the mcentral lock (`l`).
    ///
    /// # Safety
    /// `s` is linked in `l` by the caller.
    #[must_use]
    unsafe fn settle_locked(
        &self,
        l: &mut Lists,
        s: NonNull<MSpan>,
        state: u64,
        remote: bool,
    ) -> Option<NonNull<MSpan>> {
        // SAFETY: span records are never unmapped.
        let small = unsafe { &s.as_ref().small };
        // SAFETY: linked in our lists: ours under the lock.
        let p = unsafe { private(s) };
        let (live, low) = rstate_parts(state);
        debug_assert!(live != RSTATE_OWNED);
        let cur = p.list;
        if low == live as i64 {
            // Every object is free. (AcqRel CASes: see the module note.)
            if small
                .place
                .compare_exchange(cur, place::CACHED, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return None;
            }
            // SAFETY: linked in our lists.
            unsafe { unlink(l, s) };
            // SAFETY: span records are never unmapped.
            let npages = unsafe { s.as_ref() }.npages();
            let keep = if remote { max_spares(npages) } else { 1 };
            if l.nspares < keep {
                p.next = l.spares;
                l.spares = s.as_ptr();
                l.nspares += 1;
            } else {
                // No live object, no owner, in no list: nobody uses the span.
                return Some(s);
            }
        } else if low > 0 && cur == place::FULL {
            // (`low` can be transiently negative: a merge that ran ahead of a freer's
            // increment. Only a positive count means unmerged frees exist.)
            // SAFETY: linked in our lists.
            unsafe { promote_locked(l, s) };
        }
        None
    }
}

/// Moves a span of the full list to the partial list, unless a freer announced it
/// meanwhile (then the drain places it). Returns whether it moved. The place changes by
/// a CAS from FULL, so a racing announcement (FULL -> PENDING) wins (AcqRel: see the
/// module note on `place`). Needs the mcentral lock (`l`).
///
/// # Safety
/// `s` is linked in `l`'s full list.
unsafe fn promote_locked(l: &mut Lists, s: NonNull<MSpan>) -> bool {
    // SAFETY: span records are never unmapped.
    let small = unsafe { &s.as_ref().small };
    let moved = small
        .place
        .compare_exchange(
            place::FULL,
            place::PARTIAL,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok();
    if moved {
        // SAFETY: linked in our lists, as the contract says.
        unsafe { relink(l, s, place::PARTIAL) };
    }
    moved
}

/// Makes the cache `owner` the owner of a span taken from the mcentral (partial list or
/// spare), merging remote frees so its alloc bitmap is exact.
///
/// # Safety
/// The caller holds the mcentral lock and has taken `s` out of its lists (place CACHED).
unsafe fn take_ownership(s: NonNull<MSpan>, owner: usize) {
    // SAFETY: per the contract the private state is ours.
    let p = unsafe { private(s) };
    // SAFETY: as above.
    let m = unsafe { merge_remote(p, s.as_ref().base()) };
    p.next_word = 0;
    // Relaxed: `owner` only lets the owning thread recognise its own spans; that thread
    // reads it after taking the span on the same thread, and others only compare it with
    // their own address.
    // SAFETY: span records are never unmapped.
    unsafe { s.as_ref() }
        .small
        .owner
        .store(owner, Ordering::Relaxed);
    update_rstate(s, |_, low| (RSTATE_OWNED, low - m as i64));
}

/// How many partial lists spans are spread over by last owner. Caches whose addresses
/// share a bucket see each other's spans when they look for their own (and may miss
/// their own behind `OWN_SCAN` of others'): 64 keeps that rare up to tens of threads
/// (one bit each of `Lists::nonempty`).
const PARTIAL_BUCKETS: usize = 64;
const _: () = assert!(PARTIAL_BUCKETS.is_power_of_two() && PARTIAL_BUCKETS <= 64);

/// The partial list of spans whose last owner is `owner` (a Fibonacci hash of the cache
/// address: records are a few KiB apart, so the low bits alone would collide).
#[cfg(not(spanheap_loom))]
fn bucket(owner: usize) -> usize {
    ((owner as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - PARTIAL_BUCKETS.trailing_zeros()))
        as usize
}

/// Under loom every span is in bucket 0: the models' caches are fresh allocations in
/// each execution, and a bucket drawn from their addresses would change the order in
/// which `foreign_partial_locked` tries spans from one execution to the next (loom
/// requires each execution to replay the same operations). The list code is the same;
/// only the spreading is not modelled.
#[cfg(spanheap_loom)]
fn bucket(_owner: usize) -> usize {
    0
}

/// How many spans of its own bucket a cache looks at for one it owned last.
const OWN_SCAN: usize = 32;

/// How many spans at the head of each bucket a cache without a partial span of its own
/// looks at for a mostly free one.
const FOREIGN_SCAN: usize = 4;

/// Whether a partial span with `free` of its `nelems` objects free may go to a cache
/// other than its last owner: at least half of it is free.
fn mostly_free(free: usize, nelems: usize) -> bool {
    free * 2 >= nelems
}

/// The last owner of `s` (a hint written when a cache takes the span; unchanged while
/// the span is in a list, since only `take_ownership` and a fresh span write it).
fn last_owner(s: NonNull<MSpan>) -> usize {
    // Relaxed: written by `take_ownership` under this mcentral's lock, which the caller
    // holds or (a hint) by the cache that got the span fresh, before its
    // `uncache_span` took that lock.
    // SAFETY: span records are never unmapped.
    unsafe { s.as_ref() }.small.owner.load(Ordering::Relaxed)
}

/// Unlinks the partial span `s` and marks it CACHED for the caller, unless a freer
/// announced it meanwhile (PENDING): then it is only unlinked, and the drain places
/// it. Returns whether the caller now holds the span.
///
/// # Safety
/// The caller holds the mcentral lock; `s` is in one of its partial lists.
unsafe fn take_partial_locked(l: &mut Lists, s: NonNull<MSpan>) -> bool {
    // SAFETY: per the contract.
    unsafe { unlink(l, s) };
    // SAFETY: span records are never unmapped.
    let small = unsafe { &s.as_ref().small };
    // AcqRel: see the module note on `place` orderings.
    small
        .place
        .compare_exchange(
            place::PARTIAL,
            place::CACHED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// The span `cache_span` hands to the cache `owner` (see there), taken out of the lists
/// and owned by `owner`; `None` if the caller should grow.
///
/// # Safety
/// The caller holds the mcentral lock (`l`).
unsafe fn take_span_locked(l: &mut Lists, owner: usize) -> Option<NonNull<MSpan>> {
    // SAFETY (both calls): we hold the lock; the lists are ours.
    let s = match unsafe { own_partial_locked(l, owner) } {
        Some(s) => Some(s),
        None => unsafe { foreign_partial_locked(l) },
    };
    if let Some(s) = s {
        // SAFETY: unlinked and CACHED: ours until handed over.
        unsafe { take_ownership(s, owner) };
        return Some(s);
    }
    // SAFETY: we hold the lock.
    let s = unsafe { pop_spare(l) }?;
    // SAFETY: a spare span is ours under the lock (no live object, so no remote frees).
    unsafe { take_ownership(s, owner) };
    Some(s)
}

/// The spare span emptied last, taken off the spares (its link cleared), or `None`.
///
/// # Safety
/// The caller holds the mcentral lock (`l`).
unsafe fn pop_spare(l: &mut Lists) -> Option<NonNull<MSpan>> {
    let s = NonNull::new(l.spares)?;
    // SAFETY: spare spans are ours under the lock.
    l.spares = core::mem::replace(&mut unsafe { private(s) }.next, ptr::null_mut());
    l.nspares -= 1;
    Some(s)
}

/// Links `s`, whose alloc bitmap shows `free` free objects, into the partial list (or
/// the full one if none) and stores its place to match. The place store is Release;
/// the caller's SeqCst `rstate` CAS that follows publishes it to every freer whose
/// increment reads that value (or a later one), before they CAS `place`: an
/// announcement needs a place to CAS from.
///
/// # Safety
/// The caller holds the mcentral lock (`l`) and owns the private state of `s`, which
/// is in no list.
unsafe fn place_locked(l: &mut Lists, s: NonNull<MSpan>, free: usize) {
    let target = if free > 0 {
        place::PARTIAL
    } else {
        place::FULL
    };
    // SAFETY: per the contract.
    unsafe { private(s) }.nfree = free as u16;
    // SAFETY: per the contract.
    unsafe { link(l, s, target) };
    // SAFETY: span records are never unmapped.
    unsafe { s.as_ref() }
        .small
        .place
        .store(target, Ordering::Release);
}

/// A partial span whose last owner is `owner`, taken out of its list and CACHED; among
/// the first `OWN_SCAN` of its bucket.
///
/// # Safety
/// The caller holds the mcentral lock.
unsafe fn own_partial_locked(l: &mut Lists, owner: usize) -> Option<NonNull<MSpan>> {
    let mut cur = l.partial[bucket(owner)];
    let mut i = 0;
    while let Some(s) = NonNull::new(cur) {
        if i == OWN_SCAN {
            return None;
        }
        // SAFETY: list members' private state is ours under the lock.
        cur = unsafe { private(s) }.next;
        // SAFETY: in our partial list, under the lock (the next link was read first).
        if last_owner(s) == owner && unsafe { take_partial_locked(l, s) } {
            return Some(s);
        }
        i += 1;
    }
    None
}

/// A partial span of any owner that is `mostly_free` (by its alloc bitmap), taken out
/// of its list and CACHED; among the first `FOREIGN_SCAN` of each non-empty bucket.
///
/// # Safety
/// The caller holds the mcentral lock.
unsafe fn foreign_partial_locked(l: &mut Lists) -> Option<NonNull<MSpan>> {
    let mut buckets = l.nonempty;
    while buckets != 0 {
        let b = buckets.trailing_zeros() as usize;
        buckets &= buckets - 1;
        let mut cur = l.partial[b];
        let mut i = 0;
        while let Some(s) = NonNull::new(cur) {
            if i == FOREIGN_SCAN {
                break;
            }
            // SAFETY: list members' private state is ours under the lock.
            let p = unsafe { private(s) };
            cur = p.next;
            let (nelems, free) = (p.nelems as usize, p.nfree as usize);
            // SAFETY: as above.
            debug_assert_eq!(free, unsafe { count_free(p) }, "stale free count");
            // SAFETY: in our partial list, under the lock (`p` is not used again).
            if mostly_free(free, nelems) && unsafe { take_partial_locked(l, s) } {
                return Some(s);
            }
            i += 1;
        }
    }
    None
}

/// Moves `s` from the list it is in to the head of list `which` (PARTIAL or FULL).
///
/// # Safety
/// As for `unlink`.
unsafe fn relink(l: &mut Lists, s: NonNull<MSpan>, which: u8) {
    // SAFETY: forwarded.
    unsafe {
        unlink(l, s);
        link(l, s, which);
    }
}

/// Links `s` at the head of list `which` (PARTIAL or FULL).
///
/// # Safety
/// The caller holds the mcentral lock and owns `s`'s private state; `s` is in no list.
unsafe fn link(l: &mut Lists, s: NonNull<MSpan>, which: u8) {
    let head = if which == place::PARTIAL {
        let b = bucket(last_owner(s));
        l.nonempty |= 1 << b;
        &mut l.partial[b]
    } else {
        &mut l.full
    };
    // SAFETY: per the contract.
    let p = unsafe { private(s) };
    debug_assert_eq!(p.list, NO_LIST);
    p.prev = ptr::null_mut();
    p.next = *head;
    if let Some(h) = NonNull::new(*head) {
        // SAFETY: list members are ours under the lock.
        unsafe { private(h) }.prev = s.as_ptr();
    }
    *head = s.as_ptr();
    p.list = which;
}

/// Unlinks `s` from the list it is in.
///
/// # Safety
/// As for `link`; `s` is in one of the lists.
unsafe fn unlink(l: &mut Lists, s: NonNull<MSpan>) {
    // SAFETY: per the contract.
    let p = unsafe { private(s) };
    let (prev, next, which) = (p.prev, p.next, p.list);
    debug_assert!(which != NO_LIST);
    if let Some(n) = NonNull::new(next) {
        // SAFETY: list members are ours under the lock.
        unsafe { private(n) }.prev = prev;
    }
    match NonNull::new(prev) {
        // SAFETY: as above.
        Some(pr) => unsafe { private(pr) }.next = next,
        None => {
            if which == place::PARTIAL {
                let b = bucket(last_owner(s));
                l.partial[b] = next;
                if next.is_null() {
                    l.nonempty &= !(1 << b);
                }
            } else {
                l.full = next;
            }
        }
    }
    // SAFETY: as above (`p` was not used across the neighbours' updates).
    let p = unsafe { private(s) };
    p.prev = ptr::null_mut();
    p.next = ptr::null_mut();
    p.list = NO_LIST;
}
