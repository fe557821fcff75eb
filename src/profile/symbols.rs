//! Symbol resolution of a profile's stacks, when a profile is written (never while
//! sampling): `backtrace::resolve` (DWARF through gimli where the binary has debug
//! information, the symbol table otherwise), inlined calls expanded. The allocator's
//! own frames (spanheap's, the global-allocator shims, the C entry points of the
//! preload) are trimmed off the leaf end, and buckets whose stacks are then the same
//! are merged (a bucket's stack differs by the allocator path it took: through
//! `realloc`, `alloc_zeroed` ...).

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

/// The standard library's thin wrappers around the global allocator
/// (`alloc::alloc::alloc`, `Global::alloc_impl`, `exchange_malloc` ...): trimmed too
/// where they are locations of their own (not inlined into their caller).
fn alloc_shim(name: &str) -> bool {
    name.starts_with("alloc::alloc::") || name.starts_with("<alloc::alloc::Global as")
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
    // Each distinct return address once.
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut stacks: HashMap<Vec<usize>, (Values, u64, u64, u64)> = HashMap::new();
    for b in &p.buckets {
        let mut locs: Vec<usize> = b
            .stack
            .iter()
            .map(|&ip| {
                *index.entry(ip).or_insert_with(|| {
                    // backtrace::resolve looks up `ip - 1` itself (inside the call).
                    locations.push(Location {
                        addr: ip.saturating_sub(1),
                        frames: resolve(ip),
                    });
                    locations.len() - 1
                })
            })
            .collect();
        // Trim the sampler's and the allocator's frames off the leaf end: everything up
        // to the last location with an allocator frame (the entry point the program
        // called), then the standard library's shims that are locations of their own.
        let cut = locs
            .iter()
            .rposition(|&l| {
                locations[l]
                    .frames
                    .iter()
                    .any(|f| allocator_frame(&f.function))
            })
            .map_or(0, |i| i + 1);
        let shims = locs[cut..]
            .iter()
            .take_while(|&&l| {
                let f = &locations[l].frames;
                alloc_shim(&f[f.len() - 1].function)
            })
            .count();
        locs.drain(..cut + shims);
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
