//! Randomized differential testing of spanheap against a model of live blocks.
//!
//! Shared by `tests/differential.rs` (a fixed seed in CI) and
//! `examples/differential.rs` (long runs, any seed). Each thread runs a random sequence
//! of `alloc`, `alloc_zeroed`, `realloc` and `dealloc` over sizes from 1 byte to 4 MiB
//! (size 0 is excluded: `GlobalAlloc` forbids it) and alignments from 1 byte to 1 MiB, through spanheap's `GlobalAlloc` methods, and keeps
//! a model of its live blocks (address, layout, a tag). Every block holds a pattern
//! derived from its tag (every byte of blocks up to 4 KiB; the first and last 256 bytes
//! and one byte per 4 KiB of larger ones), checked when the block is freed or
//! reallocated; zeroed allocations are checked for zeros; realloc must keep the
//! common prefix. Blocks are handed to the next thread through a channel, so many
//! frees are cross-thread. Any difference from the model (a corrupted or overlapping
//! block, a misaligned or null result) panics with the seed and operation number.
//! With [`Config::tolerate_null`] (for runs where OS calls fail on purpose) a null from
//! `alloc`, `alloc_zeroed` or `realloc` is counted instead: nothing was allocated, and
//! a failed realloc must leave its block as it was.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc::{channel, Receiver, Sender};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub seed: u64,
    pub threads: usize,
    pub ops_per_thread: u64,
    /// Accept null results (counted in [`Report::nulls`]) instead of failing.
    pub tolerate_null: bool,
}

/// What was run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub ops: u64,
    pub allocs: u64,
    pub zeroed: u64,
    pub reallocs: u64,
    pub frees: u64,
    pub handed_over: u64,
    pub bytes_checked: u64,
    /// Allocations and reallocs that returned null (only with `tolerate_null`).
    pub nulls: u64,
}

impl Report {
    fn add(&mut self, o: &Report) {
        self.ops += o.ops;
        self.allocs += o.allocs;
        self.zeroed += o.zeroed;
        self.reallocs += o.reallocs;
        self.frees += o.frees;
        self.handed_over += o.handed_over;
        self.bytes_checked += o.bytes_checked;
        self.nulls += o.nulls;
    }
}

/// splitmix64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A live block as the model knows it.
#[derive(Clone, Copy)]
struct Block {
    p: usize,
    layout: Layout,
    tag: u64,
}

/// The pattern byte at offset `i` of a block tagged `tag`.
#[inline]
fn pat(tag: u64, i: usize) -> u8 {
    (tag.wrapping_mul(0x9E37_79B9) ^ (i as u64).wrapping_mul(0x85EB_CA6B) ^ (i as u64 >> 8)) as u8
}

/// The offsets of a block of `size` bytes that carry the pattern.
fn offsets(size: usize, mut f: impl FnMut(usize)) {
    if size <= 4096 {
        (0..size).for_each(f);
        return;
    }
    (0..256).for_each(&mut f);
    (size - 256..size).for_each(&mut f);
    let mut i = 4096;
    while i < size - 256 {
        f(i);
        i += 4096;
    }
}

fn fill(b: &Block, upto: usize) -> u64 {
    let p = b.p as *mut u8;
    let mut n = 0;
    offsets(b.layout.size().min(upto), |i| {
        // SAFETY: `i` < size of the live block.
        unsafe { p.add(i).write(pat(b.tag, i)) };
        n += 1;
    });
    n
}

fn check(b: &Block, upto: usize, ctx: &dyn Fn() -> String) -> u64 {
    let p = b.p as *const u8;
    let mut n = 0;
    // The offsets the block's own pattern covers, up to `upto`.
    offsets(b.layout.size(), |i| {
        if i >= upto {
            return;
        }
        // SAFETY: `i` < size of the live block.
        let v = unsafe { p.add(i).read() };
        if v != pat(b.tag, i) {
            panic!(
                "{}: block {:#x} ({:?}) corrupted at offset {i}: {v:#x} instead of {:#x}",
                ctx(),
                b.p,
                b.layout,
                pat(b.tag, i)
            );
        }
        n += 1;
    });
    n
}

fn random_layout(rng: &mut Rng) -> Layout {
    let r = rng.below(1000);
    let size = match r {
        0..=599 => 1 + rng.below(256),
        600..=849 => 257 + rng.below(4096 - 256),
        850..=969 => 4097 + rng.below(65536 - 4096),
        970..=994 => 65537 + rng.below((1 << 20) - 65536),
        _ => (1 << 20) + rng.below(3 << 20),
    } as usize;
    let align = match rng.below(100) {
        0..=69 => 1 << rng.below(4),     // 1..8
        70..=94 => 16 << rng.below(9),   // 16..4096
        95..=98 => 8192 << rng.below(4), // 8 KiB..64 KiB
        _ => 128 << 10 << rng.below(4),  // 128 KiB..1 MiB
    };
    Layout::from_size_align(size, align).unwrap()
}

/// One thread's run. `next` receives blocks this thread hands over; `inbox` delivers
/// blocks handed to it.
fn thread_run<A: GlobalAlloc>(
    a: &A,
    cfg: Config,
    t: usize,
    next: Sender<(usize, usize, usize, u64)>,
    inbox: Receiver<(usize, usize, usize, u64)>,
) -> Report {
    let mut rng = Rng(cfg.seed ^ (t as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut live: Vec<Block> = Vec::new();
    let mut bytes = 0usize;
    let mut rep = Report::default();
    let mut tag = (t as u64) << 48;
    let mut target = MAX_LIVE;
    const MAX_LIVE: usize = 3000;
    const MAX_BYTES: usize = 96 << 20;
    for op in 0..cfg.ops_per_thread {
        let ctx = || format!("seed {:#x} thread {t} op {op}", cfg.seed);
        // Adopt blocks handed over by the previous thread.
        while let Ok((p, size, align, btag)) = inbox.try_recv() {
            let b = Block {
                p,
                layout: Layout::from_size_align(size, align).unwrap(),
                tag: btag,
            };
            bytes += size;
            live.push(b);
        }
        rep.ops += 1;
        // Phases of 20,000 operations with a target number of live blocks (few, some,
        // many): the heap fills up, drains (spans empty and go back to the page heap)
        // and refills, instead of hovering at the cap.
        if op % 20_000 == 0 {
            target = [8, 256, MAX_LIVE][rng.below(3) as usize];
        }
        let r = rng.below(100);
        let must_free = live.len() >= target.max(1) + 64 || bytes >= MAX_BYTES;
        // Below the target, allocations dominate; above it, frees.
        let p_alloc = if live.len() < target { 55 } else { 30 };
        if !must_free && (r < p_alloc || live.is_empty()) {
            // Allocate (a quarter zeroed).
            let layout = random_layout(&mut rng);
            let zero = rng.below(4) == 0;
            // SAFETY: non-zero size.
            let p = unsafe {
                if zero {
                    a.alloc_zeroed(layout)
                } else {
                    a.alloc(layout)
                }
            };
            if p.is_null() && cfg.tolerate_null {
                rep.nulls += 1;
                continue;
            }
            assert!(!p.is_null(), "{}: null for {layout:?}", ctx());
            assert_eq!(
                p as usize % layout.align(),
                0,
                "{}: misaligned {layout:?}",
                ctx()
            );
            if zero {
                let mut n = 0;
                offsets(layout.size(), |i| {
                    // SAFETY: inside the new block.
                    let v = unsafe { p.add(i).read() };
                    assert_eq!(
                        v,
                        0,
                        "{}: alloc_zeroed byte {i} of {layout:?} is {v:#x}",
                        ctx()
                    );
                    n += 1;
                });
                rep.bytes_checked += n;
                rep.zeroed += 1;
            } else {
                rep.allocs += 1;
            }
            tag += 1;
            let b = Block {
                p: p as usize,
                layout,
                tag,
            };
            fill(&b, usize::MAX);
            bytes += layout.size();
            live.push(b);
        } else if r < p_alloc + 20 && !must_free {
            // Realloc a random block to a random size (same alignment).
            let i = rng.below(live.len() as u64) as usize;
            let b = live[i];
            rep.bytes_checked += check(&b, usize::MAX, &ctx);
            let new_size = random_layout(&mut rng).size();
            // SAFETY: a live block of this layout; non-zero new size.
            let q = unsafe { a.realloc(b.p as *mut u8, b.layout, new_size) };
            if q.is_null() && cfg.tolerate_null {
                // The block stays where it was, untouched.
                rep.bytes_checked += check(&b, usize::MAX, &ctx);
                rep.nulls += 1;
                continue;
            }
            assert!(!q.is_null(), "{}: realloc to {new_size} failed", ctx());
            let nl = Layout::from_size_align(new_size, b.layout.align()).unwrap();
            assert_eq!(q as usize % nl.align(), 0, "{}: realloc misaligned", ctx());
            // The old block's pattern, at the new address.
            let moved = Block {
                p: q as usize,
                layout: b.layout,
                tag: b.tag,
            };
            // The common prefix survives.
            rep.bytes_checked += check(&moved, b.layout.size().min(new_size), &ctx);
            tag += 1;
            let nb = Block {
                p: q as usize,
                layout: nl,
                tag,
            };
            fill(&nb, usize::MAX);
            bytes = bytes - b.layout.size() + new_size;
            live[i] = nb;
            rep.reallocs += 1;
        } else if (!must_free && r < p_alloc + 27) || (must_free && r % 8 == 0) {
            // Hand a block to the next thread (its free will be cross-thread).
            let i = rng.below(live.len() as u64) as usize;
            let b = live.swap_remove(i);
            bytes -= b.layout.size();
            if next
                .send((b.p, b.layout.size(), b.layout.align(), b.tag))
                .is_err()
            {
                // The next thread has finished: free it here.
                rep.bytes_checked += check(&b, usize::MAX, &ctx);
                // SAFETY: a live block of this layout.
                unsafe { a.dealloc(b.p as *mut u8, b.layout) };
                rep.frees += 1;
            } else {
                rep.handed_over += 1;
            }
        } else {
            // Free a random block.
            let i = rng.below(live.len() as u64) as usize;
            let b = live.swap_remove(i);
            rep.bytes_checked += check(&b, usize::MAX, &|| ctx());
            bytes -= b.layout.size();
            // SAFETY: a live block of this layout, freed once.
            unsafe { a.dealloc(b.p as *mut u8, b.layout) };
            rep.frees += 1;
        }
    }
    drop(next);
    // Free everything still live, including what arrives until the sender is gone.
    for b in live.drain(..) {
        rep.bytes_checked += check(&b, usize::MAX, &|| format!("thread {t} final"));
        // SAFETY: as above.
        unsafe { a.dealloc(b.p as *mut u8, b.layout) };
        rep.frees += 1;
    }
    for (p, size, align, btag) in inbox.iter() {
        let b = Block {
            p,
            layout: Layout::from_size_align(size, align).unwrap(),
            tag: btag,
        };
        rep.bytes_checked += check(&b, usize::MAX, &|| format!("thread {t} final inbox"));
        // SAFETY: as above.
        unsafe { a.dealloc(b.p as *mut u8, b.layout) };
        rep.frees += 1;
    }
    rep
}

/// Runs the configured threads (a ring: thread `t` hands blocks to `t + 1`) against
/// spanheap's `GlobalAlloc` methods. Panics on any discrepancy.
pub fn run(cfg: Config) -> Report {
    let n = cfg.threads.max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| channel()).unzip();
    let mut rxs: Vec<Option<Receiver<_>>> = rxs.into_iter().map(Some).collect();
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let next = txs[(t + 1) % n].clone();
            let inbox = rxs[t].take().unwrap();
            std::thread::spawn(move || thread_run(&spanheap::SpanHeap, cfg, t, next, inbox))
        })
        .collect();
    drop(txs);
    let mut total = Report::default();
    for h in handles {
        total.add(&h.join().unwrap());
    }
    total
}
