//! Issue 26, "reuse address space": a process under `RLIMIT_AS` (containers set it)
//! fills its limit with blocks of 24 B .. 3 MB until an allocation fails, frees every
//! block, and then asks for one 100 MiB block. A heap that is entirely free must serve
//! it: when the OS refuses to grow the heap, spanheap gives its wholly free arenas back
//! (`munmap`) and grows again (`MHeap::grow_locked`).
//!
//! The child also maps one page of its own (`PROT_NONE`) just past the end and just
//! before the start of every arena its blocks land in, as a process's other mappings (thread stacks, files, other
//! allocators) come to sit between a heap's arenas: the heap's next arena then cannot
//! be placed right after the last one, so no free run is longer than an arena and the
//! 100 MiB block cannot be served from free runs however the frees leave them; it
//! needs the address space of arenas given back. (Without those pages the arenas are
//! usually contiguous, free runs join across them, and the request is served without
//! a growth.)
//!
//! `setrlimit` applies to the whole process, so the scenario runs in a child process
//! (this test binary again, with `SPANHEAP_ADDRSPACE_CHILD` set). The child never
//! panics while the limit is down (a panic message needs memory): a failed check first
//! raises the soft limit back, then panics. The parent kills a child that hangs.

use std::alloc::{alloc, dealloc, Layout};
use std::time::Duration;

mod common;
use common::{bail, ensure, limit_address_space, restore_address_space, vm_size};

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

const MIB: usize = 1 << 20;
const CHILD: &str = "SPANHEAP_ADDRSPACE_CHILD";

#[test]
fn a_freed_heap_serves_100_mib_under_rlimit_as() {
    if std::env::var_os(CHILD).is_some() {
        fill_free_and_ask();
        return;
    }
    let stdout = common::run_child(
        "a_freed_heap_serves_100_mib_under_rlimit_as",
        CHILD,
        Duration::from_secs(120),
        "filling the address-space limit",
    );
    assert!(stdout.contains("addrspace: ok"), "{stdout}");
    for l in stdout.lines().filter(|l| l.contains("addrspace: ")) {
        println!("{l}");
    }
}

/// A block size of 24 B .. 3 MB: half of them uniform over the range (mostly large
/// blocks), half log-uniform (as many small objects as large blocks).
fn size(rng: &mut common::Rng) -> usize {
    const MIN: u64 = 24;
    const MAX: u64 = 3_000_000;
    if rng.below(2) == 0 {
        (MIN + rng.below(MAX - MIN + 1)) as usize
    } else {
        let shift = rng.below(17); // 24 << 17 = 3,145,728
        let lo = MIN << shift;
        (lo + rng.below(lo)).min(MAX) as usize
    }
}

/// Arenas are 64 MiB, aligned.
const ARENA: usize = 64 * MIB;

/// Maps a page of our own right after and right before the arena holding `addr`
/// (where the address is free: not where the heap's next arena is already), once per
/// arena: the heap cannot grow contiguously past them, upwards (its growth hint) or
/// downwards (where the kernel places a new mapping by itself).
fn fence_around(addr: usize, fences: &mut Vec<usize>) {
    let arena = addr & !(ARENA - 1);
    for at in [arena + ARENA, arena - 4096] {
        if fences.contains(&at) || fences.len() == fences.capacity() {
            continue;
        }
        fences.push(at);
        // SAFETY: an anonymous PROT_NONE page at a fixed address that
        // MAP_FIXED_NOREPLACE never takes from an existing mapping (it fails instead).
        unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
        }
    }
}

fn fill_free_and_ask() {
    let mut rng = common::Rng(0x5EED_AD05);
    // Everything the test needs is allocated before the limit goes down.
    let mut blocks: Vec<(usize, usize)> = Vec::with_capacity(1 << 18);
    let mut fences: Vec<usize> = Vec::with_capacity(1 << 12);
    let stats0 = spanheap::stats();
    let limit = vm_size() + 900 * MIB;
    limit_address_space(limit);

    // 1. Fill the limit until an allocation fails. Each block is written at its ends
    //    and every 64 KiB (so that its memory is really used).
    let mut bytes = 0usize;
    loop {
        let n = size(&mut rng);
        let l = Layout::from_size_align(n, 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(l) };
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh block of `n` bytes.
        unsafe {
            let mut off = 0;
            while off < n {
                p.add(off).write(0xA5);
                off += 64 << 10;
            }
            p.add(n - 1).write(0x5A);
        }
        bytes += n;
        blocks.push((p as usize, n));
        fence_around(p as usize, &mut fences);
        fence_around(p as usize + n - 1, &mut fences);
        if blocks.len() == blocks.capacity() {
            bail("the limit was never reached");
        }
    }
    ensure(bytes > 300 * MIB, "the limit was reached too early");
    let full = spanheap::stats();
    ensure(full.check().is_ok(), "statistics inconsistent at the limit");

    // 2. Free every block.
    for &(p, n) in &blocks {
        // SAFETY: a live block of this layout.
        unsafe { dealloc(p as *mut u8, Layout::from_size_align(n, 8).unwrap()) };
    }
    let freed = spanheap::stats();
    ensure(
        freed.check().is_ok(),
        "statistics inconsistent after the frees",
    );

    // 3. One 100 MiB block: it must be served, and be writable.
    let big = Layout::from_size_align(100 * MIB, 8).unwrap();
    // SAFETY: non-zero size. (black_box: a block freed unused might otherwise not
    // reach the allocator at all.)
    let p = std::hint::black_box(unsafe { alloc(big) });
    ensure(!p.is_null(), "100 MiB after freeing a full heap: null");
    // SAFETY: a fresh block of 100 MiB.
    unsafe {
        let mut off = 0;
        while off < 100 * MIB {
            p.add(off).write(off as u8 | 1);
            off += 4096;
        }
        off = 0;
        while off < 100 * MIB {
            ensure(
                p.add(off).read() == off as u8 | 1,
                "the 100 MiB block lost a write",
            );
            off += 4096;
        }
    }
    let after = spanheap::stats();
    ensure(
        after.check().is_ok(),
        "statistics inconsistent after the retry",
    );
    // SAFETY: the live block of this layout.
    unsafe { dealloc(p, big) };

    // The limit goes back up before anything is formatted.
    restore_address_space();
    println!(
        "addrspace: filled {} MiB in {} blocks ({} MiB of arenas; {} MiB under the limit at the end); \
         after the frees {} MiB of arenas; 100 MiB served with {} MiB of arenas, {} MiB unmapped",
        bytes / MIB,
        blocks.len(),
        full.arena_bytes as usize / MIB,
        limit.saturating_sub(vm_size()) / MIB,
        freed.arena_bytes as usize / MIB,
        after.arena_bytes as usize / MIB,
        after.unmapped_bytes as usize / MIB,
    );
    assert_eq!(stats0.unmapped_bytes, 0);
    assert_eq!(full.unmapped_bytes, 0, "arenas in use were unmapped");
    assert!(
        after.unmapped_bytes >= 2 * ARENA as u64,
        "the 100 MiB block was served without giving arenas back"
    );
    // What was unmapped left `arena_bytes`; the growth added two arenas.
    assert_eq!(
        after.arena_bytes,
        freed.arena_bytes - (after.unmapped_bytes - freed.unmapped_bytes) + 2 * ARENA as u64
    );
    println!("addrspace: ok");
}
