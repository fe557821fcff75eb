//! Fixed-size record allocators for the allocator's own metadata (Go's `fixalloc`),
//! with one thing Go's lacks: chunks whose records are all free give their pages back.
//!
//! Records are carved from 64 KiB chunks that the owner supplies (the mheap gives it
//! manual spans of the record kind's purpose, aligned to their size) and recycled
//! through free lists. Records are constructed once, when first carved, and never
//! dropped or unmapped: a stale pointer to a record (from the span map, say) stays a
//! pointer to a valid record of the same type. This is also what lets loom track
//! records' atomics across recycling. An allocator is protected by whatever lock its
//! owner keeps it under (the heap lock for all three kinds): every method takes
//! `&mut self`.
//!
//! **Layout.** A chunk opens with a [`ChunkHead`]: its free list (each chunk keeps its
//! own, so that a chunk whose records are all free can be found), its carving point and
//! its links in the allocator's list of chunks that have a record to give. The
//! allocator takes records from the first chunk of that list; a record freed into a
//! full chunk puts the chunk at the list's end. Where records are small enough
//! (*paged* allocators: span and bitmap records, at most half a 4 KiB page), no record
//! straddles a 4 KiB page boundary, so that the 15 pages after the chunk's first hold
//! whole records only.
//!
//! **Giving pages back.** After a burst a program may free thousands of spans at
//! once; their records (200 bytes each) would stay resident for good, as they do in Go.
//! [`take_empty`](Slab::take_empty) hands the owner (the scavenger) the pages of a
//! paged allocator's chunks (past each chunk's first) whose records are all carved and
//! free, withdrawn from use: their records leave the free list and nothing is carved
//! there. The owner returns those pages to the OS without its lock and then gives them
//! back with [`put_back`](Slab::put_back); their slots are carved again, one page at a
//! time, once the chunk has nothing else. Such a record is not constructed again (a
//! reader holding a stale pointer may be loading its atomics): its bytes read as zero,
//! which for a bitmap is a cleared one and for a span record a free one in state
//! `Dead` once [`Record::revive`] has restored the one field whose free value is not
//! zero. If the OS refused, the record holds what it held when freed, which is valid
//! too. Thread-cache records are not paged (each owns a mapping for its free stacks
//! that it keeps for its next owner) and never give pages back.

use core::marker::PhantomData;
use core::ptr;

use crate::sync::UnsafeCell;

/// Bytes of a chunk; chunks are aligned to it, so a record's chunk is its address
/// rounded down.
pub(crate) const CHUNK_BYTES: usize = 64 << 10;
/// Paged allocators place no record across a boundary of this many bytes.
pub(crate) const RECORD_PAGE: usize = 4 << 10;

/// A record type a [`FixAlloc`] can hand out.
///
/// # Safety
/// `free_link` must return a field of `self` that nothing else uses while the record is
/// free in the allocator; where the allocator is paged (records of at most half a
/// [`RECORD_PAGE`]), a record whose bytes are all zero must be a valid free record
/// once [`revive`](Record::revive) has run on it.
pub(crate) unsafe trait Record: Sized {
    /// A newly constructed record (run once per slot, when the slot is first carved).
    fn fresh() -> Self;
    /// The intrusive free-list link.
    fn free_link(&self) -> &UnsafeCell<*mut Self>;
    /// Restores what a free record holds and zero bytes do not, in a record carved
    /// again from a page that went back to the OS (its bytes read as zero, or as they
    /// were if the OS refused). Runs under the owner's lock on a free record; it may
    /// write only what no lock-free reader of a stale pointer looks at.
    fn revive(&self) {}
}

/// How [`Slab::alloc`] came by a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carved {
    /// From a free list: a record as it was freed.
    Recycled,
    /// Never handed out before: the caller constructs it.
    Fresh,
    /// Carved again from a page that went back to the OS: zero bytes (or the record
    /// as it was freed, if the OS refused); see [`Record::revive`].
    Dropped,
}

/// How a [`Slab`] reads and writes the free-list link of a free record.
pub(crate) trait Link {
    /// # Safety
    /// `p` is a free record of the slab, of `size` bytes.
    unsafe fn get(p: *mut u8, size: usize) -> *mut u8;
    /// # Safety
    /// As for `get`.
    unsafe fn set(p: *mut u8, size: usize, next: *mut u8);
}

/// The link of a typed record: its [`Record::free_link`] field.
pub(crate) struct FieldLink<T>(PhantomData<T>);

impl<T: Record> Link for FieldLink<T> {
    unsafe fn get(p: *mut u8, _: usize) -> *mut u8 {
        // SAFETY: the caller's contract: a valid free record of type T.
        unsafe { (*p.cast::<T>()).free_link().with(|l| *l).cast() }
    }
    unsafe fn set(p: *mut u8, _: usize, next: *mut u8) {
        // SAFETY: as above; the link is ours while the record is free.
        unsafe { (*p.cast::<T>()).free_link().with_mut(|l| *l = next.cast()) }
    }
}

/// The link of an untyped record: its last word.
pub(crate) struct LastWord;

impl Link for LastWord {
    unsafe fn get(p: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: the caller's contract; records are at least 8 bytes, 8-aligned.
        unsafe { p.add(size - 8).cast::<*mut u8>().read() }
    }
    unsafe fn set(p: *mut u8, size: usize, next: *mut u8) {
        // SAFETY: as above.
        unsafe { p.add(size - 8).cast::<*mut u8>().write(next) }
    }
}

/// Record pages per chunk (16); page 0 holds the chunk's head and is never dropped.
const PAGES: usize = CHUNK_BYTES / RECORD_PAGE;

/// The bookkeeping at the start of every chunk. Protected by the owner's lock, like
/// the rest of the slab.
#[repr(C)]
struct ChunkHead {
    /// Free records of this chunk, linked through their links.
    free: *mut u8,
    /// The next slot to carve, below `carve_end`: first the chunk from its first slot
    /// to its end, then (once that is done) one dropped page at a time.
    carve: usize,
    carve_end: usize,
    /// High-water mark of the first carving: slots from here up were never carved, and
    /// carving one constructs it.
    fresh: usize,
    /// Records handed out, per page (paged allocators).
    page_live: [u16; PAGES],
    /// Pages whose records left the free list to be returned to the OS and that
    /// `take_empty` has handed out and not yet had back (not carved meanwhile).
    pending: u16,
    /// Pages handed back: their records are on no free list and are carved again,
    /// unconstructed, one page at a time once the chunk has nothing else.
    dropped: u16,
    /// Of those, the pages the OS took (resident again once carved).
    released: u16,
    /// In the slab's list of chunks with a record to give, linked by `prev`/`next`.
    listed: bool,
    prev: *mut ChunkHead,
    next: *mut ChunkHead,
}

/// The record allocator all three kinds share: `size`-byte records, linked through
/// `L`, carved from chunks (see the module comment).
pub(crate) struct Slab<L: Link> {
    /// Record size in bytes (a multiple of 8 and of the records' alignment).
    size: usize,
    /// Offset of a chunk's first record (the head, rounded up to the alignment).
    first: usize,
    /// Whether no record crosses a `RECORD_PAGE` boundary (see the module comment).
    paged: bool,
    /// Chunks with a record to give: free, not yet carved, or dropped.
    head: *mut ChunkHead,
    tail: *mut ChunkHead,
    /// Records handed out and not yet returned.
    inuse: usize,
    /// Bytes of the chunks' `released` pages.
    released: usize,
    /// Where the next `take_empty` looks first (null: at the head).
    scan: *mut ChunkHead,
    _link: PhantomData<L>,
}

// SAFETY: the raw pointers refer to metadata memory owned by the allocator, not to
// thread-local data; access is serialised by the owner's lock (`&mut self`).
unsafe impl<L: Link> Send for Slab<L> {}

#[inline]
fn page_of(p: usize) -> usize {
    p % CHUNK_BYTES / RECORD_PAGE
}

impl<L: Link> Slab<L> {
    pub(crate) const fn new(size: usize, align: usize) -> Self {
        assert!(size >= 8 && size % 8 == 0 && size % align == 0 && align.is_power_of_two());
        let head = core::mem::size_of::<ChunkHead>();
        let first = (head + align - 1) & !(align - 1);
        assert!(first + size <= CHUNK_BYTES);
        Slab {
            size,
            first,
            paged: 2 * size <= RECORD_PAGE && first + size <= RECORD_PAGE,
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
            inuse: 0,
            released: 0,
            scan: ptr::null_mut(),
            _link: PhantomData,
        }
    }

    /// A record and whether it is fresh (never handed out before, so the caller must
    /// construct it), or null if no chunk has one (the owner then supplies a chunk with
    /// [`add_chunk`](Self::add_chunk) and retries).
    pub(crate) fn alloc(&mut self) -> (*mut u8, Carved) {
        loop {
            let c = self.head;
            if c.is_null() {
                return (ptr::null_mut(), Carved::Recycled);
            }
            // SAFETY: listed chunks are chunks the owner gave us, with a valid head.
            let h = unsafe { &mut *c };
            if let Some((p, fresh)) = self.take_from(h) {
                if self.paged {
                    h.page_live[page_of(p as usize)] += 1;
                }
                self.inuse += 1;
                return (p, fresh);
            }
            self.unlink(c);
        }
    }

    /// A record of chunk `h`: a free one, else one carved, else the first of a dropped
    /// page (which becomes the carving page).
    fn take_from(&mut self, h: &mut ChunkHead) -> Option<(*mut u8, Carved)> {
        if !h.free.is_null() {
            let p = h.free;
            // SAFETY: records on a chunk's free list are free records of ours.
            h.free = unsafe { L::get(p, self.size) };
            return Some((p, Carved::Recycled));
        }
        if h.carve + self.size > h.carve_end {
            let ready = h.dropped & !h.pending;
            if ready == 0 {
                return None;
            }
            let k = ready.trailing_zeros() as usize;
            h.dropped &= !(1 << k);
            let base = h as *mut ChunkHead as usize;
            h.carve = base + k * RECORD_PAGE;
            h.carve_end = h.carve + RECORD_PAGE;
            if h.released & (1 << k) != 0 {
                h.released &= !(1 << k);
                self.released -= RECORD_PAGE;
            }
        }
        let p = h.carve;
        let mut next = p + self.size;
        if self.paged && next % RECORD_PAGE + self.size > RECORD_PAGE {
            next = (next + RECORD_PAGE - 1) & !(RECORD_PAGE - 1);
        }
        h.carve = next;
        // The first carving runs at the high-water mark; below it are dropped pages.
        if p >= h.fresh {
            h.fresh = next;
            Some((p as *mut u8, Carved::Fresh))
        } else {
            Some((p as *mut u8, Carved::Dropped))
        }
    }

    /// Returns a record.
    ///
    /// # Safety
    /// `p` came from this allocator's `alloc` and is not used by anyone any more except
    /// lock-free readers that validate what they read (they never see the link).
    pub(crate) unsafe fn free(&mut self, p: *mut u8) {
        let c = (p as usize & !(CHUNK_BYTES - 1)) as *mut ChunkHead;
        // SAFETY: `p` lies in a chunk of ours (contract), whose head is valid.
        let h = unsafe { &mut *c };
        // SAFETY: the record is ours again; its link is unused while free.
        unsafe { L::set(p, self.size, h.free) };
        h.free = p;
        if self.paged {
            h.page_live[page_of(p as usize)] -= 1;
        }
        self.inuse -= 1;
        if !h.listed {
            self.push_back(c);
        }
    }

    /// Supplies a chunk of [`CHUNK_BYTES`] at `base` (aligned to its size, memory the
    /// owner keeps for good); records are taken from it first.
    pub(crate) fn add_chunk(&mut self, base: usize, bytes: usize) {
        debug_assert!(base % CHUNK_BYTES == 0 && bytes == CHUNK_BYTES);
        let c = base as *mut ChunkHead;
        // SAFETY: fresh chunk memory, ours alone, aligned for the head.
        unsafe {
            c.write(ChunkHead {
                free: ptr::null_mut(),
                carve: base + self.first,
                carve_end: base + CHUNK_BYTES,
                fresh: base + self.first,
                page_live: [0; PAGES],
                pending: 0,
                dropped: 0,
                released: 0,
                listed: true,
                prev: ptr::null_mut(),
                next: self.head,
            });
            if let Some(h) = self.head.as_mut() {
                h.prev = c;
            }
        }
        self.head = c;
        if self.tail.is_null() {
            self.tail = c;
        }
    }

    /// Records currently handed out.
    #[cfg(test)]
    pub(crate) fn inuse(&self) -> usize {
        self.inuse
    }

    /// Bytes of record pages returned to the OS and not carved into since.
    pub(crate) fn released(&self) -> usize {
        self.released
    }

    /// For the scavenger: finds pages (past chunks' first pages) whose records are all
    /// carved and all free, takes those records off the free lists and writes
    /// `(chunk base, page mask)` to `out`, up to `out.len()` chunks; returns how many.
    /// Until [`put_back`](Self::put_back) nothing in those pages is handed out, so the
    /// caller may return them to the OS without the lock. Only chunks with a free
    /// record are looked at (the others have no page to give), at most `*budget` of
    /// them (each look is taken off it), from where the previous call stopped, or from
    /// the start with `restart`; so a pass over a heap of millions of spans holds the
    /// lock for a bounded time and the next pass goes on. Nothing for allocators that
    /// are not paged.
    pub(crate) fn take_empty(
        &mut self,
        out: &mut [(usize, u16)],
        budget: &mut usize,
        restart: bool,
    ) -> usize {
        if !self.paged {
            return 0;
        }
        let mut n = 0;
        // SAFETY: `scan` is null or a chunk of ours (chunks are never given back).
        let resume = !restart && unsafe { self.scan.as_ref() }.is_some_and(|h| h.listed);
        let mut c = if resume { self.scan } else { self.head };
        while !c.is_null() && n < out.len() && *budget > 0 {
            *budget -= 1;
            // SAFETY: listed chunks have valid heads.
            let h = unsafe { &mut *c };
            let base = c as usize;
            let mut mask = 0u16;
            for k in 1..PAGES {
                let (start, end) = (base + k * RECORD_PAGE, base + (k + 1) * RECORD_PAGE);
                let carving = h.carve >= start && h.carve < end && h.carve_end == end;
                if h.page_live[k] == 0
                    && end <= h.fresh
                    && !carving
                    && (h.pending | h.dropped) & (1 << k) == 0
                {
                    mask |= 1 << k;
                }
            }
            // A page being carved for the first time stops the first carving there
            // (pages past `carve` were never carved, so they cannot be in the mask).
            if mask != 0 {
                let (mut keep, mut p) = (ptr::null_mut::<u8>(), h.free);
                while !p.is_null() {
                    // SAFETY: free records of this chunk.
                    let after = unsafe { L::get(p, self.size) };
                    if mask & (1 << page_of(p as usize)) == 0 {
                        // SAFETY: as above.
                        unsafe { L::set(p, self.size, keep) };
                        keep = p;
                    }
                    p = after;
                }
                h.free = keep;
                h.pending |= mask;
                out[n] = (base, mask);
                n += 1;
            }
            c = h.next;
        }
        self.scan = c;
        n
    }

    /// Gives back pages taken by [`take_empty`](Self::take_empty); `released`: whether
    /// they went back to the OS. Either way their records are carved again (unchanged
    /// records are valid free records as much as zeroed ones are).
    ///
    /// # Safety
    /// `(base, mask)` was written by `take_empty` and not put back since.
    pub(crate) unsafe fn put_back(&mut self, base: usize, mask: u16, released: bool) {
        let c = base as *mut ChunkHead;
        // SAFETY: a chunk of ours (contract).
        let h = unsafe { &mut *c };
        debug_assert!(h.pending & mask == mask);
        h.pending &= !mask;
        h.dropped |= mask;
        if released {
            h.released |= mask;
            self.released += mask.count_ones() as usize * RECORD_PAGE;
        }
        if !h.listed {
            self.push_back(c);
        }
    }

    fn unlink(&mut self, c: *mut ChunkHead) {
        // SAFETY: `c` is a listed chunk; its neighbours are listed chunks.
        unsafe {
            let h = &mut *c;
            debug_assert!(h.listed);
            match h.prev.as_mut() {
                Some(p) => p.next = h.next,
                None => self.head = h.next,
            }
            match h.next.as_mut() {
                Some(n) => n.prev = h.prev,
                None => self.tail = h.prev,
            }
            h.prev = ptr::null_mut();
            h.next = ptr::null_mut();
            h.listed = false;
        }
    }

    fn push_back(&mut self, c: *mut ChunkHead) {
        // SAFETY: `c` is a chunk of ours in no list; the tail, if any, is listed.
        unsafe {
            let h = &mut *c;
            h.prev = self.tail;
            h.next = ptr::null_mut();
            h.listed = true;
            match self.tail.as_mut() {
                Some(t) => t.next = c,
                None => self.head = c,
            }
        }
        self.tail = c;
    }
}

/// A typed record allocator: records of `T`, constructed with [`Record::fresh`] when
/// first carved.
pub(crate) struct FixAlloc<T: Record>(Slab<FieldLink<T>>);

impl<T: Record> FixAlloc<T> {
    pub(crate) const SIZE: usize = core::mem::size_of::<T>();

    pub(crate) const fn new() -> Self {
        FixAlloc(Slab::new(Self::SIZE, core::mem::align_of::<T>()))
    }

    /// A record, or null if every chunk is used up (the owner then supplies a chunk with
    /// [`add_chunk`](Self::add_chunk) and retries).
    pub(crate) fn alloc(&mut self) -> *mut T {
        let (p, carved) = self.0.alloc();
        let p = p.cast::<T>();
        match carved {
            // SAFETY: a slot in a chunk the owner gave us, aligned for T, never used.
            Carved::Fresh => unsafe { p.write(T::fresh()) },
            // SAFETY: a free record of ours (zero bytes are one, per `Record`).
            Carved::Dropped => unsafe { (*p).revive() },
            Carved::Recycled => {}
        }
        p
    }

    /// Returns a record.
    ///
    /// # Safety
    /// As for [`Slab::free`].
    pub(crate) unsafe fn free(&mut self, p: *mut T) {
        // SAFETY: forwarded.
        unsafe { self.0.free(p.cast()) }
    }

    /// See [`Slab::add_chunk`].
    pub(crate) fn add_chunk(&mut self, base: usize, bytes: usize) {
        self.0.add_chunk(base, bytes);
    }

    /// Records currently handed out.
    #[cfg(test)]
    pub(crate) fn inuse(&self) -> usize {
        self.0.inuse()
    }

    /// The slab, for the scavenger's [`Slab::take_empty`] and [`Slab::put_back`].
    pub(crate) fn slab(&mut self) -> &mut Slab<FieldLink<T>> {
        &mut self.0
    }
}

/// An untyped record allocator, for records whose size is chosen at run time
/// (small-object bitmaps), linked through their last word. [`Slab::alloc`] says
/// whether a record is freshly carved so that the caller can construct what needs
/// constructing once; records carved again from a dropped page need nothing (zero
/// bytes are a cleared bitmap).
pub(crate) type RawFixAlloc = Slab<LastWord>;

// SAFETY: `free_link` is a field used for nothing else; a zeroed span record is a
// free one (state Dead, no base, no bitmap) once `revive` has put it in no mcentral list.
unsafe impl Record for crate::mspan::MSpan {
    fn fresh() -> Self {
        crate::mspan::MSpan::new()
    }
    fn free_link(&self) -> &UnsafeCell<*mut Self> {
        &self.free_link
    }
    fn revive(&self) {
        // `list` is the one field whose free value is not zero (`NO_LIST`): the
        // mcentral trusts it to say whether a span is linked. Lock-free readers of a
        // stale pointer never look at the private state.
        // SAFETY: the record is free and ours (the heap lock), so is its private state.
        unsafe { self.small.private_mut().list = crate::mspan::NO_LIST };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mspan::MSpan;
    use std::alloc::{alloc_zeroed, dealloc, Layout};

    /// A chunk from the test's own (system) allocator: fixalloc never allocates.
    struct Chunk(usize);
    impl Chunk {
        const LAYOUT: Layout = match Layout::from_size_align(CHUNK_BYTES, CHUNK_BYTES) {
            Ok(l) => l,
            Err(_) => panic!(),
        };
        fn new() -> Self {
            Chunk(unsafe { alloc_zeroed(Self::LAYOUT) } as usize)
        }
    }
    impl Drop for Chunk {
        fn drop(&mut self) {
            unsafe { dealloc(self.0 as *mut u8, Self::LAYOUT) }
        }
    }

    /// Every record of `fa`'s one chunk, in carving order.
    fn carve_all(fa: &mut FixAlloc<MSpan>) -> Vec<*mut MSpan> {
        core::iter::from_fn(|| Some(fa.alloc()).filter(|p| !p.is_null())).collect()
    }

    #[test]
    fn carves_whole_records_per_page_recycles_and_reports_empty() {
        const SZ: usize = core::mem::size_of::<MSpan>();
        let chunk = Chunk::new();
        let mut fa: FixAlloc<MSpan> = FixAlloc::new();
        assert!(fa.alloc().is_null(), "empty allocator must say so");
        fa.add_chunk(chunk.0, CHUNK_BYTES);
        let a = carve_all(&mut fa);
        let first = fa.0.first;
        let per_page = RECORD_PAGE / SZ;
        assert_eq!(
            a.len(),
            (RECORD_PAGE - first) / SZ + (CHUNK_BYTES / RECORD_PAGE - 1) * per_page,
            "every whole slot of every page is carved"
        );
        for (i, &p) in a.iter().enumerate() {
            let p = p as usize;
            assert!(p >= chunk.0 + first && p + SZ <= chunk.0 + CHUNK_BYTES);
            assert_eq!(
                p / RECORD_PAGE,
                (p + SZ - 1) / RECORD_PAGE,
                "record {i} straddles a page"
            );
            if i > 0 {
                assert!(p >= a[i - 1] as usize + SZ, "records overlap");
            }
        }
        assert_eq!(fa.inuse(), a.len());
        unsafe {
            fa.free(a[1]);
            fa.free(a[3]);
        }
        assert_eq!(fa.inuse(), a.len() - 2);
        // LIFO recycling, and records are not reconstructed.
        unsafe { (*a[1]).base.store(77, crate::sync::Ordering::Relaxed) };
        assert_eq!(fa.alloc(), a[3]);
        let again = fa.alloc();
        assert_eq!(again, a[1]);
        assert_eq!(unsafe { (*again).base() }, 77);
        assert!(fa.alloc().is_null(), "chunk used up");
        assert_eq!(
            fa.0.take_empty(&mut [(0, 0); 4], &mut usize::MAX.clone(), true),
            0,
            "every record is in use"
        );
    }

    #[test]
    fn pages_whose_records_are_all_free_are_withdrawn_and_carved_again_unconstructed() {
        let (c1, c2) = (Chunk::new(), Chunk::new());
        let mut fa: FixAlloc<MSpan> = FixAlloc::new();
        fa.add_chunk(c1.0, CHUNK_BYTES);
        let a = carve_all(&mut fa);
        fa.add_chunk(c2.0, CHUNK_BYTES);
        let b = carve_all(&mut fa);
        let page = |p: *mut MSpan| page_of(p as usize);
        // Chunk 1: everything free but one record on page 3. Chunk 2: pages 1 and 2
        // free, one more record of page 2 kept.
        let kept1 = a.iter().copied().find(|&q| page(q) == 3).unwrap();
        for &p in &a {
            if p != kept1 {
                unsafe { fa.free(p) };
            }
        }
        let kept2 = b.iter().copied().find(|&q| page(q) == 2).unwrap();
        for &p in &b {
            if (page(p) == 1 || page(p) == 2) && p != kept2 {
                unsafe { fa.free(p) };
            }
        }
        let mut out = [(0, 0); 4];
        assert_eq!(fa.0.take_empty(&mut out, &mut 8, true), 2);
        let all_but_0_and_3 = 0xFFFEu16 & !(1 << 3);
        let mut got = out[..2].to_vec();
        got.sort();
        let mut want = vec![(c1.0, all_but_0_and_3), (c2.0, 1 << 1)];
        want.sort();
        assert_eq!(got, want, "free, carved pages past the first, per chunk");
        assert_eq!(
            fa.0.take_empty(&mut out, &mut 8, true),
            0,
            "pending pages are not taken twice"
        );
        // While pending, nothing comes from those pages: what is left free is chunk
        // 1's first page and page 3 but one record, and chunk 2's page 2 but one.
        let left = a.iter().filter(|&&p| page(p) == 0 || page(p) == 3).count() - 1
            + b.iter().filter(|&&p| page(p) == 2).count()
            - 1;
        let during: Vec<_> = (0..left).map(|_| fa.alloc()).collect();
        assert!(during.iter().all(|&p| !p.is_null()));
        assert!(fa.alloc().is_null(), "pending pages are not carved");
        for &p in during.iter().rev() {
            unsafe { fa.free(p) };
        }
        // The OS "returns" chunk 1's pages (they read as zero); chunk 2's refuses.
        for k in 1..PAGES {
            if all_but_0_and_3 & (1 << k) != 0 {
                unsafe {
                    core::ptr::write_bytes((c1.0 + k * RECORD_PAGE) as *mut u8, 0, RECORD_PAGE)
                };
            }
        }
        unsafe {
            fa.0.put_back(c1.0, all_but_0_and_3, true);
            fa.0.put_back(c2.0, 1 << 1, false);
        }
        assert_eq!(fa.0.released(), 14 * RECORD_PAGE);
        // Everything comes back: the free records, then the dropped pages' slots, in
        // the same places, unconstructed: zeroed ones read as dead records.
        let rest = carve_all(&mut fa);
        let freed = a.len() - 1 + b.iter().filter(|&&p| page(p) == 1 || page(p) == 2).count() - 1;
        assert_eq!(rest.len(), freed);
        let mut again: Vec<_> = rest
            .iter()
            .copied()
            .filter(|&p| {
                p as usize / CHUNK_BYTES == c1.0 / CHUNK_BYTES
                    && all_but_0_and_3 & (1 << page(p)) != 0
            })
            .collect();
        again.sort();
        let want: Vec<_> = a
            .iter()
            .copied()
            .filter(|&p| all_but_0_and_3 & (1 << page(p)) != 0)
            .collect();
        assert_eq!(again, want, "dropped slots are carved again in place");
        // Revived: what a fresh record holds (a zeroed one would claim to be in list 0,
        // and the mcentral trusts that field).
        let fresh = MSpan::new();
        for &p in &again {
            let r = unsafe { &*p };
            assert_eq!(r.state(), crate::mspan::SpanState::Dead);
            assert_eq!(r.base(), 0);
            assert_eq!(
                unsafe { r.small.private_mut().list },
                unsafe { fresh.small.private_mut().list },
                "a record carved from a dropped page is not in a list"
            );
        }
        assert_eq!(fa.0.released(), 0, "every released page is resident again");
        assert_eq!(fa.inuse(), a.len() + b.len());
        assert!(fa.alloc().is_null());
    }

    #[test]
    fn raw_records_link_through_their_last_word() {
        let chunk = Chunk::new();
        let mut ra = RawFixAlloc::new(32, 8);
        ra.add_chunk(chunk.0, CHUNK_BYTES);
        let (p, carved) = ra.alloc();
        assert!(carved == Carved::Fresh && !p.is_null());
        unsafe { p.write_bytes(0xAB, 24) };
        unsafe { ra.free(p) };
        let (q, carved) = ra.alloc();
        assert_eq!((q, carved), (p, Carved::Recycled));
        assert_eq!(unsafe { *q }, 0xAB, "only the last word is the link");
    }
}
