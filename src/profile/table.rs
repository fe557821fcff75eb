//! The heap profile's tables: stack buckets (Go's `mProf` buckets, `mprof.go`) and the
//! map of sampled objects that are still live (where Go keeps a `specialprofile` on the
//! object's span), both in memory mapped from the OS for the profile
//! (`MemSource::reserve_mapped`), never from the global allocator.
//!
//! *Buckets.* One per distinct call stack (up to [`MAX_DEPTH`] return addresses, leaf
//! first), found through a chained hash table of `BUCKET_HASH` heads. A bucket holds its
//! stack and four counts: sampled allocations and their bytes, frees of those objects
//! and their bytes. Buckets are never freed (Go keeps them too): a program has as many
//! as it has allocating call stacks that were sampled.
//!
//! *Sampled objects.* `OBJECT_HASH` chains of `(address, size, bucket)` nodes. A free
//! first loads the chain head of its address's hash without the lock ([`remove`]):
//! null means "not sampled", which is the answer for almost every free; otherwise it
//! takes the lock and looks. Nodes come from a free list, so a program that samples and
//! frees forever uses a constant amount of memory.
//!
//! *Protection.* Everything is under one lock (rank `lockrank::PROFILE`, the last: no
//! other lock is taken and nothing is allocated while it is held, so it can be taken
//! from any allocation or free path that holds no allocator lock, which they never do
//! at the points where the profile hooks run). The object chain heads are atomics,
//! written under the lock and read without it by the negative check; see
//! [`remove`] for why a relaxed load is enough.
//!
//! *Memory.* Taken in `CHUNK`s from `OsMemory::reserve_mapped` (lazily backed: pages are
//! resident only once touched) and carved by bumping; the two head arrays are one
//! allocation each, made when the first sample is recorded. If the OS refuses memory
//! the sample is dropped and counted (`Totals::dropped`).

use core::ptr::{self, NonNull};

use crate::os::{MemSource, OsMemory};
use crate::sync::{AtomicPtr, Mutex, Ordering};

/// Return addresses kept per sampled stack (Go keeps 32; Rust stacks are deeper,
/// with generic and closure frames).
pub(crate) const MAX_DEPTH: usize = 64;

/// Heads of the bucket hash table (a power of two).
const BUCKET_HASH: usize = 1 << 13;

/// Heads of the sampled-object hash table (a power of two). 512 KiB of address space,
/// resident a page per head touched.
const OBJECT_HASH: usize = 1 << 16;

/// Metadata is taken from the OS in chunks of this many bytes and carved by bumping.
const CHUNK: usize = 256 << 10;

/// The four counts of a bucket, sampled (not scaled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) allocs: u64,
    pub(crate) alloc_bytes: u64,
    pub(crate) frees: u64,
    pub(crate) free_bytes: u64,
}

/// A stack bucket: header, then `depth` return addresses (leaf first).
#[repr(C)]
struct Bucket {
    /// Next bucket in this hash chain.
    next: *mut Bucket,
    /// Next bucket in the list of all buckets, newest first (snapshots walk it).
    all: *mut Bucket,
    hash: u64,
    depth: usize,
    counts: Counts,
    // `depth` usizes follow.
}

impl Bucket {
    /// # Safety
    /// `b` is a bucket made by `new_bucket`.
    unsafe fn stack<'a>(b: *const Bucket) -> &'a [usize] {
        // SAFETY: `new_bucket` writes `depth` addresses right after the header.
        unsafe { core::slice::from_raw_parts(b.add(1).cast::<usize>(), (*b).depth) }
    }
}

/// A sampled object that is live (as far as the profile knows).
struct Object {
    next: *mut Object,
    addr: usize,
    size: usize,
    bucket: *mut Bucket,
}

/// What the profile has recorded in all: these satisfy `sampled - freed == live` and
/// equal the buckets' summed counts (`sampled` the allocations, `freed` the frees).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Allocations sampled and recorded in a bucket.
    pub sampled: u64,
    /// Frees of sampled objects (each attributed to its allocation's bucket).
    pub freed: u64,
    /// Sampled objects not freed yet (entries of the object map).
    pub live: u64,
    /// Samples dropped because the OS refused the profile memory.
    pub dropped: u64,
    /// Buckets (distinct stacks).
    pub buckets: u64,
    /// Bytes of metadata the profile took from the OS.
    pub meta_bytes: u64,
    /// Bytes of the blocks that hold live sampled small objects (each a page or more
    /// in the profile's own range; see `profile/blocks.rs`).
    pub block_bytes: u64,
}

/// The tables. All fields are protected by `TABLES`'s lock; the object heads' *values*
/// are also read without it (see `Tables::remove`).
pub(crate) struct Tables {
    /// `BUCKET_HASH` chain heads (null until the first sample).
    buckets: *mut *mut Bucket,
    /// All buckets, newest first.
    all: *mut Bucket,
    /// Sum of the depths of all buckets (a snapshot's buffer size).
    frames: usize,
    /// `OBJECT_HASH` chain heads (null until the first sample).
    objects: *const AtomicPtr<Object>,
    /// Nodes of freed sampled objects, for reuse.
    free_objects: *mut Object,
    /// The current chunk: `[bump, bump_end)` is free.
    bump: usize,
    bump_end: usize,
    totals: Totals,
    /// The sampled small objects' blocks.
    blocks: super::blocks::Blocks,
}

// SAFETY: the raw pointers point into metadata memory owned by the tables, reached only
// under the lock (and the object heads, atomics, also without it).
unsafe impl Send for Tables {}

/// The one profile of the process.
pub(crate) static TABLES: Mutex<Tables> = Mutex::new(
    Tables {
        buckets: ptr::null_mut(),
        all: ptr::null_mut(),
        frames: 0,
        objects: ptr::null(),
        free_objects: ptr::null_mut(),
        bump: 0,
        bump_end: 0,
        totals: Totals {
            sampled: 0,
            freed: 0,
            live: 0,
            dropped: 0,
            buckets: 0,
            meta_bytes: 0,
            block_bytes: 0,
        },
        blocks: super::blocks::Blocks::new(),
    },
    crate::lockrank::PROFILE,
);

/// The object heads, for the lock-free negative check of a free: set once, under the
/// lock, when the tables are first used (Release; read with Acquire). Null: nothing was
/// ever sampled.
static OBJECT_HEADS: AtomicPtr<AtomicPtr<Object>> = AtomicPtr::new(ptr::null_mut());

#[inline]
fn object_slot(addr: usize) -> usize {
    // Fibonacci hashing of the address without its low (alignment) bits.
    (((addr as u64) >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        >> (64 - OBJECT_HASH.trailing_zeros())) as usize
}

fn stack_hash(stack: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &pc in stack {
        h = (h ^ pc as u64).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    h
}

/// `size` bytes (a multiple of 64 KiB) of zero-filled memory mapped for the profile
/// alone (`MemSource::reserve_mapped`: not carved from the allocator's shared metadata
/// block, which the profile would otherwise use up), or None if the OS refuses.
fn os_memory(size: usize) -> Option<NonNull<u8>> {
    let page = crate::os::os_page_size().ok()?;
    OsMemory.reserve_mapped(size, page, 0).ok()
}

impl Tables {
    /// `size` bytes (a multiple of 8) of zeroed metadata, or None if the OS refuses.
    fn carve(&mut self, size: usize) -> Option<NonNull<u8>> {
        if self.bump_end - self.bump < size {
            let chunk = size.max(CHUNK);
            let p = os_memory(chunk)?;
            self.totals.meta_bytes += chunk as u64;
            self.bump = p.as_ptr() as usize;
            self.bump_end = self.bump + chunk;
        }
        let p = self.bump;
        self.bump += size;
        NonNull::new(p as *mut u8)
    }

    /// Makes the head arrays on first use. False if the OS refused the memory.
    fn init_locked(&mut self) -> bool {
        if !self.objects.is_null() {
            return true;
        }
        let Some(b) = os_memory(BUCKET_HASH * 8) else {
            return false;
        };
        let Some(o) = os_memory(OBJECT_HASH * 8) else {
            return false;
        };
        self.totals.meta_bytes += (BUCKET_HASH * 8 + OBJECT_HASH * 8) as u64;
        let heads = o.as_ptr().cast::<AtomicPtr<Object>>();
        // SAFETY: fresh zeroed metadata of OBJECT_HASH pointer-sized, aligned slots.
        unsafe { crate::sync::init_atomics(heads, OBJECT_HASH) };
        self.buckets = b.as_ptr().cast();
        self.objects = heads;
        OBJECT_HEADS.store(heads, Ordering::Release);
        true
    }

    /// The bucket of `stack`, made if new; None if the OS refused the memory.
    fn bucket_locked(&mut self, stack: &[usize]) -> Option<*mut Bucket> {
        let h = stack_hash(stack);
        let slot = h as usize & (BUCKET_HASH - 1);
        // SAFETY: `buckets` has BUCKET_HASH heads (`init_locked` ran); every bucket in a
        // chain was made by this function and is never freed.
        unsafe {
            let head = self.buckets.add(slot);
            let mut b = *head;
            while !b.is_null() {
                if (*b).hash == h && Bucket::stack(b) == stack {
                    return Some(b);
                }
                b = (*b).next;
            }
            let size = core::mem::size_of::<Bucket>() + stack.len() * 8;
            let b = self.carve(size)?.as_ptr().cast::<Bucket>();
            b.write(Bucket {
                next: *head,
                all: self.all,
                hash: h,
                depth: stack.len(),
                counts: Counts::default(),
            });
            ptr::copy_nonoverlapping(stack.as_ptr(), b.add(1).cast::<usize>(), stack.len());
            *head = b;
            self.all = b;
            self.frames += stack.len();
            self.totals.buckets += 1;
            Some(b)
        }
    }

    /// Records a sampled allocation of `size` bytes at `addr` with `stack`: counts it
    /// in its bucket and remembers the object. Dropped (and counted) if the OS refuses
    /// memory.
    fn record_locked(&mut self, stack: &[usize], addr: usize, size: usize) {
        let b = if self.init_locked() {
            self.bucket_locked(stack)
        } else {
            None
        };
        match b {
            Some(b) if self.insert_locked(b, addr, size) => {
                // SAFETY: buckets are never freed; the lock is held.
                unsafe {
                    (*b).counts.allocs += 1;
                    (*b).counts.alloc_bytes += size as u64;
                }
                self.totals.sampled += 1;
            }
            _ => self.totals.dropped += 1,
        }
    }

    /// Remembers the object at `addr` as sampled in bucket `b`; false if the OS
    /// refused memory for the node.
    fn insert_locked(&mut self, b: *mut Bucket, addr: usize, size: usize) -> bool {
        let node = if self.free_objects.is_null() {
            match self.carve(core::mem::size_of::<Object>()) {
                Some(n) => n.as_ptr().cast::<Object>(),
                None => return false,
            }
        } else {
            let n = self.free_objects;
            // SAFETY: a node on the free list is ours.
            self.free_objects = unsafe { (*n).next };
            n
        };
        // SAFETY: `objects` has OBJECT_HASH heads (a bucket exists, so `init_locked`
        // ran); `node` is ours (lock held).
        unsafe {
            let head = &*self.objects.add(object_slot(addr));
            node.write(Object {
                next: head.load(Ordering::Relaxed),
                addr,
                size,
                bucket: b,
            });
            // Relaxed: the freer of `addr` reads the head after the allocation returned
            // (it got the pointer from this thread, a happens-before edge), so it sees
            // this store or a later one; the node's fields are read only under the lock.
            head.store(node, Ordering::Relaxed);
        }
        self.totals.live += 1;
        true
    }

    /// Forgets the sampled object at `addr` and counts its free in its bucket; returns
    /// its bucket and size, or None if `addr` is not a sampled object.
    fn remove_locked(&mut self, addr: usize) -> Option<(*mut Bucket, usize)> {
        if self.objects.is_null() {
            return None;
        }
        // SAFETY: as in `record_locked`; nodes in a chain are live nodes of ours.
        unsafe {
            let head = &*self.objects.add(object_slot(addr));
            let mut prev: *mut Object = ptr::null_mut();
            let mut n = head.load(Ordering::Relaxed);
            while !n.is_null() {
                if (*n).addr == addr {
                    let next = (*n).next;
                    if prev.is_null() {
                        head.store(next, Ordering::Relaxed);
                    } else {
                        (*prev).next = next;
                    }
                    let (b, size) = ((*n).bucket, (*n).size);
                    (*n).next = self.free_objects;
                    self.free_objects = n;
                    (*b).counts.frees += 1;
                    (*b).counts.free_bytes += size as u64;
                    self.totals.freed += 1;
                    self.totals.live -= 1;
                    return Some((b, size));
                }
                prev = n;
                n = (*n).next;
            }
        }
        None
    }
}

/// Records a sampled allocation (see `Tables::record_locked`).
pub(crate) fn record(stack: &[usize], addr: usize, size: usize) {
    TABLES.lock().with(|t| t.record_locked(stack, addr, size));
}

/// A removed sampled object, to put back if the operation that freed it fails (a
/// `realloc` that could not get memory leaves the block live).
pub(crate) struct Removed {
    addr: usize,
    bucket: *mut Bucket,
    size: usize,
}

/// If `addr` is a sampled object: forgets it and counts its free in its bucket. Called
/// before the block is freed (after, its address could be handed out and sampled again
/// by another thread).
///
/// The check without the lock: the object's chain head is non-null from its record
/// until its own removal (other removals leave it in the chain), and the caller frees
/// an object it got after the allocation returned, so a relaxed load sees that store
/// or a later one: a null head proves the object is not sampled.
#[inline]
pub(crate) fn remove(addr: usize) -> Option<Removed> {
    let heads = OBJECT_HEADS.load(Ordering::Acquire);
    if heads.is_null() {
        return None;
    }
    // SAFETY: the heads array is never freed and has OBJECT_HASH slots.
    let head = unsafe { &*heads.add(object_slot(addr)) };
    if head.load(Ordering::Relaxed).is_null() {
        return None;
    }
    remove_slow(addr)
}

#[cold]
#[inline(never)]
fn remove_slow(addr: usize) -> Option<Removed> {
    TABLES
        .lock()
        .with(|t| t.remove_locked(addr))
        .map(|(bucket, size)| Removed { addr, bucket, size })
}

/// A block for a sampled small object of at least `bytes` bytes, zeroed if `zero`
/// (`blocks.rs`); null if there is none.
pub(crate) fn alloc_block(bytes: usize, zero: bool) -> *mut u8 {
    TABLES.lock().with(|t| t.blocks.alloc(bytes, zero))
}

/// The free of the sampled object at `p`, which is in the blocks' range: counted in its
/// bucket, and the block taken back, in one hold of the lock.
pub(crate) fn free_block(p: *mut u8) {
    TABLES.lock().with(|t| {
        let _ = t.remove_locked(p as usize);
        t.blocks.free(p as usize);
    });
}

/// Undoes `remove`: the object is live again, its free uncounted (if the OS refuses
/// the node, which cannot happen since `remove` just freed one, the free stays counted).
pub(crate) fn restore(r: Removed) {
    TABLES.lock().with(|t| {
        if t.insert_locked(r.bucket, r.addr, r.size) {
            // SAFETY: buckets are never freed; the lock is held.
            unsafe {
                (*r.bucket).counts.frees -= 1;
                (*r.bucket).counts.free_bytes -= r.size as u64;
            }
            t.totals.freed -= 1;
        }
    });
}

/// The totals (see [`Totals`]).
pub(crate) fn totals() -> Totals {
    TABLES.lock().with(|t| Totals {
        block_bytes: t.blocks.live_bytes,
        ..t.totals
    })
}

/// One bucket of a snapshot: its stack is `frames[start..start + depth]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) start: usize,
    pub(crate) depth: usize,
    pub(crate) counts: Counts,
}

/// Copies every bucket into `entries` and its stack into `frames`, if they have room
/// for all (no allocation happens under the lock); otherwise returns the room needed
/// (buckets, frames) and copies nothing.
pub(crate) fn copy_into(
    entries: &mut Vec<Entry>,
    frames: &mut Vec<usize>,
) -> Result<Totals, (usize, usize)> {
    TABLES.lock().with(|t| {
        let nb = t.totals.buckets as usize;
        if entries.capacity() - entries.len() < nb || frames.capacity() - frames.len() < t.frames {
            return Err((nb, t.frames));
        }
        let mut b = t.all;
        while !b.is_null() {
            // SAFETY: buckets are never freed; the lock is held. The pushes stay within
            // the capacity checked above, so they do not allocate.
            unsafe {
                let stack = Bucket::stack(b);
                entries.push(Entry {
                    start: frames.len(),
                    depth: stack.len(),
                    counts: (*b).counts,
                });
                frames.extend_from_slice(stack);
                b = (*b).all;
            }
        }
        Ok(Totals {
            block_bytes: t.blocks.live_bytes,
            ..t.totals
        })
    })
}

/// Fork handlers (`global/fork.rs`): the lock is held across `fork()`.
pub(crate) fn fork_lock() {
    TABLES.fork_lock();
}

/// # Safety
/// The calling thread took the lock with `fork_lock`.
pub(crate) unsafe fn fork_unlock() {
    // SAFETY: forwarded.
    unsafe { TABLES.fork_unlock() };
}

/// The lock's counts, for `spanheap::lock_stats`.
pub(crate) fn lock_counts() -> (crate::sync::Rank, crate::sync::LockCount) {
    TABLES.counts()
}
