//! Checked mode (cargo feature `checked`): every free is validated against what the
//! heap knows about the block, and a fault is reported on stderr in one line naming
//! spanheap, the fault and the address, then the process aborts.
//!
//! Detected:
//! - **double free** of a small object (even while the first free sits on a thread's
//!   local free list) and of a large block;
//! - **free of a pointer spanheap never handed out**: outside the heap, in the
//!   allocator's own metadata pages, or in pages no live span covers;
//! - **free of an interior pointer** (not the start of its object or block);
//! - **layout mismatch** in `dealloc`/`realloc`: the layout's size class is not the
//!   block's, a small layout for a large block or the reverse, or a large layout whose
//!   page count is not the block's.
//!
//! How: small-object spans get a third bitmap in their bitmap record, one *live* bit per
//! object, set when the object is handed out (`on_alloc`, on every small allocation
//! path) and cleared when it is freed (`fetch_and`: a bit already clear is a double
//! free). Large blocks are live exactly while their span is; the per-thread
//! large-block cache, which keeps freed blocks as live spans, is off in checked mode so
//! that a second free of a block finds its span dead. Every check does a span-map
//! lookup and a division: checked mode is for testing, not production. Without the
//! feature none of this is compiled and the fast paths are unchanged.

use core::fmt;

use super::HEAP;
use crate::mspan::{MSpan, Purpose, SpanState};
use crate::os::PAGE_SIZE;
use crate::sizeclasses::{class_for_layout, CLASS_TO_NOBJS, CLASS_TO_SIZE};
use crate::sync::{AtomicU64, Ordering};

/// The live bit of the object at `p` in span `s` of class `class`: (word, mask).
///
/// # Safety
/// `s` is a live small-object span of class `class` containing `p`.
unsafe fn live_bit(s: &MSpan, class: usize, p: usize) -> (&AtomicU64, u64) {
    let size = CLASS_TO_SIZE[class] as usize;
    let idx = (p - s.base()) / size;
    let words = crate::mheap::bits_words(CLASS_TO_NOBJS[class] as usize);
    // SAFETY: a live small span's info is immutable while it is live.
    let bits = unsafe { s.info() }.bits;
    // SAFETY: checked mode gives every bitmap record a third bitmap of `words` atomic
    // words after the remote and alloc bitmaps; idx < nelems <= 64 * words.
    let w = unsafe { &*(bits as *const AtomicU64).add(2 * words + idx / 64) };
    (w, 1u64 << (idx % 64))
}

/// Marks the small object `p` (just handed out) live.
pub(crate) fn on_alloc(p: *mut u8) {
    if p.is_null() || sampled_block(p) {
        return;
    }
    let Some(s) = HEAP.span_of(p as usize) else {
        fault(
            "allocation handed out a block outside any live span",
            p as usize,
            None,
        );
    };
    // SAFETY: span records are never unmapped; `span_of` validated it.
    let s = unsafe { s.as_ref() };
    // SAFETY: as above.
    let class = unsafe { s.info() }.spanclass as usize;
    if class == 0 {
        return;
    }
    // SAFETY: `p` is in this live small span.
    let (w, m) = unsafe { live_bit(s, class, p as usize) };
    // Relaxed: the bit is a diagnostic; frees of this object are ordered after the
    // allocation by the program itself.
    if w.fetch_or(m, Ordering::Relaxed) & m != 0 {
        fault(
            "allocation handed out an object that is still live",
            p as usize,
            None,
        );
    }
}

/// What a free must check of the layout: none (C `free`), or the Rust layout.
#[derive(Clone, Copy)]
pub(crate) struct Expect {
    size: usize,
    align: usize,
}

impl Expect {
    pub(crate) fn layout(size: usize, align: usize) -> Option<Expect> {
        Some(Expect { size, align })
    }
}

/// Validates a free (or the old block of a realloc, `clear` false) of `p`; for a small
/// object with `clear`, clears its live bit. Aborts on any fault.
pub(crate) fn on_free(p: *mut u8, layout: Option<Expect>, clear: bool) {
    if sampled_block(p) {
        return;
    }
    let addr = p as usize;
    let raw = HEAP.span_of_unchecked(addr);
    let Some(s) = HEAP.span_of(addr) else {
        if !raw.is_null() {
            // SAFETY: span records are never unmapped.
            let r = unsafe { &*raw };
            if r.state() == SpanState::Dead {
                fault("double free (or free of freed memory)", addr, None);
            }
        }
        fault("free of a pointer spanheap never handed out", addr, None);
    };
    // SAFETY: validated live span; records are never unmapped.
    let s = unsafe { s.as_ref() };
    // SAFETY: a live span's info is immutable while it is live.
    let info = unsafe { s.info() };
    if info.purpose != Purpose::Heap {
        fault(
            "free of a pointer spanheap never handed out (allocator metadata)",
            addr,
            None,
        );
    }
    let class = info.spanclass as usize;
    let lclass = layout.map(|l| class_for_layout(l.size, l.align) as usize);
    if class == 0 {
        let bytes = s.npages() * PAGE_SIZE;
        if addr != s.base() {
            fault(
                "free of an interior pointer",
                addr,
                Some(Detail::Large { bytes, layout }),
            );
        }
        if let Some(l) = layout {
            if lclass != Some(0) || l.size.div_ceil(PAGE_SIZE).max(1) != s.npages() {
                fault(
                    "dealloc layout does not match the block",
                    addr,
                    Some(Detail::Large { bytes, layout }),
                );
            }
        }
        return;
    }
    let size = CLASS_TO_SIZE[class] as usize;
    let detail = Some(Detail::Small {
        class,
        size,
        layout,
    });
    if (addr - s.base()) % size != 0 {
        fault("free of an interior pointer", addr, detail);
    }
    if lclass.is_some_and(|c| c != class) {
        fault("dealloc layout does not match the block", addr, detail);
    }
    // SAFETY: `p` is an object of this live small span.
    let (w, m) = unsafe { live_bit(s, class, addr) };
    let live = if clear {
        w.fetch_and(!m, Ordering::Relaxed) & m != 0
    } else {
        w.load(Ordering::Relaxed) & m != 0
    };
    if !live {
        fault(
            "double free (or free of an object never allocated)",
            addr,
            detail,
        );
    }
}

#[derive(Clone, Copy)]
enum Detail {
    Small {
        class: usize,
        size: usize,
        layout: Option<Expect>,
    },
    Large {
        bytes: usize,
        layout: Option<Expect>,
    },
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (layout, r) = match *self {
            Detail::Small {
                class,
                size,
                layout,
            } => (
                layout,
                write!(
                    f,
                    "; the block is a small object of {size} bytes (size class {class})"
                ),
            ),
            Detail::Large { bytes, layout } => (
                layout,
                write!(f, "; the block is a large block of {bytes} bytes"),
            ),
        };
        r?;
        match layout {
            Some(l) => write!(f, ", the layout says size {} align {}", l.size, l.align),
            None => Ok(()),
        }
    }
}

/// Writes `spanheap: <what> at <addr>[<detail>]` to stderr and aborts.
#[cold]
#[inline(never)]
fn fault(what: &str, addr: usize, detail: Option<Detail>) -> ! {
    match detail {
        Some(d) => crate::fatal::fatal(format_args!("{what} at {addr:#x}{d}")),
        None => crate::fatal::fatal(format_args!("{what} at {addr:#x}")),
    }
}

/// Whether `p` is in the heap profile's sampled blocks (`profile/blocks.rs`), outside
/// the heap's spans: not tracked here (the profile's own free list takes a block back).
fn sampled_block(p: *mut u8) -> bool {
    #[cfg(feature = "profile")]
    return crate::profile::blocks::contains(p as usize);
    #[cfg(not(feature = "profile"))]
    {
        let _ = p;
        false
    }
}
