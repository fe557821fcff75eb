//! The free path past the fast path: objects leaving a thread cache for their spans.
//!
//! Holds a local free stack's overflow (`overflow`, `flush`, which returns objects in
//! `FLUSH_CHUNK`s, under the mcentral lock for spans no cache owns and as remote frees
//! otherwise, and which ends wide mode), the remote buffer of frees of other caches'
//! objects (`buffer_remote`, `REMOTE_LIMIT`, `flush_remote`), the remote free itself
//! (`remote_free`, and `remote_free_objs`/`RemoteRun` for runs of one span) and the
//! free of a thread without a cache (`pless_free`). Go has no explicit free; the
//! nearest counterpart is the sweeper (mgcsweep.go), which likewise gives a span its
//! freed objects as a bitmap. The batched return of a thread's stack follows tcmalloc's
//! `ThreadCache::ReleaseToCentralCache`.
//!
//! *Protection.* The stacks, the remote buffers and their counts are the cache owner's
//! (or a visitor's holding the record's door; `flush` and `flush_remote` mark
//! themselves as slow paths with `Slow`). A span's side is shared: remote frees set bits
//! of the span's remote bitmap and count them in its state word with atomic RMWs (no
//! lock; the orderings are documented where they are used), and `free_unowned` takes
//! the mcentral lock.

use core::ptr::{self, NonNull};

use super::heap::Heap;
use crate::arena::NO_ARENA;
use crate::mspan::{rstate_parts, MSpan, RSTATE_OWNED};
use crate::os::MemSource;
use crate::sizeclasses::{obj_index, CLASS_TO_SIZE, NUM_CLASSES};
use crate::stats::field;
use crate::sync::{AtomicU64, Ordering};

#[cfg(not(spanheap_loom))]
use super::budget::check_budget;
use super::lifecycle::Slow;
use super::{current_span, is_wide, set_span, ClassCache, MCache};
use super::{
    FLUSH_CHUNK, MAX_REMOTE_LIMIT, MIN_REMOTE_LIMIT, OVERFLOW_KEEP_DIV, REMOTE_LIMIT_BYTES,
    WIDE_EXIT_DIV,
};

/// A push took class `class`'s stack past its limit: flushes all but a quarter of the
/// limit, after bringing the limit up to date with the budget (process-wide heap).
///
/// # Safety
/// As for `push_local`.
#[cold]
#[inline(never)]
pub(super) unsafe fn overflow<M: MemSource>(
    heap: &Heap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    class: usize,
) {
    #[cfg(not(spanheap_loom))]
    if heap.budgeted {
        // SAFETY: `c` is a live cache of the process-wide heap, ours.
        unsafe { check_budget(heap, c) };
        if e.nfree <= u32::from(e.limit) {
            return; // a larger limit keeps them all (or `check_budget` flushed)
        }
    }
    let keep = u32::from(e.limit) / OVERFLOW_KEEP_DIV + 1;
    // SAFETY: forwarded.
    unsafe { flush(heap, c, e, class, keep) };
}

/// Puts an object of a span this cache does not own on the class's remote buffer.
/// Out of line, so that the local-free fast path needs no extra registers.
///
/// # Safety
/// `c` is this thread's cache; `p` a live object of class `class`, given up.
#[inline(never)]
pub(super) unsafe fn buffer_remote<M: MemSource>(
    heap: &Heap<M>,
    c: *mut MCache,
    p: *mut u8,
    class: usize,
) {
    // Frees of other caches' objects keep the class out of wide mode (see `refill_span`).
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    unsafe {
        let r = &mut *ptr::addr_of_mut!((*c).remote_since[class]);
        *r = r.saturating_add(1);
    }
    // SAFETY: the buffer is the owner's; `class < NUM_CLASSES`. Per the contract, the
    // object's first word is ours to link through.
    unsafe {
        let head = &mut *ptr::addr_of_mut!((*c).remote[class]);
        p.cast::<*mut u8>().write(*head);
        *head = p;
    }
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    let n = unsafe { &mut *ptr::addr_of_mut!((*c).nremote[class]) };
    *n += 1;
    if u32::from(*n) >= REMOTE_LIMIT[class] {
        // SAFETY: forwarded.
        unsafe { flush_remote(heap, c, class) };
        // A thread that only frees other threads' objects (a consumer, or the thread
        // that drops what a pool of exited workers built) reaches no other slow path:
        // this is where a due scavenger pass runs, or the background thread starts,
        // after the frees gave spans back (no lock held here).
        heap.maybe_scavenge();
    }
}

/// How many objects a class's remote buffer collects before it is returned to the
/// spans: `REMOTE_LIMIT_BYTES` worth, at least `MIN_REMOTE_LIMIT` and at most
/// `MAX_REMOTE_LIMIT`.
static REMOTE_LIMIT: [u32; NUM_CLASSES] = {
    let mut t = [0u32; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        let n = REMOTE_LIMIT_BYTES / CLASS_TO_SIZE[c] as u32;
        t[c] = if n < MIN_REMOTE_LIMIT {
            MIN_REMOTE_LIMIT
        } else if n > MAX_REMOTE_LIMIT {
            MAX_REMOTE_LIMIT
        } else {
            n
        };
        c += 1;
    }
    t
};

/// A free by a thread without a cache: counted (under the statistics lock), then a
/// remote free.
///
/// # Safety
/// As for `dealloc`.
#[cfg(not(spanheap_loom))]
#[cold]
#[inline(never)]
pub(super) unsafe fn pless_free<M: MemSource>(
    heap: &Heap<M>,
    p: *mut u8,
    s: NonNull<MSpan>,
    class: usize,
) {
    heap.stats_update(|d| d.add(field::SMALL_FREES + class, 1));
    // SAFETY: forwarded.
    unsafe { remote_free(heap, p, s, class) };
    // As in `buffer_remote`: a cache-less thread's frees reach no other slow path.
    heap.maybe_scavenge();
}

/// Returns the whole remote buffer to the objects' spans, after counting the frees.
///
/// # Safety
/// `c` is a live cache the caller owns; `class < NUM_CLASSES`.
#[cold]
#[inline(never)]
pub(super) unsafe fn flush_remote<M: MemSource>(heap: &Heap<M>, c: *mut MCache, class: usize) {
    // SAFETY: the counters are the owner's; `class < NUM_CLASSES`.
    let n = u64::from(core::mem::take(unsafe {
        &mut *ptr::addr_of_mut!((*c).nremote[class])
    }));
    if n == 0 {
        return;
    }
    // SAFETY: `c` is a live cache (caller's contract).
    let _slow = unsafe { Slow::new(c) };
    heap.stats_update(|d| d.add(field::SMALL_FREES + class, n));
    // SAFETY: as in `buffer_remote`.
    let p = core::mem::replace(
        unsafe { &mut *ptr::addr_of_mut!((*c).remote[class]) },
        ptr::null_mut(),
    );
    let mut counts = RemoteCounts::default();
    // SAFETY: the buffer's objects are ours, live from their spans' view, and linked
    // into a null-terminated list. (The owner count is only `flush`'s.)
    unsafe { remote_free_objs(heap, LinkedObjs(p), class, 0, &mut 0, &mut counts) };
    // SAFETY: `c` is a live cache, ours (or its visitor's).
    unsafe { counts.record(c) };
}

/// What one flush's remote frees did to shared cache lines (kept per record in its
/// door, summed by `spanheap::remote_free_stats`).
#[derive(Default)]
struct RemoteCounts {
    /// Objects freed through the remote path.
    objects: u64,
    /// `fetch_or`s of span remote-bitmap words (one per run's 64-object word).
    bitmap_rmws: u64,
    /// `fetch_add`s of span state words (one per run of objects of one span).
    state_rmws: u64,
    /// Announcements to the mcentral (a push on its pending stack, and a drain if the
    /// lock is free).
    announces: u64,
}

impl RemoteCounts {
    /// Adds the counts to record `c`'s door (a plain load and store each: the door's
    /// counters have one writer at a time, the owner or a visitor holding the door).
    ///
    /// # Safety
    /// `c` is a live cache record that the caller may write (its owner or visitor).
    #[inline]
    unsafe fn record(&self, c: *mut MCache) {
        #[cfg(not(spanheap_loom))]
        {
            // SAFETY: records are never unmapped; the door's fields are atomics.
            let d = unsafe { &(*c).door };
            d.count_remote([
                self.objects,
                self.bitmap_rmws,
                self.state_rmws,
                self.announces,
            ]);
        }
        #[cfg(spanheap_loom)]
        let _ = c;
    }
}

/// The objects of a null-terminated list linked through their first word (the remote
/// buffer), each read just before it is handed out.
struct LinkedObjs(*mut u8);

impl Iterator for LinkedObjs {
    type Item = *mut u8;
    #[inline]
    fn next(&mut self) -> Option<*mut u8> {
        let p = self.0;
        if p.is_null() {
            return None;
        }
        // SAFETY: the list's creator (`buffer_remote`) linked each object to the next.
        self.0 = unsafe { p.cast::<*mut u8>().read() };
        // The next object is likely cold: start loading it while this one is handled.
        prefetch(self.0);
        Some(p)
    }
}

/// Returns objects from the top of the local free stack to their spans until `keep`
/// remain. Objects of spans no cache owns are freed under the mcentral lock
/// (`MCentral::free_unowned`); the others, and all of a chunk whose lock is busy, as
/// remote frees (merged by the span's owner, or announced if the span is unowned).
///
/// In wide mode the objects returned are also counted by owner: if more than an eighth
/// belong to spans another cache owns or owned last, the class leaves wide mode and the
/// whole list is returned (it may hold more of them).
///
/// # Safety
/// `e` is entry `class` of cache `c`, which the caller owns.
#[cold]
#[inline(never)]
pub(super) unsafe fn flush<M: MemSource>(
    heap: &Heap<M>,
    c: *mut MCache,
    e: &mut ClassCache,
    class: usize,
    keep: u32,
) {
    // SAFETY: `c` is a live cache (caller's contract).
    let _slow = unsafe { Slow::new(c) };
    // Count first: the objects leave the stack before their spans see them free.
    let n = e.nfree.saturating_sub(keep) as u64;
    // SAFETY: `e` is entry `class` of our cache `c`.
    let pops = unsafe { super::tick::take_pops(c, e, class) };
    if n | pops != 0 {
        heap.stats_update(|d| {
            d.add(field::SMALL_ALLOCS + class, pops);
            d.add(field::SMALL_FREES + class, pops + n);
        });
    }
    if n == 0 {
        return;
    }
    // A slow path (a thread that mostly frees reaches no other), where a due
    // scavenger pass may run.
    heap.maybe_scavenge();
    // Return the top `n` objects (the most recently freed: the older ones stay) in
    // chunks: objects of spans no cache owns go back under the mcentral lock without
    // atomics (a short hold per chunk, and never a wait: a busy lock sends the chunk
    // down the remote path); the rest (of this cache's current span, or of spans
    // another cache took since) take the remote path.
    let owner = c as usize;
    let mut foreign = 0u64;
    let mut counts = RemoteCounts::default();
    // SAFETY: slots keep..nfree of the stack hold the objects to return: ours, live
    // from their spans' view, counted. The stack is not the cache record, so `e` and
    // the slice do not overlap.
    let objs = unsafe { core::slice::from_raw_parts_mut(e.stack.add(keep as usize), n as usize) };
    for chunk in objs.chunks_mut(FLUSH_CHUNK) {
        // SAFETY: as above.
        unsafe {
            match heap.central[class].free_unowned(heap, class as u8, chunk, owner) {
                Some((kept, f)) => {
                    foreign += f;
                    let rest = chunk.get_unchecked(..kept).iter().copied();
                    remote_free_objs(heap, rest, class, owner, &mut foreign, &mut counts);
                }
                None => remote_free_objs(
                    heap,
                    chunk.iter().copied(),
                    class,
                    owner,
                    &mut foreign,
                    &mut counts,
                ),
            }
        }
    }
    // SAFETY: `c` is a live cache, ours (or its visitor's).
    unsafe { counts.record(c) };
    e.nfree = keep;
    // SAFETY: `c` is a live cache; its door is used atomically.
    unsafe { (*c).door.publish_depth(class, keep) };
    if is_wide(e) && foreign * WIDE_EXIT_DIV > n {
        // Wide mode took in other caches' objects (a consumer of another thread's
        // objects): back to the owner test, and return the rest of the stack too.
        // SAFETY: the counter is the owner's; `class < NUM_CLASSES`.
        unsafe { *ptr::addr_of_mut!((*c).remote_since[class]) = foreign as u32 };
        let s = current_span(heap, e);
        set_span(e, s, false);
        // SAFETY: forwarded; no longer wide, so this does not come back here.
        unsafe { flush(heap, c, e, class, 0) };
    }
}

/// Remote-frees objects of class `class`; those of spans whose owner (current or last)
/// is not `owner` are added to `foreign`. Objects of one span that follow each other
/// are returned together:
/// their bits are ORed into the remote bitmap one word at a time, and the span's state
/// word takes one increment for all of them, which is what an increment per object
/// would have done, announcements included.
///
/// # Safety
/// The objects are live small objects of class `class` of `heap`, given up.
unsafe fn remote_free_objs<M: MemSource>(
    heap: &Heap<M>,
    objs: impl Iterator<Item = *mut u8>,
    class: usize,
    owner: usize,
    foreign: &mut u64,
    counts: &mut RemoteCounts,
) {
    let mut run: Option<RemoteRun> = None;
    let mut hint = NO_ARENA;
    // Whether a run announced a span: then the mcentral's pending stack is drained once,
    // after the last run, if its lock is free (not once per announcement).
    let mut pushed = false;
    for p in objs {
        if let Some(s) = NonNull::new(heap.span_of_hinted(p as usize, &mut hint)) {
            if run.as_ref().map_or(true, |r| r.span != s) {
                if let Some(r) = run.take() {
                    *foreign += r.foreign(owner);
                    // SAFETY: the run's objects were given up by the caller.
                    pushed |= unsafe { r.finish(heap, class, counts) };
                }
                run = Some(RemoteRun::new(s));
            }
            if let Some(r) = run.as_mut() {
                r.add(p, class, counts);
            }
        }
    }
    if let Some(r) = run {
        *foreign += r.foreign(owner);
        // SAFETY: as above.
        pushed |= unsafe { r.finish(heap, class, counts) };
    }
    // (The loom mutant `batch_no_drain` leaves this out, to show that the span-set
    // model's batched variant catches announcements left behind.)
    if pushed && !cfg!(spanheap_mutant = "batch_no_drain") {
        heap.central[class].try_drain(heap, class as u8);
    }
}

/// Asks the CPU to start loading the cache line at `p` (a no-op on targets without a
/// stable prefetch intrinsic). A hint only: any address, null included, is fine.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no memory, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The ordering of a remote free's bitmap OR (single or in a run): Release, paired with
/// the merger's Acquire swap. The loom mutant `remote_relaxed` weakens it to show that
/// a model catches it.
#[cfg(not(spanheap_mutant = "remote_relaxed"))]
const REMOTE_RELEASE: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "remote_relaxed")]
const REMOTE_RELEASE: Ordering = Ordering::Relaxed;

/// Consecutive remote frees into one span (see `remote_free_objs`).
struct RemoteRun {
    span: NonNull<MSpan>,
    base: usize,
    /// The span's bitmap record: remote words first.
    bits: *mut u64,
    /// The remote word being collected, and its bits.
    word: usize,
    mask: u64,
    count: u64,
}

impl RemoteRun {
    fn new(span: NonNull<MSpan>) -> Self {
        // SAFETY: span records are never unmapped; `info` is immutable while the span is
        // live, and the objects being freed keep it live.
        let (base, bits) = unsafe { (span.as_ref().base(), span.as_ref().info().bits) };
        RemoteRun {
            span,
            base,
            bits,
            word: 0,
            mask: 0,
            count: 0,
        }
    }

    /// The run's object count if its span's owner (current or last) is not `owner`.
    fn foreign(&self, owner: usize) -> u64 {
        // Relaxed: as in `free_to`, a hint.
        // SAFETY: span records are never unmapped.
        let o = unsafe { self.span.as_ref() }
            .small
            .owner
            .load(Ordering::Relaxed);
        if o != owner {
            self.count
        } else {
            0
        }
    }

    fn add(&mut self, p: *mut u8, class: usize, counts: &mut RemoteCounts) {
        let idx = obj_index(class as u8, p as usize - self.base);
        if idx / 64 != self.word {
            self.or_word(class, counts);
            self.word = idx / 64;
        }
        let bit = 1 << (idx % 64);
        if self.mask & bit != 0 {
            // The same object twice in one flush.
            crate::fatal::double_free(p as usize, CLASS_TO_SIZE[class] as usize);
        }
        self.mask |= bit;
        self.count += 1;
    }

    fn or_word(&mut self, class: usize, counts: &mut RemoteCounts) {
        if self.mask != 0 {
            counts.bitmap_rmws += 1;
            // SAFETY: the record starts with one atomic word per 64 objects, and `word`
            // came from an object index below nelems.
            let w = unsafe { &*self.bits.cast::<AtomicU64>().add(self.word) };
            // Release: our uses of the objects happen-before whoever merges the bits
            // reuses them.
            let old = w.fetch_or(self.mask, REMOTE_RELEASE);
            if old & self.mask != 0 {
                // Freed remotely before and not merged since: freed twice.
                let size = CLASS_TO_SIZE[class] as usize;
                let idx = self.word * 64 + (old & self.mask).trailing_zeros() as usize;
                crate::fatal::double_free(self.base + idx * size, size);
            }
            self.mask = 0;
        }
    }

    /// Publishes the bits, then counts the frees in the state word and announces the
    /// span when the run freed the first object since it was full (the count crossed
    /// zero) or its last live object. Returns whether it pushed the span on the
    /// mcentral's pending stack: then the caller must `try_drain` (see
    /// `MCentral::announce_deferred`).
    ///
    /// # Safety
    /// The run's objects were given up by their user.
    #[must_use]
    unsafe fn finish<M: MemSource>(
        mut self,
        heap: &Heap<M>,
        class: usize,
        counts: &mut RemoteCounts,
    ) -> bool {
        self.or_word(class, counts);
        counts.objects += self.count;
        counts.state_rmws += 1;
        // SAFETY: span records are never unmapped.
        let span = unsafe { self.span.as_ref() };
        // SeqCst: ordered with the owner's SeqCst state-word CASes (ownership changes).
        let old = span.small.rstate.fetch_add(self.count, Ordering::SeqCst);
        let (high, low) = rstate_parts(old);
        if high != RSTATE_OWNED {
            let n = self.count as i64;
            let last = low + n == high as i64;
            // One increment per object would have announced on the one that found the
            // count at zero (it can be transiently negative, see `mcentral`).
            let first = low <= 0 && low + n > 0;
            if last || first {
                counts.announces += 1;
                return heap.central[class].announce_deferred(self.span, last);
            }
        }
        false
    }
}

/// The remote free: lock-free, two atomic RMWs, and an announcement to the
/// mcentral when the span becomes allocatable again or completely free.
///
/// # Safety
/// As for `dealloc`.
#[cold]
pub(crate) unsafe fn remote_free<M: MemSource>(
    heap: &Heap<M>,
    p: *mut u8,
    s: NonNull<MSpan>,
    class: usize,
) {
    // SAFETY: span records are never unmapped; `info` is immutable while the span is
    // live, and the caller's object keeps it live.
    let span = unsafe { s.as_ref() };
    // SAFETY: as above.
    let bits = unsafe { span.info() }.bits;
    let idx = obj_index(class as u8, p as usize - span.base());
    // SAFETY: the record starts with one atomic word per 64 objects, idx < nelems.
    let word = unsafe { &*bits.cast::<AtomicU64>().add(idx / 64) };
    // Release: our uses of the object happen-before whoever merges the bit reuses it.
    let bit = 1 << (idx % 64);
    if word.fetch_or(bit, REMOTE_RELEASE) & bit != 0 {
        // Freed remotely before and not merged since: freed twice.
        crate::fatal::double_free(p as usize, CLASS_TO_SIZE[class] as usize);
    }
    // SeqCst: ordered with the owner's SeqCst state-word CASes (ownership changes).
    let old = span.small.rstate.fetch_add(1, Ordering::SeqCst);
    let (high, low) = rstate_parts(old);
    if high != RSTATE_OWNED {
        let last = low + 1 == high as i64;
        if last || low == 0 {
            heap.central[class].announce(heap, class as u8, s, last);
        }
    }
}
