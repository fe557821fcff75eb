//! The class tables of the allocation and free fast paths (`malloc.rs`): size -> size
//! class for common requests (`SIZE_CLASS`, a copy of `sizeclasses::SIZE_TO_CLASS`) and
//! for C's `malloc` (`MALLOC_CLASS`, with glibc's alignment), and the per-class check of
//! C's `free` fast path (`FREE_CHECK`, `mcache::free_hinted`), as atomics so that the
//! heap profile can turn the fast paths off without adding an instruction to them (C's
//! `free`: one, see `FREE_CHECK`).
//!
//! The fast paths load a class from these tables anyway. [`route_to_slow_paths`] sets
//! every entry to class 0, which no cache ever has objects or a span of: every
//! allocation then misses the thread cache (its class-0 entry is empty) and every free
//! misses the span-range test (its class-0 span range is empty), and their slow paths
//! see class 0 and call the profile's hooks (`malloc::global::common_miss` and
//! `mcache::dealloc_slow`); C's `free` finds no class's span bytes to be inside and
//! takes the validating path, which calls the free hook. Nothing ever sets the entries back: a sampled object may be
//! freed at any time after.
//!
//! Entries are 32-bit: a relaxed atomic load of one is the same single instruction as a
//! plain load (for an atomic *byte* LLVM adds a second zero-extension, one instruction
//! more per fast path; measured with `tools/callgrind-fastpath.sh`). That makes each
//! table 16 KiB instead of 4, of which a program touches the lines of the sizes it
//! uses. Relaxed stores: the profile orders them before its rate
//! (`profile::sample::set_rate`).

use crate::sizeclasses::{
    CLASS_TO_NPAGES, CLASS_TO_SIZE, MAX_SMALL_SIZE, NUM_CLASSES, SIZE_TO_CLASS, SMALL_SIZE_DIV,
};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

const N: usize = MAX_SMALL_SIZE / SMALL_SIZE_DIV + 1;
const _: () = assert!(SIZE_TO_CLASS.len() == N && SMALL_SIZE_DIV == 8);

/// `SIZE_TO_CLASS`, or all 0 once the profile routed the fast paths to the slow ones.
pub(crate) static SIZE_CLASS: [AtomicU32; N] = {
    #[allow(clippy::declare_interior_mutable_const)]
    const Z: AtomicU32 = AtomicU32::new(0);
    let mut t = [Z; N];
    let mut i = 0;
    while i < N {
        t[i] = AtomicU32::new(SIZE_TO_CLASS[i] as u32);
        i += 1;
    }
    t
};

/// The size class C's `malloc` uses for each request of up to `MAX_SMALL_SIZE` bytes,
/// by `(size + 7) / 8`: glibc's alignment (16 bytes for blocks over 8 bytes, so the
/// size is rounded up to 16), one table load where `raw::malloc` rounds and then looks
/// up. Every size in `((i - 1) * 8, i * 8]` rounds to the same multiple of 16 as
/// `i * 8`, so one entry serves the eight sizes. All 0 once routed (as `SIZE_CLASS`).
pub(crate) static MALLOC_CLASS: [AtomicU32; N] = {
    #[allow(clippy::declare_interior_mutable_const)]
    const Z: AtomicU32 = AtomicU32::new(0);
    let mut t = [Z; N];
    let mut i = 0;
    while i < N {
        let s = i * 8;
        let req = if s <= 8 { 8 } else { (s + 15) & !15 };
        t[i] = AtomicU32::new(SIZE_TO_CLASS[(req + 7) >> 3] as u32);
        i += 1;
    }
    t
};

/// Per class, what the check of a block against a span of the class needs, together
/// so that one table address serves both (`mcache::free_hinted`, `at_object_start`).
#[cfg_attr(feature = "checked", allow(dead_code))] // `span_bytes`: `free_hinted` only
pub(crate) struct FreeCheck {
    /// Bytes of a span of the class; 0 (nothing passes) for class 0, and for every
    /// class once the heap profile routed the fast paths to the slow ones. (An atomic:
    /// its load is not folded into the compare, one instruction more on C's `free`.)
    pub(crate) span_bytes: AtomicU64,
    /// `ceil(2^64 / size)`: an offset `n` below 2^32 is a multiple of the size iff
    /// `n * divisible mod 2^64 < divisible` (Lemire, Kaser and Kurz, "Faster remainder
    /// by direct computation", 2019). Offsets in a span are far below 2^32; a test
    /// checks every offset of every class.
    pub(crate) divisible: u64,
}

/// `FreeCheck` of every class.
pub(crate) static FREE_CHECK: [FreeCheck; NUM_CLASSES] = {
    #[allow(clippy::declare_interior_mutable_const)]
    const Z: FreeCheck = FreeCheck {
        span_bytes: AtomicU64::new(0),
        divisible: 0,
    };
    let mut t = [Z; NUM_CLASSES];
    let mut c = 1;
    while c < NUM_CLASSES {
        t[c] = FreeCheck {
            span_bytes: AtomicU64::new((CLASS_TO_NPAGES[c] as u64) << crate::os::PAGE_SHIFT),
            divisible: u64::MAX / CLASS_TO_SIZE[c] as u64 + 1,
        };
        c += 1;
    }
    t
};

/// The fast paths' class of a common request of `size <= MAX_SMALL_SIZE` bytes
/// (alignment at most 8): `sizeclasses::common_class(size)`, or 0 once routed.
#[inline(always)]
pub(crate) fn size_class(size: usize) -> usize {
    // size <= 32768, so the index is at most 4096, the last entry.
    SIZE_CLASS[(size + 7) >> 3].load(Ordering::Relaxed) as usize
}

/// `malloc`'s class of a request of `size <= MAX_SMALL_SIZE` bytes, or 0 once routed.
#[inline(always)]
pub(crate) fn malloc_class(size: usize) -> usize {
    MALLOC_CLASS[(size + 7) >> 3].load(Ordering::Relaxed) as usize
}

/// Sends every request of the fast paths to the slow paths from now on (see the module
/// doc). For the heap profile; never undone.
#[cfg_attr(not(feature = "profile"), allow(dead_code))]
pub(crate) fn route_to_slow_paths() {
    for e in SIZE_CLASS.iter().chain(MALLOC_CLASS.iter()) {
        e.store(0, Ordering::Relaxed);
    }
    for c in &FREE_CHECK {
        c.span_bytes.store(0, Ordering::Relaxed);
    }
}

/// Whether `route_to_slow_paths` ran.
#[cfg(feature = "profile")]
pub(crate) fn routed() -> bool {
    SIZE_CLASS[1].load(Ordering::Relaxed) == 0
}
