//! Helpers shared by the integration test binaries (each installs spanheap as its own
//! global allocator).
#![allow(dead_code)] // each binary uses a different subset

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tests that measure the heap's in-use bytes take this lock for writing; every other
/// test of the binary holds it for reading (they may run concurrently with each other,
/// never with a measurement).
static QUIET: RwLock<()> = RwLock::new(());

pub fn shared() -> RwLockReadGuard<'static, ()> {
    QUIET.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    QUIET.write().unwrap_or_else(|e| e.into_inner())
}

/// Bytes in live heap spans of the process-wide heap.
pub fn inuse() -> u64 {
    spanheap::__private::global_counters().heap_inuse
}

/// splitmix64: a small, fast, deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
