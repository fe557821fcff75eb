//! Generator for spanheap's small-object size classes (`src/sizeclasses.rs`).
//!
//! The scheme follows the Go runtime's `mksizeclasses.go`; the code and the
//! explanations here are our own.
//!
//! * Memory is handed out in spans: runs of 8 KiB pages, 8 KiB aligned.
//! * A small request (at most [`MAX_SMALL_SIZE`] bytes) is rounded up to a size
//!   class. Every class has one object size and one span length; a span of the
//!   class is cut into equal objects from its base upwards.
//! * The span length of a class is the smallest number of pages whose leftover
//!   (the tail that is too short for one more object) is at most 1/8 of the
//!   span.
//! * Candidate sizes advance in steps that grow with the size (8, then 16,
//!   then size/8, then 256), so rounding a request up wastes a bounded fraction
//!   of it. Neighbouring candidates that would produce exactly the same spans
//!   (same page count, same objects per span) are merged into the larger one.
//! * Then each class grows to the largest multiple of [`LARGE_SIZE_DIV`]
//!   that still fits the same number of objects into its span: those bytes
//!   would otherwise be tail waste.
//! * Finally a class of spans shorter than [`SHORT_TAIL_MAX_PAGES`] pages that
//!   wastes more than 1/[`SHORT_TAIL_DIV`] of each span at the tail gets the
//!   shortest span of at most that many pages that wastes no more than that
//!   (sizes unchanged). Go's rule allows 1/8: a 1,280-byte class wasted 512 B
//!   of every 8 KiB span (six objects took 1,365 B each), and objects of those
//!   sizes are common (B-tree nodes, messages). A span of a few pages costs
//!   nothing more at allocation, and its objects pack as tightly as their size
//!   allows (`examples/footprint.rs btree`, docs/benchmarks.md "Footprint").
//! * Last, the spans of classes up to [`MIN_SPAN_UP_TO`] bytes that hold fewer than
//!   256 objects are made at least [`MIN_SPAN_PAGES`] pages long (the smallest
//!   multiple of the span that is, so at most 1,020 objects; its
//!   tail, a multiple of the shorter span's remainder at most, stays within the
//!   rules above). A span is the unit that goes through the class's mcentral: each
//!   one a thread fills and another empties costs lock acquisitions and
//!   announcements, so a span of a page served 7-170 objects per cycle where 4
//!   pages serve 28-682. Objects of these sizes are the ones programs pass between
//!   threads (messages, boxed tasks); in `examples/threads.rs` `remote` the mcentral
//!   lock went from 52 to 22 acquisitions per 1,000 operations at 16 and 64
//!   threads (docs/benchmarks.md, "Fourteenth session (2026-12-08): longer spans,
//!   merged, and traded page blocks"). A longer span costs nothing at allocation (a
//!   window is 64 objects whatever the span), and its unused end is not touched.
//!
//! Class 0 is not a class: it stands for "large object, no class".
//!
//! The steps keep object sizes multiples of 16 from 32 bytes on, and multiples
//! of larger powers of two further up. Because spans are 8 KiB aligned,
//! object `k` of a class of size `s` sits at `base + k * s` and is therefore
//! aligned to the largest power of two dividing `s` (at most 8 KiB). spanheap
//! serves an aligned request from the smallest class that is big enough *and*
//! a multiple of the alignment; the generator emits a table for that.
//!
//! [`generate`] builds the classes, checks every property the allocator relies
//! on (it panics when one fails) and returns the text of `src/sizeclasses.rs`:
//! the generated tables followed by the hand-written lookup functions and
//! tests from `template/sizeclasses_tail.rs`.

use std::fmt::Write as _;

/// Largest request served by a size class; anything bigger is a large object.
pub const MAX_SMALL_SIZE: usize = 32 << 10;
/// Granularity of the fine lookup table (sizes up to [`SMALL_SIZE_MAX`]).
pub const SMALL_SIZE_DIV: usize = 8;
/// Largest size looked up in the fine table.
pub const SMALL_SIZE_MAX: usize = 1024;
/// Granularity of the coarse lookup table (sizes above [`SMALL_SIZE_MAX`]).
pub const LARGE_SIZE_DIV: usize = 128;
/// log2 of the page size that spans are made of.
pub const PAGE_SHIFT: u32 = 13;
/// The page size that spans are made of (and their alignment).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// Number of classes, class 0 included. Changing the algorithm so that this
/// changes must be deliberate: update the constant together with it.
pub const EXPECTED_NUM_CLASSES: usize = 68;
/// A class's objects may waste at most `span / TAIL_WASTE_DIV` bytes at the
/// end of a span.
pub const TAIL_WASTE_DIV: usize = 8;
/// Classes of short spans wasting more than `span / SHORT_TAIL_DIV` at the tail get
/// longer spans (see the module notes).
pub const SHORT_TAIL_DIV: usize = 32;
/// The longest span such a class is given.
pub const SHORT_TAIL_MAX_PAGES: usize = 4;
/// Spans of classes up to [`MIN_SPAN_UP_TO`] bytes are at least this many pages
/// (see the module notes).
pub const MIN_SPAN_PAGES: usize = 4;
/// See [`MIN_SPAN_PAGES`].
pub const MIN_SPAN_UP_TO: usize = 1152;
/// The most objects a span may have: the allocator keeps its bitmap records in
/// buckets of up to 16 words (`pagecache::BITS_BUCKETS`).
pub const MAX_SPAN_OBJECTS: usize = 1024;
/// Upper bound, checked, on the max waste of every class of at least
/// [`MAX_WASTE_FROM_SIZE`] bytes: at most 1/8 lost to rounding the request up
/// and at most 1/8 of the rest lost to the span tail, i.e. `1 - (7/8)^2`.
/// Smaller classes are bounded by the 8- and 16-byte steps instead.
pub const MAX_WASTE_BOUND: f64 = 1.0 - (7.0 / 8.0) * (7.0 / 8.0);
/// See [`MAX_WASTE_BOUND`].
pub const MAX_WASTE_FROM_SIZE: usize = 128;
/// The command that regenerates the file (run from the workspace root).
pub const REGENERATE_COMMAND: &str = "cargo run -p sizeclasses-gen > src/sizeclasses.rs";
/// Where the generated file lives, relative to the workspace root.
pub const OUTPUT_PATH: &str = "src/sizeclasses.rs";

/// The hand-written functions and tests appended below the generated tables.
const TAIL: &str = include_str!("../template/sizeclasses_tail.rs");

/// One size class. Class 0 (large objects) is `Class { size: 0, npages: 0 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// Bytes per object.
    pub size: usize,
    /// Pages per span.
    pub npages: usize,
}

impl Class {
    /// Bytes per span.
    pub fn span_bytes(&self) -> usize {
        self.npages * PAGE_SIZE
    }

    /// Objects per span.
    pub fn objects(&self) -> usize {
        self.span_bytes() / self.size
    }

    /// Bytes at the end of a span too short for one more object.
    pub fn tail_waste(&self) -> usize {
        self.span_bytes() % self.size
    }

    /// Multiplier for dividing a span offset by `size`: `(n * m) >> 32`.
    pub fn div_magic(&self) -> u32 {
        u32::MAX / u32::try_from(self.size).expect("class size fits in u32") + 1
    }

    /// Alignment of every object of the class in an 8 KiB aligned span: the
    /// largest power of two dividing the size, capped at the page size.
    pub fn align(&self) -> usize {
        (1usize << self.size.trailing_zeros()).min(PAGE_SIZE)
    }

    /// Worst-case fraction of a span that is not used by the bytes requested:
    /// every object holds a request one byte larger than the previous class
    /// (`prev_size`), plus the tail.
    pub fn max_waste(&self, prev_size: usize) -> f64 {
        let rounding = (self.size - prev_size - 1) * self.objects();
        (rounding + self.tail_waste()) as f64 / self.span_bytes() as f64
    }
}

/// Summary numbers of a class table, for reports.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Number of classes, class 0 included.
    pub num_classes: usize,
    /// The class with the largest tail waste (as a fraction of its span).
    pub worst_tail_class: usize,
    /// That fraction.
    pub worst_tail: f64,
    /// The class with the largest max waste.
    pub worst_max_class: usize,
    /// That fraction.
    pub worst_max: f64,
    /// The largest max waste among classes of at least
    /// [`MAX_WASTE_FROM_SIZE`] bytes.
    pub worst_max_large: f64,
}

fn is_power_of_two(x: usize) -> bool {
    x.is_power_of_two()
}

/// Smallest number of pages whose span wastes at most 1/8 at the tail when
/// cut into objects of `size` bytes.
fn pages_for(size: usize) -> usize {
    let mut span = PAGE_SIZE;
    while span % size > span / TAIL_WASTE_DIV {
        span += PAGE_SIZE;
    }
    span / PAGE_SIZE
}

/// Builds the class table; index 0 is the "large object" placeholder.
pub fn make_classes() -> Vec<Class> {
    let mut classes = vec![Class { size: 0, npages: 0 }];

    // Walk candidate sizes. The step starts at 8 and grows each time the size
    // reaches a power of two: 16 from 32 bytes (so that almost every class is
    // 16-byte aligned, the common alignment of u128 and SIMD types), size/8
    // from 128 bytes (rounding up then costs at most 1/8 of the request), and
    // a flat 256 from 2 KiB, where the spans are long and the tail rule takes
    // over.
    let mut step = 8;
    let mut size = step;
    while size <= MAX_SMALL_SIZE {
        if is_power_of_two(size) {
            if size >= 2048 {
                step = 256;
            } else if size >= 128 {
                step = size / 8;
            } else if size >= 32 {
                step = 16;
            }
        }
        assert!(is_power_of_two(step), "step {step} is not a power of two");

        let npages = pages_for(size);
        let objects = npages * PAGE_SIZE / size;

        // A candidate whose spans look exactly like the previous class's
        // (same pages, same object count) adds nothing but a longer table:
        // let the previous class grow to this size instead.
        let last = classes.len() - 1;
        if last > 0 && classes[last].npages == npages && classes[last].objects() == objects {
            classes[last].size = size;
        } else {
            classes.push(Class { size, npages });
        }
        size += step;
    }

    // Grow each class to the largest size that still fits the same number of
    // objects into its span, rounded down to a multiple of LARGE_SIZE_DIV so
    // that the coarse lookup table stays exact. Example: 8448 bytes gives 6
    // objects in 7 pages; 9472 bytes also gives 6 objects in 7 pages.
    for c in classes.iter_mut().skip(1) {
        let grown = (c.span_bytes() / c.objects()) & !(LARGE_SIZE_DIV - 1);
        if grown > c.size {
            c.size = grown;
        }
    }

    // Short spans with a long tail: the shortest span of a few pages whose tail
    // is at most 1/SHORT_TAIL_DIV, if there is one.
    for c in classes.iter_mut().skip(1) {
        if c.npages < SHORT_TAIL_MAX_PAGES && c.tail_waste() * SHORT_TAIL_DIV > c.span_bytes() {
            if let Some(n) = (c.npages + 1..=SHORT_TAIL_MAX_PAGES)
                .find(|&n| (n * PAGE_SIZE) % c.size * SHORT_TAIL_DIV <= n * PAGE_SIZE)
            {
                c.npages = n;
            }
        }
    }

    // Short spans of small objects: at least MIN_SPAN_PAGES pages, in whole
    // multiples of the span chosen above.
    for c in classes.iter_mut().skip(1) {
        if c.size <= MIN_SPAN_UP_TO && c.npages < MIN_SPAN_PAGES && c.objects() < 256 {
            c.npages *= MIN_SPAN_PAGES.div_ceil(c.npages);
        }
    }

    assert_eq!(
        classes.len(),
        EXPECTED_NUM_CLASSES,
        "the number of size classes changed; update EXPECTED_NUM_CLASSES if that is intended"
    );
    classes
}

/// Reference answer, by linear search: the smallest class (never 0) whose
/// size is at least `size` (0 counts as 1) and a multiple of `align`, or 0
/// when there is none or `align` exceeds the page alignment of spans.
pub fn brute_force_class(classes: &[Class], size: usize, align: usize) -> usize {
    if align > PAGE_SIZE {
        return 0;
    }
    let size = size.max(1);
    (1..classes.len())
        .find(|&i| classes[i].size >= size && classes[i].size % align == 0)
        .unwrap_or(0)
}

/// `SIZE_TO_CLASS8[i]`: the class for sizes in `(8 * (i - 1), 8 * i]`, and
/// for size 0 the first class.
pub fn size_to_class8(classes: &[Class]) -> Vec<u8> {
    (0..=SMALL_SIZE_MAX / SMALL_SIZE_DIV)
        .map(|i| to_u8(brute_force_class(classes, i * SMALL_SIZE_DIV, 1)))
        .collect()
}

/// `SIZE_TO_CLASS128[i]`: the class for sizes in
/// `(1024 + 128 * (i - 1), 1024 + 128 * i]`.
pub fn size_to_class128(classes: &[Class]) -> Vec<u8> {
    (0..=(MAX_SMALL_SIZE - SMALL_SIZE_MAX) / LARGE_SIZE_DIV)
        .map(|i| {
            to_u8(brute_force_class(
                classes,
                SMALL_SIZE_MAX + i * LARGE_SIZE_DIV,
                1,
            ))
        })
        .collect()
}

/// `ALIGN_CLASS_NEXT[k][c]`: the first class at or after `c` whose size is a
/// multiple of `1 << k`, or 0 if none (and 0 for `c == 0`).
pub fn align_class_next(classes: &[Class]) -> Vec<Vec<u8>> {
    (0..=PAGE_SHIFT)
        .map(|k| {
            let align = 1usize << k;
            (0..classes.len())
                .map(|c| {
                    if c == 0 {
                        return 0;
                    }
                    let next = (c..classes.len()).find(|&j| classes[j].size % align == 0);
                    to_u8(next.unwrap_or(0))
                })
                .collect()
        })
        .collect()
}

fn to_u8(x: usize) -> u8 {
    u8::try_from(x).expect("class index fits in u8")
}

/// The lookup of `size_to_class` in the generated file, replayed on the
/// tables being generated.
fn lookup(t8: &[u8], t128: &[u8], size: usize) -> usize {
    if size <= SMALL_SIZE_MAX {
        t8[size.div_ceil(SMALL_SIZE_DIV)] as usize
    } else if size <= MAX_SMALL_SIZE {
        t128[(size - SMALL_SIZE_MAX).div_ceil(LARGE_SIZE_DIV)] as usize
    } else {
        0
    }
}

/// The lookup of `class_for_layout` in the generated file, replayed.
fn lookup_aligned(
    classes: &[Class],
    t8: &[u8],
    t128: &[u8],
    next: &[Vec<u8>],
    size: usize,
    align: usize,
) -> usize {
    if align > PAGE_SIZE {
        return 0;
    }
    let c = lookup(t8, t128, size);
    if classes[c].size % align == 0 {
        return c;
    }
    next[align.trailing_zeros() as usize][c] as usize
}

/// Checks every property that the allocator relies on; panics on the first
/// one that fails. Returns summary numbers.
pub fn check(classes: &[Class]) -> Stats {
    assert_eq!(
        classes[0],
        Class { size: 0, npages: 0 },
        "class 0 must be the large-object placeholder"
    );
    assert!(classes.len() <= 256, "class indices must fit in u8");
    for (i, c) in classes.iter().enumerate().skip(1) {
        assert!(
            c.objects() <= MAX_SPAN_OBJECTS,
            "class {i}: {} objects per span, more than {MAX_SPAN_OBJECTS}",
            c.objects()
        );
    }
    assert_eq!(
        classes[1].size, SMALL_SIZE_DIV,
        "the first class holds 8 bytes"
    );
    assert_eq!(
        classes[classes.len() - 1].size,
        MAX_SMALL_SIZE,
        "the last class holds MAX_SMALL_SIZE"
    );
    // With the last class a multiple of the page size, every alignment up to
    // the page size has a class for every small size.
    assert_eq!(MAX_SMALL_SIZE % PAGE_SIZE, 0);

    let mut prev = 0;
    let mut stats = Stats {
        num_classes: classes.len(),
        worst_tail_class: 0,
        worst_tail: 0.0,
        worst_max_class: 0,
        worst_max: 0.0,
        worst_max_large: 0.0,
    };
    for (i, c) in classes.iter().enumerate().skip(1) {
        let span = c.span_bytes();
        assert!(c.size > prev, "class {i}: sizes must increase strictly");
        assert_eq!(
            c.size % SMALL_SIZE_DIV,
            0,
            "class {i}: size must be a multiple of {SMALL_SIZE_DIV}"
        );
        if c.size > SMALL_SIZE_MAX {
            assert_eq!(
                c.size % LARGE_SIZE_DIV,
                0,
                "class {i}: size must be a multiple of {LARGE_SIZE_DIV}"
            );
        }
        if c.size >= 32 {
            assert_eq!(
                c.size % 16,
                0,
                "class {i}: sizes from 32 bytes on must be multiples of 16"
            );
        }
        assert!(
            c.size <= u16::MAX as usize,
            "class {i}: size must fit in u16"
        );
        assert!(
            (1..=u8::MAX as usize).contains(&c.npages),
            "class {i}: page count must fit in u8"
        );
        assert!(
            c.objects() >= 1 && c.objects() <= u16::MAX as usize,
            "class {i}: object count must fit in u16"
        );
        assert!(c.objects() * c.size + c.tail_waste() == span);
        assert!(
            c.tail_waste() * TAIL_WASTE_DIV <= span,
            "class {i}: tail waste {} exceeds 1/{TAIL_WASTE_DIV} of {span}",
            c.tail_waste()
        );
        // Alignment: the class's objects, at base + k * size with an 8 KiB
        // aligned base, are aligned to c.align() and no more (below a page).
        let a = c.align();
        for k in [0, 1, c.objects() / 2, c.objects() - 1] {
            let off = k * c.size;
            assert_eq!(off % a, 0, "class {i}: object {k} misaligned");
        }
        if a < PAGE_SIZE {
            assert_ne!(
                c.size % (2 * a),
                0,
                "class {i}: alignment {a} is not the largest"
            );
        }

        // Division by multiply-and-shift must be exact over the whole span,
        // one past the end included. Exhaustive: at most a few hundred
        // thousand offsets per class.
        let m = c.div_magic() as u64;
        for n in 0..=span {
            let q = ((n as u64 * m) >> 32) as usize;
            assert_eq!(q, n / c.size, "class {i}: magic {m} wrong for offset {n}");
        }

        let tail = c.tail_waste() as f64 / span as f64;
        if tail > stats.worst_tail {
            stats.worst_tail = tail;
            stats.worst_tail_class = i;
        }
        let max = c.max_waste(prev);
        if max > stats.worst_max {
            stats.worst_max = max;
            stats.worst_max_class = i;
        }
        if c.size >= MAX_WASTE_FROM_SIZE {
            assert!(
                max <= MAX_WASTE_BOUND,
                "class {i}: max waste {:.2}% exceeds {:.2}%",
                100.0 * max,
                100.0 * MAX_WASTE_BOUND
            );
            stats.worst_max_large = stats.worst_max_large.max(max);
        }
        prev = c.size;
    }

    // The lookup tables, used exactly as the runtime uses them, agree with a
    // linear search for every size and every power-of-two alignment.
    let t8 = size_to_class8(classes);
    let t128 = size_to_class128(classes);
    let next = align_class_next(classes);
    for size in 0..=MAX_SMALL_SIZE + LARGE_SIZE_DIV {
        let want = brute_force_class(classes, size, 1);
        assert_eq!(
            lookup(&t8, &t128, size),
            want,
            "size {size}: lookup tables disagree"
        );
        if size <= MAX_SMALL_SIZE {
            assert_ne!(want, 0, "size {size}: no class");
        }
        for k in 0..=PAGE_SHIFT + 1 {
            let align = 1usize << k;
            let want = brute_force_class(classes, size, align);
            let got = lookup_aligned(classes, &t8, &t128, &next, size, align);
            assert_eq!(
                got, want,
                "size {size} align {align}: aligned lookup disagrees"
            );
            let none = size > MAX_SMALL_SIZE || align > PAGE_SIZE;
            assert_eq!(
                want == 0,
                none,
                "size {size} align {align}: unexpected (no) class"
            );
        }
    }
    // The case that motivated the alignment table: 48 bytes aligned to 16
    // must not be rounded to 64.
    assert_eq!(classes[brute_force_class(classes, 48, 16)].size, 48);

    stats
}

/// Builds and checks the classes and returns the complete text of
/// `src/sizeclasses.rs`.
pub fn generate() -> String {
    generate_with_stats().0
}

/// Like [`generate`], also returning the summary numbers of the classes.
pub fn generate_with_stats() -> (String, Stats) {
    let classes = make_classes();
    let stats = check(&classes);
    (render(&classes, &stats), stats)
}

fn render(classes: &[Class], stats: &Stats) -> String {
    let mut o = String::new();
    let w = &mut o;
    line(
        w,
        &format!("// Code generated by `{REGENERATE_COMMAND}`; DO NOT EDIT."),
    );
    line(w, "//");
    line(
        w,
        "// Generated by the workspace crate tools/sizeclasses-gen: the tables come from",
    );
    line(
        w,
        "// its src/lib.rs, the hand-written functions and tests at the end of this file",
    );
    line(
        w,
        "// from its template/sizeclasses_tail.rs. Change those and regenerate, from the",
    );
    line(w, "// workspace root:");
    line(w, "//");
    line(w, &format!("//     {REGENERATE_COMMAND}"));
    line(w, "//");
    line(
        w,
        "// `cargo test -p sizeclasses-gen` fails while this file is out of date.",
    );
    line(w, "");
    line(w, "//! Small-object size classes.");
    line(w, "//!");
    line(
        w,
        "//! A request of at most [`MAX_SMALL_SIZE`] bytes is rounded up to the object",
    );
    line(
        w,
        "//! size of a class `1..NUM_CLASSES`; class 0 means \"large object, no class\".",
    );
    line(
        w,
        "//! Each class has a span length (a number of 8 KiB pages, spans being 8 KiB",
    );
    line(
        w,
        "//! aligned) chosen so that the span's tail, too short for one more object,",
    );
    line(
        w,
        "//! is at most 1/8 of the span. Object `k` of a span of class `c` starts at",
    );
    line(
        w,
        "//! `span_base + k * CLASS_TO_SIZE[c]`, so it is aligned to the largest power",
    );
    line(w, "//! of two dividing the size (8 KiB at most).");
    line(w, "//!");
    line(
        w,
        "//! Columns below: `tail waste` is the unusable end of each span in bytes;",
    );
    line(
        w,
        "//! `max waste` is the worst fraction of a span not holding requested bytes,",
    );
    line(
        w,
        "//! when every object holds a request one byte larger than the previous class.",
    );
    line(w, "");

    // The class table, as a comment.
    line(
        w,
        "// class  bytes/obj  bytes/span  objects  tail waste  max waste",
    );
    let mut prev = 0;
    for (i, c) in classes.iter().enumerate().skip(1) {
        line(
            w,
            &format!(
                "// {:5}  {:9}  {:10}  {:7}  {:10}  {:8.2}%",
                i,
                c.size,
                c.span_bytes(),
                c.objects(),
                c.tail_waste(),
                100.0 * c.max_waste(prev)
            ),
        );
        prev = c.size;
    }
    line(w, "//");
    line(
        w,
        &format!(
            "// Largest tail waste: {:.2}% of the span (class {}).",
            100.0 * stats.worst_tail,
            stats.worst_tail_class
        ),
    );
    line(
        w,
        &format!(
            "// Largest max waste: {:.2}% (class {}); {:.2}% from {} bytes on (checked <= {:.2}%).",
            100.0 * stats.worst_max,
            stats.worst_max_class,
            100.0 * stats.worst_max_large,
            MAX_WASTE_FROM_SIZE,
            100.0 * MAX_WASTE_BOUND
        ),
    );
    line(w, "");

    // Which classes can serve which alignment.
    line(w, "// alignment  first class  bytes/obj  classes");
    for k in 0..=PAGE_SHIFT {
        let align = 1usize << k;
        let qualifying: Vec<usize> = (1..classes.len())
            .filter(|&i| classes[i].size % align == 0)
            .collect();
        let first = qualifying[0];
        line(
            w,
            &format!(
                "// {:9}  {:11}  {:9}  {:7}",
                align,
                first,
                classes[first].size,
                qualifying.len()
            ),
        );
    }
    line(w, "");

    // Constants.
    line(
        w,
        "/// Number of size classes, class 0 (large objects) included.",
    );
    line(
        w,
        &format!("pub(crate) const NUM_CLASSES: usize = {};", classes.len()),
    );
    line(
        w,
        "/// Largest request served by a size class; bigger ones are large objects.",
    );
    line(
        w,
        &format!("pub(crate) const MAX_SMALL_SIZE: usize = {MAX_SMALL_SIZE};"),
    );
    line(w, "/// Granularity of [`SIZE_TO_CLASS8`].");
    line(
        w,
        &format!("pub(crate) const SMALL_SIZE_DIV: usize = {SMALL_SIZE_DIV};"),
    );
    line(
        w,
        "/// Largest size looked up in [`SIZE_TO_CLASS8`]; above it, [`SIZE_TO_CLASS128`].",
    );
    line(
        w,
        &format!("pub(crate) const SMALL_SIZE_MAX: usize = {SMALL_SIZE_MAX};"),
    );
    line(w, "/// Granularity of [`SIZE_TO_CLASS128`].");
    line(
        w,
        &format!("pub(crate) const LARGE_SIZE_DIV: usize = {LARGE_SIZE_DIV};"),
    );
    line(
        w,
        "/// Largest alignment a class can provide: spans are only page aligned.",
    );
    line(w, "/// Larger alignments go to the large-object path.");
    line(w, "pub(crate) const MAX_CLASS_ALIGN: usize = PAGE_SIZE;");
    line(
        w,
        "/// log2 of the page size the tables were computed for (the span page size).",
    );
    line(w, &format!("const PAGE_SHIFT: u32 = {PAGE_SHIFT};"));
    line(
        w,
        "/// The page size the tables were computed for (the span page size).",
    );
    line(w, "const PAGE_SIZE: usize = 1 << PAGE_SHIFT;");
    line(w, "");

    // Per-class tables.
    let per_class = |w: &mut String, doc: &[&str], name: &str, ty: &str, vals: Vec<String>| {
        for d in doc {
            line(w, &format!("/// {d}"));
        }
        line(w, "#[rustfmt::skip]");
        line(
            w,
            &format!("pub(crate) static {name}: [{ty}; NUM_CLASSES] = ["),
        );
        rows(w, &vals, 8, true);
        line(w, "];");
        line(w, "");
    };
    per_class(
        w,
        &["Bytes per object of each class (0 for class 0)."],
        "CLASS_TO_SIZE",
        "u16",
        classes.iter().map(|c| c.size.to_string()).collect(),
    );
    per_class(
        w,
        &["Pages (8 KiB) per span of each class."],
        "CLASS_TO_NPAGES",
        "u8",
        classes.iter().map(|c| c.npages.to_string()).collect(),
    );
    per_class(
        w,
        &["Objects per span of each class: `npages * 8192 / size`."],
        "CLASS_TO_NOBJS",
        "u16",
        classes
            .iter()
            .map(|c| if c.size == 0 { 0 } else { c.objects() }.to_string())
            .collect(),
    );
    per_class(
        w,
        &[
            "`u32::MAX / size + 1` for each class (0 for class 0): `offset / size ==",
            "(offset * magic) >> 32` for every offset in `0..=span bytes` (checked by the",
            "generator for every offset).",
        ],
        "CLASS_TO_DIVMAGIC",
        "u32",
        classes
            .iter()
            .map(|c| if c.size == 0 { 0 } else { c.div_magic() }.to_string())
            .collect(),
    );

    // Size lookups.
    let t8 = size_to_class8(classes);
    line(
        w,
        "/// `SIZE_TO_CLASS8[(size + 7) / 8]` is the class of `size` for `size <= SMALL_SIZE_MAX`",
    );
    line(w, "/// (index 0, size 0, gives class 1).");
    line(w, "#[rustfmt::skip]");
    line(
        w,
        "pub(crate) static SIZE_TO_CLASS8: [u8; SMALL_SIZE_MAX / SMALL_SIZE_DIV + 1] = [",
    );
    rows(
        w,
        &t8.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        16,
        true,
    );
    line(w, "];");
    line(w, "");
    let t128 = size_to_class128(classes);
    line(
        w,
        "/// `SIZE_TO_CLASS128[(size - SMALL_SIZE_MAX + 127) / 128]` is the class of `size` for",
    );
    line(w, "/// `SMALL_SIZE_MAX < size <= MAX_SMALL_SIZE`.");
    line(w, "#[rustfmt::skip]");
    line(
        w,
        "pub(crate) static SIZE_TO_CLASS128: [u8; (MAX_SMALL_SIZE - SMALL_SIZE_MAX) / LARGE_SIZE_DIV + 1] = [",
    );
    rows(
        w,
        &t128.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        16,
        true,
    );
    line(w, "];");
    line(w, "");

    // Alignment table.
    let next = align_class_next(classes);
    line(
        w,
        "/// `ALIGN_CLASS_NEXT[k][c]`: the first class at or after class `c` whose object size is",
    );
    line(
        w,
        "/// a multiple of `1 << k`, or 0 if there is none (always 0 for `c == 0`). Rows are",
    );
    line(w, "/// alignments 1 to 8192 bytes.");
    line(w, "#[rustfmt::skip]");
    line(
        w,
        "pub(crate) static ALIGN_CLASS_NEXT: [[u8; NUM_CLASSES]; PAGE_SHIFT as usize + 1] = [",
    );
    for (k, row) in next.iter().enumerate() {
        line(w, &format!("    // align {}", 1usize << k));
        line(w, "    [");
        let vals: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        let mut inner = String::new();
        rows(&mut inner, &vals, 16, false);
        for l in inner.lines() {
            line(w, &format!("    {l}"));
        }
        line(w, "    ],");
    }
    line(w, "];");
    line(w, "");

    o.push_str(TAIL);
    o
}

fn line(w: &mut String, s: &str) {
    w.push_str(s);
    w.push('\n');
}

/// Writes `vals` as indented rows of `per_row` right-aligned entries, each row
/// followed (when `index_comments`) by the range of indices it holds.
fn rows(w: &mut String, vals: &[String], per_row: usize, index_comments: bool) {
    let width = vals.iter().map(|v| v.len()).max().unwrap_or(0);
    for (r, chunk) in vals.chunks(per_row).enumerate() {
        let mut s = String::from("    ");
        for (j, v) in chunk.iter().enumerate() {
            if j > 0 {
                s.push(' ');
            }
            write!(s, "{v:>width$},").unwrap();
        }
        if index_comments {
            let first = r * per_row;
            let pad = (per_row - chunk.len()) * (width + 2);
            write!(s, "{:pad$} // {}..={}", "", first, first + chunk.len() - 1).unwrap();
        }
        line(w, &s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Go runtime's classes (src/runtime/sizeclasses.go, generated by
    /// mksizeclasses.go with the same parameters): object sizes and pages.
    #[rustfmt::skip]
    const GO_SIZES: [usize; 68] = [
        0, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256,
        288, 320, 352, 384, 416, 448, 480, 512, 576, 640, 704, 768, 896, 1024, 1152, 1280,
        1408, 1536, 1792, 2048, 2304, 2688, 3072, 3200, 3456, 4096, 4864, 5376, 6144, 6528,
        6784, 6912, 8192, 9472, 9728, 10240, 10880, 12288, 13568, 14336, 16384, 18432,
        19072, 20480, 21760, 24576, 27264, 28672, 32768,
    ];
    #[rustfmt::skip]
    const GO_NPAGES: [usize; 68] = [
        0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1, 2, 1, 3, 2, 3, 1, 3, 2, 3, 4, 5, 6, 1, 7, 6, 5, 4,
        3, 5, 7, 2, 9, 7, 5, 8, 3, 10, 7, 4,
    ];

    /// The classes whose spans the short-tail rule lengthens, and their pages.
    const SHORT_TAIL_NPAGES: [(usize, usize); 7] = [
        (416, 2),
        (640, 2),
        (704, 2),
        (768, 2),
        (1280, 3),
        (1408, 3),
        (1536, 3),
    ];

    #[test]
    fn classes_match_go_runtime_but_for_short_tails_and_minimum_spans() {
        let classes = make_classes();
        let sizes: Vec<usize> = classes.iter().map(|c| c.size).collect();
        assert_eq!(sizes, GO_SIZES);
        for (i, c) in classes.iter().enumerate() {
            let want = SHORT_TAIL_NPAGES
                .iter()
                .find(|&&(size, _)| size == c.size)
                .map_or(GO_NPAGES[i], |&(_, n)| n);
            let go_objects = want * PAGE_SIZE / c.size.max(1);
            if i > 0 && c.size <= MIN_SPAN_UP_TO && want < MIN_SPAN_PAGES && go_objects < 256 {
                // The minimum span: a multiple of the span the rules above chose.
                assert!(
                    c.npages >= MIN_SPAN_PAGES && c.npages % want == 0,
                    "class {i}"
                );
                assert!(
                    c.npages < 2 * MIN_SPAN_PAGES,
                    "class {i}: longer than needed"
                );
                continue;
            }
            assert_eq!(c.npages, want, "class {i} ({} B)", c.size);
            if c.npages <= SHORT_TAIL_MAX_PAGES && c.npages != GO_NPAGES[i] {
                assert!(c.tail_waste() * SHORT_TAIL_DIV <= c.span_bytes());
            }
        }
    }

    #[test]
    fn stats_are_reported() {
        let (text, s) = generate_with_stats();
        assert_eq!(s.num_classes, EXPECTED_NUM_CLASSES);
        assert!(s.worst_tail <= 1.0 / TAIL_WASTE_DIV as f64);
        assert!(s.worst_max_large <= MAX_WASTE_BOUND);
        assert!(text.starts_with("// Code generated by"));
        assert!(text.contains("// class  bytes/obj  bytes/span  objects  tail waste  max waste\n"));
    }

    #[test]
    #[should_panic(expected = "tail waste")]
    fn check_rejects_a_large_tail() {
        let mut classes = make_classes();
        // 1408 bytes in one page leaves 1152 bytes, more than 1/8 of 8192.
        let c = classes.iter_mut().find(|c| c.size == 1408).unwrap();
        c.npages = 1;
        check(&classes);
    }

    #[test]
    #[should_panic(expected = "increase strictly")]
    fn check_rejects_unordered_sizes() {
        let mut classes = make_classes();
        classes.swap(10, 11);
        check(&classes);
    }

    #[test]
    #[should_panic(expected = "multiple of 128")]
    fn check_rejects_sizes_the_coarse_table_cannot_serve() {
        let mut classes = make_classes();
        let c = classes.iter_mut().find(|c| c.size == 1152).unwrap();
        c.size = 1160;
        check(&classes);
    }
}
