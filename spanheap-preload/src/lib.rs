//! spanheap as the C allocator of any program: `LD_PRELOAD=libspanheap_preload.so prog`.
//!
//! Exports `malloc`, `free`, `calloc`, `realloc`, `reallocarray`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc`, `malloc_usable_size` and C23's
//! `free_sized` / `free_aligned_sized`, with glibc's documented semantics:
//!
//! - `malloc(0)` (and every zero-size request) returns a unique pointer;
//! - blocks are aligned to 16 bytes when they can hold a 16-byte object (more than
//!   8 bytes), as glibc's `malloc` guarantees on 64-bit targets;
//! - `free(NULL)` does nothing; `free` preserves `errno`; sizes are looked up from the
//!   block's span (a lock-free span-map lookup), so `free` needs no header;
//! - `realloc(NULL, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and returns NULL
//!   (glibc's behaviour); on failure the block is untouched;
//! - failures return NULL with `errno = ENOMEM`: exhausted memory, `calloc` and
//!   `reallocarray` products that overflow, sizes over `PTRDIFF_MAX`;
//! - `posix_memalign` returns `EINVAL` for an alignment that is not a power-of-two
//!   multiple of `sizeof(void *)`, `ENOMEM` on exhaustion, and leaves `*memptr`
//!   untouched on any error; `aligned_alloc` fails with `EINVAL` for an alignment that
//!   is not a power of two; `memalign` rounds the alignment up to a power of two;
//! - `malloc_usable_size(p) >= n` for a block of `n` bytes, 0 for NULL.
//!
//! Pointers spanheap never handed out (for instance memory the dynamic loader allocated
//! before the library took over) are ignored by `free` and have usable size 0.
//!
//! Fork safety comes from the core (`pthread_atfork` handlers, `spanheap/src/fork.rs`).
//! Nothing here panics or unwinds; nothing allocates except through spanheap.

#![deny(unsafe_op_in_unsafe_fn)]

use core::ffi::c_void;

use spanheap::raw;

/// glibc's `MALLOC_ALIGNMENT` on 64-bit targets: `malloc` results can hold any object
/// that fits, so blocks of more than 8 bytes are 16-byte aligned.
const MIN_ALIGN: usize = 16;

#[inline]
fn align_for(size: usize) -> usize {
    if size > 8 {
        MIN_ALIGN
    } else {
        8
    }
}

#[inline]
fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Sizes over `PTRDIFF_MAX` are refused (glibc does the same).
#[inline]
fn too_big(size: usize) -> bool {
    size > isize::MAX as usize
}

#[inline]
fn alloc(size: usize, align: usize, zero: bool) -> *mut c_void {
    if too_big(size) {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    }
    let p = if zero {
        raw::alloc_zeroed(size, align)
    } else {
        raw::alloc(size, align)
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// # Safety
/// C's `malloc`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // 16-byte alignment for blocks over 8 bytes, through the fast class lookup. The
    // fast half has no slow path, so this is a leaf with a tail call on a miss.
    let p = raw::malloc_fast(size);
    if !p.is_null() {
        return p.cast();
    }
    malloc_slow(size)
}

/// `malloc` when the thread's cache has nothing ready: the whole path, and `ENOMEM` on
/// failure. (Sizes over `PTRDIFF_MAX` fail there too: they exceed the largest span.)
#[cold]
#[inline(never)]
extern "C" fn malloc_slow(size: usize) -> *mut c_void {
    if too_big(size) {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    }
    let p = raw::malloc(size);
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// # Safety
/// C's `calloc`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => alloc(total, align_for(total), true),
        None => {
            set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

/// # Safety
/// C's `free`: `p` is NULL or a live block from this allocator, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: the caller's contract. The fast half makes no system call, and null is
    // never an object of a span (it misses). A leaf with a tail call on a miss.
    if unsafe { raw::free_fast(p.cast()) } {
        return;
    }
    // SAFETY: forwarded.
    unsafe { free_slow(p) }
}

/// `free` when the block is not an object of the thread's current span of its class.
///
/// # Safety
/// As for `free`.
#[cold]
#[inline(never)]
unsafe extern "C" fn free_slow(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // The rest may reach a slow path that makes system calls (returning memory to the
    // OS, waiting for a lock); C requires errno to survive it.
    // SAFETY: __errno_location returns this thread's errno slot.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: the slot is valid for this thread's life.
    let e = unsafe { *slot };
    // SAFETY: the caller's contract.
    unsafe { raw::free_validated(p.cast()) };
    // SAFETY: as above.
    unsafe { *slot = e };
}

/// # Safety
/// C23's `free_sized`: as `free`; the size is only a hint and is not needed.
#[no_mangle]
pub unsafe extern "C" fn free_sized(p: *mut c_void, _size: usize) {
    // SAFETY: forwarded.
    unsafe { free(p) }
}

/// # Safety
/// C23's `free_aligned_sized`: as `free`.
#[no_mangle]
pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, _align: usize, _size: usize) {
    // SAFETY: forwarded.
    unsafe { free(p) }
}

/// # Safety
/// C's `realloc`.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return alloc(size, align_for(size), false);
    }
    if size == 0 {
        // glibc: realloc(p, 0) frees p and returns NULL.
        // SAFETY: forwarded.
        unsafe { free(p) };
        return core::ptr::null_mut();
    }
    if too_big(size) {
        set_errno(libc::ENOMEM);
        return core::ptr::null_mut();
    }
    // SAFETY: the caller's contract: a live block of ours.
    let q = unsafe { raw::realloc(p.cast(), size, align_for(size)) };
    if q.is_null() {
        set_errno(libc::ENOMEM);
    }
    q.cast()
}

/// # Safety
/// glibc's `reallocarray`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

/// # Safety
/// POSIX `posix_memalign`: `memptr` is writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(
    memptr: *mut *mut c_void,
    align: usize,
    size: usize,
) -> i32 {
    if !align.is_power_of_two() || align % core::mem::size_of::<*mut c_void>() != 0 {
        return libc::EINVAL;
    }
    if too_big(size) {
        return libc::ENOMEM;
    }
    let p = raw::alloc(size, align.max(align_for(size)));
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's contract.
    unsafe { *memptr = p.cast() };
    0
}

/// # Safety
/// C11's `aligned_alloc`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    alloc(size, align.max(align_for(size)), false)
}

/// # Safety
/// glibc's `memalign` (obsolete): the alignment is rounded up to a power of two.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let Some(a) = align.max(align_for(size)).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    alloc(size, a, false)
}

fn os_page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// # Safety
/// glibc's `valloc` (obsolete): page-aligned.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    alloc(size, os_page(), false)
}

/// # Safety
/// glibc's `pvalloc` (obsolete): page-aligned, the size rounded up to whole pages.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = os_page();
    match size.checked_add(page - 1) {
        Some(s) => alloc((s & !(page - 1)).max(page), page, false),
        None => {
            set_errno(libc::ENOMEM);
            core::ptr::null_mut()
        }
    }
}

/// # Safety
/// glibc's `malloc_usable_size`: `p` is NULL or a live block.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    raw::usable_size(p.cast())
}
