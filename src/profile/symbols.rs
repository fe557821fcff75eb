//! Symbol resolution of a profile's stacks, when a profile is written (never while
//! sampling): `backtrace::resolve` (DWARF through gimli where the binary has debug
//! information, the symbol table otherwise), inlined calls expanded. The allocator's
//! own frames (spanheap's, the global-allocator shims, the C entry points of the
//! preload) and then those of Rust's `alloc` crate are trimmed off the leaf end, and
//! buckets whose stacks are then the same are merged (a bucket's stack differs by the
//! allocator path it took: through `realloc`, `alloc_zeroed` ...).

use std::collections::HashMap;

use super::{Profile, Values};

/// One function of a location: a function that the address is in, or one inlined there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The demangled name, without the hash (`?` if unknown).
    pub function: String,
    /// Source file, if the binary has debug information.
    pub file: Option<String>,
    /// Source line, likewise.
    pub line: Option<u32>,
}

/// A return address and the functions it is in: `frames[0]` the innermost (inlined),
/// the last the function the code belongs to (pprof's `Location` and its `Line`s).
#[derive(Clone, Debug)]
pub struct Location {
    /// The address looked up: the return address minus one (in the call instruction).
    pub addr: usize,
    pub frames: Vec<Frame>,
}

/// A stack of a resolved profile: indices into [`Symbolized::locations`], leaf first,
/// and its values (scaled for sampling) and sampled counts.
#[derive(Clone, Debug)]
pub struct Stack {
    pub locations: Vec<usize>,
    pub values: Values,
    /// Sampled allocations and in-use objects (unscaled) and the average object size.
    pub sampled_allocs: u64,
    pub sampled_inuse: u64,
    pub avg_size: u64,
}

/// A profile with its stacks resolved to functions (see [`Profile::symbolize`]).
#[derive(Clone, Debug)]
pub struct Symbolized {
    /// The sampling rate it was scaled for.
    pub rate: usize,
    pub locations: Vec<Location>,
    pub stacks: Vec<Stack>,
}

impl Symbolized {
    /// The function names of a stack, leaf (innermost) first, inlined calls expanded.
    pub fn functions<'a>(&'a self, s: &'a Stack) -> impl Iterator<Item = &'a str> + 'a {
        s.locations
            .iter()
            .flat_map(move |&l| self.locations[l].frames.iter())
            .map(|f| f.function.as_str())
    }
}

/// Whether `name` is one of the allocator's entry points or its own functions: a stack
/// is cut after the last location (from the leaf end) that has such a frame.
pub(crate) fn allocator_frame(name: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "spanheap::",
        "<spanheap::",
        "spanheap_preload::",
        "__rg_",
        "__rdl_",
    ];
    // The global-allocator shims (`__rustc::` in newer compilers) and the C entry points
    // of the preload library.
    const ENTRIES: [&str; 14] = [
        "__rust_alloc",
        "__rust_alloc_zeroed",
        "__rust_realloc",
        "__rust_dealloc",
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "free",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
        || ENTRIES.contains(&name.strip_prefix("__rustc::").unwrap_or(name))
}

/// Whether `name` is a function of Rust's `alloc` crate (`alloc::alloc::alloc`,
/// `RawVec::grow_amortized`, `Vec::with_capacity`, `<u8 as SpecFromElem>::from_elem`,
/// `String::push` ...): the plumbing between a program and the allocator, trimmed off
/// the leaf end after the allocator's frames, so that the leaf is the program's own
/// function (as Go's profiles start at the caller of `make` or `new`).
fn alloc_crate(name: &str) -> bool {
    name.starts_with("alloc::") || name.starts_with("<alloc::") || name.contains(" as alloc::")
}

fn resolve(addr: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    backtrace::resolve(addr as *mut core::ffi::c_void, |s| {
        frames.push(Frame {
            function: s
                .name()
                .map_or_else(|| "?".to_string(), |n| format!("{n:#}")),
            file: s.filename().map(|f| f.display().to_string()),
            line: s.lineno(),
        });
    });
    if frames.is_empty() {
        frames.push(Frame {
            function: "?".to_string(),
            file: None,
            line: None,
        });
    }
    frames
}

pub(crate) fn symbolize(p: &Profile) -> Symbolized {
    let mut resolved: HashMap<usize, Vec<Frame>> = HashMap::new();
    // A location per (return address, frames trimmed off its inner end).
    let mut index: HashMap<(usize, usize), usize> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut stacks: HashMap<Vec<usize>, (Values, u64, u64, u64)> = HashMap::new();
    for b in &p.buckets {
        for &ip in &b.stack {
            resolved.entry(ip).or_insert_with(|| resolve(ip));
        }
        // Every frame of the stack, leaf first: (position in the stack, frame index).
        let frames: Vec<(usize, usize)> = b
            .stack
            .iter()
            .enumerate()
            .flat_map(|(i, ip)| (0..resolved[ip].len()).map(move |k| (i, k)))
            .collect();
        let name = |&(i, k): &(usize, usize)| resolved[&b.stack[i]][k].function.as_str();
        // Trim the sampler's and the allocator's frames off the leaf end (up to the last
        // allocator frame: the entry point the program called), then the `alloc`
        // crate's. An entry point inlined into its caller leaves a location cut in two:
        // its outer part becomes a location of its own.
        let cut = frames
            .iter()
            .rposition(|f| allocator_frame(name(f)))
            .map_or(0, |i| i + 1);
        let start = cut
            + frames[cut..]
                .iter()
                .take_while(|f| alloc_crate(name(f)))
                .count();
        let mut locs: Vec<usize> = Vec::new();
        if let Some(&(first, skip)) = frames.get(start) {
            for (i, &ip) in b.stack.iter().enumerate().skip(first) {
                let skip = if i == first { skip } else { 0 };
                let l = *index.entry((ip, skip)).or_insert_with(|| {
                    // backtrace::resolve looks up `ip - 1` itself (inside the call).
                    locations.push(Location {
                        addr: ip.saturating_sub(1),
                        frames: resolved[&ip][skip..].to_vec(),
                    });
                    locations.len() - 1
                });
                locs.push(l);
            }
        }
        // Unknown frames at the root end (the loader's entry without symbols).
        while locs
            .last()
            .is_some_and(|&l| locations[l].frames.iter().all(|f| f.function == "?"))
        {
            locs.pop();
        }
        let e = stacks.entry(locs).or_default();
        e.0.add(&b.values(p.rate));
        e.1 += b.allocs;
        e.2 += b.allocs - b.frees;
        e.3 += b.alloc_bytes;
    }
    let mut stacks: Vec<Stack> = stacks
        .into_iter()
        .map(|(locations, (values, allocs, inuse, bytes))| Stack {
            locations,
            values,
            sampled_allocs: allocs,
            sampled_inuse: inuse,
            avg_size: bytes.checked_div(allocs).unwrap_or(0),
        })
        .collect();
    stacks.sort_by(|a, b| {
        b.values
            .inuse_space
            .cmp(&a.values.inuse_space)
            .then(b.values.alloc_space.cmp(&a.values.alloc_space))
            .then(a.locations.cmp(&b.locations))
    });
    Symbolized {
        rate: p.rate,
        locations,
        stacks,
    }
}
