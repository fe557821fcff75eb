//! Metadata records the heap carves for itself (the users of Go's `mfixalloc.go`):
//! span records and small-object bitmap records, from chunks of `SPAN_CHUNK_PAGES`
//! pages that the heap takes as manual spans; the bitmap record sizes (`BITS_*`,
//! `bits_bucket`); chunks and metadata mappings for the level above (thread-cache
//! records and their free stacks, `mcache/heap.rs`); and the accounting of metadata
//! memory outside the arenas (`count_meta`).
//!
//! What protects what: the record allocators are in `Locked` and are used only with
//! the heap lock held (`h`); a new chunk's span is initialised and published under it
//! (the rare path). Gauges and statistics are atomic, as in `mod.rs`.

use core::ptr::{self, NonNull};

use super::{add, Locked, MHeap};
use crate::fixalloc::Carved;
use crate::mspan::{MSpan, Purpose};
use crate::os::{MemSource, PAGE_SHIFT};
use crate::stats::field;
use crate::sync::init_atomics;

/// Pages in one chunk of span records, bitmap records or thread-cache records (64 KiB,
/// allocated aligned to its size: see `fixalloc.rs`).
pub(super) const SPAN_CHUNK_PAGES: usize = 8;
const _: () = assert!(SPAN_CHUNK_PAGES << PAGE_SHIFT == crate::fixalloc::CHUNK_BYTES);
/// Bitmap record sizes, in 64-bit words per bitmap (a record holds two bitmaps).
pub(super) const BITS_WORDS: [usize; 5] = [1, 2, 4, 8, 16];
/// Bitmaps per record: remote-free and alloc bits, and in checked mode the live bits.
#[cfg(not(feature = "checked"))]
pub(super) const BITS_MAPS: usize = 2;
#[cfg(feature = "checked")]
pub(super) const BITS_MAPS: usize = 3;

/// Words per bitmap of a span of `nelems` objects (checked mode finds its live bits
/// at `2 * words` from the record's start).
#[cfg(feature = "checked")]
pub(crate) fn bits_words(nelems: usize) -> usize {
    BITS_WORDS[bits_bucket(nelems)]
}

/// Index into `BITS_WORDS` for a span of `nelems` objects.
#[inline]
pub(super) fn bits_bucket(nelems: usize) -> usize {
    let w = nelems.div_ceil(64).max(1);
    (usize::BITS - (w - 1).leading_zeros()) as usize
}

impl<M: MemSource> MHeap<M> {
    /// A span record, refilling the fixalloc from the heap itself when it is empty.
    /// Needs the heap lock (`h`).
    ///
    /// Records live in manual spans of purpose `SpanRecords`. The span describing a new
    /// chunk of records is the chunk's own first record, so refilling needs no record
    /// from elsewhere. This rare path (once per 64 KiB chunk of records) initialises and publishes
    /// that span with the lock held.
    pub(super) fn span_record_locked(&self, h: &mut Locked) -> Option<NonNull<MSpan>> {
        let s = self.span_record_refill_locked(h);
        self.publish_meta_released(h);
        s
    }

    /// `span_record_locked` but for the released-bytes gauge.
    fn span_record_refill_locked(&self, h: &mut Locked) -> Option<NonNull<MSpan>> {
        if let Some(s) = NonNull::new(h.spanalloc.alloc()) {
            return Some(s);
        }
        let (base, scav) = self.alloc_pages_locked(h, SPAN_CHUNK_PAGES, SPAN_CHUNK_PAGES)?;
        self.commit_run(base, SPAN_CHUNK_PAGES, scav);
        h.spanalloc.add_chunk(base, SPAN_CHUNK_PAGES << PAGE_SHIFT);
        let own = NonNull::new(h.spanalloc.alloc())?;
        // SAFETY: `own` is a fresh record in the chunk it describes; nobody else knows
        // it or the pages.
        unsafe {
            self.init_and_publish(
                own,
                base,
                SPAN_CHUNK_PAGES,
                Purpose::SpanRecords,
                0,
                scav,
                false,
            )
        };
        NonNull::new(h.spanalloc.alloc())
    }

    /// A chunk of `SPAN_CHUNK_PAGES` pages for a record allocator, as a manual span of
    /// `purpose`. Needs the heap lock (`h`). Like the span-record refill, this rare path
    /// initialises and publishes the chunk's span with the lock held.
    fn manual_chunk_locked(&self, h: &mut Locked, purpose: Purpose) -> Option<usize> {
        let s = self.span_record_locked(h)?;
        let Some((base, scav)) = self.alloc_pages_locked(h, SPAN_CHUNK_PAGES, SPAN_CHUNK_PAGES)
        else {
            // SAFETY: the record was just taken and never published.
            unsafe { h.spanalloc.free(s.as_ptr()) };
            return None;
        };
        self.commit_run(base, SPAN_CHUNK_PAGES, scav);
        // SAFETY: fresh record and pages, known to nobody else.
        unsafe { self.init_and_publish(s, base, SPAN_CHUNK_PAGES, purpose, 0, scav, false) };
        Some(base)
    }

    /// A bitmap record for a span of `nelems` objects. Needs the heap lock (`h`).
    pub(super) fn bits_record_locked(&self, h: &mut Locked, nelems: usize) -> Option<*mut u64> {
        self.bits_record_bucket_locked(h, bits_bucket(nelems))
    }

    /// A bitmap record of size bucket `b`. Needs the heap lock (`h`).
    pub(super) fn bits_record_bucket_locked(&self, h: &mut Locked, b: usize) -> Option<*mut u64> {
        let (mut p, mut carved) = h.bitsalloc[b].alloc();
        if p.is_null() {
            let base = self.manual_chunk_locked(h, Purpose::SpanBitmaps)?;
            h.bitsalloc[b].add_chunk(base, SPAN_CHUNK_PAGES << PAGE_SHIFT);
            (p, carved) = h.bitsalloc[b].alloc();
        }
        self.publish_meta_released(h);
        // Records carved again from a dropped page need nothing: zero bytes are a
        // cleared bitmap, and old bytes are what a recycled record holds.
        if carved == Carved::Fresh {
            // The remote-free words are atomics: construct them once, when carved.
            // SAFETY: a fresh record of 2 * BITS_WORDS[b] words; chunk memory may be
            // dirty, so zero it first.
            unsafe {
                ptr::write_bytes(p, 0, BITS_MAPS * 8 * BITS_WORDS[b]);
                init_atomics(p.cast::<crate::sync::AtomicU64>(), BITS_WORDS[b]);
                // Checked mode's live bits (after the remote and alloc bitmaps).
                #[cfg(feature = "checked")]
                init_atomics(
                    p.add(2 * BITS_WORDS[b]).cast::<crate::sync::AtomicU64>(),
                    BITS_WORDS[b],
                );
            }
        }
        Some(p.cast())
    }

    /// A chunk of `CHUNK_BYTES` (`fixalloc.rs`) for a record allocator the heap does not
    /// own (thread-cache records, `mcache/heap.rs`), as a manual span of `purpose`, or
    /// `None` if memory is exhausted. Takes the heap lock.
    pub(crate) fn record_chunk(&self, purpose: Purpose) -> Option<usize> {
        self.locked
            .lock()
            .with(|h| self.manual_chunk_locked(h, purpose))
    }

    /// A mapping of `bytes` for metadata outside the arenas (a thread cache's free
    /// stacks), lazily backed and counted as metadata; `None` if the OS refuses. It is
    /// never unmapped: its pages are dropped with `drop_meta_pages`.
    pub(crate) fn alloc_meta_mapping(&self, bytes: usize) -> Option<NonNull<u8>> {
        let base = self.mem.alloc_meta(bytes).ok()?;
        self.count_meta(bytes);
        Some(base)
    }

    /// Counts `bytes` more of OS memory for metadata outside the arenas (the gauge and
    /// the consistent statistics).
    pub(super) fn count_meta(&self, bytes: usize) {
        add(&self.gauges.meta_sys, bytes);
        self.stats_update(|d| d.add(field::META, bytes as u64));
    }

    /// Drops the resident pages that lie wholly inside `[base, base + bytes)`, a part of
    /// a cache record's free-stack storage that holds no object (what a trimmed stack
    /// no longer reaches). If the OS refuses, only the statistics say so, as for
    /// `drop_stack_pages`.
    ///
    /// # Safety
    /// The range is stack storage of a cache record whose owner (or a visitor holding
    /// its door) is the caller, and no slot in it holds an object.
    pub(crate) unsafe fn drop_stack_range(&self, base: usize, bytes: usize) {
        let Ok(page) = crate::os::os_page_size() else {
            return;
        };
        let (from, to) = (base.next_multiple_of(page), (base + bytes) & !(page - 1));
        if to > from {
            // SAFETY: whole pages of the caller's unused stack storage (contract).
            if !unsafe {
                self.mem
                    .decommit(NonNull::new_unchecked(from as *mut u8), to - from)
            } {
                self.count_refused_decommit(to - from);
            }
        }
    }

    /// Drops the resident pages of `[base, base + bytes)`, a whole mapping from
    /// `alloc_meta_mapping` (the mapping stays). If the OS refuses, the pages stay
    /// resident and only the statistics say so.
    ///
    /// # Safety
    /// The mapping's owner is the caller and nothing in it is read before it is written
    /// again.
    pub(crate) unsafe fn drop_meta_pages(&self, base: NonNull<u8>, bytes: usize) {
        // SAFETY: the caller's own mapping, holding nothing it will read (contract).
        if !unsafe { self.mem.decommit(base, bytes) } {
            self.count_refused_decommit(bytes);
        }
    }
}
