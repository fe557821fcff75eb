//! Sampled heap profiling, Go style: where the memory goes.
//!
//! Off until turned on, by [`set_rate`] or by the environment when the process starts:
//!
//! | variable | effect |
//! |---|---|
//! | `SPANHEAP_PROF_RATE=<bytes>[K\|M\|G]` | sample on average one allocation per this many bytes allocated (Go's `MemProfileRate`; [`DEFAULT_RATE`] is 512 KiB; `1`: every allocation) |
//! | `SPANHEAP_PROF_FILE=<path>` | write the profile there when the process exits (format by extension, see [`Format`]); with no rate set, profiling at [`DEFAULT_RATE`] |
//! | `SPANHEAP_PROF_INTERVAL_MS=<ms>` | also write it (replacing the file) every this many milliseconds while the program allocates: from the first sampled allocation after the interval, on that thread |
//!
//! The same variables work under the `LD_PRELOAD` library.
//!
//! Each thread counts down the bytes it allocates to its next sample (an exponential
//! draw with mean `rate`, as Go's runtime does; `sample.rs`); a sampled allocation
//! records its call stack (the unwinder, which does not allocate) in a bucket of the
//! profile's table, and the object is remembered, so that its free is counted in the
//! same bucket: the in-use figures are exact for the sampled objects, with no garbage
//! collection to wait for (`table.rs`). The tables live in memory taken from the OS,
//! not from the heap. Symbols are resolved only when a profile is written, outside the
//! allocator's locks, with sampling off on the writing thread (`symbols.rs`).
//!
//! Outputs: pprof's protobuf, gzipped (`go tool pprof`, `pprof -http`; `pprof.rs`),
//! collapsed stacks for flame graphs (`inferno-flamegraph`, `flamegraph.pl`), a
//! top-N table (`text.rs`), and a flame graph drawn as SVG (`svg.rs`).
//!
//! ```no_run
//! spanheap::profile::set_rate(spanheap::profile::DEFAULT_RATE);
//! // ... the work to profile ...
//! let p = spanheap::profile::snapshot().symbolize();
//! p.write_top(&mut std::io::stdout(), spanheap::profile::SampleType::InuseSpace, 10).unwrap();
//! spanheap::profile::write_file("heap.pb.gz").unwrap();
//! ```
//!
//! What it does not see: allocations made before profiling was turned on (their frees
//! are not counted either), memory outside spanheap's heap (`mmap` by the program,
//! thread stacks, the allocator's own metadata), and, since a sample is scaled up by
//! the rate, the exact count of a call site that allocated only a few times.

pub(crate) mod blocks;
mod pprof;
pub(crate) mod sample;
mod svg;
mod symbols;
mod table;
mod text;

use std::io;
use std::path::Path;

pub use symbols::{Frame, Location, Stack, Symbolized};
pub use table::Totals;

/// Go's default `MemProfileRate`: one sample per 512 KiB allocated, on average.
pub const DEFAULT_RATE: usize = 512 << 10;

/// Sets the sampling rate: on average one sample per `bytes` bytes allocated; 0 turns
/// sampling off (objects sampled before are still followed to their frees); 1 samples
/// every allocation. Takes effect in the calling thread at its next allocation, in
/// other threads at their next sample (within 4 MiB of allocation if it was 0).
pub fn set_rate(bytes: usize) {
    sample::set_rate(bytes);
}

/// The sampling rate in bytes (0: off).
pub fn rate() -> usize {
    sample::rate()
}

/// Allocations sampled so far, as counted by the sampler (the tables' `Totals::sampled`
/// plus `Totals::dropped` should equal it once no sample is being recorded).
pub fn sampled_allocations() -> u64 {
    sample::sampled()
}

/// What a profile shows per stack; pprof's sample types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleType {
    /// Objects allocated (estimated from the samples).
    AllocObjects,
    /// Bytes allocated.
    AllocSpace,
    /// Objects allocated and not freed.
    InuseObjects,
    /// Bytes allocated and not freed.
    InuseSpace,
}

/// The four values of a stack, estimated for all allocations from the sampled ones
/// ([`scale`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub alloc_objects: u64,
    pub alloc_space: u64,
    pub inuse_objects: u64,
    pub inuse_space: u64,
}

impl Values {
    /// The value of one sample type.
    pub fn get(&self, t: SampleType) -> u64 {
        match t {
            SampleType::AllocObjects => self.alloc_objects,
            SampleType::AllocSpace => self.alloc_space,
            SampleType::InuseObjects => self.inuse_objects,
            SampleType::InuseSpace => self.inuse_space,
        }
    }

    fn add(&mut self, o: &Values) {
        self.alloc_objects += o.alloc_objects;
        self.alloc_space += o.alloc_space;
        self.inuse_objects += o.inuse_objects;
        self.inuse_space += o.inuse_space;
    }
}

/// Go's `scaleHeapSample`: `count` sampled objects of `bytes` bytes together, sampled
/// at `rate`, stand for `count / p` objects and `bytes / p` bytes, where `p = 1 -
/// exp(-avg / rate)` is the chance that an object of their average size `avg` was
/// sampled.
pub fn scale(count: u64, bytes: u64, rate: usize) -> (u64, u64) {
    if count == 0 || bytes == 0 {
        return (0, 0);
    }
    if rate <= 1 {
        return (count, bytes);
    }
    let avg = bytes as f64 / count as f64;
    let s = 1.0 / (1.0 - libm::exp(-avg / rate as f64));
    ((count as f64 * s) as u64, (bytes as f64 * s) as u64)
}

/// One stack of a [`Profile`]: its return addresses (leaf first) and sampled counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Return addresses, leaf first, the allocator's own frames included (the writers
    /// trim them).
    pub stack: Vec<usize>,
    /// Sampled allocations and their bytes.
    pub allocs: u64,
    pub alloc_bytes: u64,
    /// Frees of those sampled objects and their bytes.
    pub frees: u64,
    pub free_bytes: u64,
}

impl Bucket {
    /// The bucket's values scaled for sampling at `rate` (allocations and in-use
    /// scaled separately, as Go does).
    pub fn values(&self, rate: usize) -> Values {
        let (ao, asp) = scale(self.allocs, self.alloc_bytes, rate);
        let (io, isp) = scale(
            self.allocs - self.frees,
            self.alloc_bytes - self.free_bytes,
            rate,
        );
        Values {
            alloc_objects: ao,
            alloc_space: asp,
            inuse_objects: io,
            inuse_space: isp,
        }
    }
}

/// A snapshot of the heap profile: every bucket with its sampled counts.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// The sampling rate when the snapshot was taken (what the writers scale by).
    pub rate: usize,
    pub buckets: Vec<Bucket>,
    /// The table's totals at the same instant.
    pub totals: Totals,
}

/// Takes a snapshot of the profile: the buckets are copied under the profile's lock
/// (which allocation and frees of sampled objects take briefly), into memory allocated
/// before it is taken. Allocations it makes are not sampled.
pub fn snapshot() -> Profile {
    sample::unsampled(|| {
        let mut entries: Vec<table::Entry> = Vec::new();
        let mut frames: Vec<usize> = Vec::new();
        let totals = loop {
            match table::copy_into(&mut entries, &mut frames) {
                Ok(t) => break t,
                Err((nb, nf)) => {
                    // Room for what there was and some that may come meanwhile.
                    entries.reserve(nb + nb / 4 + 16);
                    frames.reserve(nf + nf / 4 + 1024);
                }
            }
        };
        let buckets = entries
            .iter()
            .map(|e| Bucket {
                stack: frames[e.start..e.start + e.depth].to_vec(),
                allocs: e.counts.allocs,
                alloc_bytes: e.counts.alloc_bytes,
                frees: e.counts.frees,
                free_bytes: e.counts.free_bytes,
            })
            .collect();
        Profile {
            rate: sample::rate(),
            buckets,
            totals,
        }
    })
}

impl Profile {
    /// Resolves the stacks' symbols (file and line where there is debug information),
    /// drops the allocator's own frames, and merges stacks that are then the same.
    /// Allocations it makes are not sampled.
    pub fn symbolize(&self) -> Symbolized {
        sample::unsampled(|| symbols::symbolize(self))
    }
}

/// A profile's file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// pprof's protobuf, gzipped (`*.pb.gz`, `*.pprof`, anything not named below).
    Pprof,
    /// Collapsed stacks of in-use bytes, one line per stack (`*.folded`, `*.collapsed`):
    /// the input of `inferno-flamegraph` and `flamegraph.pl`.
    Collapsed,
    /// A top-20 table of functions by in-use bytes and by allocated bytes (`*.txt`).
    Top,
    /// A flame graph of in-use bytes as an SVG image (`*.svg`), drawn by spanheap itself
    /// ([`Symbolized::write_svg`]).
    Svg,
}

impl Format {
    /// The format a file name asks for (by its extension).
    pub fn for_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("folded" | "collapsed") => Format::Collapsed,
            Some("txt" | "top") => Format::Top,
            Some("svg") => Format::Svg,
            _ => Format::Pprof,
        }
    }
}

impl Symbolized {
    /// Writes the profile in format `f`.
    pub fn write(&self, w: &mut dyn io::Write, f: Format) -> io::Result<()> {
        sample::unsampled(|| match f {
            Format::Pprof => self.write_pprof(w),
            Format::Collapsed => self.write_collapsed(w, SampleType::InuseSpace),
            Format::Top => {
                self.write_top(w, SampleType::InuseSpace, 20)?;
                writeln!(w)?;
                self.write_top(w, SampleType::AllocSpace, 20)
            }
            Format::Svg => self.write_svg(w, SampleType::InuseSpace, "Heap profile: in-use bytes"),
        })
    }
}

/// Takes a snapshot, resolves it and writes it to `path`, in the format its extension
/// names ([`Format::for_path`]): `.pb.gz` (pprof, also the default), `.folded`, `.txt`,
/// or `.svg` (a flame graph of in-use bytes, ready to open in a browser).
pub fn write_file(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    sample::unsampled(|| {
        let p = snapshot().symbolize();
        let mut f = io::BufWriter::new(std::fs::File::create(path)?);
        p.write(&mut f, Format::for_path(path))?;
        io::Write::flush(&mut f)
    })
}

/// The totals of the profile's tables now (see [`Totals`]).
pub fn totals() -> Totals {
    table::totals()
}

// ---------------------------------------------------------------------------------------
// The environment, the exit hook, the fork handlers and the lock counts.
// ---------------------------------------------------------------------------------------

/// `SPANHEAP_PROF_FILE`, read once at start (a copy in static storage: the writer at
/// exit must not depend on the environment then).
static FILE: crate::sync::AtomicPtr<u8> = crate::sync::AtomicPtr::new(core::ptr::null_mut());
static FILE_LEN: crate::sync::AtomicUsize = crate::sync::AtomicUsize::new(0);

/// `SPANHEAP_PROF_INTERVAL_MS` in nanoseconds (0: none), and when the next periodic
/// write is due (a thread claims it by moving it on, with a compare-and-swap).
static INTERVAL_NS: crate::sync::AtomicU64 = crate::sync::AtomicU64::new(0);
static NEXT_WRITE_NS: crate::sync::AtomicU64 = crate::sync::AtomicU64::new(0);

/// After a sample is recorded (the thread's sampling is off, it holds no allocator
/// lock): writes the profile to `SPANHEAP_PROF_FILE` if the interval is due. The file
/// is written to `<path>.tmp` and renamed over `<path>`, so that a reader never sees a
/// half-written profile.
pub(crate) fn periodic_write() {
    use crate::sync::Ordering::Relaxed;
    let interval = INTERVAL_NS.load(Relaxed);
    if interval == 0 {
        return;
    }
    let now = crate::os::coarse_now_ns();
    let due = NEXT_WRITE_NS.load(Relaxed);
    if now < due
        || NEXT_WRITE_NS
            .compare_exchange(due, now + interval, Relaxed, Relaxed)
            .is_err()
    {
        return;
    }
    let Some(path) = file_path() else { return };
    let r = std::panic::catch_unwind(|| {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        // The format of the final name, not of `.tmp`.
        let p = snapshot().symbolize();
        let mut f = io::BufWriter::new(std::fs::File::create(&tmp)?);
        p.write(&mut f, Format::for_path(path))?;
        io::Write::flush(&mut f)?;
        drop(f);
        std::fs::rename(&tmp, path)
    });
    if !matches!(r, Ok(Ok(()))) {
        crate::os::write_stderr(
            b"spanheap: could not write the heap profile (SPANHEAP_PROF_INTERVAL_MS)\n",
        );
    }
}

/// `SPANHEAP_PROF_FILE` as read at start-up.
fn file_path() -> Option<&'static Path> {
    use std::os::unix::ffi::OsStrExt;
    let p = FILE.load(crate::sync::Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: `FILE`/`FILE_LEN` describe a string of the environment, which the
    // process does not free (`getenv`'s result stays valid unless `setenv` replaces
    // the variable, and glibc never frees the strings it replaces).
    let bytes =
        unsafe { core::slice::from_raw_parts(p, FILE_LEN.load(crate::sync::Ordering::Relaxed)) };
    Some(Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// Reads `SPANHEAP_PROF_RATE` and `SPANHEAP_PROF_FILE` once per process and turns
/// profiling on if they ask for it. Called when a thread cache goes live (the first
/// allocation of the process), without allocating itself (`atexit` may).
pub(crate) fn init_from_env_once() {
    // Process-wide set-once flag, outside the modelled core.
    use core::sync::atomic::{AtomicBool, Ordering as O};
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.load(O::Relaxed) || DONE.swap(true, O::Relaxed) {
        return;
    }
    let rate = crate::env::env_size(c"SPANHEAP_PROF_RATE");
    let file = crate::env::env(c"SPANHEAP_PROF_FILE").filter(|f| !f.is_empty());
    if let Some(f) = file {
        FILE_LEN.store(f.len(), crate::sync::Ordering::Relaxed);
        FILE.store(f.as_ptr().cast_mut(), crate::sync::Ordering::Release);
        // SAFETY: registering a handler of the right signature; if it fails there is
        // no profile written at exit.
        unsafe { libc::atexit(write_at_exit) };
        if let Some(ms) =
            crate::env::env(c"SPANHEAP_PROF_INTERVAL_MS").and_then(crate::env::parse_u32)
        {
            let ns = u64::from(ms) * 1_000_000;
            NEXT_WRITE_NS.store(
                crate::os::coarse_now_ns() + ns,
                crate::sync::Ordering::Relaxed,
            );
            INTERVAL_NS.store(ns, crate::sync::Ordering::Relaxed);
        }
    }
    match (rate, file) {
        (Some(r), _) => set_rate(r),
        (None, Some(_)) => set_rate(DEFAULT_RATE),
        (None, None) => {}
    }
}

extern "C" fn write_at_exit() {
    let Some(path) = file_path() else { return };
    // Never unwind out of an exit handler.
    let r = std::panic::catch_unwind(|| write_file(path));
    if !matches!(r, Ok(Ok(()))) {
        crate::os::write_stderr(
            b"spanheap: could not write the heap profile (SPANHEAP_PROF_FILE)\n",
        );
    }
}

/// Fork handlers (`global/fork.rs`): the profile's lock is the last one taken.
pub(crate) fn fork_lock() {
    table::fork_lock();
}

/// # Safety
/// The calling thread took the lock with `fork_lock`.
pub(crate) unsafe fn fork_unlock() {
    // SAFETY: forwarded.
    unsafe { table::fork_unlock() };
}

/// The profile lock's counts, for `spanheap::lock_stats`.
pub(crate) fn lock_counts() -> (crate::sync::Rank, crate::sync::LockCount) {
    table::lock_counts()
}
