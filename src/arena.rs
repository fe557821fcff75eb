//! Heap arenas, the two-level arena index, the span map and the `pageInUse` bitmap.
//!
//! The heap grows in *arenas*: 64 MiB of address space aligned to 64 MiB (Go's
//! `heapArena`). Every arena has a metadata record, kept outside the arena in memory
//! from the OS layer, holding
//!
//! - the **span map**: one entry per 8 KiB page naming the span that owns the page, so
//!   that `dealloc` finds a block's span from its address without a lock;
//! - the **`pageInUse` bitmap**: one bit per page, set only for the *first* page of each
//!   in-use heap span (seed 001), so a sweeper or a statistics reader can enumerate live
//!   spans without locking the heap;
//! - `zeroed_base`: the offset below which the arena's pages may have been written.
//!
//! Arena records are found through a two-level index over the 48-bit address space:
//! `L1` (64 entries, part of the heap) points to lazily allocated `L2` arrays (65,536
//! entries, 512 KiB of virtual memory each, resident only where touched), which point
//! to arena records. Lookups are lock-free; entries are only ever added, under the heap
//! lock, and never removed: an arena whose address space the heap gives back to the OS
//! (`MHeap::release_free_arenas_locked`) keeps its record, its span map emptied
//! (`forget_pages_locked`), and gets it back if the range is grown again.
//!
//! Shared fields and what protects them:
//!
//! | field                   | written                                   | read                  |
//! |-------------------------|-------------------------------------------|-----------------------|
//! | `ArenaIndex::l1[i]`     | once, under the heap lock (Release)       | lock-free (Acquire)   |
//! | `L2` entries            | once, under the heap lock (Release)       | lock-free (Acquire)   |
//! | `HeapArena::spans[p]`   | by the thread publishing the span owning p, no lock (Release) | lock-free (Acquire) |
//! | `HeapArena::page_in_use`| atomic OR / AND by span publication and release | lock-free       |
//! | `HeapArena::zeroed_base`| atomic max by the allocating thread       | atomic                |

use core::ptr::{self, NonNull};

use crate::mspan::MSpan;
use crate::os::{MemSource, OsError, ADDR_LIMIT, PAGE_SHIFT, PAGE_SIZE};
use crate::sync::{init_atomics, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// log2 of the arena size.
#[cfg(not(spanheap_loom))]
pub(crate) const ARENA_SHIFT: u32 = 26;
/// Under loom: 4 MiB arenas (one page-allocator chunk, 512 pages), so that an arena
/// record holds 512 + 64 loom atomics instead of 8,192 + 1,024. Same code paths.
#[cfg(spanheap_loom)]
pub(crate) const ARENA_SHIFT: u32 = 22;
/// Size of a heap arena: 64 MiB (4 MiB under loom).
pub(crate) const ARENA_SIZE: usize = 1 << ARENA_SHIFT;
/// Heap pages per arena (8,192; 512 under loom).
pub(crate) const PAGES_PER_ARENA: usize = ARENA_SIZE / PAGE_SIZE;

/// The address space the arena index covers: all of it.
#[cfg(not(spanheap_loom))]
const INDEX_LIMIT: usize = ADDR_LIMIT;
/// Under loom: the low 64 GiB only, so that the index is 64 + 256 loom atomics instead
/// of 64 + 65,536. Lookups of addresses at or above it answer "not in the heap", as at
/// `ADDR_LIMIT` normally; the heap must never grow there, so the models' memory source
/// (`loom-tests/src/lib.rs`) hands out addresses below it.
#[cfg(spanheap_loom)]
const INDEX_LIMIT: usize = 1 << 36;
const _: () = assert!(INDEX_LIMIT <= ADDR_LIMIT);

/// Bits of an arena number (48-bit addresses / 64 MiB arenas = 2^22 arenas).
const ARENA_BITS: u32 = INDEX_LIMIT.trailing_zeros() - ARENA_SHIFT;
const L1_BITS: u32 = 6;
const L2_BITS: u32 = ARENA_BITS - L1_BITS;
const L1_ENTRIES: usize = 1 << L1_BITS;
const L2_ENTRIES: usize = 1 << L2_BITS;
const _: () = assert!(INDEX_LIMIT == 1 << (ARENA_BITS + ARENA_SHIFT));

/// Metadata of one 64 MiB arena. Lives in OS metadata memory, never freed.
#[repr(C)]
pub(crate) struct HeapArena {
    /// Span map: `spans[p]` is the span that owns page `p` of the arena, or null if the
    /// page was never part of a span. Entries of freed spans are left in place (they
    /// point to a dead span record; readers check its state), until the scavenger drops
    /// the entries of a whole chunk of free, released pages, which then read as null
    /// again ([`ArenaIndex::chunk_span_map`]). Written with Release by
    /// the thread publishing the owning span, read with Acquire.
    ///
    /// An entry's top byte (`CLASS_SHIFT`) carries the span's size class (0 for other
    /// spans): the size-class hint of the C ABI's `free` (`mcache::free_hinted`), read
    /// with the entry in one Relaxed load. An entry left by a dead span still names
    /// its class, so the hint may be stale: `free_hinted` takes its class only if the
    /// block lies in the calling thread's current span of that class, which is a live
    /// span of that class whatever the entry's age. Record pointers are below 2^47, so
    /// the byte is free; `span_at` masks it off.
    spans: [AtomicPtr<MSpan>; PAGES_PER_ARENA],
    /// `pageInUse`: bit `p` is set iff page `p` is the first page of a heap span in
    /// state InUse. Updated with atomic OR/AND (seed 001).
    page_in_use: [AtomicU8; PAGES_PER_ARENA / 8],
    /// Bytes from the arena start below which pages may have been written since the arena
    /// was mapped; pages at or above it are still zero from the OS. Only grows (atomic
    /// fetch_max), Go's `zeroedBase`, until the arena is unmapped
    /// (`ArenaIndex::forget_pages_locked` sets it back to 0).
    zeroed_base: AtomicUsize,
}

/// Where a span-map entry keeps its span's size class (see `HeapArena::spans`).
const CLASS_SHIFT: u32 = 56;
/// The record-pointer bits of a span-map entry.
const ENTRY_ADDR: usize = (1 << CLASS_SHIFT) - 1;
const _: () = assert!(crate::sizeclasses::NUM_CLASSES <= 1 << (usize::BITS - CLASS_SHIFT));

type L2 = [AtomicPtr<HeapArena>; L2_ENTRIES];

/// A one-entry memo of arena lookups: (arena number, record). See
/// [`ArenaIndex::arena_of_hinted`].
pub(crate) type ArenaHint = (usize, *const HeapArena);
/// A hint that matches no address (arena numbers are below 2^38).
pub(crate) const NO_ARENA: ArenaHint = (usize::MAX, ptr::null());

/// The ordering of span-map stores. The loom mutant `span_map_relaxed` weakens it to
/// show that the publication model catches it.
#[cfg(not(spanheap_mutant = "span_map_relaxed"))]
const PUBLISH_SPAN: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "span_map_relaxed")]
const PUBLISH_SPAN: Ordering = Ordering::Relaxed;

/// Orderings of the `pageInUse` updates. The loom mutants `in_use_relaxed` and
/// `clear_in_use_relaxed` weaken them to show that the models catch it.
#[cfg(not(spanheap_mutant = "in_use_relaxed"))]
const MARK_IN_USE: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "in_use_relaxed")]
const MARK_IN_USE: Ordering = Ordering::Relaxed;
#[cfg(not(spanheap_mutant = "clear_in_use_relaxed"))]
const CLEAR_IN_USE: Ordering = Ordering::Release;
#[cfg(spanheap_mutant = "clear_in_use_relaxed")]
const CLEAR_IN_USE: Ordering = Ordering::Relaxed;

/// The two-level index from address to arena record.
pub(crate) struct ArenaIndex {
    /// `l1[i]` points to the L2 array for the i-th 2^42-byte region, or is null.
    /// Set once under the heap lock (Release); read lock-free (Acquire).
    l1: [AtomicPtr<L2>; L1_ENTRIES],
}

#[inline]
pub(crate) fn arena_number(addr: usize) -> usize {
    addr >> ARENA_SHIFT
}

impl ArenaIndex {
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const NULL: AtomicPtr<L2> = AtomicPtr::new(ptr::null_mut());
        ArenaIndex {
            l1: [NULL; L1_ENTRIES],
        }
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn new() -> Self {
        ArenaIndex {
            l1: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }

    /// The arena record for `addr`, or `None` if `addr` is not in the heap. Lock-free.
    #[inline]
    pub(crate) fn arena_of(&self, addr: usize) -> Option<&HeapArena> {
        if addr >= INDEX_LIMIT {
            return None;
        }
        let n = arena_number(addr);
        // Acquire pairs with the Release in `insert_locked`: the L2 array's
        // initialisation is visible before we index it.
        let l2 = self.l1[n >> L2_BITS].load(Ordering::Acquire);
        if l2.is_null() {
            return None;
        }
        // SAFETY: non-null L2 pointers point to initialised, never-freed L2 arrays, and
        // the index is masked to L2_ENTRIES.
        let entry = unsafe { &(*l2)[n & (L2_ENTRIES - 1)] };
        // Acquire pairs with the Release in `insert_locked`: the arena record is
        // initialised before it becomes reachable.
        let a = entry.load(Ordering::Acquire);
        // SAFETY: non-null entries point to arena records that are never freed.
        unsafe { a.as_ref() }
    }

    /// `arena_of` through a one-entry memo of the caller's: `hint` holds the arena
    /// number and record of an earlier lookup (start it at [`NO_ARENA`]). Records are
    /// never moved or removed and an arena number never changes record, so a matching
    /// number needs no walk of the index: the record pointer is ready before the
    /// address is even compared, where the walk is two dependent loads.
    #[inline(always)]
    pub(crate) fn arena_of_hinted(&self, addr: usize, hint: &mut ArenaHint) -> Option<&HeapArena> {
        let n = arena_number(addr);
        if n == hint.0 {
            // SAFETY: `hint.1` came from `arena_of` for arena number `n` (a number never
            // matches `NO_ARENA`'s): a record that is never freed.
            return Some(unsafe { &*hint.1 });
        }
        self.arena_of_miss(addr, hint)
    }

    /// `arena_of_hinted` when the memo does not match: walks the index and refills the
    /// memo. Out of line and cold, so that the hit path keeps its registers (inline, the
    /// flush loop of `MCentral::free_unowned` shuffled the memo between registers on
    /// every object).
    #[cold]
    #[inline(never)]
    fn arena_of_miss(&self, addr: usize, hint: &mut ArenaHint) -> Option<&HeapArena> {
        let a = self.arena_of(addr)?;
        *hint = (arena_number(addr), a);
        Some(a)
    }

    /// Makes sure the L2 array covering `addr` exists. Needs the heap lock.
    pub(crate) fn ensure_l2_locked(
        &self,
        mem: &dyn MemSource,
        addr: usize,
    ) -> Result<usize, OsError> {
        let slot = &self.l1[arena_number(addr) >> L2_BITS];
        // Relaxed: only lock holders write L1 and we hold the lock.
        if !slot.load(Ordering::Relaxed).is_null() {
            return Ok(0);
        }
        let bytes = core::mem::size_of::<L2>();
        let p = mem.alloc_meta(bytes)?.cast::<L2>();
        // SAFETY: fresh zero-filled metadata memory large enough for an L2 array.
        unsafe { init_atomics(p.as_ptr().cast::<AtomicPtr<HeapArena>>(), L2_ENTRIES) };
        // Release pairs with the Acquire in `arena_of`.
        slot.store(p.as_ptr(), Ordering::Release);
        Ok(bytes)
    }

    /// Publishes the arena record for the arena starting at `base`. Needs the heap lock,
    /// and `ensure_l2_locked(base)` must have succeeded.
    pub(crate) fn insert_locked(&self, base: usize, arena: NonNull<HeapArena>) {
        let n = arena_number(base);
        let l2 = self.l1[n >> L2_BITS].load(Ordering::Relaxed);
        debug_assert!(!l2.is_null());
        if l2.is_null() {
            return;
        }
        // SAFETY: checked non-null above; L2 arrays are never freed.
        let entry = unsafe { &(*l2)[n & (L2_ENTRIES - 1)] };
        // Release pairs with the Acquire in `arena_of`: the record's initialisation
        // happens-before any lookup that finds it.
        entry.store(arena.as_ptr(), Ordering::Release);
    }
}

impl HeapArena {
    /// Allocates and initialises a record from OS metadata memory. Returns the record
    /// and the bytes it took.
    pub(crate) fn new_in(mem: &dyn MemSource) -> Result<(NonNull<HeapArena>, usize), OsError> {
        let bytes = core::mem::size_of::<HeapArena>();
        let p = mem.alloc_meta(bytes)?.cast::<HeapArena>();
        // SAFETY: fresh, zero-filled, page-aligned memory of `bytes` bytes; every field
        // is an atomic (or array of them) whose zero value is what we want.
        unsafe {
            let a = p.as_ptr();
            init_atomics(
                ptr::addr_of_mut!((*a).spans).cast::<AtomicPtr<MSpan>>(),
                PAGES_PER_ARENA,
            );
            init_atomics(
                ptr::addr_of_mut!((*a).page_in_use).cast::<AtomicU8>(),
                PAGES_PER_ARENA / 8,
            );
            init_atomics(ptr::addr_of_mut!((*a).zeroed_base), 1);
            // `zeroed_base` is read before it is first written: fault its page (with
            // the in-use bitmap) in for writing now, once, instead of twice.
            crate::os::touch_for_write(ptr::addr_of_mut!((*a).zeroed_base).cast::<u64>());
        }
        Ok((p, bytes))
    }

    #[inline]
    fn page_index(addr: usize) -> usize {
        (addr >> PAGE_SHIFT) & (PAGES_PER_ARENA - 1)
    }

    /// The span-map entry of the page holding `addr` (Acquire: pairs with the Release
    /// in [`ArenaIndex::set_spans`], so a non-null span's record is initialised).
    #[inline]
    pub(crate) fn span_at(&self, addr: usize) -> *mut MSpan {
        let e = self.spans[Self::page_index(addr)].load(Ordering::Acquire);
        // Take the class byte off by offsetting the pointer (keeps its provenance).
        e.wrapping_byte_sub(e as usize & !ENTRY_ADDR)
    }

    /// The size class the span-map entry of the page holding `addr` names (see
    /// `spans`: it may be stale, and 0 means none). Relaxed: the reader's own check,
    /// not the entry, is what it relies on.
    #[cfg(not(spanheap_loom))]
    #[cfg_attr(feature = "checked", allow(dead_code))] // checked mode validates every free
    #[inline(always)]
    pub(crate) fn class_hint_at(&self, addr: usize) -> usize {
        self.spans[Self::page_index(addr)].load(Ordering::Relaxed) as usize >> CLASS_SHIFT
    }
}

impl ArenaIndex {
    /// Points the span map entries of `npages` pages from `base` at `s`.
    ///
    /// Needs no lock: until the span is published, only the publishing thread knows
    /// these pages are allocated. The Release stores pair with the Acquire in
    /// [`HeapArena::span_at`]: a reader that finds `s` also sees `s`'s record as it was
    /// initialised before this call. Pages may cross arena boundaries (large spans in
    /// contiguous arenas). `class` is the span's size class (0 for other spans), kept
    /// in the entries' top byte (see `HeapArena::spans`).
    pub(crate) fn set_spans(&self, base: usize, npages: usize, s: *mut MSpan, class: u8) {
        debug_assert!(s as usize <= ENTRY_ADDR, "span record above 2^56");
        let entry = s.wrapping_byte_add((class as usize) << CLASS_SHIFT);
        self.for_each_run(base, npages, |arena, pages| {
            for slot in &arena.spans[pages] {
                slot.store(entry, PUBLISH_SPAN);
            }
        });
    }

    /// Runs `f` on each arena's share of `npages` pages from `base`, as that arena's
    /// record and a range of its page indices (pages may cross arena boundaries: large
    /// spans in contiguous arenas).
    fn for_each_run(
        &self,
        base: usize,
        npages: usize,
        mut f: impl FnMut(&HeapArena, core::ops::Range<usize>),
    ) {
        let mut addr = base;
        let end = base + npages * PAGE_SIZE;
        while addr < end {
            let Some(arena) = self.arena_of(addr) else {
                debug_assert!(false, "span pages outside the heap");
                return;
            };
            let first = HeapArena::page_index(addr);
            let arena_end = (addr & !(ARENA_SIZE - 1)) + ARENA_SIZE;
            let last = if end < arena_end {
                HeapArena::page_index(end - 1) + 1
            } else {
                PAGES_PER_ARENA
            };
            f(arena, first..last);
            addr = arena_end.min(end);
        }
    }

    /// The span-map entries of the 4 MiB page-allocator chunk at `chunk_base`, as a
    /// byte range that fills whole OS pages (512 entries of 8 bytes: one 4 KiB page,
    /// page aligned because arena records are and the span map comes first), for the
    /// scavenger to drop when every page of the chunk is free and returned to the OS.
    /// `None` outside the heap or where the OS page is not 4 KiB.
    ///
    /// Dropping is sound because the entries of free pages carry nothing: a dropped
    /// page reads back as null entries, "never part of a span", which every reader
    /// already handles, as it handles an entry of a dead span; and nobody writes them,
    /// since a span-map entry is only stored by a thread that owns the page, after
    /// taking it from the page allocator. The caller must hold the heap lock and see
    /// every page of the chunk free, so that no thread owns one until the lock is let go.
    #[cfg(not(spanheap_loom))]
    pub(crate) fn chunk_span_map(
        &self,
        chunk_base: usize,
        os_page: usize,
    ) -> Option<(NonNull<u8>, usize)> {
        let bytes = crate::pagealloc::CHUNK_PAGES * core::mem::size_of::<AtomicPtr<MSpan>>();
        let arena = self.arena_of(chunk_base)?;
        let entry = &arena.spans[HeapArena::page_index(chunk_base)];
        let p = NonNull::from(entry).cast::<u8>();
        (os_page == bytes && p.as_ptr() as usize % os_page == 0).then_some((p, bytes))
    }

    /// Forgets what the record of the arena at `base` says about its pages, for a heap
    /// that is about to give the arena's address space back to the OS (`munmap`): its
    /// span map reads as null again ("never part of a span"), so that a pointer into
    /// whatever the OS maps there later is not taken for one of ours (the C ABI's
    /// `free` aborts on a pointer into pages the heap has used), and `zeroed_base` is
    /// back to 0, so that the pages of a fresh mapping at the same address are known to
    /// be zero if the arena is grown again. The record itself stays in the index (an
    /// address range keeps its record). The span map (with the size classes its
    /// entries carry) is dropped with `decommit` where it fills whole OS pages
    /// (the record's span map is 64 KiB, page aligned), else its entries are stored
    /// null one by one; returns false if the OS refused the `decommit` (the entries
    /// were then stored null).
    ///
    /// The caller holds the heap lock and has seen every page of the arena free in the
    /// page allocator: nobody owns a page of it, so nobody writes its span-map entries
    /// or its `zeroed_base` (both are only written by a thread that took pages from the
    /// page allocator) until the lock is let go; lock-free readers may read either value
    /// of an entry, and handle both (as for `chunk_span_map`). No span of it is in use,
    /// so its `pageInUse` bits are clear already.
    pub(crate) fn forget_pages_locked(&self, mem: &dyn MemSource, base: usize) -> bool {
        let Some(a) = self.arena_of(base) else {
            return true;
        };
        debug_assert!(
            a.page_in_use.iter().all(|b| b.load(Ordering::Relaxed) == 0),
            "an arena with a span in use is being released"
        );
        a.zeroed_base.store(0, Ordering::Relaxed);
        // Not under loom: the models' span map is loom atomics, not plain memory.
        #[cfg(not(spanheap_loom))]
        let refused = {
            let bytes = core::mem::size_of_val(&a.spans);
            let p = NonNull::from(&a.spans).cast::<u8>();
            let whole = crate::os::os_page_size()
                .is_ok_and(|page| bytes % page == 0 && p.as_ptr() as usize % page == 0);
            // SAFETY: whole OS pages of the record's span map, metadata memory from the
            // OS layer (Ready); nobody writes them while the caller holds the heap lock
            // (above), and their zero value is valid for every reader.
            if whole && unsafe { mem.decommit(p, bytes) } {
                return true;
            }
            whole
        };
        #[cfg(spanheap_loom)]
        let refused = {
            let _ = mem;
            false
        };
        for e in &a.spans {
            // Relaxed: a null entry carries nothing for a reader to see.
            e.store(ptr::null_mut(), Ordering::Relaxed);
        }
        !refused
    }

    /// Sets the `pageInUse` bit of the page at `base`. Release: a reader that sees the
    /// bit (Acquire) and then reads the span map finds a fully published span.
    pub(crate) fn mark_in_use(&self, base: usize) {
        if let Some(a) = self.arena_of(base) {
            let i = HeapArena::page_index(base);
            a.page_in_use[i / 8].fetch_or(1 << (i % 8), MARK_IN_USE);
        }
    }

    /// Clears the `pageInUse` bit of the page at `base`. Release: a reader that sees the
    /// bit clear (Acquire) after having seen it set also sees `pages_in_use` without the
    /// span (`free_span` lowers the count first).
    pub(crate) fn clear_in_use(&self, base: usize) {
        if let Some(a) = self.arena_of(base) {
            let i = HeapArena::page_index(base);
            a.page_in_use[i / 8].fetch_and(!(1 << (i % 8)), CLEAR_IN_USE);
        }
    }

    /// Whether the `pageInUse` bit of the page at `base` is set (tests and the loom
    /// models; the scavenger and statistics walkers will read the bitmap too).
    pub(crate) fn is_marked_in_use(&self, base: usize) -> bool {
        self.arena_of(base).is_some_and(|a| {
            let i = HeapArena::page_index(base);
            // Acquire pairs with the Release in `mark_in_use`.
            a.page_in_use[i / 8].load(Ordering::Acquire) & (1 << (i % 8)) != 0
        })
    }

    /// Whether [base, base + npages pages) has never been written since it was mapped, and
    /// records that it is about to be. Lock-free; several threads may allocate in one
    /// arena at once (Go's `allocNeedsZero`).
    pub(crate) fn needs_zero(&self, base: usize, npages: usize) -> bool {
        let mut needs = false;
        let mut addr = base;
        let end = base + npages * PAGE_SIZE;
        while addr < end {
            let arena_start = addr & !(ARENA_SIZE - 1);
            let arena_end = arena_start + ARENA_SIZE;
            let (off, stop) = (addr - arena_start, end.min(arena_end) - arena_start);
            match self.arena_of(addr) {
                Some(a) => {
                    // Relaxed is enough: the value only orders "has been handed out" for
                    // this address range, and the span carrying the pages is published
                    // with its own Release/Acquire. A stale, lower value only makes us
                    // zero memory that is already zero.
                    // Reused memory (the common case) needs no read-modify-write.
                    let mut prev = a.zeroed_base.load(Ordering::Relaxed);
                    if stop > prev {
                        prev = a.zeroed_base.fetch_max(stop, Ordering::Relaxed);
                    }
                    needs |= off < prev;
                }
                None => needs = true,
            }
            addr = arena_end;
        }
        needs
    }
}
