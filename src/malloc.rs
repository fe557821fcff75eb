//! The allocation entry points behind `GlobalAlloc` (Go's `malloc.go`): they turn a
//! `Layout` into work for the heap.
//!
//! At this stage every request is a *large* object: a page span of its own, sized to
//! whole 8 KiB pages and aligned as asked. The small-object path (size classes, thread
//! caches) slots in front of these functions.
//!
//! None of these functions panics or unwinds; failures return null.

use core::ptr::{self, NonNull};

use crate::mheap::{MHeap, MAX_ALIGN, MAX_SPAN_BYTES};
use crate::mspan::Purpose;
use crate::os::{MemSource, PAGE_SHIFT, PAGE_SIZE};

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
/// unless the memory is known to be zero already. Null on failure.
#[inline]
pub(crate) fn alloc<M: MemSource>(
    heap: &MHeap<M>,
    size: usize,
    align: usize,
    zero: bool,
) -> *mut u8 {
    alloc_large(heap, size, align, zero)
}

#[inline(never)]
fn alloc_large<M: MemSource>(heap: &MHeap<M>, size: usize, align: usize, zero: bool) -> *mut u8 {
    let Some(npages) = pages_for(size) else {
        return ptr::null_mut();
    };
    if align > MAX_ALIGN {
        return ptr::null_mut();
    }
    let Some(s) = heap.alloc_span(npages, Purpose::Heap, 0, align) else {
        return ptr::null_mut();
    };
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

/// Frees a block. Pointers that are not live blocks of this heap are ignored (never a
/// panic in `dealloc`).
///
/// # Safety
/// `p` is a live block of this heap (or foreign, see above), not used afterwards.
#[inline]
pub(crate) unsafe fn dealloc<M: MemSource>(heap: &MHeap<M>, p: *mut u8) {
    let Some(s) = NonNull::new(heap.span_of_unchecked(p as usize)) else {
        return;
    };
    // SAFETY: `p` is a live block, so `s` is its live span and the caller gives it up.
    unsafe { heap.free_span(s) };
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
        // SAFETY: the caller owns the block; bytes past `new_size` are no longer used.
        unsafe { heap.shrink_span(s, new_pages) };
        return p;
    }
    // SAFETY: as above.
    if unsafe { heap.grow_span_in_place(s, new_pages) } {
        return p;
    }
    let q = alloc(heap, new_size, align, false);
    if !q.is_null() {
        // SAFETY: both blocks are live, distinct, and at least this long.
        unsafe {
            ptr::copy_nonoverlapping(p, q, old_size.min(new_size));
            dealloc(heap, p);
        }
    }
    q
}

/// Usable size of the block at `p` (whole pages).
///
/// # Safety
/// `p` is a live block of this heap.
#[allow(dead_code)] // used by tests now; by malloc_usable_size in the C ABI later.
pub(crate) unsafe fn usable_size<M: MemSource>(heap: &MHeap<M>, p: *mut u8) -> usize {
    // SAFETY: the caller guarantees `p` is a live block.
    match unsafe { heap.span_of_unchecked(p as usize).as_ref() } {
        Some(s) => s.npages() << PAGE_SHIFT,
        None => 0,
    }
}
