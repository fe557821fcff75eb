//! The two thread-local slots of the thread cache: the cache pointer and its state
//! (`lifecycle.rs`: NO_CACHE, LIVE, DEAD). Both are plain per-thread values with constant
//! initial values and no destructor, readable at any point of a thread's life. They are
//! part of `mcache` because the cache slot's initial value is the static empty cache's
//! address, and only the thread cache and the idle-thread visitor above it (`global/idle.rs`)
//! touch them: a module of their own would have to name `mcache` from below it.
//!
//! Two implementations behind one interface:
//!
//! - default: std's `thread_local!`. In an executable that is the local-exec TLS model
//!   (one `fs`-relative load); in a shared library (the `LD_PRELOAD` build) rustc uses
//!   the general-dynamic model, a call to `__tls_get_addr` per access;
//! - feature `static-tls` on x86_64 Linux (enabled by `spanheap-preload`): a 16-byte
//!   TLS block declared in assembly and reached with the initial-exec model (the
//!   offset from the thread pointer is read from the GOT, then one `fs`-relative
//!   access), which is what C allocators use with `tls_model("initial-exec")`; stable
//!   Rust has no TLS-model switch. Initial-exec TLS lives in the static TLS area, which
//!   a library loaded at start-up (`LD_PRELOAD`, or linked) always gets; a library
//!   `dlopen`ed later takes it from glibc's small surplus, which 16 bytes fit.
//!
//! The assembly block starts zeroed, so there the cache slot holds the cache's offset
//! from the static empty cache (0 = the empty cache) rather than the pointer itself.

use super::MCache;

#[cfg(not(all(feature = "static-tls", target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::MCache;
    use core::cell::Cell;

    thread_local! {
        /// The cache pointer itself, starting at the static empty cache.
        static CACHE: Cell<*mut MCache> = const {
            Cell::new(super::super::EMPTY_CACHE.get())
        };
        static STATE: Cell<u8> = const { Cell::new(0) };
    }

    #[inline(always)]
    pub(super) fn cache() -> *mut MCache {
        CACHE.with(Cell::get)
    }
    #[inline(always)]
    pub(super) fn set_cache(c: *mut MCache) {
        CACHE.with(|x| x.set(c));
    }
    #[inline(always)]
    pub(super) fn state() -> u8 {
        STATE.with(Cell::get)
    }
    pub(super) fn cache_slot() -> (usize, usize) {
        (
            CACHE.with(|x| x.as_ptr() as usize),
            super::super::EMPTY_CACHE.get() as usize,
        )
    }
    #[inline(always)]
    pub(super) fn set_state(s: u8) {
        STATE.with(|c| c.set(s));
    }
}

#[cfg(all(feature = "static-tls", target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::MCache;

    // The block: word 0 the cache offset, byte 8 the state. Hidden, so that the
    // library's own references bind to its own block.
    core::arch::global_asm!(
        ".pushsection .tbss,\"awT\",@nobits",
        ".p2align 3",
        ".globl spanheap_tls_slots",
        ".hidden spanheap_tls_slots",
        ".type spanheap_tls_slots,@object",
        ".size spanheap_tls_slots,16",
        "spanheap_tls_slots:",
        ".zero 16",
        ".popsection",
    );

    /// Address of this thread's block: the thread pointer (`fs:0` holds it on x86_64
    /// Linux) plus the block's initial-exec offset from the GOT.
    #[inline(always)]
    fn block() -> *mut usize {
        let p: usize;
        // SAFETY: reads the GOT entry the linker made for the block and the thread
        // control block's self-pointer; both are valid for the life of the thread and
        // the result depends only on the calling thread (`pure`).
        unsafe {
            core::arch::asm!(
                "mov {p}, qword ptr [rip + spanheap_tls_slots@GOTTPOFF]",
                "add {p}, qword ptr fs:[0]",
                p = out(reg) p,
                options(nostack, pure, readonly),
            );
        }
        p as *mut usize
    }

    #[inline(always)]
    fn empty() -> usize {
        super::super::EMPTY_CACHE.get() as usize
    }

    /// The block starts zeroed, so it holds the cache's offset from the static empty
    /// cache (0: the empty cache).
    #[inline(always)]
    pub(super) fn cache() -> *mut MCache {
        // SAFETY: the block is this thread's, 16 bytes, 8-aligned; only this thread
        // touches it.
        empty().wrapping_add(unsafe { block().read() }) as *mut MCache
    }
    #[inline(always)]
    pub(super) fn set_cache(c: *mut MCache) {
        // SAFETY: as above.
        unsafe { block().write((c as usize).wrapping_sub(empty())) }
    }
    pub(super) fn cache_slot() -> (usize, usize) {
        (block() as usize, 0)
    }
    #[inline(always)]
    pub(super) fn state() -> u8 {
        // SAFETY: as above (byte 8 of the block).
        unsafe { block().add(1).cast::<u8>().read() }
    }
    #[inline(always)]
    pub(super) fn set_state(s: u8) {
        // SAFETY: as above.
        unsafe { block().add(1).cast::<u8>().write(s) }
    }
}

/// This thread's cache, or the static empty one.
#[inline(always)]
pub(crate) fn cache() -> *mut MCache {
    imp::cache()
}

/// Makes `c` this thread's cache (the static empty one for none).
#[inline(always)]
pub(crate) fn set_cache(c: *mut MCache) {
    imp::set_cache(c)
}

/// The address of this thread's cache slot (a word, valid while the thread lives), and
/// the value that means "the empty cache" in it: for a visitor that empties the slot of
/// an idle thread (`global/idle.rs`).
pub(crate) fn cache_slot() -> (usize, usize) {
    imp::cache_slot()
}

/// This thread's cache state.
#[inline(always)]
pub(crate) fn state() -> u8 {
    imp::state()
}

/// Sets this thread's cache state.
#[inline(always)]
pub(crate) fn set_state(s: u8) {
    imp::set_state(s)
}
