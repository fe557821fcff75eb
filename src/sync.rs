//! The one synchronisation shim of the concurrent core.
//!
//! Every atomic, interior-mutability cell, lock and spin-wait that spanheap's shared
//! state uses comes from this module. Normally they are the `core` types plus a small
//! futex lock; under `--cfg spanheap_loom` they are loom's instrumented types, so the
//! loom models in `loom-tests/` run the *real* allocator code, not a copy of it.
//!
//! The cfg is crate-specific (`spanheap_loom`, not `loom`) so that a user who model-checks
//! their own program with `--cfg loom` does not silently switch the allocator underneath.
//!
//! Rules for code outside this module:
//! - never name `core::sync::atomic` or `core::cell::UnsafeCell` directly for shared state;
//! - a spin loop must yield to loom's scheduler under the model: use [`SpinWait`] (the
//!   lock's wait is a modelled futex: [`RawMutex`] under loom blocks on a condvar);
//! - arrays of atomics placed in raw OS memory are made valid with [`init_atomics`].

pub(crate) use crate::lockrank::Rank;
#[cfg(not(spanheap_loom))]
pub(crate) use core::sync::atomic::{
    fence, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(spanheap_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// Defines a constructor as a `const fn` normally and as a plain `fn` under loom (whose
/// types have no const constructors), from one body, so the two cannot drift apart.
macro_rules! const_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$attr])*
        #[cfg(not(spanheap_loom))]
        $vis const fn $name($($arg: $ty),*) -> $ret $body
        $(#[$attr])*
        #[cfg(spanheap_loom)]
        $vis fn $name($($arg: $ty),*) -> $ret $body
    };
}
pub(crate) use const_fn;

/// Makes `n` atomics starting at `ptr` valid, in memory that came zero-filled from the OS.
///
/// With the `core` atomics an all-zero bit pattern already is a valid atomic holding
/// zero / null, so this does nothing and the OS pages stay untouched (not resident)
/// until used. loom's atomics carry model state and must be constructed.
///
/// # Safety
/// `ptr` must point to `n` writable, zero-filled, suitably aligned slots of `T`.
#[inline]
pub(crate) unsafe fn init_atomics<T: ZeroedAtomic>(ptr: *mut T, n: usize) {
    #[cfg(not(spanheap_loom))]
    {
        let _ = (ptr, n);
    }
    #[cfg(spanheap_loom)]
    for i in 0..n {
        // SAFETY: the caller guarantees `n` writable slots.
        unsafe { ptr.add(i).write(T::zeroed()) };
    }
}

/// Atomic types whose all-zero bit pattern is their zero value.
pub(crate) trait ZeroedAtomic {
    #[allow(dead_code)] // used only under loom
    fn zeroed() -> Self;
}
impl ZeroedAtomic for AtomicU8 {
    fn zeroed() -> Self {
        AtomicU8::new(0)
    }
}
impl ZeroedAtomic for AtomicU64 {
    fn zeroed() -> Self {
        AtomicU64::new(0)
    }
}
impl ZeroedAtomic for AtomicUsize {
    fn zeroed() -> Self {
        AtomicUsize::new(0)
    }
}
impl<T> ZeroedAtomic for AtomicPtr<T> {
    fn zeroed() -> Self {
        AtomicPtr::new(core::ptr::null_mut())
    }
}

/// An `UnsafeCell` with tokio's closure API, so that loom can check each access.
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(
    #[cfg(not(spanheap_loom))] core::cell::UnsafeCell<T>,
    #[cfg(spanheap_loom)] loom::cell::UnsafeCell<T>,
);

impl<T> UnsafeCell<T> {
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn new(value: T) -> Self {
        UnsafeCell(core::cell::UnsafeCell::new(value))
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn new(value: T) -> Self {
        UnsafeCell(loom::cell::UnsafeCell::new(value))
    }

    /// Shared access; the caller's protocol must exclude concurrent writers.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(not(spanheap_loom))]
        return f(self.0.get());
        #[cfg(spanheap_loom)]
        return self.0.with(f);
    }

    /// Exclusive access; the caller's protocol must exclude every other access.
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(not(spanheap_loom))]
        return f(self.0.get());
        #[cfg(spanheap_loom)]
        return self.0.with_mut(f);
    }
}

/// Pushes `node` on a lock-free stack (Treiber) whose head is `head`; `link` is the
/// node's own next field. The link is stored Relaxed, then the head CASed to `node`
/// with `push` (Release in every caller: a thread that loads the head with Acquire
/// sees the link and everything written to the node before the push). The callers'
/// stacks are taken whole (swap) or only grow, so there is no ABA.
pub(crate) fn push_linked<T>(
    head: &AtomicPtr<T>,
    node: *mut T,
    link: &AtomicPtr<T>,
    push: Ordering,
) {
    let mut cur = head.load(Ordering::Relaxed);
    loop {
        link.store(cur, Ordering::Relaxed);
        match head.compare_exchange_weak(cur, node, push, Ordering::Relaxed) {
            Ok(_) => return,
            Err(h) => cur = h,
        }
    }
}

/// The cheap side of an asymmetric barrier: a thread announces that it is about to use
/// something (a store), passes this, and checks whether another thread has claimed it
/// (a load); the claimer stores its claim, passes [`heavy_barrier`], and loads the
/// announcement. Either the claimer sees the announcement or the user sees the claim,
/// as with a full fence on both sides (Dekker), yet the frequent side pays only a
/// compiler fence: the heavy barrier runs a full barrier on every running thread of the
/// process (`os::membarrier`), and a thread not running has passed through the kernel.
/// Under loom both sides are SeqCst fences, which is what that guarantee amounts to.
/// The loom mutant `gate_no_fence` drops this side's fence to show that the model
/// needs it.
#[inline(always)]
pub(crate) fn light_barrier() {
    #[cfg(not(spanheap_loom))]
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    #[cfg(all(spanheap_loom, not(spanheap_mutant = "gate_no_fence")))]
    fence(Ordering::SeqCst);
}

/// The expensive side of the asymmetric barrier (see [`light_barrier`]): a system call
/// that interrupts every CPU running a thread of this process. False, having done
/// nothing, if the OS offers no such barrier; the caller must then not rely on it.
pub(crate) fn heavy_barrier() -> bool {
    #[cfg(not(spanheap_loom))]
    {
        crate::os::membarrier()
    }
    #[cfg(spanheap_loom)]
    {
        fence(Ordering::SeqCst);
        true
    }
}

/// One step of a spin-wait on another thread's progress (a statistics reader waiting for
/// a writer to leave its short critical section). Spins on the CPU first, then yields
/// the time slice. Under loom it yields to the model's scheduler, so that a wait on a
/// thread that has not run yet is explored instead of spinning forever.
#[derive(Debug, Default)]
pub(crate) struct SpinWait {
    #[cfg(not(spanheap_loom))]
    spins: u32,
}

impl SpinWait {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub(crate) fn spin(&mut self) {
        #[cfg(not(spanheap_loom))]
        {
            if self.spins < 64 {
                self.spins += 1;
                core::hint::spin_loop();
            } else {
                // SAFETY: sched_yield has no preconditions and does not allocate.
                unsafe { libc::sched_yield() };
            }
        }
        #[cfg(spanheap_loom)]
        loom::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------
// The lock.
// ---------------------------------------------------------------------------------------

const UNLOCKED: u32 = 0;
/// Held, nobody sleeping on it.
const LOCKED: u32 = 1;
/// Held, and at least one thread may be asleep in `futex_wait`.
const CONTENDED: u32 = 2;

/// The ordering of a successful lock acquisition. The loom suite's mutant
/// `spanheap_mutant="lock_relaxed"` weakens it to show that the lock model can fail.
#[cfg(not(spanheap_mutant = "lock_relaxed"))]
const LOCK_ACQUIRE: Ordering = Ordering::Acquire;
#[cfg(spanheap_mutant = "lock_relaxed")]
const LOCK_ACQUIRE: Ordering = Ordering::Relaxed;

/// A mutual-exclusion lock that never allocates, never panics and never unwinds.
///
/// Three-state futex lock (Drepper, "Futexes are tricky", mutex #2): an uncontended
/// lock/unlock pair is one CAS and one swap; a waiter spins briefly, then sleeps in the
/// kernel. It has no poisoning (the allocator does not panic) and exposes raw
/// `lock`/`unlock` so that fork handlers can hold it across `fork()`.
///
/// It counts its own use ([`LockCount`], read by `spanheap::lock_stats`): every
/// acquisition, with a plain load and store of a counter beside `state` that only the
/// holder writes (no atomic read-modify-write on the fast path), and, on the slow path
/// only, the contended acquisitions, the futex sleeps and the nanoseconds waited.
/// `#[repr(C)]` keeps the acquisition counter in the first 16 bytes with `state`, on the
/// cache line the acquiring CAS has just taken.
///
/// Under loom the kernel wait becomes a yield, so the lock itself is model-checked too;
/// the counters are compiled out there.
#[repr(C)]
pub(crate) struct RawMutex {
    state: AtomicU32,
    /// Its place in the lock order (`lockrank.rs`): the key its counts are summed by,
    /// and what the `lockrank` feature checks.
    rank: Rank,
    /// Successful acquisitions (`lock`, `try_lock`). Written only by the holder, with a
    /// Relaxed load and store, before `contended` (see [`RawMutex::counts`]).
    #[cfg(not(spanheap_loom))]
    acquisitions: AtomicU64,
    /// The slow path's counts, written by the holder only.
    #[cfg(not(spanheap_loom))]
    slow: SlowCounts,
    /// Debug builds: the pthread that holds the lock (0 when free), to check that the
    /// thread unlocking is the one that locked. Written only by the holder.
    #[cfg(all(debug_assertions, not(spanheap_loom)))]
    owner: AtomicUsize,
    /// Under loom, the model of the kernel's futex queue for `state`.
    #[cfg(spanheap_loom)]
    futex: (loom::sync::Mutex<()>, loom::sync::Condvar),
}

/// What a lock's slow paths counted (see [`RawMutex`]).
#[cfg(not(spanheap_loom))]
struct SlowCounts {
    /// Acquisitions whose first CAS failed (`lock_slow` ran). Written by the holder,
    /// Release, after `acquisitions`.
    contended: AtomicU64,
    /// `futex_wait` calls made by those acquisitions. Written by the holder.
    sleeps: AtomicU64,
    /// Nanoseconds those acquisitions spent in `lock_slow` (`CLOCK_MONOTONIC`, read
    /// only there). Written by the holder.
    wait_ns: AtomicU64,
    /// `try_lock` calls that found the lock taken: a Relaxed `fetch_add` by the caller,
    /// which does not hold the lock (on the line its failed CAS just loaded).
    busy: AtomicU64,
}

/// One lock's counts, as [`RawMutex::counts`] reads them (all zero under loom).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LockCount {
    pub(crate) acquisitions: u64,
    pub(crate) contended: u64,
    pub(crate) sleeps: u64,
    pub(crate) wait_ns: u64,
    pub(crate) try_busy: u64,
}

/// Adds one to a counter only the caller writes: a load and a store, no RMW.
#[cfg(not(spanheap_loom))]
#[inline(always)]
fn bump(c: &AtomicU64, v: u64, order: Ordering) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), order);
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO: no system call, no allocation).
#[cfg(not(spanheap_loom))]
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; it does not allocate.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

impl RawMutex {
    /// A free lock of rank `rank` (`lockrank.rs`).
    #[cfg(not(spanheap_loom))]
    pub(crate) const fn new(rank: Rank) -> Self {
        RawMutex {
            state: AtomicU32::new(UNLOCKED),
            rank,
            acquisitions: AtomicU64::new(0),
            slow: SlowCounts {
                contended: AtomicU64::new(0),
                sleeps: AtomicU64::new(0),
                wait_ns: AtomicU64::new(0),
                busy: AtomicU64::new(0),
            },
            #[cfg(debug_assertions)]
            owner: AtomicUsize::new(0),
        }
    }
    #[cfg(spanheap_loom)]
    pub(crate) fn new(rank: Rank) -> Self {
        RawMutex {
            state: AtomicU32::new(UNLOCKED),
            rank,
            futex: (loom::sync::Mutex::new(()), loom::sync::Condvar::new()),
        }
    }

    /// The lock's rank and what it has counted so far. Lock-free and racy with the
    /// holder's updates, but never shows more contended acquisitions than acquisitions:
    /// `contended` is loaded first (Acquire, pairing with the holder's Release store,
    /// which follows its store of `acquisitions`). Under loom: nothing counted.
    #[cfg(spanheap_loom)]
    pub(crate) fn counts(&self) -> (Rank, LockCount) {
        (self.rank, LockCount::default())
    }
    /// The lock's rank and what it has counted so far (see above).
    #[cfg(not(spanheap_loom))]
    pub(crate) fn counts(&self) -> (Rank, LockCount) {
        let contended = self.slow.contended.load(Ordering::Acquire);
        let c = LockCount {
            contended,
            acquisitions: self.acquisitions.load(Ordering::Relaxed),
            sleeps: self.slow.sleeps.load(Ordering::Relaxed),
            wait_ns: self.slow.wait_ns.load(Ordering::Relaxed),
            try_busy: self.slow.busy.load(Ordering::Relaxed),
        };
        (self.rank, c)
    }

    /// The holder counts its acquisition.
    #[inline(always)]
    fn count_acquisition(&self) {
        #[cfg(not(spanheap_loom))]
        bump(&self.acquisitions, 1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn lock(&self) {
        // Checked before waiting: an order that could deadlock aborts even when it
        // does not.
        #[cfg(all(feature = "lockrank", not(spanheap_loom)))]
        crate::lockrank::acquired(self as *const Self as usize, self.rank);
        // Acquire pairs with the Release in `unlock`: everything the previous holder
        // wrote under the lock is visible to us.
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, LOCK_ACQUIRE, Ordering::Relaxed)
            .is_ok()
        {
            self.count_acquisition();
        } else {
            self.lock_slow();
        }
        #[cfg(all(debug_assertions, not(spanheap_loom)))]
        self.owner.store(current_thread_id(), Ordering::Relaxed);
    }

    /// The contended acquisition: waits, then counts it (holding the lock).
    #[cold]
    #[inline(never)]
    fn lock_slow(&self) {
        #[cfg(not(spanheap_loom))]
        let start = now_ns();
        let _sleeps = self.acquire_slow();
        self.count_acquisition();
        #[cfg(not(spanheap_loom))]
        {
            // Release: a reader that sees this count sees the acquisition's too.
            bump(&self.slow.contended, 1, Ordering::Release);
            bump(&self.slow.sleeps, _sleeps, Ordering::Relaxed);
            bump(
                &self.slow.wait_ns,
                now_ns().wrapping_sub(start),
                Ordering::Relaxed,
            );
        }
    }

    /// Waits for the lock and takes it; returns how many times it slept in the kernel.
    #[inline(always)]
    fn acquire_slow(&self) -> u64 {
        // Spin a little first: the heap lock is held for short sections. (Not under
        // loom: there a spin only multiplies the interleavings without adding any.)
        #[cfg(not(spanheap_loom))]
        {
            let backoff = crossbeam_utils::Backoff::new();
            while !backoff.is_completed() {
                if self.state.load(Ordering::Relaxed) == UNLOCKED
                    && self
                        .state
                        .compare_exchange(UNLOCKED, LOCKED, LOCK_ACQUIRE, Ordering::Relaxed)
                        .is_ok()
                {
                    return 0;
                }
                backoff.snooze();
            }
        }
        // Then sleep. Marking the lock CONTENDED tells the holder to wake someone.
        let mut sleeps = 0;
        while self.state.swap(CONTENDED, LOCK_ACQUIRE) != UNLOCKED {
            self.wait(CONTENDED);
            sleeps += 1;
        }
        sleeps
    }

    #[inline]
    pub(crate) fn unlock(&self) {
        #[cfg(all(feature = "lockrank", not(spanheap_loom)))]
        crate::lockrank::released(self as *const Self as usize, self.rank);
        #[cfg(all(debug_assertions, not(spanheap_loom)))]
        {
            debug_assert_eq!(self.owner.load(Ordering::Relaxed), current_thread_id());
            self.owner.store(0, Ordering::Relaxed);
        }
        // Release pairs with the Acquire in `lock`.
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            self.wake_one();
        }
    }

    /// Takes the lock if it is free; never waits, so it may take it out of rank order.
    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        let ok = self
            .state
            .compare_exchange(UNLOCKED, LOCKED, LOCK_ACQUIRE, Ordering::Relaxed)
            .is_ok();
        if ok {
            self.count_acquisition();
        } else {
            // Relaxed RMW, by a thread that does not hold the lock: only on failure.
            #[cfg(not(spanheap_loom))]
            self.slow.busy.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(all(feature = "lockrank", not(spanheap_loom)))]
        if ok {
            crate::lockrank::tried(self as *const Self as usize, self.rank);
        }
        #[cfg(all(debug_assertions, not(spanheap_loom)))]
        if ok {
            self.owner.store(current_thread_id(), Ordering::Relaxed);
        }
        ok
    }

    /// Whether some thread holds the lock (for debug assertions of lock preconditions).
    pub(crate) fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }
}

#[cfg(all(debug_assertions, not(spanheap_loom)))]
fn current_thread_id() -> usize {
    // SAFETY: pthread_self has no preconditions and does not allocate.
    unsafe { libc::pthread_self() as usize }
}

impl RawMutex {
    /// Sleeps while `state` holds `expected` (spurious returns are fine).
    #[cfg(not(spanheap_loom))]
    fn wait(&self, expected: u32) {
        // SAFETY: futex(FUTEX_WAIT_PRIVATE) on a valid, aligned u32 that lives as long
        // as the lock; it returns at once if the value is no longer `expected`.
        // Spurious wake-ups are handled by the caller's loop.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.state.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                core::ptr::null::<libc::timespec>(),
            );
        }
    }

    /// Wakes one thread sleeping in `wait`, if any.
    #[cfg(not(spanheap_loom))]
    fn wake_one(&self) {
        // SAFETY: futex(FUTEX_WAKE_PRIVATE) on a valid, aligned u32; waking nobody is fine.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.state.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }

    /// The model of `futex_wait`: block until woken while the word holds `expected`.
    /// Checking the word under the queue mutex gives the kernel's guarantee that a wake
    /// issued after the check is not lost. (A spin on loads instead would let loom read
    /// a stale value forever.)
    #[cfg(spanheap_loom)]
    fn wait(&self, expected: u32) {
        let (m, cv) = &self.futex;
        let mut g = m.lock().unwrap();
        while self.state.load(Ordering::Relaxed) == expected {
            g = cv.wait(g).unwrap();
        }
    }

    #[cfg(spanheap_loom)]
    fn wake_one(&self) {
        let (m, cv) = &self.futex;
        let _g = m.lock().unwrap();
        cv.notify_one();
    }
}

/// A value protected by a [`RawMutex`]. The data is reachable only through the guard,
/// so "this function needs the lock" is checked by the type system: such functions take
/// `&mut T` that only a guard can produce, and end in `_locked`.
pub(crate) struct Mutex<T> {
    raw: RawMutex,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reachable through a guard, and guards are exclusive.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: moving the mutex moves the data with it.
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    crate::sync::const_fn! {
        /// `value` behind a lock of rank `rank` (`lockrank.rs`).
        pub(crate) fn new(value: T, rank: Rank) -> Self {
            Mutex {
                raw: RawMutex::new(rank),
                data: UnsafeCell::new(value),
            }
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.raw.lock();
        MutexGuard { mutex: self }
    }

    /// Takes the lock without a guard, for the fork handlers, which hold it across
    /// `fork()` and release it with [`fork_unlock`](Self::fork_unlock).
    pub(crate) fn fork_lock(&self) {
        self.raw.lock();
    }

    /// Releases a lock taken by [`fork_lock`](Self::fork_lock).
    ///
    /// # Safety
    /// The calling thread took it with `fork_lock` (in the child of a fork, the thread
    /// that forked).
    pub(crate) unsafe fn fork_unlock(&self) {
        self.raw.unlock();
    }

    /// The lock's rank and counts (see [`RawMutex::counts`]).
    pub(crate) fn counts(&self) -> (Rank, LockCount) {
        self.raw.counts()
    }

    /// The lock if it is free; never waits.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        if self.raw.try_lock() {
            Some(MutexGuard { mutex: self })
        } else {
            None
        }
    }
}

impl<T> core::fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mutex")
            .field("locked", &self.raw.is_locked())
            .finish_non_exhaustive()
    }
}

pub(crate) struct MutexGuard<'a, T> {
    mutex: &'a Mutex<T>,
}

impl<T> MutexGuard<'_, T> {
    /// Runs `f` with exclusive access to the protected data.
    #[inline]
    pub(crate) fn with<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: holding the guard means holding the lock, so no other reference to the
        // data exists; `&mut self` keeps this call the only one on this guard.
        self.mutex.data.with_mut(|p| f(unsafe { &mut *p }))
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.mutex.raw.unlock();
    }
}
