//! The process-wide allocator: the one heap behind [`SpanHeap`](crate::SpanHeap) and
//! the C entry points, and what acts on that heap as a whole rather than on one thread's
//! cache or one span:
//!
//! - `HEAP` (here): the process's `mcache::Heap`, built with the hooks that reach up
//!   into this module (the background scavenger's, the fork handlers' registration);
//! - `idle.rs`: visits of other threads' caches (the door protocol's visitor side);
//! - `bgscavenge.rs`: the background scavenger thread;
//! - `fork.rs`: the `pthread_atfork` handlers;
//! - `checked.rs`: checked mode's validation of every free (feature `checked`).
//!
//! This is the top of the layering (`docs/design.md`, "Layers"): the core below
//! (`mcache` -> `mcentral` -> `mheap` -> `pagealloc`/`arena` -> `os`) never names `HEAP`;
//! a thread cache's functions that serve the process-wide heap take it as an argument
//! (`&HEAP`, a constant once inlined), and the front ends (`lib.rs`'s `GlobalAlloc`,
//! `malloc.rs`'s C ABI) pass it. The files here name each other freely: they are one
//! concern, the process's single heap.

use crate::mcache::Heap;
use crate::os::OsMemory;

pub(crate) mod bgscavenge;
#[cfg(feature = "checked")]
pub(crate) mod checked;
pub(crate) mod fork;
pub(crate) mod idle;

/// The process-wide heap behind [`SpanHeap`](crate::SpanHeap).
pub(crate) static HEAP: Heap<OsMemory> = Heap::global(
    OsMemory,
    crate::mcache::current_writer,
    bgscavenge::HOOKS,
    on_cache_live,
);

/// Run when a thread cache goes live (`mcache::Heap::on_cache_live`): registers the fork
/// handlers and reads the heap profile's settings, once per process.
fn on_cache_live() {
    fork::register_once();
    #[cfg(feature = "profile")]
    {
        crate::profile::sample::register_restart(crate::mcache::restart_countdown);
        crate::profile::init_from_env_once();
    }
}

/// The thread caches' handle on `HEAP` (`mcache::Process`): the entry points of the
/// calling thread's cache are instantiated with it.
pub(crate) struct Process;

impl crate::mcache::Process for Process {
    #[inline(always)]
    fn heap() -> &'static Heap<OsMemory> {
        &HEAP
    }
}
