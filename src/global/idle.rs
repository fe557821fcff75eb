//! Visiting other threads' small-object caches: what an idle thread's cache holds (free
//! stacks, remote buffers, current spans) goes back to the heap, and a busy thread's
//! free stacks are trimmed to what it uses, with nothing added to the fast paths.
//!
//! # Why this needs care
//!
//! A thread's fast paths read and write its cache record with plain loads and stores,
//! and mark nothing: no other thread may touch the record while its owner might be
//! inside one. Go flushes every mcache while the world is stopped; allocators without a
//! stop-the-world either leave a parked thread's cache alone (jemalloc, mimalloc) or
//! run their fast paths as restartable sequences (TCMalloc's per-CPU caches). spanheap
//! instead waits for a moment when the owner provably is not inside: the kernel tells
//! it.
//!
//! # The door
//!
//! A visitor (the background scavenger thread, or `release_memory`) holds the reclaim
//! lock and, for a thread whose record is `OPEN`:
//!
//! 1. *looks* at the thread (`/proc/self/task/<tid>/status` and `.../syscall`): it must
//!    be blocked in a system call (state S or D, and a syscall number: not running, not
//!    preempted, not waiting on a page fault), with the signal mask it had when it
//!    created its cache (a signal handler that interrupted an allocation and then
//!    blocked would have its own signal blocked), and its context-switch count is
//!    noted;
//! 2. claims the record (`OPEN` -> `CLAIMED`), and writes "the empty cache" into the
//!    owner's thread-local cache slot: from now on, any allocation or free the owner
//!    starts misses at once and goes to its slow path, which waits for the claim to end
//!    and then re-installs the record (`reattach`);
//! 3. passes a heavy barrier (`membarrier`), so that the owner, wherever it runs next,
//!    sees that write;
//! 4. looks again: if the context-switch count is unchanged and the thread is still
//!    blocked in a system call, the thread has not run since the first look. It was
//!    then inside a system call, which no fast path makes, and not inside a slow path
//!    (those keep a depth count in the record, `slow`, read here); so it was not in the
//!    middle of any allocator operation, and its next one starts after the write of
//!    step 2. The record is the visitor's until it reopens the door. Otherwise the
//!    visit is abandoned (the door reopens; the slot stays empty, and the owner
//!    re-installs its record at its next allocation).
//!
//! A thread exiting marks its record `EXITED` (waiting for a claim to end first), so a
//! visitor never writes into thread-local storage that is gone. In a fork child the
//! other threads' records have no owner: they become `ORPHAN`, and a visitor takes
//! everything they hold without touching any thread-local slot.
//!
//! Known limit: a signal handler installed with `SA_NODEFER` and an empty `sa_mask`
//! that interrupts an allocation and then blocks in a system call for the whole visit
//! passes the first test; nothing short of restartable sequences can tell. (Handlers
//! without `SA_NODEFER` block their own signal while they run, which step 1 sees.)
//!
//! The door (`Door`, a field of every cache record), the registry of records and the
//! owner's side (`open`, `exit`, `reattach`) are in `mcache/door.rs`, run from the
//! cache's life cycle; this module, above the caches, is the visitor's side.
//!
//! # What a visit does
//!
//! A thread that has not run at all for the delay (its context-switch count unchanged
//! since a visit at least that long ago) is idle: everything its cache holds goes back
//! (free stacks, remote buffers, current spans) and its stack pages are dropped, as at
//! thread exit. A thread that did run has its free stacks trimmed by a low-water rule
//! (jemalloc's incremental tcache GC): per class, at the previous visit the stack held
//! `low` objects; `min(low, now)` of them have (approximately) not been needed since,
//! and three quarters of those, from the bottom of the stack (the longest unused) go
//! back. The estimate over-counts only when a stack dipped below both figures between
//! visits, which costs a refill, nothing else. A stack nothing was taken from since the
//! previous visit or since the class's last slow path (its pop count unchanged, or
//! zero) goes back whole: it only receives frees (the leftover of a burst, say), and a
//! quarter kept at each visit would linger, pinning the pages of the spans its objects
//! belong to. A thread is visited at most once per
//! delay; the cost to the owner is one slow path per visit (the re-installation).
//!
//! Everything here is process bookkeeping outside the modelled core (core atomics):
//! its safety rests on the kernel's view of the thread, which loom cannot model.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::mcache::door::{door, CLAIMED, EXITED, NOT_SEEN, OPEN, ORPHAN, RECORDS};
use crate::mcache::MCache;
use crate::sizeclasses::NUM_CLASSES;

/// A thread whose last visit left less than this in its free stacks is not worth
/// waking up for again (the background thread may park).
#[cfg(not(spanheap_loom))]
const QUIET_BYTES: u64 = 256 << 10;

/// A class's tick as `Door::tick_seen` keeps it (never `NOT_SEEN`).
#[cfg(not(spanheap_loom))]
fn tick_key(tick: u64) -> u32 {
    tick as u32 & (NOT_SEEN >> 1)
}

#[cfg(not(spanheap_loom))]
pub(crate) use imp::*;

#[cfg(not(spanheap_loom))]
mod imp {
    use super::super::HEAP;
    use super::*;

    /// Whether visits can work here (the heavy barrier exists); checked at the first.
    static USABLE: AtomicU8 = AtomicU8::new(2);

    /// Visits that claimed a door, visits that got in (the second look agreed), and
    /// of those, idle threads released and busy ones trimmed (for tests and tuning).
    static COUNTS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

    /// `COUNTS`: (claimed, entered, released, trimmed).
    pub(crate) fn counts() -> (u64, u64, u64, u64) {
        let c = |i: usize| COUNTS[i].load(Ordering::Relaxed);
        (c(0), c(1), c(2), c(3))
    }

    fn count(i: usize) {
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
    }

    /// In a fork child, run by the only thread: every other thread's record is an
    /// orphan now, and the calling thread's has a new thread id.
    pub(crate) fn fork_child(own: Option<*mut MCache>) {
        // Acquire: pairs with `open`'s Release.
        let mut c = RECORDS.load(Ordering::Acquire);
        while !c.is_null() {
            let d = door(c);
            if Some(c) == own {
                // SAFETY: gettid has no preconditions.
                d.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                d.seen_switches.store(u64::MAX, Ordering::Relaxed);
            } else if d.state.load(Ordering::Relaxed) == OPEN {
                d.state.store(ORPHAN, Ordering::Relaxed);
            }
            c = d.next.load(Ordering::Acquire);
        }
    }

    /// The free-stack bytes of every thread with a live cache, as of each class's last
    /// slow path: calls `f(tid, bytes)` per thread; returns the total. Does not
    /// allocate.
    pub(crate) fn census(mut f: impl FnMut(i32, u64)) -> u64 {
        let mut total = 0;
        // Acquire: pairs with `open`'s Release.
        let mut c = RECORDS.load(Ordering::Acquire);
        while !c.is_null() {
            let d = door(c);
            if matches!(d.state.load(Ordering::Acquire), OPEN | CLAIMED) {
                let bytes: u64 = (1..NUM_CLASSES)
                    .map(|k| {
                        u64::from(d.depth[k].load(Ordering::Relaxed))
                            * u64::from(crate::sizeclasses::CLASS_TO_SIZE[k])
                    })
                    .sum();
                f(d.tid.load(Ordering::Relaxed), bytes);
                total += bytes;
            }
            c = d.next.load(Ordering::Acquire);
        }
        total
    }

    /// What a look at a thread found.
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct Look {
        /// Blocked in a system call (state S or D, a syscall number).
        blocked: bool,
        /// Its blocked signals (1..=64).
        sigblk: u64,
        /// Voluntary plus involuntary context switches.
        switches: u64,
    }

    /// Looks at thread `tid` of this process (see the module's documentation). None if
    /// `/proc` cannot tell (no such thread, no `/proc`).
    fn look(tid: i32) -> Option<Look> {
        let mut buf = [0u8; 4096];
        let status = read_proc(tid, b"status", &mut buf)?;
        let (mut state, mut sigblk, mut switches, mut seen) = (0u8, None, 0u64, 0);
        for line in status.split(|&b| b == b'\n') {
            if let Some(v) = line.strip_prefix(b"State:") {
                state = v
                    .iter()
                    .copied()
                    .find(|b| !b.is_ascii_whitespace())
                    .unwrap_or(0);
            } else if let Some(v) = line.strip_prefix(b"SigBlk:") {
                sigblk = parse_hex(v);
            } else if let Some(v) = line
                .strip_prefix(b"voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix(b"nonvoluntary_ctxt_switches:"))
            {
                switches += parse_dec(v)?;
                seen += 1;
            }
        }
        if seen != 2 {
            return None;
        }
        let sigblk = sigblk?;
        let mut buf2 = [0u8; 256];
        let sc = read_proc(tid, b"syscall", &mut buf2)?;
        let in_syscall = sc.first().is_some_and(u8::is_ascii_digit);
        Some(Look {
            blocked: matches!(state, b'S' | b'D') && in_syscall,
            sigblk,
            switches,
        })
    }

    /// Reads `/proc/self/task/<tid>/<file>` into `buf` without allocating.
    fn read_proc<'a>(tid: i32, file: &[u8], buf: &'a mut [u8]) -> Option<&'a [u8]> {
        let mut path = [0u8; 64];
        let mut n = 0;
        let mut put = |s: &[u8]| {
            path[n..n + s.len()].copy_from_slice(s);
            n += s.len();
        };
        put(b"/proc/self/task/");
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut t = u32::try_from(tid).ok()?;
        loop {
            i -= 1;
            digits[i] = b'0' + (t % 10) as u8;
            t /= 10;
            if t == 0 {
                break;
            }
        }
        put(&digits[i..]);
        put(b"/");
        put(file);
        // path[n] is already 0: the terminator.
        // SAFETY: a NUL-terminated path; reads into our buffer; the descriptor is ours
        // and closed here.
        unsafe {
            let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return None;
            }
            let mut len = 0;
            while len < buf.len() {
                let r = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
                if r <= 0 {
                    break;
                }
                len += r as usize;
            }
            libc::close(fd);
            Some(&buf[..len])
        }
    }

    fn parse_dec(s: &[u8]) -> Option<u64> {
        let s = s.trim_ascii();
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            s.iter()
                .fold(0u64, |v, &d| v.wrapping_mul(10) + u64::from(d - b'0')),
        )
    }

    fn parse_hex(s: &[u8]) -> Option<u64> {
        let s = s.trim_ascii();
        if s.is_empty() || s.len() > 16 {
            return None;
        }
        s.iter().try_fold(0u64, |v, &d| {
            Some(v << 4 | u64::from((d as char).to_digit(16)?))
        })
    }

    /// A claimed record waiting for the second look.
    struct Claimed {
        c: *mut MCache,
        first: Look,
        idle: bool,
    }

    /// Visits other threads' caches (see the module's documentation): with `force`
    /// (`release_memory`), every thread blocked in a system call gives back everything;
    /// otherwise each thread at most once per `delay_ms`, idle ones everything, busy
    /// ones what their free stacks did not use. `now_ms`: the coarse clock. Returns how
    /// many threads gave something back, and how many may have something to give later
    /// (not idle yet). Skips the visit if another visitor is at work, unless `force`.
    ///
    /// No allocator lock may be held.
    pub(crate) fn visit_threads(force: bool, now_ms: u32, delay_ms: u32) -> (usize, usize) {
        const BATCH: usize = 16;
        if USABLE.load(Ordering::Relaxed) == 0 {
            return (0, 0);
        }
        let Some(mut guard) = HEAP.reclaim_lock(force) else {
            return (0, 0);
        };
        // The calling thread's own record is never idle (it is running this), and
        // looking at it would read its own `/proc` files.
        let own = crate::mcache::own_record().unwrap_or(core::ptr::null_mut());
        guard.with(|_| {
            let (mut taken, mut pending) = (0, 0);
            // Acquire: pairs with `open`'s Release.
            let mut cur = RECORDS.load(Ordering::Acquire);
            while !cur.is_null() {
                let mut batch: [Option<Claimed>; BATCH] = [const { None }; BATCH];
                let mut worth = [false; BATCH];
                let mut n = 0;
                while n < BATCH && !cur.is_null() {
                    let c = cur;
                    let d = door(c);
                    cur = d.next.load(Ordering::Acquire);
                    // Acquire: pairs with `open`'s Release (the fields it set).
                    match d.state.load(Ordering::Acquire) {
                        ORPHAN => {
                            if take_orphan(c) {
                                taken += 1;
                            }
                            continue;
                        }
                        OPEN if c != own => {}
                        _ => continue,
                    }
                    if d.flushed.load(Ordering::Relaxed) != 0 {
                        continue;
                    }
                    // A quarter of the delay between visits: an idle thread is found
                    // within 1.25 delays of its last run.
                    let since_visit = now_ms.wrapping_sub(d.visited_at.load(Ordering::Relaxed));
                    if !force && since_visit < delay_ms / 4 {
                        pending += 1;
                        continue;
                    }
                    let Some(first) = look(d.tid.load(Ordering::Relaxed)) else {
                        continue;
                    };
                    d.visited_at.store(now_ms, Ordering::Relaxed);
                    // Worth another look later unless a visit found it holding little.
                    let worth_now = d.held.load(Ordering::Relaxed) >= QUIET_BYTES;
                    pending += usize::from(worth_now);
                    if d.seen_switches.load(Ordering::Relaxed) != first.switches {
                        d.seen_switches.store(first.switches, Ordering::Relaxed);
                        d.seen_at.store(now_ms, Ordering::Relaxed);
                    }
                    if !first.blocked || first.sigblk != d.sigmask.load(Ordering::Relaxed) {
                        continue;
                    }
                    let idle =
                        force || now_ms.wrapping_sub(d.seen_at.load(Ordering::Relaxed)) >= delay_ms;
                    if d.state
                        .compare_exchange(OPEN, CLAIMED, Ordering::Relaxed, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    // Close the door: the owner's next allocation misses and waits.
                    // SAFETY: the owner is alive (its record is not EXITED, and it
                    // waits for our claim before exiting), so its thread-local slot is
                    // valid memory; it is a word the owner reads with plain loads and
                    // writes only in its slow paths, which it cannot be in (blocked in
                    // a system call; checked again below before we rely on it).
                    unsafe {
                        core::ptr::write_volatile(
                            d.slot.load(Ordering::Relaxed) as *mut usize,
                            d.empty.load(Ordering::Relaxed),
                        )
                    };
                    count(0);
                    batch[n] = Some(Claimed { c, first, idle });
                    worth[n] = worth_now;
                    n += 1;
                }
                if n == 0 {
                    continue;
                }
                let barrier = crate::sync::heavy_barrier();
                if !barrier {
                    USABLE.store(0, Ordering::Relaxed);
                }
                for (cl, &was_worth) in batch[..n].iter().flatten().zip(&worth) {
                    let d = door(cl.c);
                    let again = look(d.tid.load(Ordering::Relaxed));
                    if barrier && again == Some(cl.first) && d.slow.load(Ordering::Relaxed) == 0 {
                        // The record is ours until the door reopens.
                        count(1);
                        pending -= usize::from(was_worth);
                        if cl.idle {
                            // SAFETY: see above: the owner is outside the allocator and
                            // will wait for the door before touching its record.
                            unsafe { release(cl.c) };
                            d.flushed.store(1, Ordering::Relaxed);
                            d.held.store(0, Ordering::Relaxed);
                            taken += 1;
                            count(2);
                        } else {
                            // SAFETY: as above.
                            let (any, held) = unsafe { trim(cl.c) };
                            taken += usize::from(any);
                            if any {
                                count(3);
                            }
                            d.held.store(held, Ordering::Relaxed);
                            pending += usize::from(held >= QUIET_BYTES);
                        }
                    }
                    // Release: our work on the record happens-before the owner's next
                    // use (its Acquire in `reattach`).
                    d.state.store(OPEN, Ordering::Release);
                }
            }
            (taken, pending)
        })
    }

    /// Takes everything an orphan record (fork child) holds.
    fn take_orphan(c: *mut MCache) -> bool {
        let d = door(c);
        if d.state
            .compare_exchange(ORPHAN, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // SAFETY: no thread of this process owns the record.
        unsafe { release(c) };
        d.state.store(EXITED, Ordering::Release);
        true
    }

    /// Gives back everything record `c` holds but its page caches (those go back
    /// through their own gate, `MHeap::reclaim_caches`), and drops its stack pages.
    ///
    /// # Safety
    /// The caller holds the record's door (claimed, owner outside).
    unsafe fn release(c: *mut MCache) {
        // SAFETY: per the contract, the record is ours.
        unsafe {
            crate::mcache::release_classes(&HEAP, c);
            HEAP.drop_stack_pages(c);
        }
        for l in &door(c).low {
            l.store(0, Ordering::Relaxed);
        }
        for p in &door(c).tick_seen {
            p.store(NOT_SEEN, Ordering::Relaxed);
        }
    }

    /// Trims record `c`'s free stacks by the low-water rule; returns whether anything
    /// went back, and the bytes the stacks still hold.
    ///
    /// # Safety
    /// As for `release`.
    unsafe fn trim(c: *mut MCache) -> (bool, u64) {
        let d = door(c);
        // A parked thread's limits follow the budget's share too.
        // SAFETY: the record is ours (caller's contract).
        unsafe { crate::mcache::check_budget(&HEAP, c) };
        let (mut any, mut held) = (false, 0u64);
        for class in 1..NUM_CLASSES {
            let low = u32::from(d.low[class].load(Ordering::Relaxed));
            let seen = d.tick_seen[class].load(Ordering::Relaxed);
            let unused = |tick: u64| tick_key(tick) == seen;
            // SAFETY: the record is ours (caller's contract).
            let (left, went, tick) =
                unsafe { crate::mcache::trim_class(&HEAP, c, class, low, unused) };
            d.tick_seen[class].store(tick_key(tick), Ordering::Relaxed);
            any |= went;
            held += u64::from(left) * u64::from(crate::sizeclasses::CLASS_TO_SIZE[class]);
            d.low[class].store(left.min(u32::from(u16::MAX)) as u16, Ordering::Relaxed);
        }
        (any, held)
    }
}
