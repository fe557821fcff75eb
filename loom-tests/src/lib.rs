//! loom models of spanheap's concurrent core. They only do something under
//! `RUSTFLAGS="--cfg spanheap_loom" cargo test -p loom-tests --release`; see docs/loom.md.
//!
//! This library holds what the models share: [`TestMem`], the memory source the page
//! heap models run on, and [`check`], which runs a model, reports how many executions
//! loom explored, and asserts that a mutant was caught.
#![cfg(spanheap_loom)]

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use spanheap::os::{MemSource, OsError, OsMemory};

/// Address space for one test thread's [`TestMem`] windows.
const WINDOW: usize = 1 << 30;
/// Where windows are placed: the arena index covers only the low 64 GiB under
/// `spanheap_loom` (`src/arena.rs`, `INDEX_LIMIT`), so heap memory must come from there.
const FIRST_WINDOW: usize = 8 << 30;
const LIMIT: usize = 64 << 30;

/// One window of address space, reused by every execution of the models run on one
/// test thread.
struct Pool {
    base: usize,
    /// Next free byte. Only touched under the heap lock or before the model's threads
    /// exist, and loom runs all of a model's threads on one OS thread: the plain
    /// (not loom) atomic is only there to make `Pool` `Sync`.
    next: AtomicUsize,
}

thread_local! {
    static POOL: Cell<Option<&'static Pool>> = const { Cell::new(None) };
}

/// A [`MemSource`] for the models: a bump allocator over a window of address space
/// below 64 GiB, obtained once per test thread from [`OsMemory`] and made zero again at
/// the start of every execution ([`TestMem::fresh`]).
///
/// Why not `OsMemory` itself: a model runs thousands of executions, each building a new
/// heap that is never freed (spans outlive their handles), and each heap reserves its
/// page-allocator summaries (585 MiB of address space) and arenas; executions would run
/// out of mappings. Here every execution reuses the same addresses, which also makes
/// span addresses the same in every execution.
#[derive(Clone, Copy, Debug)]
pub struct TestMem {
    pool: &'static Pool,
}

impl core::fmt::Debug for Pool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Pool({:#x})", self.base)
    }
}

impl TestMem {
    /// A memory source with nothing handed out, for one execution of a model: every
    /// byte the previous execution on this OS thread used reads as zero again. Call it
    /// on the model's first thread, before spawning.
    pub fn fresh() -> TestMem {
        let pool = POOL.with(|p| {
            if p.get().is_none() {
                p.set(Some(Box::leak(Box::new(Pool::new()))));
            }
            p.get().unwrap()
        });
        let used = pool.next.load(Ordering::Relaxed) - pool.base;
        if used != 0 {
            // SAFETY: the used prefix of our own window; nothing from the previous
            // execution is used any more (its heap is unreachable). `map` replaces it
            // with fresh zero-filled memory.
            unsafe { OsMemory.map(NonNull::new(pool.base as *mut u8).unwrap(), used) }
                .expect("remapping the test window");
        }
        pool.next.store(pool.base, Ordering::Relaxed);
        TestMem { pool }
    }
}

impl Pool {
    fn new() -> Pool {
        // One window per test thread, at the first free slot (MAP_FIXED_NOREPLACE via
        // the hint; a slot taken by another mapping is skipped).
        static NEXT_SLOT: AtomicUsize = AtomicUsize::new(FIRST_WINDOW);
        loop {
            let at = NEXT_SLOT.fetch_add(WINDOW, Ordering::Relaxed);
            assert!(at + WINDOW <= LIMIT, "no free window below 64 GiB");
            if let Ok(p) = OsMemory.reserve(WINDOW, WINDOW, at) {
                if p.as_ptr() as usize == at {
                    return Pool {
                        base: at,
                        next: AtomicUsize::new(at),
                    };
                }
                // SAFETY: the reservation we just made, elsewhere; unused.
                unsafe { OsMemory.release(p, WINDOW) };
            }
        }
    }
}

// SAFETY: every range handed out is a fresh part of this thread's window (bump
// allocation, reset only by `fresh` once the previous execution's heap is gone), aligned
// as asked; the transitions are `OsMemory`'s on that window.
unsafe impl MemSource for TestMem {
    fn reserve(&self, size: usize, align: usize, _hint: usize) -> Result<NonNull<u8>, OsError> {
        let next = self.pool.next.load(Ordering::Relaxed);
        let start = next.checked_add(align - 1).ok_or(OsError::TooLarge)? & !(align - 1);
        let end = start.checked_add(size).ok_or(OsError::TooLarge)?;
        if end > self.pool.base + WINDOW {
            return Err(OsError::NoMemory(0));
        }
        self.pool.next.store(end, Ordering::Relaxed);
        Ok(NonNull::new(start as *mut u8).unwrap())
    }

    unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
        // SAFETY: the range is inside our window (caller's contract).
        unsafe { OsMemory.map(ptr, size) }
    }

    unsafe fn commit(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded.
        unsafe { OsMemory.commit(ptr, size) }
    }

    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: forwarded.
        unsafe { OsMemory.decommit(ptr, size) }
    }

    fn decommit_zeroes(&self) -> bool {
        OsMemory.decommit_zeroes()
    }

    unsafe fn release(&self, _ptr: NonNull<u8>, _size: usize) {
        // The window is only given back as a whole, when the next execution starts.
    }
}

/// Runs `model` under loom (bounds from the `LOOM_*` environment variables, as
/// `loom::model`), with the model body on a thread with a large stack (a page heap is
/// built by value, and loom's first thread has a 32 KiB stack). Prints the number of
/// executions and the time. If `caught` (the model is run against a mutant it must
/// catch), asserts that loom reported a failure; otherwise passes failures on.
pub fn check(name: &str, caught: bool, model: fn()) {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    EXECUTIONS.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| {
        let mut b = loom::model::Builder::new();
        // The single-threaded set-up before the threads start (growing the heap)
        // takes a few hundred branches of its own.
        b.max_branches = b.max_branches.max(10_000);
        b.check(move || {
            EXECUTIONS.fetch_add(1, Ordering::Relaxed);
            spawn(model).join().unwrap();
        })
    });
    let n = EXECUTIONS.load(Ordering::Relaxed);
    let outcome = if result.is_ok() { "passed" } else { "FAILED" };
    eprintln!(
        "loom model {name}: {outcome} after {n} executions in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    if caught {
        assert!(result.is_err(), "the mutant was not caught by model {name}");
    } else if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// `loom::thread::spawn` with a stack large enough for the page heap's code paths.
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> loom::thread::JoinHandle<T> {
    loom::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(f)
        .unwrap()
}
