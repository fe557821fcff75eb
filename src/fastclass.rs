//! The class tables of the allocation and free fast paths (`malloc.rs`): size -> size
//! class for common requests (`SIZE_CLASS`, a copy of `sizeclasses::SIZE_TO_CLASS`) and
//! for C's `malloc` (`MALLOC_CLASS`, with glibc's alignment), and the per-class check of
//! C's `free` fast path (`FREE_CHECK`, `mcache::free_hinted`).
//!
//! Entries are 32-bit: a load of one is a single instruction, where a byte table would
//! be zero-extended (one instruction more per fast path; measured with
//! `tools/callgrind-fastpath.sh`). That makes each table 16 KiB instead of 4, of which a
//! program touches the lines of the sizes it uses.

use crate::sizeclasses::{
    CLASS_TO_NPAGES, CLASS_TO_SIZE, MAX_SMALL_SIZE, NUM_CLASSES, SIZE_TO_CLASS, SMALL_SIZE_DIV,
};

const N: usize = MAX_SMALL_SIZE / SMALL_SIZE_DIV + 1;
const _: () = assert!(SIZE_TO_CLASS.len() == N && SMALL_SIZE_DIV == 8);

/// `SIZE_TO_CLASS`, 32 bits wide.
pub(crate) static SIZE_CLASS: [u32; N] = {
    let mut t = [0; N];
    let mut i = 0;
    while i < N {
        t[i] = SIZE_TO_CLASS[i] as u32;
        i += 1;
    }
    t
};

/// The size class C's `malloc` uses for each request of up to `MAX_SMALL_SIZE` bytes,
/// by `(size + 7) / 8`: glibc's alignment (16 bytes for blocks over 8 bytes, so the
/// size is rounded up to 16), one table load where `raw::malloc` rounds and then looks
/// up. Every size in `((i - 1) * 8, i * 8]` rounds to the same multiple of 16 as
/// `i * 8`, so one entry serves the eight sizes.
pub(crate) static MALLOC_CLASS: [u32; N] = {
    let mut t = [0; N];
    let mut i = 0;
    while i < N {
        let s = i * 8;
        let req = if s <= 8 { 8 } else { (s + 15) & !15 };
        t[i] = SIZE_TO_CLASS[(req + 7) >> 3] as u32;
        i += 1;
    }
    t
};

/// Per class, what the check of a block against a span of the class needs, together
/// so that one table address serves both (`mcache::free_hinted`, `at_object_start`).
#[cfg_attr(feature = "checked", allow(dead_code))] // `span_bytes`: `free_hinted` only
pub(crate) struct FreeCheck {
    /// Bytes of a span of the class; 0 (nothing passes) for class 0.
    pub(crate) span_bytes: u64,
    /// `ceil(2^64 / size)`: an offset `n` below 2^32 is a multiple of the size iff
    /// `n * divisible mod 2^64 < divisible` (Lemire, Kaser and Kurz, "Faster remainder
    /// by direct computation", 2019). Offsets in a span are far below 2^32; a test
    /// checks every offset of every class.
    pub(crate) divisible: u64,
}

/// `FreeCheck` of every class.
pub(crate) static FREE_CHECK: [FreeCheck; NUM_CLASSES] = {
    const Z: FreeCheck = FreeCheck {
        span_bytes: 0,
        divisible: 0,
    };
    let mut t = [Z; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        t[c] = FreeCheck {
            span_bytes: (CLASS_TO_NPAGES[c] as u64) << crate::os::PAGE_SHIFT,
            divisible: u64::MAX / CLASS_TO_SIZE[c] as u64 + 1,
        };
        c += 1;
    }
    t
};

/// The fast paths' class of a common request of `size <= MAX_SMALL_SIZE` bytes
/// (alignment at most 8): `sizeclasses::common_class(size)`.
#[inline(always)]
pub(crate) fn size_class(size: usize) -> usize {
    // size <= 32768, so the index is at most 4096, the last entry.
    SIZE_CLASS[(size + 7) >> 3] as usize
}

/// `malloc`'s class of a request of `size <= MAX_SMALL_SIZE` bytes.
#[inline(always)]
pub(crate) fn malloc_class(size: usize) -> usize {
    MALLOC_CLASS[(size + 7) >> 3] as usize
}
