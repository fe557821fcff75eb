//! Fault injection for the OS layer (cargo feature `fault-injection`, for testing only).
//!
//! When switched on with [`set`], [`OsMemory`](crate::os::OsMemory) fails about one in
//! `one_in` of its `reserve`, `map` and `decommit` calls, chosen by a seeded hash of a
//! process-wide call number, as the OS would: `reserve` and `map` return
//! [`OsError::NoMemory`](crate::os::OsError::NoMemory) without calling `mmap`, and
//! `decommit` reports failure without calling `madvise`. Not injected: `commit` (a
//! no-op on Linux that cannot fail, see `os.rs`) and `release` (`munmap` of our own
//! range; a real failure only leaves address space mapped, which nothing can observe).
//!
//! Everything here is a static atomic: deciding and counting neither allocates nor
//! panics, so it runs inside the allocator. Without the feature none of it is compiled.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// The OS calls that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Reserve = 0,
    Map = 1,
    Decommit = 2,
}

/// 0: off; otherwise one call in this many fails (on average).
static ONE_IN: AtomicU32 = AtomicU32::new(0);
static SEED: AtomicU64 = AtomicU64::new(0);
/// Calls seen while on, all kinds (numbers the calls for the hash).
static SERIAL: AtomicU64 = AtomicU64::new(0);
static CALLS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static FAILED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Makes about one in `one_in` OS calls of each kind fail from now on (0 switches
/// injection off; 1 fails every call). Which calls fail follows from `seed` and the
/// order of the calls, which threads make in no fixed order.
pub fn set(one_in: u32, seed: u64) {
    SEED.store(seed, Relaxed);
    SERIAL.store(0, Relaxed);
    ONE_IN.store(one_in, Relaxed);
}

/// Switches injection off. The counts stay.
pub fn off() {
    ONE_IN.store(0, Relaxed);
}

/// Calls made and failures injected for one kind of OS call (cumulative, counted only
/// while injection was on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    pub calls: u64,
    pub injected: u64,
}

/// Counts per kind of OS call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub reserve: KindCounts,
    pub map: KindCounts,
    pub decommit: KindCounts,
}

/// The counts so far.
pub fn counts() -> Counts {
    let k = |i: usize| KindCounts {
        calls: CALLS[i].load(Relaxed),
        injected: FAILED[i].load(Relaxed),
    };
    Counts {
        reserve: k(Kind::Reserve as usize),
        map: k(Kind::Map as usize),
        decommit: k(Kind::Decommit as usize),
    }
}

/// Whether this call of kind `kind` is to fail. Called by `OsMemory` before the system
/// call; costs a load while injection is off.
#[inline]
pub(crate) fn fail(kind: Kind) -> bool {
    let one_in = ONE_IN.load(Relaxed);
    if one_in == 0 {
        return false;
    }
    CALLS[kind as usize].fetch_add(1, Relaxed);
    let n = SERIAL.fetch_add(1, Relaxed);
    // splitmix64 of the seeded call number.
    let mut z = SEED.load(Relaxed) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z % u64::from(one_in) != 0 {
        return false;
    }
    FAILED[kind as usize].fetch_add(1, Relaxed);
    true
}
