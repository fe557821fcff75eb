//! Blocks of sampled small objects: each sampled small object lives in a block of its
//! own, in a range of address space that is the profile's alone
//! (`mheap::SAMPLED_BLOCKS_END`, right below the heap's first arena).
//!
//! Why a range of its own: a free of a small object takes its fast path when the
//! pointer passes the freeing thread's range test for the object's class (the current
//! span, or, in wide mode, every address but this range: `mcache::set_span`), without
//! looking at anything else. An object in this range never passes, so the free of a
//! sampled object always reaches a slow path, which recognises the range with one
//! compare ([`contains`]) and counts the free in the object's bucket before the block
//! is freed here. (A block of the heap's own, say a one-page span, would not do: wide
//! mode takes any heap address.)
//!
//! The range is split into twelve equal parts, part `k` holding blocks of `16 << k`
//! bytes (16 B to 32 KiB: the power of two at or above the object's size class, so at
//! most twice its size, and aligned to that power, which covers any alignment the class
//! serves), so that a block's size follows from its address. Each part hands out blocks
//! from its bottom up and keeps the freed ones on a list linked through their first
//! word. The range is
//! reserved (`MAP_NORESERVE`, read-write, untouched until used) when the first
//! sampled small object needs a block; if that address space is taken (or a part is
//! full), the small object the countdown chose is not sampled.
//!
//! What protects what: everything here is under the profile lock (`Tables`).

use crate::mheap::{SAMPLED_BLOCKS_END, SAMPLED_BLOCKS_SIZE};

const BASE: usize = SAMPLED_BLOCKS_END - SAMPLED_BLOCKS_SIZE;
/// The smallest block, `1 << MIN_SHIFT` bytes.
const MIN_SHIFT: u32 = 4;
const PARTS: usize = 12;
const PART_SIZE: usize = SAMPLED_BLOCKS_SIZE / PARTS;
const _: () = assert!(16 << (PARTS - 1) == crate::sizeclasses::MAX_SMALL_SIZE);
const _: () = assert!(PART_SIZE.is_power_of_two() && BASE % PART_SIZE == 0);

/// The part of blocks of `bytes` (at most 32 KiB), and its block size.
fn part_of(bytes: usize) -> (usize, usize) {
    let size = bytes.max(1 << MIN_SHIFT).next_power_of_two();
    ((size.trailing_zeros() - MIN_SHIFT) as usize, size)
}

/// Whether `p` is in the blocks' range (one subtraction and one compare).
#[inline(always)]
pub(crate) fn contains(p: usize) -> bool {
    p.wrapping_sub(BASE) < SAMPLED_BLOCKS_SIZE
}

/// The size of the block `p` is in (`contains(p)`), and `p`'s offset into it.
pub(crate) fn size_and_offset(p: usize) -> (usize, usize) {
    let size = 1 << ((p - BASE) / PART_SIZE + MIN_SHIFT as usize);
    (size, p & (size - 1))
}

/// The blocks' state (in `Tables`, under the profile lock).
pub(crate) struct Blocks {
    /// 0: not reserved yet; 1: reserved; 2: the OS refused the range.
    state: u8,
    /// Per part, bytes handed out from its bottom.
    top: [usize; PARTS],
    /// Per part, the freed blocks, linked through their first word (0: none).
    free: [usize; PARTS],
    /// Bytes of blocks handed out and not freed.
    pub(crate) live_bytes: u64,
}

impl Blocks {
    pub(crate) const fn new() -> Self {
        Blocks {
            state: 0,
            top: [0; PARTS],
            free: [0; PARTS],
            live_bytes: 0,
        }
    }

    /// A block of at least `bytes` bytes (at most 32 KiB), aligned to its size (a
    /// power of two), zeroed if `zero`; null if its part is full or the range could not
    /// be reserved.
    pub(crate) fn alloc(&mut self, bytes: usize, zero: bool) -> *mut u8 {
        let (k, size) = part_of(bytes);
        if k >= PARTS || !self.reserved() {
            return core::ptr::null_mut();
        }
        let p = if self.free[k] != 0 {
            let p = self.free[k];
            // SAFETY: a freed block of ours, its first word the list's link.
            self.free[k] = unsafe { (p as *const usize).read() };
            if zero {
                // SAFETY: the whole block is ours.
                unsafe { core::ptr::write_bytes(p as *mut u8, 0, size) };
            } else {
                // The link is not the program's to see.
                // SAFETY: as above.
                unsafe { (p as *mut usize).write(0) };
            }
            p
        } else if self.top[k] + size <= PART_SIZE {
            // Never handed out before: zero, as the OS mapped it.
            let p = BASE + k * PART_SIZE + self.top[k];
            self.top[k] += size;
            p
        } else {
            return core::ptr::null_mut();
        };
        self.live_bytes += size as u64;
        p as *mut u8
    }

    /// Takes back the block at `p` (`contains(p)`, handed out by `alloc`, not freed
    /// since).
    pub(crate) fn free(&mut self, p: usize) {
        let k = (p - BASE) / PART_SIZE;
        // SAFETY: the block is ours again; its first word becomes the link.
        unsafe { (p as *mut usize).write(self.free[k]) };
        self.free[k] = p;
        self.live_bytes -= 1 << (k as u32 + MIN_SHIFT);
    }

    /// Unmaps the range (the unit test's own reservation).
    #[cfg(test)]
    fn release(&mut self) {
        if self.state == 1 {
            // SAFETY: the range is ours and nothing in it is used any more.
            unsafe { libc::munmap(BASE as *mut libc::c_void, SAMPLED_BLOCKS_SIZE) };
            *self = Blocks::new();
        }
    }

    fn reserved(&mut self) -> bool {
        if self.state == 0 {
            self.state = if reserve() { 1 } else { 2 };
        }
        self.state == 1
    }
}

/// Maps the range, read-write and without swap reservation, exactly at `BASE`.
fn reserve() -> bool {
    // SAFETY: an anonymous mapping; MAP_FIXED_NOREPLACE fails rather than replace an
    // existing mapping.
    let p = unsafe {
        libc::mmap(
            BASE as *mut libc::c_void,
            SAMPLED_BLOCKS_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    if p as usize != BASE {
        // A kernel older than MAP_FIXED_NOREPLACE (4.17) treats the address as a hint.
        // SAFETY: the mapping just made, ours.
        unsafe { libc::munmap(p, SAMPLED_BLOCKS_SIZE) };
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests map the one fixed range: one at a time.
    static RANGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn blocks_are_reused_by_size_and_their_size_follows_from_the_address() {
        let _g = RANGE.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = Blocks::new();
        let p = b.alloc(100, false);
        if p.is_null() {
            eprintln!("the sampled blocks' range is taken on this machine; skipped");
            return;
        }
        assert!(contains(p as usize));
        assert_eq!(size_and_offset(p as usize), (128, 0));
        let q = b.alloc(20_000, true);
        assert_eq!(size_and_offset(q as usize + 100), (32 << 10, 100));
        assert_eq!(q as usize % (32 << 10), 0, "aligned to its size");
        assert_eq!(b.live_bytes, 128 + (32 << 10));
        // SAFETY: blocks of ours, whole.
        unsafe {
            p.write_bytes(7, 128);
            q.write_bytes(9, 32 << 10);
        }
        b.free(p as usize);
        let r = b.alloc(112, true);
        assert_eq!(r, p, "a freed block of the size is taken first");
        // SAFETY: as above.
        assert!(unsafe { core::slice::from_raw_parts(r, 128) }
            .iter()
            .all(|&x| x == 0));
        assert_ne!(b.alloc(16, false), p);
        assert!(b.alloc(33 << 10, false).is_null(), "over 32 KiB");
        assert!(!contains(SAMPLED_BLOCKS_END) && !contains(BASE - 1));
        b.free(q as usize);
        b.free(r as usize);
        assert_eq!(b.live_bytes, 16);
        b.release();
    }

    /// Address space taken by someone else: no block, every time, and no crash.
    #[test]
    fn a_taken_range_gives_no_blocks() {
        let _g = RANGE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: an anonymous mapping that replaces nothing (NOREPLACE).
        let p = unsafe {
            libc::mmap(
                (BASE + PART_SIZE) as *mut libc::c_void,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize != BASE + PART_SIZE {
            eprintln!("could not take a page of the range first; skipped");
            return;
        }
        let mut b = Blocks::new();
        assert!(b.alloc(16, false).is_null());
        assert!(b.alloc(4096, true).is_null());
        assert_eq!(b.state, 2);
        // SAFETY: our page.
        unsafe { libc::munmap(p, 4096) };
    }
}
