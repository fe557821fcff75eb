// ---------------------------------------------------------------------------
// Hand-written part. Everything from here to the end of the file is copied
// verbatim from tools/sizeclasses-gen/template/sizeclasses_tail.rs: edit it
// there, then regenerate.
// ---------------------------------------------------------------------------

/// log2 of [`SMALL_SIZE_DIV`].
const SMALL_SIZE_SHIFT: u32 = SMALL_SIZE_DIV.trailing_zeros();
/// log2 of [`LARGE_SIZE_DIV`].
const LARGE_SIZE_SHIFT: u32 = LARGE_SIZE_DIV.trailing_zeros();

// What the lookups below rely on; the generator checks the table contents.
const _: () = {
    assert!(SMALL_SIZE_DIV.is_power_of_two());
    assert!(LARGE_SIZE_DIV.is_power_of_two());
    assert!(SMALL_SIZE_MAX % SMALL_SIZE_DIV == 0);
    assert!((MAX_SMALL_SIZE - SMALL_SIZE_MAX) % LARGE_SIZE_DIV == 0);
    // Class indices are u8.
    assert!(NUM_CLASSES <= 256);
    // ALIGN_CLASS_NEXT has one row per alignment 1..=MAX_CLASS_ALIGN.
    assert!(MAX_CLASS_ALIGN == 1 << PAGE_SHIFT);
};

/// Bytes per object of `class`; 0 for class 0 and for indices past the table.
#[inline]
pub(crate) fn class_size(class: u8) -> usize {
    match CLASS_TO_SIZE.get(class as usize) {
        Some(&size) => size as usize,
        None => 0,
    }
}

/// The size class for a request of `size` bytes: the smallest class whose
/// objects hold at least `size` bytes, or 0 ("large object") when `size`
/// exceeds [`MAX_SMALL_SIZE`].
///
/// Size 0 gets class 1, the same as size 1, so a caller may pass a zero size
/// straight through; it still has to treat the result as a real allocation.
///
/// One compare and one table load: [`SIZE_TO_CLASS`] has an entry for every
/// 8-byte step up to [`MAX_SMALL_SIZE`] (4 KiB of table, expanded at compile
/// time from Go's two tables). Looking up sizes above [`SMALL_SIZE_MAX`] in
/// [`SIZE_TO_CLASS128`] instead cost a second compare and a shift by a
/// variable amount on every allocation and free (instructions per call in the
/// churn benchmark: docs/benchmarks.md, "Fast-path instruction counts").
#[inline]
pub(crate) fn size_to_class(size: usize) -> u8 {
    if size <= MAX_SMALL_SIZE {
        common_class(size) as u8
    } else {
        0
    }
}

/// `SIZE_TO_CLASS[(size + 7) / 8]` is the class of `size` for `size <=
/// MAX_SMALL_SIZE`: [`SIZE_TO_CLASS8`] below [`SMALL_SIZE_MAX`], then
/// [`SIZE_TO_CLASS128`] repeated over each 128-byte step (its classes are
/// multiples of 128, so a size rounded up to 8 bytes has the class of the size
/// rounded up to 128).
pub(crate) static SIZE_TO_CLASS: [u8; MAX_SMALL_SIZE / SMALL_SIZE_DIV + 1] = {
    let mut t = [0u8; MAX_SMALL_SIZE / SMALL_SIZE_DIV + 1];
    let mut i = 0;
    while i < t.len() {
        let size = i * SMALL_SIZE_DIV;
        t[i] = if size <= SMALL_SIZE_MAX {
            SIZE_TO_CLASS8[i]
        } else {
            SIZE_TO_CLASS128[(size - SMALL_SIZE_MAX + (LARGE_SIZE_DIV - 1)) >> LARGE_SIZE_SHIFT]
        };
        i += 1;
    }
    t
};

// `common_class` relies on it: every size up to `MAX_SMALL_SIZE` has a class.
const _: () = {
    let mut i = 0;
    while i < SIZE_TO_CLASS.len() {
        assert!(SIZE_TO_CLASS[i] != 0);
        i += 1;
    }
};

/// Whether a request of `size` bytes aligned to `align` is of the common kind: a
/// small object with an alignment of at most 8, whose class is `common_class(size)`
/// (as `class_for_layout` would say). The allocation and free fast paths test this
/// first, so that they need neither `class_for_layout`'s alignment cases nor its
/// "large object" answer (class 0).
#[inline(always)]
pub(crate) fn is_common(size: usize, align: usize) -> bool {
    align <= 8 && size <= MAX_SMALL_SIZE
}

/// The class of a request of `size <= MAX_SMALL_SIZE` bytes (of a common request,
/// `is_common(size, _)`): never 0.
#[inline(always)]
pub(crate) fn common_class(size: usize) -> usize {
    debug_assert!(size <= MAX_SMALL_SIZE);
    // size <= 32768, so the index is at most (32768 + 7) >> 3 == 4096, the last
    // entry: in range, and the addition cannot overflow.
    SIZE_TO_CLASS[(size + (SMALL_SIZE_DIV - 1)) >> SMALL_SIZE_SHIFT] as usize
}

// `class_for_layout` relies on it: every class size is a multiple of 8.
const _: () = {
    let mut c = 0;
    while c < NUM_CLASSES {
        assert!(CLASS_TO_SIZE[c] % 8 == 0);
        c += 1;
    }
};

/// The size class for a request of `size` bytes aligned to `align`: the
/// smallest class whose object size is at least `size` and a multiple of
/// `align`, or 0 ("large object") when there is none, that is when `size`
/// exceeds [`MAX_SMALL_SIZE`] or `align` exceeds [`MAX_CLASS_ALIGN`] (8 KiB;
/// spans are only page aligned). For any smaller alignment a class always
/// exists, since the last class (32 KiB) is a multiple of 8 KiB.
///
/// Objects of a class sit at `span_base + k * size` with an 8 KiB aligned
/// `span_base`, so a size that is a multiple of `align` aligns every object.
/// Picking the *smallest* such class matters: 48 bytes aligned to 16 gets
/// the 48-byte class, not the 64-byte one.
///
/// `align` must be a power of two, as `Layout` guarantees; for any other
/// value the answer is unspecified, but the call still never panics (not
/// even in debug builds: the allocator must not unwind). Size 0 is treated as
/// 1, as in [`size_to_class`].
///
/// O(1): alignments up to 8 are met by every class, 16 by every class but
/// the 8- and 24-byte ones, so usually the class of `size` is the answer;
/// otherwise one more load from [`ALIGN_CLASS_NEXT`].
#[inline]
pub(crate) fn class_for_layout(size: usize, align: usize) -> u8 {
    // Every class size is a multiple of 8: the common alignments need no check (one
    // compare instead of a table load on the allocation and free fast paths).
    if align <= 8 {
        return size_to_class(size);
    }
    if align > MAX_CLASS_ALIGN {
        return 0;
    }
    let class = size_to_class(size);
    // A size too large gives class 0, whose size 0 passes any mask: 0 is
    // returned, which is right.
    if class_size(class) & align.wrapping_sub(1) == 0 {
        return class;
    }
    // align.trailing_zeros() is at most 13 for a power of two <= 8192; for a
    // zero `align` (not a valid alignment) it is 64 and the lookup gives 0.
    match ALIGN_CLASS_NEXT.get(align.trailing_zeros() as usize) {
        Some(row) => match row.get(class as usize) {
            Some(&next) => next,
            None => 0,
        },
        None => 0,
    }
}

/// Index of the object of `class` that contains byte `offset` of its span,
/// that is `offset / CLASS_TO_SIZE[class]`, computed as a multiply and a
/// shift: `(offset * CLASS_TO_DIVMAGIC[class]) >> 32`.
///
/// Exact for every `offset` in `0..=npages * 8192` (the generator checks each
/// one); larger offsets give unspecified results. Class 0 and indices past
/// the table give 0. Never panics.
#[inline]
pub(crate) fn obj_index(class: u8, offset: usize) -> usize {
    obj_index_by(div_magic(class), offset)
}

/// `CLASS_TO_DIVMAGIC[class]` (0 for an out-of-range class), for callers that divide
/// many offsets of one class (`obj_index_by`).
#[inline]
pub(crate) fn div_magic(class: u8) -> u64 {
    match CLASS_TO_DIVMAGIC.get(class as usize) {
        Some(&magic) => magic as u64,
        None => 0,
    }
}

/// `obj_index` with the class's `div_magic` looked up once by the caller.
#[inline]
pub(crate) fn obj_index_by(magic: u64, offset: usize) -> usize {
    ((offset as u64).wrapping_mul(magic) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class indices 1..NUM_CLASSES.
    fn classes() -> impl Iterator<Item = u8> {
        1..NUM_CLASSES as u8
    }

    fn span_bytes(class: u8) -> usize {
        CLASS_TO_NPAGES[class as usize] as usize * PAGE_SIZE
    }

    fn nobjs(class: u8) -> usize {
        CLASS_TO_NOBJS[class as usize] as usize
    }

    /// Smallest class, by linear search, whose size is at least `size` and a
    /// multiple of `align`; 0 if none.
    fn brute_force(size: usize, align: usize) -> u8 {
        if align > MAX_CLASS_ALIGN {
            return 0;
        }
        let size = size.max(1);
        let found = CLASS_TO_SIZE.iter().enumerate().skip(1).find(|&(_, &s)| {
            let s = s as usize;
            s >= size && s % align == 0
        });
        found.map_or(0, |(c, _)| c as u8)
    }

    #[test]
    fn tables_are_consistent() {
        assert_eq!(CLASS_TO_SIZE[0], 0);
        assert_eq!(CLASS_TO_NPAGES[0], 0);
        assert_eq!(CLASS_TO_NOBJS[0], 0);
        assert_eq!(CLASS_TO_DIVMAGIC[0], 0);
        assert_eq!(class_size(1), 8);
        assert_eq!(class_size(NUM_CLASSES as u8 - 1), MAX_SMALL_SIZE);
        assert_eq!(class_size(NUM_CLASSES as u8), 0);
        for c in classes() {
            let size = class_size(c);
            assert!(size > class_size(c - 1), "class {c}: sizes must increase");
            assert_eq!(size % SMALL_SIZE_DIV, 0, "class {c}");
            assert_eq!(nobjs(c), span_bytes(c) / size, "class {c}");
            let magic = CLASS_TO_DIVMAGIC[c as usize];
            assert_eq!(magic, u32::MAX / size as u32 + 1, "class {c}");
        }
    }

    #[test]
    fn common_requests_take_the_class_for_layout() {
        for size in 0..=MAX_SMALL_SIZE + 1 {
            for align in [1, 2, 4, 8, 16] {
                if is_common(size, align) {
                    assert_eq!(
                        common_class(size),
                        class_for_layout(size, align) as usize,
                        "size {size} align {align}"
                    );
                } else {
                    assert!(size > MAX_SMALL_SIZE || align > 8);
                }
            }
        }
    }

    #[test]
    fn size_to_class_matches_brute_force() {
        for size in 1..=MAX_SMALL_SIZE {
            assert_eq!(size_to_class(size), brute_force(size, 1), "size {size}");
        }
        assert_eq!(size_to_class(0), 1);
        for size in [
            MAX_SMALL_SIZE + 1,
            MAX_SMALL_SIZE + 128,
            1 << 20,
            usize::MAX,
        ] {
            assert_eq!(size_to_class(size), 0, "size {size}");
        }
    }

    #[test]
    fn class_for_layout_matches_brute_force() {
        for size in 1..=MAX_SMALL_SIZE {
            for shift in 0..=13 {
                let align = 1usize << shift;
                let got = class_for_layout(size, align);
                assert_eq!(got, brute_force(size, align), "size {size} align {align}");
                // A class exists for every small size and alignment <= 8 KiB.
                assert_ne!(got, 0, "size {size} align {align}");
                let s = class_size(got);
                assert!(s >= size && s % align == 0, "size {size} align {align}");
            }
            assert_eq!(class_for_layout(size, 16384), 0, "size {size}");
        }
        for size in [MAX_SMALL_SIZE + 1, 1 << 20, usize::MAX] {
            assert_eq!(class_for_layout(size, 8), 0, "size {size}");
        }
        assert_eq!(class_for_layout(0, 1), 1);
        assert_eq!(class_for_layout(1, usize::MAX / 2 + 1), 0);
    }

    #[test]
    fn layout_48_align_16_uses_the_48_byte_class() {
        let c = class_for_layout(48, 16);
        assert_eq!(class_size(c), 48);
        assert_eq!(c, size_to_class(48));
    }

    #[test]
    fn obj_index_is_exact_division() {
        for c in classes() {
            let size = class_size(c);
            for offset in 0..span_bytes(c) {
                assert_eq!(
                    obj_index(c, offset),
                    offset / size,
                    "class {c} offset {offset}"
                );
            }
        }
        assert_eq!(obj_index(0, 12345), 0);
        assert_eq!(obj_index(u8::MAX, 12345), 0);
    }

    #[test]
    fn invalid_inputs_do_not_panic() {
        for align in [0, 3, 24, 4095, 8191, usize::MAX] {
            for size in [0, 1, 48, 1000, 5000, MAX_SMALL_SIZE, usize::MAX] {
                let _ = class_for_layout(size, align);
            }
        }
        for class in [0, 1, NUM_CLASSES as u8 - 1, NUM_CLASSES as u8, u8::MAX] {
            for offset in [0, 1 << 20, 1 << 40, usize::MAX] {
                let _ = obj_index(class, offset);
            }
            let _ = class_size(class);
        }
    }

    #[test]
    fn tail_waste_is_at_most_an_eighth() {
        for c in classes() {
            let span = span_bytes(c);
            let tail = span % class_size(c);
            assert!(tail * 8 <= span, "class {c}: tail {tail} of {span}");
        }
    }

    #[test]
    fn objects_are_aligned_to_their_size() {
        // Any 8 KiB aligned address stands for a span base.
        let base = 0x7f12_3456_0000usize;
        assert_eq!(base % PAGE_SIZE, 0);
        for c in classes() {
            let size = class_size(c);
            let align = (1usize << size.trailing_zeros()).min(PAGE_SIZE);
            let n = nobjs(c);
            for k in [0, 1, n / 2, n - 1].into_iter().filter(|&k| k < n) {
                let addr = base + k * size;
                assert_eq!(addr % align, 0, "class {c} object {k}");
                assert!(addr + size <= base + span_bytes(c), "class {c} object {k}");
            }
            if align < PAGE_SIZE {
                // The alignment is the largest one: object 1 is not aligned
                // to twice as much.
                assert_ne!((base + size) % (2 * align), 0, "class {c}");
            }
        }
    }
}
