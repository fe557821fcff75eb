//! The allocation entry points behind `GlobalAlloc` (Go's `malloc.go`): they turn a
//! `Layout` into work for the heap.
//!
//! A request whose `Layout` maps to a size class (up to 32 KiB, alignment up to 8 KiB,
//! see `sizeclasses::class_for_layout`) is a *small* object, served by the thread cache
//! (`mcache/`); anything else is a *large* object: a page span of its own, sized to
//! whole 8 KiB pages and aligned as asked. `dealloc` and `realloc` recompute the class
//! from the `Layout` they are given with the same function, so a block's class at free
//! time always matches its class at allocation time.
//!
//! None of these functions panics or unwinds; failures return null.

use core::ptr::{self, NonNull};

use crate::mheap::{MHeap, MAX_ALIGN, MAX_SPAN_BYTES};
use crate::mspan::Purpose;
use crate::os::{MemSource, PAGE_SHIFT, PAGE_SIZE};
use crate::pagecache::{HeapCache, BIG_MAX_PAGES, LARGE_MAX_PAGES};

/// Pages needed for `size` bytes (a zero-size request still gets a unique page), or
/// `None` if the request is larger than any span.
#[inline]
fn pages_for(size: usize) -> Option<usize> {
    if size > MAX_SPAN_BYTES {
        return None;
    }
    Some(size.div_ceil(PAGE_SIZE).max(1))
}

/// Allocates `size` bytes aligned to `align` (a power of two). Zeroes them if `zero`,
/// unless the memory is known to be zero already. Null on failure. `tc` is the calling
/// thread's heap cache, if it has one (small spans then need no lock).
#[inline(never)]
pub(crate) fn alloc<M: MemSource>(
    heap: &MHeap<M>,
    size: usize,
    align: usize,
    zero: bool,
    mut tc: Option<&mut HeapCache>,
) -> *mut u8 {
    let Some(npages) = pages_for(size) else {
        return ptr::null_mut();
    };
    if align > MAX_ALIGN {
        return ptr::null_mut();
    }
    let s = match tc.as_deref_mut() {
        Some(tc) => {
            // A cached block of the same size: nothing shared is touched.
            if align <= PAGE_SIZE {
                let kept = if npages <= LARGE_MAX_PAGES {
                    tc.take_large(npages)
                } else if npages <= BIG_MAX_PAGES {
                    take_big(heap, tc, npages)
                } else {
                    None
                };
                if let Some(s) = kept {
                    // SAFETY: a live span the cache owned, now ours.
                    let span = unsafe { s.as_ref() };
                    let p = span.base() as *mut u8;
                    if zero {
                        // SAFETY: the span covers at least `size` bytes from `p`.
                        unsafe { ptr::write_bytes(p, 0, size) };
                    }
                    return p;
                }
            }
            heap.alloc_span_with(npages, Purpose::Heap, 0, align, tc)
        }
        None => heap.alloc_span(npages, Purpose::Heap, 0, align),
    };
    // Out of memory with free pages in the thread's heap cache (page block, chunks,
    // kept blocks): they pin the arenas they lie in, which the heap could otherwise
    // give back to the OS when it is refused a growth (`MHeap::grow_locked`). Give them
    // back to the page heap and try once more.
    let s = match (s, tc) {
        (None, Some(tc)) => {
            heap.flush_heap_cache(tc);
            heap.alloc_span(npages, Purpose::Heap, 0, align)
        }
        (s, _) => s,
    };
    // The heap was asked: a slow path, where a due scavenger pass may run.
    heap.maybe_scavenge();
    let Some(s) = s else {
        return ptr::null_mut();
    };
    heap.count_large(0, npages);
    // SAFETY: we just allocated the span; it is ours.
    let span = unsafe { s.as_ref() };
    let p = span.base() as *mut u8;
    // SAFETY: the span is ours (we published it on this thread).
    if zero && unsafe { span.info() }.needzero {
        // SAFETY: the span covers at least `size` bytes from `p`.
        unsafe { ptr::write_bytes(p, 0, size) };
    }
    p
}

/// The thread's kept big block if it has `npages` pages (over `LARGE_MAX_PAGES`);
/// a kept block of another size goes back to the heap (the thread moved on).
fn take_big<M: MemSource>(
    heap: &MHeap<M>,
    tc: &mut HeapCache,
    npages: usize,
) -> Option<NonNull<crate::mspan::MSpan>> {
    match tc.take_big(npages) {
        Ok(s) => {
            // Big blocks drive the scavenger's passes whether or not they reach the
            // page heap: a clock read is nothing next to using half a megabyte or more.
            heap.maybe_scavenge();
            Some(s)
        }
        Err(other) => {
            if let Some(old) = other {
                // SAFETY: the kept block is a live span nobody uses.
                let old_pages = unsafe { old.as_ref() }.npages();
                heap.count_large(old_pages, 0);
                // SAFETY: as above.
                unsafe { heap.free_span_with(old, tc) };
            }
            None
        }
    }
}

/// Frees a block (`MHeap::free_large`, which the thread caches also reach).
///
/// # Safety
/// As for `MHeap::free_large`.
#[inline]
pub(crate) unsafe fn dealloc<M: MemSource>(
    heap: &MHeap<M>,
    p: *mut u8,
    tc: Option<&mut HeapCache>,
) {
    // SAFETY: forwarded.
    unsafe { heap.free_large(p, tc) }
}

/// Resizes the block at `p` (allocated with `align`, `old_size`) to `new_size` bytes,
/// keeping the old alignment. In place when the page count is unchanged, when it
/// shrinks, or when the following pages are free; otherwise allocate, copy, free.
/// Null on failure, the old block untouched.
///
/// # Safety
/// `p` is a live block of this heap allocated with alignment `align` and at least
/// `old_size` bytes.
pub(crate) unsafe fn realloc<M: MemSource>(
    heap: &MHeap<M>,
    p: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
    mut tc: Option<&mut HeapCache>,
) -> *mut u8 {
    let Some(new_pages) = pages_for(new_size) else {
        return ptr::null_mut();
    };
    let Some(s) = NonNull::new(heap.span_of_unchecked(p as usize)) else {
        return ptr::null_mut();
    };
    // SAFETY: `p` is a live block, so `s` is its live span, owned by the caller.
    let old_pages = unsafe { s.as_ref() }.npages();
    if new_pages == old_pages {
        return p;
    }
    if new_pages < old_pages {
        heap.count_large(old_pages, new_pages);
        // SAFETY: the caller owns the block; bytes past `new_size` are no longer used.
        unsafe { heap.shrink_span(s, new_pages) };
        return p;
    }
    // SAFETY: as above.
    if unsafe { heap.grow_span_in_place_with(s, new_pages, tc.as_deref_mut()) } {
        heap.count_large(old_pages, new_pages);
        return p;
    }
    // A block that grows by realloc is placed by the page allocator, not carved from
    // the thread's chunk cache: there its neighbours would belong to the cache and the
    // next growth could only move it (measured: `Vec` growth ran slower that way;
    // docs/benchmarks.md, "Figures moved from the design notes").
    let mut q = if new_pages >= crate::pagecache::MAX_CACHED_SPAN_PAGES {
        alloc(heap, new_size, align, false, None)
    } else {
        alloc(heap, new_size, align, false, tc.as_deref_mut())
    };
    if q.is_null() {
        if let Some(tc) = tc.as_deref_mut() {
            // Out of memory: as in `alloc`, the thread's cached free pages go back to
            // the page heap first (the block being resized is live, not among them).
            heap.flush_heap_cache(tc);
            q = alloc(heap, new_size, align, false, None);
        }
    }
    if q.is_null() {
        return q;
    }
    // A big block moves by its page tables (`mremap`), not by copying its bytes.
    let moved = match (NonNull::new(p), NonNull::new(q)) {
        // SAFETY: both blocks are live, page aligned, distinct (hence not overlapping:
        // spans never do) and ours; `q`'s contents are not needed.
        (Some(src), Some(dst)) if old_pages >= MOVE_MIN_PAGES => unsafe {
            heap.mem().move_pages(src, dst, old_pages << PAGE_SHIFT)
        },
        _ => None,
    };
    match moved {
        // SAFETY: both blocks are live, distinct, and at least this long.
        None => unsafe {
            ptr::copy_nonoverlapping(p, q, old_size.min(new_size));
            dealloc(heap, p, tc);
        },
        // The old block's pages are fresh (zero, unbacked) memory again.
        // SAFETY: a live block, freed once.
        Some(true) => unsafe { dealloc(heap, p, tc) },
        // The old block's range could not be mapped again (the OS refused a mapping):
        // its span stays allocated for good, so that nobody is handed the hole.
        Some(false) => {}
    }
    q
}

/// Blocks of at least this many pages (4 MiB) move by `mremap` when a realloc cannot
/// grow them in place; smaller ones are copied (two system calls cost about as much as
/// copying a few hundred KiB, and each move can leave the kernel's mappings split).
const MOVE_MIN_PAGES: usize = (4 << 20) >> PAGE_SHIFT;

/// The process-wide entry points behind `SpanHeap` (small objects through the thread
/// caches, large ones through the functions above).
#[cfg(not(spanheap_loom))]
pub(crate) mod global {
    use core::ptr;

    use crate::fastclass;
    use crate::global::{Process, HEAP};
    use crate::mcache;
    #[cfg(feature = "profile")]
    use crate::profile::sample as prof;
    use crate::sizeclasses::{class_for_layout, is_common, MAX_SMALL_SIZE};

    /// A common request's object (`size` bytes, alignment at most 8): the thread
    /// cache's fast path with the class from the fast paths' table, counted down for
    /// the heap profile (`mcache::alloc_cached_then`).
    #[inline(always)]
    fn common(size: usize) -> *mut u8 {
        let class = fastclass::size_class(size);
        let p = mcache::alloc_cached_then(class, |p| countdown_out(p));
        if !p.is_null() {
            #[cfg(feature = "checked")]
            crate::global::checked::on_alloc(p);
            return p;
        }
        common_miss(class)
    }

    /// `common` when the thread cache had nothing ready: its slow path, counted down
    /// too.
    #[inline(never)]
    fn common_miss(class: usize) -> *mut u8 {
        let p = mcache::alloc_slow::<Process>(class);
        #[cfg(feature = "profile")]
        let p = counted_slow(p, class, false);
        #[cfg(feature = "checked")]
        crate::global::checked::on_alloc(p);
        p
    }

    /// The thread cache's countdown of `p`'s class ran out at `p`, a fresh small object:
    /// the profile sets the next countdown and says whether this allocation is
    /// sampled; if it is, a block of its own replaces `p` (`sampled_instead`). Never
    /// null. (The class is found from `p`'s span rather than passed: one register less
    /// to keep live on the fast paths.)
    ///
    /// `extern "C"` (it never unwinds) so that C's `malloc`, itself `extern "C"`, calls
    /// it as a tail call, with no unwinding edge to keep its frame for. Without the
    /// `profile` feature the fast paths never call it.
    #[cold]
    #[inline(never)]
    extern "C" fn countdown_out(p: *mut u8) -> *mut u8 {
        #[cfg(feature = "profile")]
        if let Block::Small { class, .. } = block_of(p) {
            if mcache::next_countdown(class) {
                return sampled_instead(p, class, false);
            }
        }
        p
    }

    /// `p` (null, or a fresh object of class `class` (zeroed if `zero`) that a slow path
    /// took), or the block that replaces it if it ran the class's countdown out and is
    /// sampled. The slow paths' `countdown_out`, with the class they already know.
    #[cfg(feature = "profile")]
    fn counted_slow(p: *mut u8, class: usize, zero: bool) -> *mut u8 {
        if !p.is_null() && mcache::sample_due(class) {
            return sampled_instead(p, class, zero);
        }
        p
    }

    /// The sampled small object `p` of class `class`, replaced by a block of its own
    /// (zeroed if `zero`), recorded at the class's size (the size the countdown counts
    /// in, `mcache/tick.rs`); `p` goes back to the cache. `p` itself if there is no
    /// block for it: then it stays, unsampled.
    #[cfg(feature = "profile")]
    #[cold]
    #[inline(never)]
    fn sampled_instead(p: *mut u8, class: usize, zero: bool) -> *mut u8 {
        let size = crate::sizeclasses::CLASS_TO_SIZE[class] as usize;
        let q = sampled_block(size, 8, class, zero);
        if q.is_null() {
            return p;
        }
        // SAFETY: `p` is the live object of `class` the cache just gave us, unused.
        unsafe { mcache::dealloc::<Process>(p, class) };
        q
    }

    /// A block for a sampled allocation of `size` bytes aligned to `align`, `class`
    /// being its size class (0: large), recorded in the profile: a large block where it
    /// would be anyway, a block of the profile's own (of the class's size, so that a
    /// resize within the class stays in place) for a small object, so that its free
    /// always reaches a slow path that counts it (`profile::sample`, "A sampled small
    /// object"). Null if there is none (memory exhausted, or the profile's blocks of
    /// that size full): nothing is recorded, the caller allocates as usual.
    #[cfg(feature = "profile")]
    #[inline(never)]
    fn sampled_block(size: usize, align: usize, class: usize, zero: bool) -> *mut u8 {
        let q = if class == 0 {
            large_alloc(size, align, zero)
        } else {
            // The block is aligned to its size, a power of two at or above the class's
            // size, which is a multiple of `align`.
            prof::block(crate::sizeclasses::CLASS_TO_SIZE[class] as usize, zero)
        };
        if !q.is_null() {
            prof::record_sample(q, size);
        }
        q
    }

    /// C's `malloc(size)` if the calling thread's cache has an object of the class
    /// ready (free stack or window), else null. No slow path, no system call. Always
    /// null in checked mode (every allocation then takes the path that marks it live).
    #[inline(always)]
    pub(crate) fn malloc_cached(size: usize) -> *mut u8 {
        if cfg!(feature = "checked") || size > MAX_SMALL_SIZE {
            return ptr::null_mut();
        }
        // size <= MAX_SMALL_SIZE.
        let class = fastclass::malloc_class(size);
        mcache::alloc_cached_then(class, |p| countdown_out(p))
    }

    /// The class `malloc_cached` takes for a request of `size` bytes (tests).
    #[cfg(test)]
    pub(crate) fn malloc_class(size: usize) -> usize {
        fastclass::malloc_class(size)
    }

    #[inline]
    pub(crate) fn alloc(size: usize, align: usize) -> *mut u8 {
        if is_common(size, align) {
            return common(size);
        }
        alloc_uncommon(size, align)
    }

    /// `alloc` of an over-aligned small object or a large block (counted down on the
    /// out-of-line countdown while the heap profile is on).
    #[inline(never)]
    fn alloc_uncommon(size: usize, align: usize) -> *mut u8 {
        let class = class_for_layout(size, align) as usize;
        if class != 0 {
            let p = mcache::alloc::<Process>(class);
            // The class's countdown (an object of a class aligned beyond 8 is aligned
            // in the profile's block too: see `sampled_block`).
            #[cfg(feature = "profile")]
            let p = if prof::watching() {
                counted_slow(p, class, false)
            } else {
                p
            };
            #[cfg(feature = "checked")]
            crate::global::checked::on_alloc(p);
            return p;
        }
        #[cfg(feature = "profile")]
        if prof::watching() && prof::due(size) {
            let q = sampled_block(size, align, 0, false);
            if !q.is_null() {
                return q;
            }
        }
        large_alloc(size, align, false)
    }

    /// The large-object paths with the calling thread's heap cache. Out of line so that
    /// the thread-local lookup stays off the small-object paths.
    #[inline(never)]
    fn large_alloc(size: usize, align: usize, zero: bool) -> *mut u8 {
        let p =
            mcache::with_heap_cache::<Process, _>(|tc| super::alloc(&HEAP, size, align, zero, tc));
        if !p.is_null() {
            return p;
        }
        release_for_retry();
        mcache::with_heap_cache::<Process, _>(|tc| super::alloc(&HEAP, size, align, zero, tc))
    }

    /// Out of memory for a large block (the page heap could not grow, even after
    /// giving its wholly free arenas back to the OS and flushing the thread's heap
    /// cache): what else pins free memory in arenas that could then be given back goes
    /// back to the page heap before the one retry: the calling thread's small-object
    /// cache (its free stacks and current spans, so that spans it emptied retire) and
    /// every size class's spare spans. Takes the mcentral locks and the heap lock in
    /// rank order, holding none on entry (`large_alloc` and the large `realloc`s call it
    /// after their heap-cache section). Other threads' caches are left alone.
    #[cold]
    #[inline(never)]
    fn release_for_retry() {
        mcache::flush_own::<Process>();
        HEAP.release_spares();
    }

    /// # Safety
    /// `p` is a live large block, given up.
    #[inline(never)]
    unsafe fn large_dealloc(p: *mut u8) {
        // SAFETY: forwarded.
        mcache::with_heap_cache::<Process, _>(|tc| unsafe { super::dealloc(&HEAP, p, tc) })
    }

    #[inline]
    pub(crate) fn alloc_zeroed(size: usize, align: usize) -> *mut u8 {
        #[cfg(feature = "profile")]
        if prof::watching() {
            return zeroed_watched(size, align);
        }
        zeroed(size, align)
    }

    /// `alloc_zeroed` while the heap profile is on.
    #[cfg(feature = "profile")]
    #[inline(never)]
    fn zeroed_watched(size: usize, align: usize) -> *mut u8 {
        let class = class_for_layout(size, align) as usize;
        if class == 0 {
            if prof::due(size) {
                let q = sampled_block(size, align, 0, true);
                if !q.is_null() {
                    return q;
                }
            }
            return large_alloc(size, align, true);
        }
        let p = counted_slow(mcache::alloc_zeroed::<Process>(class, size), class, true);
        #[cfg(feature = "checked")]
        crate::global::checked::on_alloc(p);
        p
    }

    #[inline(always)]
    fn zeroed(size: usize, align: usize) -> *mut u8 {
        let class = class_for_layout(size, align);
        if class == 0 {
            return large_alloc(size, align, true);
        }
        let p = mcache::alloc_zeroed::<Process>(class as usize, size);
        #[cfg(feature = "checked")]
        crate::global::checked::on_alloc(p);
        p
    }

    /// # Safety
    /// `p` is a live block allocated with this `size` and `align`.
    #[inline]
    pub(crate) unsafe fn dealloc(p: *mut u8, size: usize, align: usize) {
        #[cfg(feature = "checked")]
        crate::global::checked::on_free(
            p,
            crate::global::checked::Expect::layout(size, align),
            true,
        );
        if is_common(size, align) {
            // SAFETY: `p` is a live object of this class (foreign pointers are ignored),
            // or a sampled one in its own block, which `mcache::dealloc_slow` frees.
            return unsafe { mcache::dealloc::<Process>(p, fastclass::size_class(size)) };
        }
        // SAFETY: forwarded.
        unsafe { dealloc_uncommon(p, size, align) }
    }

    /// `dealloc` of an over-aligned small object or a large block (a sampled object's
    /// free is counted first while the heap profile is on).
    ///
    /// # Safety
    /// As for `dealloc`.
    #[inline(never)]
    unsafe fn dealloc_uncommon(p: *mut u8, size: usize, align: usize) {
        let class = class_for_layout(size, align);
        if class == 0 {
            #[cfg(feature = "profile")]
            if prof::watching() {
                prof::before_free(p);
            }
            // SAFETY: forwarded.
            return unsafe { large_dealloc(p) };
        }
        // SAFETY: `p` is a live object of class `class` (foreign pointers are ignored).
        unsafe { mcache::dealloc::<Process>(p, class as usize) }
    }

    // -- By address alone (the C ABI: `free`, `malloc_usable_size`, `realloc`) -------

    /// What a pointer is to the heap: a small object of `class` (object size `size`,
    /// `p` at `off` bytes into it), a large block of `size` bytes from `p` to its end,
    /// or nothing (foreign, a metadata page, or freed).
    #[derive(Clone, Copy)]
    pub(crate) enum Block {
        Small {
            class: usize,
            size: usize,
            off: usize,
        },
        Large {
            size: usize,
            off: usize,
        },
        /// A sampled small object in a block of the heap profile's own, of `size`
        /// bytes, `p` at `off` bytes into it.
        #[cfg_attr(not(feature = "profile"), allow(dead_code))]
        Sampled {
            size: usize,
            off: usize,
        },
        Foreign,
    }

    /// Classifies `p` by its span (a lock-free span-map lookup).
    #[inline]
    pub(crate) fn block_of(p: *const u8) -> Block {
        let addr = p as usize;
        #[cfg(feature = "profile")]
        if crate::profile::blocks::contains(addr) {
            let (size, off) = crate::profile::blocks::size_and_offset(addr);
            return Block::Sampled { size, off };
        }
        let Some(s) = HEAP.span_of(addr) else {
            return Block::Foreign;
        };
        // SAFETY: span records are never unmapped; `span_of` validated the span as
        // published and covering `addr` (Acquire on its state).
        let span = unsafe { s.as_ref() };
        // SAFETY: a live span's info is written only before publication (and, for a
        // cached large block, by the block's owner, who is not using it elsewhere: the
        // caller of a by-address call owns the block).
        let info = unsafe { span.info() };
        if info.purpose != crate::mspan::Purpose::Heap {
            return Block::Foreign;
        }
        let class = info.spanclass as usize;
        if class == 0 {
            return Block::Large {
                size: span.base() + (span.npages() << crate::os::PAGE_SHIFT) - addr,
                off: addr - span.base(),
            };
        }
        let size = crate::sizeclasses::CLASS_TO_SIZE[class] as usize;
        Block::Small {
            class,
            size,
            off: (addr - span.base()) % size,
        }
    }

    /// Frees the block at `p` given only its address; null and foreign pointers are
    /// ignored.
    ///
    /// # Safety
    /// `p` is null, foreign, or a live block of this heap (from any allocation call),
    /// not used afterwards.
    #[inline]
    pub(crate) unsafe fn free_unsized(p: *mut u8) {
        // SAFETY: forwarded.
        unsafe {
            if !free_fast(p) {
                free_validated(p);
            }
        }
    }

    /// `free_unsized`'s first half: frees `p` and returns true if it is an object of
    /// the calling thread's current span of its class (`mcache::free_hinted`); else
    /// does nothing and returns false. Never makes a system call. Always false in
    /// checked mode, where every free is validated.
    ///
    /// # Safety
    /// As for `free_unsized`.
    #[inline(always)]
    pub(crate) unsafe fn free_fast(p: *mut u8) -> bool {
        #[cfg(feature = "checked")]
        {
            let _ = p;
            false
        }
        // SAFETY: forwarded.
        #[cfg(not(feature = "checked"))]
        unsafe {
            mcache::free_hinted::<Process>(p)
        }
    }

    /// `free_unsized`'s second half: looks the span up and frees `p` by what it says.
    ///
    /// # Safety
    /// As for `free_unsized`.
    #[inline(never)]
    pub(crate) unsafe fn free_validated(p: *mut u8) {
        #[cfg(feature = "checked")]
        if !p.is_null() {
            crate::global::checked::on_free(p, None, true);
        }
        #[cfg(feature = "profile")]
        if crate::profile::blocks::contains(p as usize) {
            if crate::profile::blocks::size_and_offset(p as usize).1 != 0 {
                interior("free", p);
            }
            return prof::free_block(p);
        }
        let Some((s, off)) = HEAP.span_and_offset_of(p as usize) else {
            return not_live("free", p);
        };
        // SAFETY: as in `block_of` (span records are never unmapped; the span was
        // validated as published, Acquire on its state).
        let info = unsafe { s.as_ref().info() };
        if info.purpose != crate::mspan::Purpose::Heap {
            return not_live("free", p);
        }
        let class = info.spanclass as usize;
        if class != 0 {
            // Not an object's start: one multiply and a compare, no division.
            if !mcache::at_object_start(class, off) {
                interior("free", p);
            }
            // The next free of a block in this arena may take `free_fast`.
            mcache::note_arena::<Process>(p);
            // SAFETY: a live object of that class (the caller's contract).
            unsafe { mcache::dealloc::<Process>(p, class) }
        } else {
            if off != 0 {
                interior("free", p);
            }
            // A large block, or a small object the profile sampled.
            #[cfg(feature = "profile")]
            if prof::watching() {
                prof::before_free(p);
            }
            // SAFETY: a live large block.
            unsafe { large_dealloc(p) }
        }
    }

    /// A by-address free or realloc of `p`, which is not in a live span of user
    /// blocks: a pointer spanheap never handed out is ignored (C programs under the
    /// preload free memory the dynamic loader allocated before spanheap took over), but
    /// one in pages the heap has used is a block freed already or the allocator's own
    /// metadata, and aborts.
    #[cold]
    #[inline(never)]
    fn not_live(what: &str, p: *mut u8) {
        if !HEAP.span_of_unchecked(p as usize).is_null() {
            crate::fatal::fatal(format_args!(
                "{what} of {:#x}, which is not a live block (freed already?)",
                p as usize
            ));
        }
    }

    /// A by-address free or realloc (`what`) of a pointer into a live block, not its
    /// start.
    #[cold]
    #[inline(never)]
    fn interior(what: &str, p: *mut u8) -> ! {
        crate::fatal::fatal(format_args!(
            "{what} of {:#x}, which points inside a block, not at its start",
            p as usize
        ))
    }

    /// Usable bytes of the live block at `p` (0 for null or foreign pointers).
    #[inline]
    pub(crate) fn usable_size(p: *const u8) -> usize {
        match block_of(p) {
            Block::Small { size, off, .. } => size - off,
            Block::Large { size, .. } | Block::Sampled { size, .. } => size,
            Block::Foreign => 0,
        }
    }

    /// Resizes the block at `p` (given only its address) to `new_size` bytes, moving
    /// it to a block aligned to `align` if it must move. Null if memory is exhausted
    /// or `p` is foreign (the block is then untouched).
    ///
    /// # Safety
    /// `p` is a live block of this heap, not null.
    pub(crate) unsafe fn realloc_unsized(p: *mut u8, new_size: usize, align: usize) -> *mut u8 {
        #[cfg(feature = "checked")]
        crate::global::checked::on_free(p, None, false);
        let new_class = class_for_layout(new_size, align);
        let old_size = match block_of(p) {
            Block::Small { off, .. } | Block::Large { off, .. } | Block::Sampled { off, .. }
                if off != 0 =>
            {
                interior("realloc", p)
            }
            // A sampled object moves (and so is freed, and counted).
            Block::Sampled { size, .. } => size,
            Block::Small { class, size, .. } => {
                if class == new_class as usize {
                    return p;
                }
                size
            }
            Block::Large { size, .. } => {
                if new_class == 0 {
                    // SAFETY: large to large: in place when possible; the old size
                    // only bounds the copy.
                    return unsafe { realloc_large_watched(p, size, align, new_size) };
                }
                size
            }
            Block::Foreign => {
                not_live("realloc", p);
                return ptr::null_mut();
            }
        };
        let q = alloc(new_size, align);
        if !q.is_null() {
            // SAFETY: distinct live blocks, each at least this long.
            unsafe {
                ptr::copy_nonoverlapping(p, q, old_size.min(new_size));
                free_unsized(p);
            }
        }
        q
    }

    /// `realloc_large`, as a free and an allocation for the heap profile while it is on.
    ///
    /// # Safety
    /// As for `realloc_large`.
    #[inline(always)]
    unsafe fn realloc_large_watched(
        p: *mut u8,
        old_size: usize,
        align: usize,
        new_size: usize,
    ) -> *mut u8 {
        #[cfg(feature = "profile")]
        if prof::watching() {
            // SAFETY: forwarded.
            return prof::resize(p, new_size, || unsafe {
                realloc_large(p, old_size, align, new_size)
            });
        }
        // SAFETY: forwarded.
        unsafe { realloc_large(p, old_size, align, new_size) }
    }

    /// A large block resized to a large block, with one retry after
    /// `release_for_retry` if memory is exhausted (a failed try leaves the block as it
    /// was).
    ///
    /// # Safety
    /// `p` is a live large block of at least `old_size` bytes allocated with `align`.
    unsafe fn realloc_large(p: *mut u8, old_size: usize, align: usize, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let q = mcache::with_heap_cache::<Process, _>(|tc| unsafe {
            super::realloc(&HEAP, p, old_size, align, new_size, tc)
        });
        if !q.is_null() {
            return q;
        }
        release_for_retry();
        // SAFETY: forwarded; the failed try left the block live and unchanged.
        mcache::with_heap_cache::<Process, _>(|tc| unsafe {
            super::realloc(&HEAP, p, old_size, align, new_size, tc)
        })
    }

    /// # Safety
    /// `p` is a live block allocated with `old_size` and `align`.
    pub(crate) unsafe fn realloc(
        p: *mut u8,
        old_size: usize,
        align: usize,
        new_size: usize,
    ) -> *mut u8 {
        #[cfg(feature = "checked")]
        crate::global::checked::on_free(
            p,
            crate::global::checked::Expect::layout(old_size, align),
            false,
        );
        let old_class = class_for_layout(old_size, align);
        let new_class = class_for_layout(new_size, align);
        if old_class != 0 && old_class == new_class {
            return p; // same object size: stays in place
        }
        if old_class == 0 && new_class == 0 {
            // SAFETY: forwarded (large to large: in place when possible).
            return unsafe { realloc_large_watched(p, old_size, align, new_size) };
        }
        let q = alloc(new_size, align);
        if !q.is_null() {
            // SAFETY: distinct live blocks, each at least this long.
            unsafe {
                ptr::copy_nonoverlapping(p, q, old_size.min(new_size));
                dealloc(p, old_size, align);
            }
        }
        q
    }
}

#[cfg(all(test, not(spanheap_loom)))]
mod tests {
    use super::*;
    use crate::os::TestMem;

    /// `malloc`'s one-load class table agrees with the path it short-cuts: round to
    /// glibc's alignment (`raw::malloc`), then `class_for_layout` with alignment 8; and
    /// the block it gives has that alignment.
    #[test]
    fn malloc_class_table_matches_the_rounding_path_for_every_small_size() {
        use crate::sizeclasses::{class_for_layout, CLASS_TO_SIZE, MAX_SMALL_SIZE};
        for size in 0..=MAX_SMALL_SIZE {
            let req = if size <= 8 {
                size.max(1)
            } else {
                (size + 15) & !15
            };
            let want = class_for_layout(req, 8) as usize;
            let got = global::malloc_class(size);
            assert_eq!(got, want, "size {size}");
            let obj = CLASS_TO_SIZE[got] as usize;
            assert!(obj >= size.max(1), "size {size}: object of {obj}");
            if size > 8 {
                assert_eq!(obj % 16, 0, "size {size}: 16-byte alignment");
            }
        }
    }

    #[test]
    fn the_object_start_test_is_exact_for_every_offset_of_every_class() {
        use crate::sizeclasses::{CLASS_TO_NPAGES, CLASS_TO_SIZE, NUM_CLASSES};
        for class in 1..NUM_CLASSES {
            let size = CLASS_TO_SIZE[class] as usize;
            let span = (CLASS_TO_NPAGES[class] as usize) << PAGE_SHIFT;
            for off in 0..span {
                assert_eq!(
                    crate::mcache::at_object_start(class, off),
                    off % size == 0,
                    "class {class} offset {off}"
                );
            }
        }
    }

    fn heap() -> &'static MHeap<TestMem> {
        Box::leak(Box::new(MHeap::new(TestMem)))
    }

    #[test]
    #[cfg_attr(miri, ignore = "moves pages with mremap")]
    fn a_big_block_that_cannot_grow_in_place_moves_its_pages() {
        let h = heap();
        let (mib, page) = (1usize << 20, 4096);
        let a = alloc(h, 16 * mib, 8, false, None);
        // A neighbour right behind it, so that `a` cannot grow in place.
        let b = alloc(h, mib, 8, false, None);
        assert_eq!(
            b as usize,
            a as usize + 16 * mib,
            "first fit put b elsewhere"
        );
        // SAFETY: live blocks of these sizes.
        unsafe {
            for off in (0..16 * mib).step_by(page) {
                a.add(off).write((off / page) as u8 | 1);
            }
            b.write_bytes(0x5A, mib);
        }
        // SAFETY: `a` is a live block of 16 MiB, alignment 8.
        let c = unsafe { realloc(h, a, 16 * mib, 8, 48 * mib, None) };
        assert!(!c.is_null() && c != a);
        // SAFETY: `c` is live with 48 MiB, `b` with 1 MiB.
        unsafe {
            for off in (0..16 * mib).step_by(page) {
                assert_eq!(c.add(off).read(), (off / page) as u8 | 1, "offset {off}");
            }
            c.add(48 * mib - 1).write(7);
            assert!(core::slice::from_raw_parts(b, mib)
                .iter()
                .all(|&x| x == 0x5A));
        }
        // The old range was moved, not copied: it is mapped again, free, and reads as
        // zero (a copy would have left the old bytes there, freed but resident).
        let old = unsafe { core::slice::from_raw_parts(a, 16 * mib) };
        assert!(
            old.iter().step_by(page).all(|&x| x == 0),
            "the block was copied"
        );
        // SAFETY: live blocks, freed once.
        unsafe {
            dealloc(h, c, None);
            dealloc(h, b, None);
        }
        assert_eq!(h.counters().heap_inuse, 0);
    }

    #[test]
    fn a_big_block_of_the_size_a_thread_keeps_taking_is_kept_for_it() {
        // Blocks over 512 KiB are kept only while the thread allocates the same size
        // again: one block, given back when a big allocation of another size comes.
        let h = heap();
        let mut tc = HeapCache::new();
        let (four, six) = (4 << 20, 6 << 20);
        let p = alloc(h, four, 8, false, Some(&mut tc));
        assert!(!p.is_null());
        // SAFETY: a live block of `four` bytes.
        unsafe {
            p.write_bytes(0xA5, four);
            dealloc(h, p, Some(&mut tc));
        }
        assert!(!tc.big.is_null(), "a repeated size was not kept");
        let inuse = h.counters().heap_inuse;
        let q = alloc(h, four, 8, false, Some(&mut tc));
        assert_eq!(q, p, "the kept block was not reused");
        assert!(tc.big.is_null());
        assert_eq!(
            h.counters().heap_inuse,
            inuse,
            "a reuse touched the page heap"
        );
        // SAFETY: as above.
        unsafe { dealloc(h, q, Some(&mut tc)) };
        // Another big size: the kept block goes back to the heap at once.
        let r = alloc(h, six, 8, false, Some(&mut tc));
        assert!(!r.is_null());
        assert!(tc.big.is_null(), "the block of the old size is still kept");
        assert_eq!(
            h.counters().heap_inuse,
            (six as u64),
            "only the new block is live"
        );
        // SAFETY: a live block of `six` bytes.
        unsafe {
            r.write_bytes(0x5A, six);
            dealloc(h, r, Some(&mut tc));
        }
        // alloc_zeroed of the kept block clears it.
        let z = alloc(h, six, 8, true, Some(&mut tc));
        assert_eq!(z, r);
        // SAFETY: a live block of `six` bytes.
        let bytes = unsafe { core::slice::from_raw_parts(z, six) };
        assert!(
            bytes.iter().all(|&b| b == 0),
            "a reused block was not cleared"
        );
        // A big free of a size the thread did not just allocate is not kept.
        let a = alloc(h, four, 8, false, Some(&mut tc));
        // SAFETY: live blocks, freed once.
        unsafe {
            dealloc(h, z, Some(&mut tc));
            assert!(tc.big.is_null(), "kept a size that is not the last one");
            dealloc(h, a, Some(&mut tc));
        }
        assert!(!tc.big.is_null());
        h.flush_heap_cache(&mut tc);
        assert!(tc.big.is_null());
        assert_eq!(h.counters().heap_inuse, 0, "the kept block was not freed");
    }
}
