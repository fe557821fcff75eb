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

    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
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
    // Per call: the tests of one binary run in parallel.
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| {
        let mut b = loom::model::Builder::new();
        // The single-threaded set-up before the threads start (growing the heap)
        // takes a few hundred branches of its own.
        b.max_branches = b.max_branches.max(10_000);
        b.check(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            spawn(model).join().unwrap();
        })
    });
    let n = executions.load(Ordering::Relaxed);
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

/// Model-side bookkeeping of small objects for the models of the small-object core:
/// which addresses are live (handed out and not freed since), and one loom cell per
/// object slot standing for the object's contents.
///
/// A user writes the slot's cell after allocating the object and before freeing it, so
/// the allocator's hand-off of a slot from one user to the next must order the two
/// writes: a missing Release/Acquire on the way shows up as a loom causality violation.
/// The tables themselves are plain (not loom) state: loom runs every thread of a model
/// on one OS thread and switches only at its own operations, so each table operation is
/// atomic in every interleaving and adds no synchronisation loom could see.
pub struct Objects {
    /// Live addresses, and the address of each slot of `cells` (assigned on first use).
    tables: std::sync::Mutex<(Vec<usize>, Vec<usize>)>,
    cells: Vec<loom::cell::UnsafeCell<u64>>,
}

// SAFETY: the cells are only accessed through `with_mut`, which loom checks (a race
// is reported, not undefined); the tables are behind a mutex.
unsafe impl Sync for Objects {}
// SAFETY: as above.
unsafe impl Send for Objects {}

impl Objects {
    /// Room for `slots` distinct object addresses. Create it on the model's first
    /// thread before spawning (the cells' creation then happens-before every use).
    pub fn new(slots: usize) -> Objects {
        Objects {
            tables: std::sync::Mutex::new((Vec::new(), Vec::new())),
            cells: (0..slots).map(|_| loom::cell::UnsafeCell::new(0)).collect(),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, (Vec<usize>, Vec<usize>)> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cell(&self, p: usize) -> &loom::cell::UnsafeCell<u64> {
        let mut t = self.tables();
        let i = match t.1.iter().position(|&a| a == p) {
            Some(i) => i,
            None => {
                t.1.push(p);
                t.1.len() - 1
            }
        };
        assert!(
            i < self.cells.len(),
            "more object slots than the model expects"
        );
        &self.cells[i]
    }

    /// `p` was just handed out: it must not be live; the new user writes its contents.
    pub fn allocated(&self, p: *mut u8, tag: u64) {
        assert!(!p.is_null(), "allocation failed");
        let p = p as usize;
        {
            let mut t = self.tables();
            assert!(
                !t.0.contains(&p),
                "object {p:#x} handed out twice while live"
            );
            t.0.push(p);
        }
        // SAFETY: the cell holds a plain u64; loom checks that this access is ordered
        // after every earlier one (the previous user's last write).
        self.cell(p).with_mut(|v| unsafe { *v = tag });
    }

    /// The user's last write of `p`'s contents, just before freeing it.
    pub fn freeing(&self, p: *mut u8, tag: u64) {
        let p = p as usize;
        // SAFETY: as in `allocated`.
        self.cell(p).with_mut(|v| unsafe { *v = tag });
        let mut t = self.tables();
        let i = t.0.iter().position(|&a| a == p);
        let i = i.unwrap_or_else(|| panic!("freeing {p:#x}, which is not live"));
        t.0.swap_remove(i);
    }

    /// The live addresses.
    pub fn live(&self) -> Vec<usize> {
        self.tables().0.clone()
    }
}

/// Allocates `n` objects of size class `class` through `cache`, each recorded in
/// `objs` as allocated with its index as the tag; returns their addresses.
pub fn alloc_objects(
    cache: &mut spanheap::__private::SmallCache<TestMem>,
    class: usize,
    objs: &Objects,
    n: u64,
) -> Vec<usize> {
    (0..n)
        .map(|i| {
            let p = cache.alloc(class);
            objs.allocated(p, i);
            p as usize
        })
        .collect()
}

/// What [`settled`] found: the live spans of the class and where each is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Spans a cache owns.
    pub owned: usize,
    pub partial: usize,
    pub full: usize,
    pub spare: usize,
}

impl Settled {
    pub fn spans(&self) -> usize {
        self.owned + self.partial + self.full + self.spare
    }
}

/// Checks the spans of size class `class` when no thread uses the heap any more: every
/// live span that holds one of `addrs` is owned by a cache or sits where its state says
/// (no announcement left pending, list and `place` agree, the remote count matches the
/// remote bits and the live count the alloc bitmap, a listed span has a live object, a
/// full one no known free object, the spare no live object); the mcentral's lists
/// hold exactly the unowned ones (none lost, none listed twice); and the heap's in-use
/// bytes are exactly those spans (the others were retired).
///
/// # Safety
/// No other thread uses `heap`; the class's spans are all `npages` long.
pub unsafe fn settled(
    heap: &spanheap::__private::PageHeap<TestMem>,
    class: usize,
    npages: usize,
    addrs: &[usize],
) -> Settled {
    let mut seen = Vec::new();
    let mut r = Settled::default();
    for &a in addrs {
        // SAFETY: forwarded (nobody else uses the heap).
        let Some(v) = (unsafe { heap.small_span(a) }) else {
            continue; // retired
        };
        if seen.contains(&v.base) {
            continue;
        }
        seen.push(v.base);
        assert_eq!(v.spanclass as usize, class, "{v:?}");
        assert!(v.place != 3, "an announcement was left pending: {v:?}");
        if v.owned {
            assert!(v.place == 0 && v.list == 0xFF, "owned but listed: {v:?}");
            r.owned += 1;
            continue;
        }
        assert_eq!(v.unmerged, v.remote_bits as i64, "remote count: {v:?}");
        assert_eq!(
            v.live_at_merge as usize,
            v.nelems - v.free,
            "live count: {v:?}"
        );
        match v.place {
            0 => {
                assert_eq!(v.list, 0xFF, "{v:?}");
                // (Settling keeps a span as the spare without merging the remote frees
                // that emptied it; the next owner's merge does.)
                assert!(
                    v.unmerged == v.live_at_merge as i64,
                    "the spare has live objects: {v:?}"
                );
                r.spare += 1;
            }
            1 | 2 => {
                assert_eq!(v.list, v.place, "place and list disagree: {v:?}");
                assert!(
                    v.unmerged < v.live_at_merge as i64,
                    "a listed span has no live object (neither retired nor the spare): {v:?}"
                );
                if v.place == 2 {
                    assert!(
                        v.free == 0 && v.unmerged == 0,
                        "a full span has free objects: {v:?}"
                    );
                    r.full += 1;
                } else {
                    assert!(
                        v.free > 0 || v.unmerged > 0,
                        "a partial span has nothing free: {v:?}"
                    );
                    r.partial += 1;
                }
            }
            _ => unreachable!("{v:?}"),
        }
    }
    let (partial, full, spare, _) = heap.census(class);
    assert_eq!(
        (partial, full, spare),
        (r.partial, r.full, r.spare),
        "the mcentral's lists disagree with the spans' states ({r:?})"
    );
    assert_eq!(
        heap.heap_inuse(),
        (r.spans() * npages * spanheap::os::PAGE_SIZE) as u64,
        "heap in use is not the live spans ({r:?})"
    );
    r
}
