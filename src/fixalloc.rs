//! A fixed-size record allocator for the allocator's own metadata (Go's `fixalloc`).
//!
//! Records are carved from chunks supplied by the caller (the mheap gives it manual
//! spans of the record kind's purpose) and recycled through an intrusive free list.
//! Records are constructed once, when first carved, and never dropped or unmapped:
//! a stale pointer to a record (from the span map, say) stays a pointer to a valid
//! record of the same type. This is also what lets loom track records' atomics across
//! recycling. A `FixAlloc` is protected by whatever lock its owner keeps it under (the
//! heap lock for span records): every method takes `&mut self`.

use core::ptr;

use crate::sync::UnsafeCell;

/// A record type a [`FixAlloc`] can hand out.
///
/// # Safety
/// `free_link` must return a field of `self` that nothing else uses while the record is
/// free in the allocator.
pub(crate) unsafe trait Record: Sized {
    /// A newly constructed record (run once per slot, when the slot is first carved).
    fn fresh() -> Self;
    /// The intrusive free-list link.
    fn free_link(&self) -> &UnsafeCell<*mut Self>;
}

pub(crate) struct FixAlloc<T: Record> {
    /// Recycled records, linked through `free_link`.
    free: *mut T,
    /// Next never-used slot in the current chunk.
    chunk: usize,
    /// Bytes left in the current chunk.
    nchunk: usize,
    /// Records handed out and not yet returned.
    inuse: usize,
}

// SAFETY: the raw pointers refer to metadata memory owned by the allocator, not to
// thread-local data; access is serialised by the owner's lock (`&mut self`).
unsafe impl<T: Record> Send for FixAlloc<T> {}

impl<T: Record> FixAlloc<T> {
    pub(crate) const SIZE: usize = core::mem::size_of::<T>();

    pub(crate) const fn new() -> Self {
        FixAlloc {
            free: ptr::null_mut(),
            chunk: 0,
            nchunk: 0,
            inuse: 0,
        }
    }

    /// A record, or null if the free list and the current chunk are empty (the owner
    /// then supplies a chunk with [`add_chunk`](Self::add_chunk) and retries).
    pub(crate) fn alloc(&mut self) -> *mut T {
        let p = if !self.free.is_null() {
            let p = self.free;
            // SAFETY: records on the free list are valid records we own; their link
            // is ours to read while they are free.
            self.free = unsafe { (*p).free_link().with(|l| *l) };
            p
        } else if self.nchunk >= Self::SIZE {
            let p = self.chunk as *mut T;
            self.chunk += Self::SIZE;
            self.nchunk -= Self::SIZE;
            // SAFETY: the slot lies in a chunk the owner gave us, aligned for T (chunks
            // are page aligned and SIZE is a multiple of T's alignment), never used.
            unsafe { p.write(T::fresh()) };
            p
        } else {
            return ptr::null_mut();
        };
        self.inuse += 1;
        p
    }

    /// Returns a record.
    ///
    /// # Safety
    /// `p` came from this allocator's `alloc` and is not used by anyone any more except
    /// lock-free readers that validate what they read (they never see `free_link`).
    pub(crate) unsafe fn free(&mut self, p: *mut T) {
        // SAFETY: per the contract, the record is ours; the link is unused while free.
        unsafe { (*p).free_link().with_mut(|l| *l = self.free) };
        self.free = p;
        self.inuse -= 1;
    }

    /// Supplies a chunk of `bytes` bytes at `base` (page aligned). Any remainder of the
    /// previous chunk is abandoned (chunks are only supplied when it is too small).
    pub(crate) fn add_chunk(&mut self, base: usize, bytes: usize) {
        debug_assert!(base % core::mem::align_of::<T>() == 0);
        self.chunk = base;
        self.nchunk = bytes;
    }

    /// Records currently handed out.
    #[cfg(test)]
    pub(crate) fn inuse(&self) -> usize {
        self.inuse
    }
}

// SAFETY: `free_link` is a field used for nothing else.
unsafe impl Record for crate::mspan::MSpan {
    fn fresh() -> Self {
        crate::mspan::MSpan::new()
    }
    fn free_link(&self) -> &UnsafeCell<*mut Self> {
        &self.free_link
    }
}

/// An untyped fixed-size record allocator, for records whose size is chosen at run
/// time (small-object bitmaps). Same rules as [`FixAlloc`]; the free-list link is kept
/// in the record's last word, and [`alloc`](Self::alloc) says whether the record is
/// freshly carved so the caller can construct what needs constructing once.
pub(crate) struct RawFixAlloc {
    /// Record size in bytes (a multiple of 8, at least 8).
    size: usize,
    free: *mut u8,
    chunk: usize,
    nchunk: usize,
}

// SAFETY: as for FixAlloc: metadata memory owned by the allocator, access serialised by
// the owner's lock.
unsafe impl Send for RawFixAlloc {}

impl RawFixAlloc {
    pub(crate) const fn new(size: usize) -> Self {
        RawFixAlloc {
            size,
            free: ptr::null_mut(),
            chunk: 0,
            nchunk: 0,
        }
    }

    /// A record and whether it is fresh (never handed out before), or null if empty.
    pub(crate) fn alloc(&mut self) -> (*mut u8, bool) {
        if !self.free.is_null() {
            let p = self.free;
            // SAFETY: free records are ours; their last word holds the link.
            self.free = unsafe { p.add(self.size - 8).cast::<*mut u8>().read() };
            (p, false)
        } else if self.nchunk >= self.size {
            let p = self.chunk as *mut u8;
            self.chunk += self.size;
            self.nchunk -= self.size;
            (p, true)
        } else {
            (ptr::null_mut(), false)
        }
    }

    /// Returns a record.
    ///
    /// # Safety
    /// `p` came from this allocator and nobody uses its last word any more.
    pub(crate) unsafe fn free(&mut self, p: *mut u8) {
        // SAFETY: the record is ours again; its last word becomes the link.
        unsafe { p.add(self.size - 8).cast::<*mut u8>().write(self.free) };
        self.free = p;
    }

    pub(crate) fn add_chunk(&mut self, base: usize, bytes: usize) {
        self.chunk = base;
        self.nchunk = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mspan::MSpan;

    #[test]
    fn carves_recycles_and_reports_empty() {
        // Backing memory from the test's own (system) allocator: fixalloc never allocates.
        const SZ: usize = core::mem::size_of::<MSpan>();
        let layout = std::alloc::Layout::from_size_align(4 * SZ, 4096).unwrap();
        let mem = unsafe { std::alloc::alloc_zeroed(layout) } as usize;
        let mut fa: FixAlloc<MSpan> = FixAlloc::new();
        assert!(fa.alloc().is_null(), "empty allocator must say so");
        fa.add_chunk(mem, 4 * SZ);
        let a: Vec<*mut MSpan> = (0..4).map(|_| fa.alloc()).collect();
        assert!(a.iter().all(|p| !p.is_null()));
        for w in a.windows(2) {
            assert_eq!(
                w[1] as usize - w[0] as usize,
                SZ,
                "records are carved back to back"
            );
        }
        assert!(fa.alloc().is_null(), "chunk exhausted");
        assert_eq!(fa.inuse(), 4);
        unsafe {
            fa.free(a[1]);
            fa.free(a[3]);
        }
        assert_eq!(fa.inuse(), 2);
        // LIFO recycling, and records are not reconstructed.
        unsafe { (*a[1]).base.store(77, crate::sync::Ordering::Relaxed) };
        assert_eq!(fa.alloc(), a[3]);
        let again = fa.alloc();
        assert_eq!(again, a[1]);
        assert_eq!(unsafe { (*again).base() }, 77);
        assert!(fa.alloc().is_null());
        unsafe { std::alloc::dealloc(mem as *mut u8, layout) };
    }
}
