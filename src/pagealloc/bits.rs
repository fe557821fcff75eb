//! One chunk's page bitmaps and the bit operations and searches over them (Go's
//! `mpallocbits.go`).
//!
//! A [`Chunk`] is the record of one grown 4 MiB chunk of [`CHUNK_PAGES`] = 512 heap
//! pages: two 512-bit bitmaps, `alloc` (bit set = page in use) and `scav` (bit set =
//! the page is free *and* scavenged: returned to the OS, or fresh from it, i.e.
//! Prepared rather than Ready). This file has what works on those bits alone: marking
//! a page range allocated, free or scavenged a word at a time ([`for_each_word`]), the
//! chunk's `(start, max, end)` summary that becomes its leaf entry in the tree, the
//! first fit inside a chunk (Go's `findSmallN` and `findLargeN`, with the single-word
//! searches [`find_zero_run`], Go's `findBitRange64`, and [`longest_zero_run`]), and
//! [`highest_run`], which the scavenger uses to take runs from the top of a chunk
//! down. Nothing here knows about the tree, the chunk map or the heap's counters.
//!
//! # Locking
//!
//! Chunk records have no synchronisation of their own: they live in the L2 arrays of
//! a `PageAlloc`'s chunk map and are only read or changed through that `PageAlloc`,
//! that is under the heap lock (`&self` to read, `&mut self` to change).

use super::{Sum, CHUNK_PAGES, CHUNK_WORDS};

// ---------------------------------------------------------------------------------
// Chunk bitmaps
// ---------------------------------------------------------------------------------

/// The bitmaps of one chunk. Page `p` of the chunk is bit `p % 64` of word `p / 64`.
#[repr(C)]
pub(super) struct Chunk {
    /// Bit set: the page is allocated.
    pub(super) alloc: [u64; CHUNK_WORDS],
    /// Bit set: the page is free and scavenged (Prepared). Never set on allocated pages.
    pub(super) scav: [u64; CHUNK_WORDS],
}

/// Calls `f(word, mask)` for each word that the page range `[s, e)` of a chunk touches,
/// with the mask of the range's bits in that word. `s < e <= CHUNK_PAGES`.
#[inline]
pub(super) fn for_each_word(s: usize, e: usize, mut f: impl FnMut(usize, u64)) {
    debug_assert!(s < e && e <= CHUNK_PAGES);
    let mut p = s;
    while p < e {
        let w = p / 64;
        let lo = p % 64;
        let hi = (e - w * 64).min(64);
        f(w, (!0u64 >> (64 - (hi - lo))) << lo);
        p = w * 64 + hi;
    }
}

/// The first page at or after `from` whose bit in `bits` equals `set`, or
/// `CHUNK_PAGES` if there is none.
#[inline]
pub(super) fn next_bit(bits: &[u64; CHUNK_WORDS], from: usize, set: bool) -> usize {
    let mut w = from / 64;
    if w >= CHUNK_WORDS {
        return CHUNK_PAGES;
    }
    let flip = if set { 0 } else { !0u64 };
    let mut x = (bits[w] ^ flip) & (!0u64 << (from % 64));
    loop {
        if x != 0 {
            return w * 64 + x.trailing_zeros() as usize;
        }
        w += 1;
        if w == CHUNK_WORDS {
            return CHUNK_PAGES;
        }
        x = bits[w] ^ flip;
    }
}

/// The lowest bit index at which `x` has `n` (1..=64) consecutive zero bits, or 64.
///
/// Go's `findBitRange64`: in `c = !x`, every run of ones is shortened from the top by
/// `n - 1` bits, doubling the shift each round, so that only the starts of runs of at
/// least `n` ones survive; the lowest survivor is the answer. O(log n) word operations.
#[inline]
fn find_zero_run(x: u64, n: usize) -> usize {
    debug_assert!((1..=64).contains(&n));
    let mut c = !x;
    let mut p = n - 1; // ones still to strip from the top of each run
    let mut k = 1; // every surviving run is at least k long
    while p > 0 {
        if p <= k {
            c &= c >> p;
            break;
        }
        c &= c >> k;
        if c == 0 {
            return 64;
        }
        p -= k;
        k *= 2;
    }
    c.trailing_zeros() as usize
}

/// The longest run of zero bits in `x`, in O(log 64) word operations.
#[inline]
fn longest_zero_run(x: u64) -> usize {
    // Invariant: bit i of `c` is set iff bits i..i+len of `!x` are all set, so
    // `c & (c >> k)` keeps exactly the starts of runs at least `len + k` long.
    let mut c = !x;
    if c == 0 {
        return 0;
    }
    let mut len = 1;
    // Double the step while runs that long exist...
    let mut k = 1;
    while k < 64 {
        let t = c & (c >> k);
        if t == 0 {
            break;
        }
        c = t;
        len += k;
        k *= 2;
    }
    // ...then the longest run is shorter than `len + k`: binary-search the rest.
    k /= 2;
    while k >= 1 {
        let t = c & (c >> k);
        if t != 0 {
            c = t;
            len += k;
        }
        k /= 2;
    }
    len
}

impl Chunk {
    /// The summary of the alloc bitmap.
    pub(super) fn summarize(&self) -> Sum {
        let a = &self.alloc;
        let Some(first_used) = a.iter().position(|&w| w != 0) else {
            return Sum::FREE_CHUNK;
        };
        let start = first_used * 64 + a[first_used].trailing_zeros() as usize;
        let mut max = start;
        // `run`: the free pages just before the current word.
        let mut run = 0;
        for &w in a {
            if w == 0 {
                run += 64;
                continue;
            }
            max = max.max(run + w.trailing_zeros() as usize);
            // A run strictly inside the word can only win if the word has more free
            // pages than the best run so far.
            if w.count_zeros() as usize > max {
                max = max.max(longest_zero_run(w));
            }
            run = w.leading_zeros() as usize;
        }
        let end = run;
        Sum::pack(start, max.max(end), end)
    }

    /// The first page `p >= from` such that pages `[p, p + npages)` are all free and
    /// inside the chunk, and the first free page at or after `from` (`CHUNK_PAGES` if
    /// none).
    pub(super) fn find(&self, npages: usize, from: usize) -> (Option<usize>, usize) {
        let first_free = next_bit(&self.alloc, from, false);
        let pos = if first_free >= CHUNK_PAGES || npages > CHUNK_PAGES - first_free {
            None
        } else if npages == 1 {
            Some(first_free)
        } else if npages <= 64 {
            self.find_small(npages, first_free)
        } else {
            self.find_large(npages, first_free)
        };
        (pos, first_free)
    }

    /// The alloc word `i`, with the pages below `from` counted as used.
    #[inline]
    fn word_from(&self, i: usize, from: usize) -> u64 {
        let w = self.alloc[i];
        if i == from / 64 {
            w | ((1u64 << (from % 64)) - 1)
        } else {
            w
        }
    }

    /// First fit of `2..=64` pages at or after `from`, a word at a time (Go's
    /// `findSmallN`): a run either continues the free top of the previous word into the
    /// bottom of this one, or lies inside one word.
    fn find_small(&self, npages: usize, from: usize) -> Option<usize> {
        // Free pages at the top of the previous word.
        let mut end = 0;
        for i in from / 64..CHUNK_WORDS {
            let w = self.word_from(i, from);
            if w == !0 {
                end = 0;
                continue;
            }
            if end + w.trailing_zeros() as usize >= npages {
                return Some(i * 64 - end);
            }
            let j = find_zero_run(w, npages);
            if j < 64 {
                return Some(i * 64 + j);
            }
            end = w.leading_zeros() as usize;
        }
        None
    }

    /// First fit of more than 64 pages at or after `from` (Go's `findLargeN`): such a
    /// run starts at the free top of a word (or at a word boundary) and continues
    /// through whole free words into the free bottom of a later word.
    fn find_large(&self, npages: usize, from: usize) -> Option<usize> {
        let (mut size, mut start) = (0usize, 0usize);
        for i in from / 64..CHUNK_WORDS {
            let w = self.word_from(i, from);
            if w == 0 {
                if size == 0 {
                    start = i * 64;
                }
                size += 64;
                if size >= npages {
                    return Some(start);
                }
                continue;
            }
            if size + w.trailing_zeros() as usize >= npages {
                return Some(start);
            }
            size = w.leading_zeros() as usize;
            start = i * 64 + 64 - size;
        }
        None
    }

    /// Marks pages `[s, e)` allocated and clears their scavenged bits. Returns how many
    /// pages were newly allocated and how many scavenged bits were cleared.
    pub(super) fn set_alloc(&mut self, s: usize, e: usize) -> (usize, usize) {
        let (mut newly, mut scav) = (0, 0);
        for_each_word(s, e, |w, m| {
            newly += (m & !self.alloc[w]).count_ones() as usize;
            scav += (m & self.scav[w]).count_ones() as usize;
            self.alloc[w] |= m;
            self.scav[w] &= !m;
        });
        (newly, scav)
    }

    /// Marks pages `[s, e)` free; returns how many were allocated before.
    pub(super) fn clear_alloc(&mut self, s: usize, e: usize) -> usize {
        let mut freed = 0;
        for_each_word(s, e, |w, m| {
            freed += (m & self.alloc[w]).count_ones() as usize;
            self.alloc[w] &= !m;
        });
        freed
    }

    /// Sets the scavenged bit of the free pages in `[s, e)`; returns how many changed.
    pub(super) fn set_scav(&mut self, s: usize, e: usize) -> usize {
        let mut changed = 0;
        for_each_word(s, e, |w, m| {
            let new = m & !self.alloc[w] & !self.scav[w];
            changed += new.count_ones() as usize;
            self.scav[w] |= new;
        });
        changed
    }

    /// Whether pages `[s, e)` are all free.
    pub(super) fn range_free(&self, s: usize, e: usize) -> bool {
        let mut free = true;
        for_each_word(s, e, |w, m| free &= self.alloc[w] & m == 0);
        free
    }
}

/// The highest run of set bits in a chunk bitmap, as a page range `[s, e)`.
pub(super) fn highest_run(b: &[u64; CHUNK_WORDS]) -> Option<(usize, usize)> {
    let mut w = CHUNK_WORDS;
    let (hw, hb) = loop {
        if w == 0 {
            return None;
        }
        w -= 1;
        if b[w] != 0 {
            break (w, 63 - b[w].leading_zeros() as usize);
        }
    };
    let e = hw * 64 + hb + 1;
    // The run goes down to just above the highest clear bit below `e`.
    let mut mask = if hb == 63 { !0 } else { (1u64 << (hb + 1)) - 1 };
    let mut w = hw;
    loop {
        let clear = !b[w] & mask;
        if clear != 0 {
            return Some((w * 64 + 64 - clear.leading_zeros() as usize, e));
        }
        if w == 0 {
            return Some((0, e));
        }
        w -= 1;
        mask = !0;
    }
}

#[cfg(test)]
mod find_zero_run_tests {
    use super::find_zero_run;

    #[test]
    fn matches_a_bit_by_bit_search() {
        let naive = |x: u64, n: usize| {
            (0..=64 - n)
                .find(|&i| (i..i + n).all(|b| x >> b & 1 == 0))
                .unwrap_or(64)
        };
        let mut r = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            // Sparse and dense words, and long zero runs.
            let x = match r % 4 {
                0 => r,
                1 => r & (r >> 3) & (r >> 7),
                2 => r | (r >> 5),
                _ => (r & 0xF0F0_0000_0000_0F0F) << (r % 9),
            };
            for n in 1..=64 {
                assert_eq!(find_zero_run(x, n), naive(x, n), "x={x:#018x} n={n}");
            }
        }
        let naive_longest = |x: u64| {
            (0..64)
                .filter(|&i| x >> i & 1 == 0)
                .map(|i| (i..64).take_while(|&b| x >> b & 1 == 0).count())
                .max()
                .unwrap_or(0)
        };
        r = 99;
        for _ in 0..50_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            for x in [
                r,
                r & (r >> 9),
                r | (r >> 3),
                r << (r % 64),
                !(r << (r % 64)),
                r & 0x8000_0000_0000_0001,
            ] {
                assert_eq!(super::longest_zero_run(x), naive_longest(x), "x={x:#018x}");
            }
        }
        assert_eq!(super::longest_zero_run(0), 64);
        assert_eq!(super::longest_zero_run(!0), 0);
        assert_eq!(find_zero_run(0, 64), 0);
        assert_eq!(find_zero_run(1, 64), 64);
        assert_eq!(find_zero_run(!0, 1), 64);
    }
}
