//! The allocator switch shared by the comparison examples: the process's global
//! allocator forwards to the one named by `DEMO_ALLOC` (spanheap, system, mimalloc or
//! jemalloc), decided at the first allocation.
//!
//! Included with `#[path = "common/switch.rs"] mod switch;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
pub const SPANHEAP: u8 = 2;
const MIMALLOC: u8 = 3;
const JEMALLOC: u8 = 4;

/// The allocators, in the order the table lists them (spanheap first: the reference).
pub const CHOICES: [(&str, u8); 4] = [
    ("spanheap", SPANHEAP),
    ("system", SYSTEM),
    ("mimalloc", MIMALLOC),
    ("jemalloc", JEMALLOC),
];

static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Dispatches every call to the allocator named by `DEMO_ALLOC` at the process's first
/// allocation. The choice never changes afterwards, so each block is freed by the
/// allocator that made it.
pub struct Switch;

#[global_allocator]
static GLOBAL: Switch = Switch;

#[inline]
pub fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        UNDECIDED => decide(),
        m => m,
    }
}

/// Reads `DEMO_ALLOC` without allocating. Threads racing here read the same variable
/// (nothing in this program changes the environment) and store the same answer.
#[cold]
fn decide() -> u8 {
    // SAFETY: a NUL-terminated name; the environment is not modified by this program.
    let v = unsafe { libc::getenv(c"DEMO_ALLOC".as_ptr()) };
    let m = if v.is_null() {
        SYSTEM
    } else {
        // SAFETY: getenv returns a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
        CHOICES
            .iter()
            .find(|(n, _)| n.as_bytes() == name)
            .map_or(SYSTEM, |&(_, m)| m)
    };
    MODE.store(m, Ordering::Relaxed);
    m
}

macro_rules! dispatch {
    ($method:ident($($arg:expr),*)) => {
        match mode() {
            SPANHEAP => spanheap::SpanHeap.$method($($arg),*),
            MIMALLOC => mimalloc::MiMalloc.$method($($arg),*),
            JEMALLOC => tikv_jemallocator::Jemalloc.$method($($arg),*),
            _ => System.$method($($arg),*),
        }
    };
}

// SAFETY: every call goes to one and the same allocator for the life of the process
// (the mode is decided once, before the first block exists), so each method only
// forwards `GlobalAlloc`'s contract to an allocator that upholds it.
unsafe impl GlobalAlloc for Switch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { dispatch!(alloc(layout)) }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { dispatch!(alloc_zeroed(layout)) }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from the same allocator.
        unsafe { dispatch!(dealloc(ptr, layout)) }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from the same allocator.
        unsafe { dispatch!(realloc(ptr, layout, new_size)) }
    }
}
