//! The OS layer: every byte spanheap uses enters and leaves through here.
//!
//! Address space moves between four states, as in Go's `mem.go`:
//!
//! | state      | meaning                                             | entered by            |
//! |------------|-----------------------------------------------------|-----------------------|
//! | None       | not ours                                            | [`MemSource::release`]|
//! | Reserved   | ours, `PROT_NONE`; touching it faults; costs no RAM | [`MemSource::reserve`]|
//! | Prepared   | readable/writable, but holds no physical pages and   | [`MemSource::map`], [`MemSource::decommit`] |
//! |            | reads as zero (or old contents, see `decommit`)     |                       |
//! | Ready      | in use                                              | [`MemSource::commit`] |
//!
//! On Linux, Prepared -> Ready costs nothing (the kernel hands out zero pages on first
//! touch), and Ready -> Prepared is `madvise(MADV_DONTNEED)`, after which the pages read
//! as zero. Nothing here allocates through the global allocator, and nothing panics.
//!
//! What each failure means:
//!
//! - `reserve`, `map` (`mmap`): an [`OsError`]; the heap does not grow, or metadata is
//!   not had, and the allocation that needed it returns null.
//! - `decommit` (`madvise`; it fails, for example, on memory locked by `mlockall`):
//!   `false`. The range stays Ready with its old contents: the caller must not count it
//!   as released nor trust it to read as zero.
//! - `commit`: cannot fail here (Prepared memory is already readable and writable), so
//!   the trait has no error for it.
//! - `release` (`munmap` of our own range): fails only if splitting a mapping would
//!   exceed the kernel's map count. The range then stays mapped and is forgotten:
//!   address space lost, no memory (released ranges are never in use, and are either
//!   `PROT_NONE` or mapped but untouched). Nothing is reported.
//!
//! The layer is a trait so that components can be built and tested against another
//! source of memory (the page allocator's tests, the loom models).

use core::ptr::NonNull;

/// Size of spanheap's pages: the unit of the span heap (Go's `pageSize`).
pub const PAGE_SIZE: usize = 8 << 10;
pub const PAGE_SHIFT: u32 = 13;
const _: () = assert!(1 << PAGE_SHIFT == PAGE_SIZE);

/// The largest OS page size spanheap supports. Decommitting a heap page must not
/// discard part of a neighbouring heap page, so the OS page must not be larger than
/// ours. 16 KiB and 64 KiB kernels (some arm64 systems) are refused at start-up with a
/// message on stderr, and every allocation returns null.
pub const MAX_OS_PAGE_SIZE: usize = PAGE_SIZE;

/// Why the OS layer could not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsError {
    /// `mmap` failed (errno given): address space or memory is exhausted.
    NoMemory(i32),
    /// The request cannot be satisfied in a 48-bit address space.
    TooLarge,
    /// The OS page size (given) is larger than [`MAX_OS_PAGE_SIZE`].
    UnsupportedPageSize(usize),
}

/// A source of address space and the transitions between the four memory states.
///
/// # Safety
/// Implementations must return memory that is not handed out twice, aligned as asked,
/// and must make the state transitions they document.
pub unsafe trait MemSource: Sync {
    /// None -> Reserved: `size` bytes aligned to `align` (a power of two, at least the OS
    /// page size). `hint`, if non-zero, is a preferred address (e.g. just past the
    /// previous reservation, so that arenas stay contiguous); it is only a preference.
    fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError>;

    /// Reserved -> Prepared: the range becomes readable and writable and reads as zero.
    ///
    /// # Safety
    /// The range must lie inside one of this source's reservations and be page aligned.
    unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError>;

    /// Prepared -> Ready: the range is about to be used. Cannot fail (an OS whose commit
    /// can fail, such as Windows' `MEM_COMMIT`, would need an error here and callers that
    /// give the pages back).
    ///
    /// # Safety
    /// The range must be Prepared or Ready memory of this source.
    unsafe fn commit(&self, ptr: NonNull<u8>, size: usize);

    /// Ready -> Prepared: the contents are no longer needed and physical memory may be
    /// returned to the OS. Afterwards the range reads as zero iff
    /// [`decommit_zeroes`](Self::decommit_zeroes). Returns false if the OS refused: then
    /// the range is still Ready (resident, any part of it may keep its old contents).
    ///
    /// # Safety
    /// The range must be Ready memory of this source that nobody reads or writes.
    #[must_use]
    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool;

    /// Whether decommitted memory reads as zero when next committed.
    fn decommit_zeroes(&self) -> bool;

    /// Any state -> None.
    ///
    /// # Safety
    /// The range must be a whole reservation of this source, or a page-aligned part of
    /// one (its head or tail, or an arena inside it: the heap gives back wholly free
    /// arenas when growth is refused), that nobody uses any more.
    unsafe fn release(&self, ptr: NonNull<u8>, size: usize);

    /// None -> Prepared in one step: `reserve` then `map` of the whole range (a source
    /// that can do both in one call overrides it; a failed map releases the range).
    fn reserve_mapped(
        &self,
        size: usize,
        align: usize,
        hint: usize,
    ) -> Result<NonNull<u8>, OsError> {
        reserve_then_map(self, size, align, hint)
    }

    /// Moves the pages of `[src, src + len)` to `[dst, dst + len)` without copying their
    /// bytes (the OS moves the page tables), then makes the source range Prepared again
    /// (zero-filled, holding no memory). `None`: nothing moved, both ranges unchanged
    /// (the caller copies); `Some(true)`: moved; `Some(false)`: moved, but the source
    /// range could not be made usable again and must never be touched (or handed out)
    /// again. A source that cannot move pages says `None` (the default).
    ///
    /// # Safety
    /// Both ranges are page aligned, do not overlap, and are Ready memory of this
    /// source that only the caller uses; `dst`'s old contents are discarded.
    unsafe fn move_pages(&self, src: NonNull<u8>, dst: NonNull<u8>, len: usize) -> Option<bool> {
        let _ = (src, dst, len);
        None
    }

    /// None -> Ready in one step, for the allocator's own metadata.
    fn alloc_meta(&self, size: usize) -> Result<NonNull<u8>, OsError> {
        let page = os_page_size()?;
        let size = size.checked_add(page - 1).ok_or(OsError::TooLarge)? & !(page - 1);
        self.reserve_mapped(size, page, 0)
    }
}

/// The operating system, through `mmap`, `madvise` and `munmap`.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsMemory;

/// The largest address (exclusive) the heap uses: 48-bit user address spaces.
pub const ADDR_LIMIT: usize = 1 << 48;

// SAFETY: mmap never returns a range that is still mapped; ranges are trimmed to the
// requested alignment; the transitions below are the documented ones.
unsafe impl MemSource for OsMemory {
    fn reserve(&self, size: usize, align: usize, hint: usize) -> Result<NonNull<u8>, OsError> {
        let page = os_page_size()?;
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Reserve) {
            return Err(OsError::NoMemory(libc::ENOMEM));
        }
        debug_assert!(align.is_power_of_two() && align >= page && size % page == 0);
        if size == 0 || size >= ADDR_LIMIT || align >= ADDR_LIMIT {
            return Err(OsError::TooLarge);
        }
        // First try exactly at the hint: the common case when the heap grows, and it
        // keeps arenas contiguous so that large spans can cross arena boundaries.
        if hint != 0 && hint % align == 0 && hint.checked_add(size).is_some_and(|e| e <= ADDR_LIMIT)
        {
            if let Some(p) = mmap_none(hint, size) {
                if p.as_ptr() as usize == hint {
                    return Ok(p);
                }
                // The kernel put it elsewhere (pre-4.17 kernels ignore NOREPLACE).
                // SAFETY: we just mapped exactly this range.
                unsafe { munmap(p, size) };
            }
        }
        // Over-reserve by `align - page`, then trim both ends so the rest is aligned.
        let total = size.checked_add(align - page).ok_or(OsError::TooLarge)?;
        let raw = mmap_none(0, total).ok_or_else(|| OsError::NoMemory(errno()))?;
        let start = raw.as_ptr() as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let head = aligned - start;
        let tail = total - head - size;
        // SAFETY: the head and tail are parts of the mapping we just made and nobody
        // else knows about.
        unsafe {
            if head != 0 {
                munmap(raw, head);
            }
            if tail != 0 {
                munmap(NonNull::new_unchecked((aligned + size) as *mut u8), tail);
            }
        }
        if aligned + size > ADDR_LIMIT {
            // SAFETY: the aligned part is ours and unused.
            unsafe { munmap(NonNull::new_unchecked(aligned as *mut u8), size) };
            return Err(OsError::TooLarge);
        }
        // SAFETY: `aligned` lies inside a successful mapping, so it is not null.
        Ok(unsafe { NonNull::new_unchecked(aligned as *mut u8) })
    }

    fn reserve_mapped(
        &self,
        size: usize,
        align: usize,
        hint: usize,
    ) -> Result<NonNull<u8>, OsError> {
        // One `mmap` instead of two where the kernel's placement does: page alignment,
        // or the hint itself (arenas growing in place). Otherwise reserve, trim to the
        // alignment, then map. (Start-up makes a handful of these: the first arena and
        // the metadata mappings.)
        let page = os_page_size()?;
        let at_hint = hint != 0
            && hint % align == 0
            && hint.checked_add(size).is_some_and(|e| e <= ADDR_LIMIT);
        if size == 0 || size >= ADDR_LIMIT || !(align <= page || at_hint) {
            return reserve_then_map(self, size, align, hint);
        }
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Reserve)
            || crate::fault_injection::fail(crate::fault_injection::Kind::Map)
        {
            return Err(OsError::NoMemory(libc::ENOMEM));
        }
        let flags = if at_hint {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
        let want = if at_hint { hint } else { 0 };
        // SAFETY: without MAP_FIXED the kernel picks a free range, and
        // MAP_FIXED_NOREPLACE fails rather than replace an existing mapping.
        let p = unsafe { mmap_rw(want, size, flags) };
        if p == libc::MAP_FAILED {
            if at_hint {
                // Taken (or refused): anywhere else, aligned.
                return reserve_then_map(self, size, align, 0);
            }
            return Err(OsError::NoMemory(errno()));
        }
        let addr = p as usize;
        if (at_hint && addr != hint) || addr % align != 0 || addr + size > ADDR_LIMIT {
            // Not where it was asked for (pre-4.17 kernels ignore NOREPLACE): give it
            // back and take the general path.
            // SAFETY: we just mapped exactly this range.
            unsafe { munmap(NonNull::new_unchecked(p.cast()), size) };
            return reserve_then_map(self, size, align, 0);
        }
        // SAFETY: a successful mapping is not null.
        Ok(unsafe { NonNull::new_unchecked(p.cast()) })
    }

    fn alloc_meta(&self, size: usize) -> Result<NonNull<u8>, OsError> {
        let page = os_page_size()?;
        let size = size.checked_add(page - 1).ok_or(OsError::TooLarge)? & !(page - 1);
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Reserve)
            || crate::fault_injection::fail(crate::fault_injection::Kind::Map)
        {
            return Err(OsError::NoMemory(libc::ENOMEM));
        }
        match META.carve(size) {
            Some(p) => Ok(p),
            None => map_fresh(size),
        }
    }

    unsafe fn map(&self, ptr: NonNull<u8>, size: usize) -> Result<(), OsError> {
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Map) {
            return Err(OsError::NoMemory(libc::ENOMEM));
        }
        // MAP_FIXED over our own PROT_NONE reservation: replaces it with zero-filled,
        // writable, lazily-backed memory. Unlike mprotect this also gives a fresh
        // mapping if the range was written before.
        // SAFETY: the caller guarantees the range is inside our reservation, so
        // MAP_FIXED cannot clobber anybody else's mapping.
        let p = unsafe { mmap_rw(ptr.as_ptr() as usize, size, libc::MAP_FIXED) };
        if p == libc::MAP_FAILED {
            return Err(OsError::NoMemory(errno()));
        }
        Ok(())
    }

    unsafe fn commit(&self, _ptr: NonNull<u8>, _size: usize) {
        // Prepared memory is already readable and writable on Linux; the kernel
        // supplies zero pages on first touch.
    }

    unsafe fn move_pages(&self, src: NonNull<u8>, dst: NonNull<u8>, len: usize) -> Option<bool> {
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Map) {
            return None;
        }
        // SAFETY: both ranges are ours and unused by anybody else (caller's contract);
        // MREMAP_FIXED replaces `dst`'s mapping, whose contents the caller discards. On
        // failure (EFAULT when the source spans two kernel mappings, ENOMEM past
        // `vm.max_map_count`) nothing has moved.
        let r = unsafe {
            libc::mremap(
                src.as_ptr().cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst.as_ptr().cast::<libc::c_void>(),
            )
        };
        if r != dst.as_ptr().cast() {
            return None;
        }
        // The source range is now unmapped: put fresh memory back so that the heap's
        // arena has no hole.
        // SAFETY: the range was ours a moment ago and nothing else can have mapped it:
        // MAP_FIXED over our own former range.
        let p = unsafe { mmap_rw(src.as_ptr() as usize, len, libc::MAP_FIXED) };
        Some(p == src.as_ptr().cast())
    }

    unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
        #[cfg(feature = "fault-injection")]
        if crate::fault_injection::fail(crate::fault_injection::Kind::Decommit) {
            return false;
        }
        // MADV_DONTNEED: pages are dropped at once and read as zero afterwards, which
        // lets `alloc_zeroed` skip clearing them. (MADV_FREE is cheaper but leaves
        // contents undefined until reclaim, and RSS does not drop until then.) It fails
        // with EINVAL on locked pages (`mlockall`, `mlock`), which keep their contents.
        // SAFETY: the caller guarantees the range is ours and unused.
        unsafe { libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTNEED) == 0 }
    }

    fn decommit_zeroes(&self) -> bool {
        true
    }

    unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
        // SAFETY: the caller guarantees the range is ours and unused.
        unsafe { munmap(ptr, size) };
    }
}

/// Size of the block that small metadata requests are carved from.
///
/// The first allocation of a process asks for several metadata mappings at once (the
/// arena index's L2 array, the arena record, the page allocator's chunk bitmaps, the
/// first thread cache's free stacks: about 2.3 MiB together, see docs/design.md
/// "Start-up, in order"). One block serves them all with a single `mmap` instead of
/// one each, and keeps them on neighbouring pages (fewer page-table pages to fill at
/// start and to free at exit). Its pages are lazily backed like any other mapping:
/// what no request touched costs no memory.
const META_BLOCK: usize = 4 << 20;
/// Requests above this go straight to the OS, so that one big request does not use
/// up the block the small ones would share.
const META_BLOCK_MAX_REQUEST: usize = 2 << 20;
/// A block that metadata requests are carved from (see [`META_BLOCK`]). Not part of
/// the concurrent core (an OS resource of the process, like [`os_page_size`]'s cache);
/// Relaxed throughout: the block is fresh zero-filled memory that nobody writes before
/// carving it, so its address is the only thing shared, and each carved range belongs
/// to the thread whose `compare_exchange` on `used` reserved it.
struct MetaBlock {
    /// The block's address: 0 until first used, [`META_BLOCK_NONE`] if the OS refused
    /// it (then every request maps its own memory).
    base: core::sync::atomic::AtomicUsize,
    /// Bytes of the block handed out (never more than [`META_BLOCK`]).
    used: core::sync::atomic::AtomicUsize,
}

const META_BLOCK_NONE: usize = 1;

/// `OsMemory`'s metadata block.
static META: MetaBlock = MetaBlock::new();

impl MetaBlock {
    const fn new() -> Self {
        MetaBlock {
            base: core::sync::atomic::AtomicUsize::new(0),
            used: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// `size` bytes (a multiple of the OS page size) of zero-filled metadata memory
    /// carved from the block, or `None` if the request is too large, the block is full
    /// or the OS refused it; the caller then maps memory of its own. Carved ranges are
    /// never given back (metadata is never unmapped; its pages may be dropped with
    /// `madvise`).
    fn carve(&self, size: usize) -> Option<NonNull<u8>> {
        use core::sync::atomic::Ordering::Relaxed;
        if size > META_BLOCK_MAX_REQUEST {
            return None;
        }
        let mut base = self.base.load(Relaxed);
        if base == 0 {
            let mine = map_fresh(META_BLOCK).map_or(META_BLOCK_NONE, |p| p.as_ptr() as usize);
            base = match self.base.compare_exchange(0, mine, Relaxed, Relaxed) {
                Ok(_) => mine,
                Err(theirs) => {
                    if mine != META_BLOCK_NONE {
                        // Another thread's block won; ours was never handed out.
                        // SAFETY: we just mapped exactly this range.
                        unsafe { munmap(NonNull::new_unchecked(mine as *mut u8), META_BLOCK) };
                    }
                    theirs
                }
            };
        }
        if base == META_BLOCK_NONE {
            return None;
        }
        let mut used = self.used.load(Relaxed);
        loop {
            if used + size > META_BLOCK {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, used + size, Relaxed, Relaxed)
            {
                // SAFETY: inside a successful mapping, so not null.
                Ok(_) => return Some(unsafe { NonNull::new_unchecked((base + used) as *mut u8) }),
                Err(now) => used = now,
            }
        }
    }
}

/// `size` bytes (page aligned) of fresh zero-filled read-write memory wherever the
/// kernel puts it, below [`ADDR_LIMIT`].
fn map_fresh(size: usize) -> Result<NonNull<u8>, OsError> {
    // SAFETY: without MAP_FIXED the kernel picks a free range.
    let p = unsafe { mmap_rw(0, size, 0) };
    if p == libc::MAP_FAILED {
        return Err(OsError::NoMemory(errno()));
    }
    // SAFETY: a successful mapping is not null.
    let p = unsafe { NonNull::new_unchecked(p.cast::<u8>()) };
    if p.as_ptr() as usize + size > ADDR_LIMIT {
        // SAFETY: we just mapped exactly this range.
        unsafe { munmap(p, size) };
        return Err(OsError::TooLarge);
    }
    Ok(p)
}

/// `reserve` then `map` of the whole range, releasing it if the map fails: the trait's
/// default `reserve_mapped`, and `OsMemory`'s fallback.
fn reserve_then_map<M: MemSource + ?Sized>(
    m: &M,
    size: usize,
    align: usize,
    hint: usize,
) -> Result<NonNull<u8>, OsError> {
    let p = m.reserve(size, align, hint)?;
    // SAFETY: `p` is a fresh reservation of exactly `size` bytes.
    match unsafe { m.map(p, size) } {
        Ok(()) => Ok(p),
        Err(e) => {
            // SAFETY: the whole reservation, never handed out.
            unsafe { m.release(p, size) };
            Err(e)
        }
    }
}

/// `mmap` of `size` bytes of private anonymous read-write memory at `addr` (0: where
/// the kernel likes), with `flags` added (MAP_FIXED, MAP_FIXED_NOREPLACE or none).
/// Returns what `mmap` returns, `MAP_FAILED` included.
///
/// # Safety
/// With MAP_FIXED, `[addr, addr + size)` must be the caller's own range (it is
/// replaced).
unsafe fn mmap_rw(addr: usize, size: usize, flags: libc::c_int) -> *mut libc::c_void {
    // SAFETY: an anonymous mapping; the caller vouches for a MAP_FIXED range.
    unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    }
}

fn mmap_none(hint: usize, size: usize) -> Option<NonNull<u8>> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | libc::MAP_NORESERVE
        | if hint != 0 {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    // SAFETY: an anonymous PROT_NONE mapping; without MAP_FIXED the kernel picks a free
    // range, and MAP_FIXED_NOREPLACE fails rather than replace an existing mapping.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            size,
            libc::PROT_NONE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p.cast())
    }
}

/// # Safety
/// The range must be mapped by us and unused.
unsafe fn munmap(ptr: NonNull<u8>, size: usize) {
    // SAFETY: forwarded from the caller. A failure (ENOMEM: too many mappings to split
    // one) leaves the range mapped and unused: address space lost, nothing to act on
    // (see the module docs).
    unsafe { libc::munmap(ptr.as_ptr().cast(), size) };
}

fn errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Touches the word at `p` with a write that changes nothing, so that its page, if
/// it has not been touched yet, is faulted in once, for writing. Code that reads a
/// fresh page before writing it (a summary merged with its old value, a bitmap word
/// or-ed into) otherwise pays two faults: the read maps the shared zero page and the
/// write then replaces it. Only a hint: it changes no value, and under loom (which
/// models no page faults) it does nothing.
///
/// # Safety
/// `p` is valid for reads and writes and aligned, and nothing reads or writes the
/// word concurrently (the caller holds whatever lock protects it).
#[inline]
pub(crate) unsafe fn touch_for_write(p: *mut u64) {
    #[cfg(not(spanheap_loom))]
    // SAFETY: the caller guarantees `p` is valid, aligned and not accessed
    // concurrently, so an atomic view of it for this one operation races with
    // nothing. A compare-exchange of 0 for 0 changes no value; on x86 it is a write
    // access whatever the value (the compiler turns an or of 0 into a plain load).
    unsafe {
        use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let _ = AtomicU64::from_ptr(p).compare_exchange(0, 0, Relaxed, Relaxed);
    }
    #[cfg(spanheap_loom)]
    let _ = p;
}

/// The OS page size, read once. Errors if it is larger than [`MAX_OS_PAGE_SIZE`]; the
/// first such error prints one line on stderr.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
pub fn os_page_size() -> Result<usize, OsError> {
    // Not part of the concurrent core: a racy first read of a constant of the process.
    use core::sync::atomic::{AtomicUsize, Ordering};
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let mut p = PAGE.load(Ordering::Relaxed);
    if p == 0 {
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        p = if v > 0 { v as usize } else { 4096 };
        if PAGE.swap(p, Ordering::Relaxed) == 0 && p > MAX_OS_PAGE_SIZE {
            write_stderr(b"spanheap: the OS page size is larger than 8 KiB; this build of spanheap does not support it and every allocation will fail\n");
        }
    }
    if p > MAX_OS_PAGE_SIZE || !p.is_power_of_two() {
        return Err(OsError::UnsupportedPageSize(p));
    }
    Ok(p)
}

/// The OS page size: x86-64 Linux has 4 KiB base pages, always, so there is nothing to
/// ask or to keep (a static read first and written once cost every start-up two page
/// faults on a page of its own).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[inline]
pub fn os_page_size() -> Result<usize, OsError> {
    Ok(4096)
}

/// `membarrier` registration: not tried yet, registered, or not available.
static MEMBARRIER: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
const MB_UNKNOWN: u8 = 0;
const MB_READY: u8 = 1;
const MB_NONE: u8 = 2;

/// Makes every thread of this process that is running now execute a full memory
/// barrier before this returns (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, Linux
/// 4.14 and later; the process registers on first use). This is the expensive side of
/// an asymmetric barrier: the other side needs only a compiler fence
/// (`sync::light_barrier`), because a thread that is not running has passed through
/// the kernel, a full barrier, since it last ran. False, and nothing done, if the
/// kernel does not offer it (or a seccomp filter refuses it): then the caller must not
/// rely on it. Does not allocate.
pub(crate) fn membarrier() -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    const QUERY: libc::c_long = 0;
    const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;
    // SAFETY (all three): membarrier takes (cmd, flags, cpu_id) and reads or writes no
    // memory of ours.
    match MEMBARRIER.load(Relaxed) {
        MB_NONE => return false,
        MB_UNKNOWN => {
            let mask = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0, 0) };
            let ok = mask > 0
                && mask & PRIVATE_EXPEDITED != 0
                && unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0, 0) }
                    == 0;
            MEMBARRIER.store(if ok { MB_READY } else { MB_NONE }, Relaxed);
            if !ok {
                return false;
            }
        }
        _ => {}
    }
    if unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0, 0) } == 0 {
        true
    } else {
        MEMBARRIER.store(MB_NONE, Relaxed);
        false
    }
}

/// In a forked child: the registration belongs to the parent's address space, so the
/// child registers again on first use.
pub(crate) fn membarrier_fork_child_reset() {
    MEMBARRIER.store(MB_UNKNOWN, core::sync::atomic::Ordering::Relaxed);
}

/// Monotonic time in nanoseconds from the kernel's coarse clock (a vDSO read of a few
/// nanoseconds; resolution one timer tick, typically 1-4 ms). For the scavenger's
/// pacing and page ages, where a tick is fine and the read must be cheap.
pub(crate) fn coarse_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// Monotonic time in nanoseconds, full resolution (bounding the work of one
/// scavenger pass).
pub(crate) fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer; it cannot fail
    // for these clocks (on an error `t` stays zero, which only delays pacing).
    unsafe { libc::clock_gettime(clock, &mut t) };
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

/// Writes bytes to stderr without allocating (for the rare diagnostics of the allocator).
pub(crate) fn write_stderr(msg: &[u8]) {
    // SAFETY: a plain write(2) from a valid buffer; a short or failed write is ignored.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_supported_here() {
        let p = os_page_size().unwrap();
        assert!(p.is_power_of_two() && p <= PAGE_SIZE);
    }

    #[test]
    #[cfg_attr(miri, ignore = "tests OsMemory itself: Miri cannot run mmap")]
    fn small_metadata_shares_one_block_and_large_metadata_does_not() {
        use core::sync::atomic::Ordering::Relaxed;
        let os = OsMemory;
        // `OsMemory` carves from the process's block, which other tests of this binary
        // may have used up: the carving is tested on a block of its own, the request
        // path through `alloc_meta` for what it must always give.
        let block = MetaBlock::new();
        let small = [PAGE_SIZE, 4096, 3 * PAGE_SIZE];
        let got: Vec<_> = small.iter().map(|&n| block.carve(n).unwrap()).collect();
        let base = block.base.load(Relaxed);
        assert!(base != 0 && base != META_BLOCK_NONE);
        assert_eq!(block.used.load(Relaxed), small.iter().sum::<usize>());
        // Carved in order, back to back.
        let mut at = base;
        for (&p, &n) in got.iter().zip(&small) {
            assert_eq!(p.as_ptr() as usize, at);
            at += n;
        }
        // Too large for the block, and a block that is full: the caller maps its own.
        assert!(block.carve(META_BLOCK_MAX_REQUEST + PAGE_SIZE).is_none());
        while block.carve(META_BLOCK_MAX_REQUEST).is_some() {}
        assert!(block.used.load(Relaxed) <= META_BLOCK);
        assert!(block
            .carve(META_BLOCK - block.used.load(Relaxed) + PAGE_SIZE)
            .is_none());
        let big = os.alloc_meta(META_BLOCK_MAX_REQUEST + 1).unwrap();
        let odd = os.alloc_meta(100).unwrap();
        let in_block = |p: NonNull<u8>| (base..base + META_BLOCK).contains(&(p.as_ptr() as usize));
        assert!(!in_block(big) && !in_block(odd));
        let mut ranges: Vec<_> = got
            .iter()
            .zip(small)
            .map(|(p, n)| (p.as_ptr() as usize, n))
            .collect();
        ranges.push((big.as_ptr() as usize, META_BLOCK_MAX_REQUEST + 1));
        ranges.push((odd.as_ptr() as usize, 100));
        for &(a, n) in &ranges {
            assert_eq!(a % os_page_size().unwrap(), 0);
            // SAFETY: fresh metadata memory of at least `n` bytes, ours alone.
            let s = unsafe { core::slice::from_raw_parts_mut(a as *mut u8, n) };
            assert!(s.iter().all(|&x| x == 0));
            s.fill(0xa5);
        }
        // No two requests overlap (their bytes would have been overwritten).
        for &(a, n) in &ranges {
            // SAFETY: as above.
            let s = unsafe { core::slice::from_raw_parts(a as *const u8, n) };
            assert!(s.iter().all(|&x| x == 0xa5));
        }
        let sorted = {
            let mut r = ranges.clone();
            r.sort();
            r
        };
        assert!(sorted.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }

    #[test]
    #[cfg_attr(miri, ignore = "tests OsMemory itself: Miri cannot run mmap")]
    fn reserve_mapped_is_aligned_writable_and_takes_a_free_hint() {
        let os = OsMemory;
        // Page alignment (one mmap), a larger one (reserve, trim, map), and a free hint.
        let a = os.reserve_mapped(3 * PAGE_SIZE, 4096, 0).unwrap();
        let b = os.reserve_mapped(3 * PAGE_SIZE, 64 << 20, 0).unwrap();
        assert_eq!(b.as_ptr() as usize % (64 << 20), 0);
        // A hint just past a reservation we release first is free.
        let c = os.reserve(128 << 20, 64 << 20, 0).unwrap();
        let hint = c.as_ptr() as usize + (64 << 20);
        unsafe { os.release(c, 128 << 20) };
        let d = os.reserve_mapped(64 << 20, 64 << 20, hint).unwrap();
        assert_eq!(d.as_ptr() as usize, hint);
        // A taken hint: placed elsewhere, still aligned.
        let e = os.reserve_mapped(64 << 20, 64 << 20, hint).unwrap();
        assert_ne!(e.as_ptr() as usize, hint);
        assert_eq!(e.as_ptr() as usize % (64 << 20), 0);
        for (p, size) in [
            (a, 3 * PAGE_SIZE),
            (b, 3 * PAGE_SIZE),
            (d, 64 << 20),
            (e, 64 << 20),
        ] {
            unsafe {
                let s = core::slice::from_raw_parts_mut(p.as_ptr(), size);
                assert!(s[..PAGE_SIZE].iter().all(|&x| x == 0) && s[size - 1] == 0);
                s[0] = 1;
                s[size - 1] = 1;
                os.release(p, size);
            }
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "tests OsMemory itself: Miri cannot run mmap with PROT_NONE/MAP_FIXED"
    )]
    fn reserve_is_aligned_and_map_gives_zeroed_writable_memory() {
        let os = OsMemory;
        for &align in &[4096usize, 1 << 16, 64 << 20] {
            let size = 3 * PAGE_SIZE;
            let p = os.reserve(size, align, 0).unwrap();
            assert_eq!(p.as_ptr() as usize % align, 0);
            unsafe {
                os.map(p, size).unwrap();
                os.commit(p, size);
                let s = core::slice::from_raw_parts_mut(p.as_ptr(), size);
                assert!(s.iter().all(|&b| b == 0));
                s.fill(0xAB);
                assert!(os.decommit(p, size));
                assert!(os.decommit_zeroes());
                let s = core::slice::from_raw_parts(p.as_ptr(), size);
                assert!(
                    s.iter().all(|&b| b == 0),
                    "MADV_DONTNEED memory must read as zero"
                );
                os.release(p, size);
            }
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "tests OsMemory itself: Miri cannot run mmap with PROT_NONE/MAP_FIXED"
    )]
    fn reserve_at_hint_is_honoured_when_free() {
        let os = OsMemory;
        let a = os.reserve(64 << 20, 64 << 20, 0).unwrap();
        let hint = a.as_ptr() as usize + (64 << 20);
        // The range right after a fresh reservation is usually free; if the kernel put
        // something there, the reservation must still succeed elsewhere.
        let b = os.reserve(64 << 20, 64 << 20, hint).unwrap();
        assert_eq!(b.as_ptr() as usize % (64 << 20), 0);
        unsafe {
            os.release(b, 64 << 20);
            os.release(a, 64 << 20);
        }
    }

    #[test]
    fn std_mem_gives_aligned_zeroed_memory_and_decommit_zeroes_it() {
        let m = StdMem;
        let p = m.reserve(4 * PAGE_SIZE, 2 * PAGE_SIZE, 0).unwrap();
        assert_eq!(p.as_ptr() as usize % (2 * PAGE_SIZE), 0);
        // SAFETY: the whole fresh reservation, mapped, used, decommitted, released.
        unsafe {
            m.map(p, 4 * PAGE_SIZE).unwrap();
            m.commit(p, 4 * PAGE_SIZE);
            let s = core::slice::from_raw_parts_mut(p.as_ptr(), 4 * PAGE_SIZE);
            assert!(s.iter().all(|&b| b == 0));
            s[PAGE_SIZE] = 7;
            assert!(m.decommit(p, 4 * PAGE_SIZE));
            assert!(m.decommit_zeroes() && *p.as_ptr().add(PAGE_SIZE) == 0);
            m.release(p, 4 * PAGE_SIZE);
        }
        assert_eq!(m.reserve(ADDR_LIMIT, 4096, 0), Err(OsError::TooLarge));
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "tests OsMemory itself: Miri cannot run mmap with PROT_NONE"
    )]
    fn impossible_reservations_fail_cleanly() {
        let os = OsMemory;
        assert_eq!(os.reserve(ADDR_LIMIT, 4096, 0), Err(OsError::TooLarge));
        assert!(os.reserve(1 << 47, 1 << 47, 0).is_err());
    }
}

/// The memory source of the unit tests: [`OsMemory`] normally, [`StdMem`] under Miri
/// (which cannot run `mmap` with `MAP_FIXED`/`PROT_NONE`, nor `madvise`).
#[cfg(all(test, not(miri)))]
pub(crate) use OsMemory as TestMem;
#[cfg(all(test, miri))]
pub(crate) use StdMem as TestMem;

/// Test-only: a [`MemSource`] backed by `std::alloc::alloc_zeroed`, so that components
/// can be run under Miri. A reservation is a zeroed allocation aligned as asked; `map`
/// and `commit` do nothing (the memory is already zero and writable), `decommit`
/// writes zeros, and `release` frees a whole reservation (a head or tail of one is
/// leaked). Hints are ignored. All instances share one record of reservations.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StdMem;

#[cfg(test)]
mod std_mem {
    extern crate std;

    use super::{MemSource, OsError, StdMem, ADDR_LIMIT};
    use core::alloc::Layout;
    use core::ptr::NonNull;
    use std::sync::Mutex;
    use std::vec::Vec;

    struct Region(NonNull<u8>, Layout);
    // SAFETY: only an address and a layout, used to free the allocation.
    unsafe impl Send for Region {}

    static REGIONS: Mutex<Vec<Region>> = Mutex::new(Vec::new());

    // SAFETY: every reservation is a fresh allocation of the global (system) allocator
    // of the test binary, aligned as asked, zeroed; decommit zeroes the range.
    unsafe impl MemSource for StdMem {
        fn reserve(&self, size: usize, align: usize, _hint: usize) -> Result<NonNull<u8>, OsError> {
            if size == 0 || size >= ADDR_LIMIT || align >= ADDR_LIMIT {
                return Err(OsError::TooLarge);
            }
            let layout = Layout::from_size_align(size, align).map_err(|_| OsError::TooLarge)?;
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let p = NonNull::new(p).ok_or(OsError::NoMemory(12))?;
            REGIONS.lock().unwrap().push(Region(p, layout));
            Ok(p)
        }

        unsafe fn map(&self, _ptr: NonNull<u8>, _size: usize) -> Result<(), OsError> {
            // Reserved memory is already zero (allocated zeroed, or zeroed by decommit).
            Ok(())
        }

        unsafe fn commit(&self, _ptr: NonNull<u8>, _size: usize) {}

        unsafe fn decommit(&self, ptr: NonNull<u8>, size: usize) -> bool {
            // SAFETY: the caller guarantees the range is ours and unused.
            unsafe { ptr.as_ptr().write_bytes(0, size) };
            true
        }

        fn decommit_zeroes(&self) -> bool {
            true
        }

        unsafe fn release(&self, ptr: NonNull<u8>, size: usize) {
            let mut regions = REGIONS.lock().unwrap();
            if let Some(i) = regions
                .iter()
                .position(|r| r.0 == ptr && r.1.size() == size)
            {
                let r = regions.swap_remove(i);
                // SAFETY: a whole allocation made by `reserve` with this layout.
                unsafe { std::alloc::dealloc(r.0.as_ptr(), r.1) };
            }
            // A part of a reservation (head, tail, an arena inside it): leaked (the
            // tests are short-lived).
        }
    }
}
