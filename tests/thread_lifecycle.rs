//! Thread lifecycle with spanheap as the global allocator: objects outliving the thread
//! that allocated them, thousands of short-lived threads (the heap's in-use bytes must
//! come back), and allocation inside thread-local destructors, both std's and a pthread
//! key's (which may run after spanheap has torn the thread's cache down).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

mod common;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

use common::{exclusive, inuse, shared};

/// Contents of the `i`-th object of thread `t`: a vector whose length and bytes depend on
/// both, so that swapped, moved or overwritten objects are noticed.
fn payload(t: usize, i: usize) -> Vec<u8> {
    let len = 1 + (t * 7 + i * 13) % 700;
    (0..len).map(|k| (t * 31 + i * 17 + k) as u8).collect()
}

#[test]
fn objects_outlive_the_threads_that_allocated_them() {
    let _q = shared();
    let t0 = Instant::now();
    const THREADS: usize = 32;
    let (tx, rx) = mpsc::channel::<(usize, usize, Vec<u8>, Box<u64>, String)>();
    let mut returned = Vec::new();
    for round in 0..4 {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let t = round * THREADS + t;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    // Garbage of various sizes, freed on this thread.
                    let tmp: Vec<String> = (0..200).map(|i| format!("{t}:{i}")).collect();
                    assert!(tmp
                        .iter()
                        .enumerate()
                        .all(|(i, s)| *s == format!("{t}:{i}")));
                    // Objects that outlive the thread: sent to main as they are made...
                    for i in 0..100 {
                        tx.send((
                            t,
                            i,
                            payload(t, i),
                            Box::new((t * 1000 + i) as u64),
                            i.to_string(),
                        ))
                        .unwrap();
                    }
                    // ...and returned through join.
                    let keep: Vec<Box<[u8]>> = (100..150)
                        .map(|i| payload(t, i).into_boxed_slice())
                        .collect();
                    drop(tmp);
                    keep
                })
            })
            .collect();
        for (t, h) in hs.into_iter().enumerate() {
            returned.push((round * THREADS + t, h.join().unwrap()));
        }
    }
    drop(tx);
    // Every thread has exited; only now are their objects checked and freed.
    let mut n = 0;
    for (t, i, v, b, s) in rx {
        assert_eq!(v, payload(t, i), "object {i} of thread {t}");
        assert_eq!(*b, (t * 1000 + i) as u64);
        assert_eq!(s, i.to_string());
        n += 1;
    }
    assert_eq!(n, 4 * THREADS * 100);
    for (t, keep) in returned {
        for (j, b) in keep.into_iter().enumerate() {
            assert_eq!(
                *b,
                *payload(t, 100 + j),
                "returned object {j} of thread {t}"
            );
        }
    }
    eprintln!("outlive: {:.2?}", t0.elapsed());
}

/// One short-lived thread: garbage freed locally, a few objects left for the caller.
fn short_lived(t: usize) -> Vec<Box<[u8]>> {
    let mut garbage: Vec<(usize, Vec<u8>)> = Vec::new();
    for i in 0..64 {
        garbage.push((i, payload(t, i)));
        if i % 3 == 0 {
            let (j, g) = garbage.swap_remove(i / 5 % garbage.len());
            assert_eq!(g, payload(t, j));
        }
    }
    for (j, g) in garbage {
        assert_eq!(g, payload(t, j));
    }
    let s: String = (0..50).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    assert_eq!(s.len(), 50);
    // A quarter of the threads leave live objects behind for the caller to free.
    if t % 4 != 0 {
        return Vec::new();
    }
    (0..4)
        .map(|i| payload(t, 1000 + i).into_boxed_slice())
        .collect()
}

#[test]
fn a_hundred_thousand_threads_leave_in_use_where_it_was() {
    let _q = exclusive();
    const THREADS: usize = 100_000;
    const WAVE: usize = 16;
    let t0 = Instant::now();
    let wave = |first: usize| {
        let hs: Vec<_> = (first..first + WAVE)
            .map(|t| std::thread::spawn(move || short_lived(t)))
            .collect();
        // The wave has exited; its leftovers are checked and freed on this thread.
        for (k, h) in hs.into_iter().enumerate() {
            let t = first + k;
            for (i, b) in h.join().unwrap().into_iter().enumerate() {
                assert_eq!(*b, *payload(t, 1000 + i), "leftover {i} of thread {t}");
            }
        }
    };
    // One warm-up wave so the baseline includes this thread's own cache. The leftovers
    // freed here belong to spans of exited threads: they are remote frees, so those
    // spans empty and retire instead of being pinned by this thread's free lists.
    const WARMUP_WAVES: usize = 1;
    for w in 0..WARMUP_WAVES {
        wave(w * WAVE);
    }
    // Measured with this thread's own cache flushed both times: what it keeps for
    // reuse (free lists, current spans) is not what the threads left behind.
    spanheap::flush_thread_cache();
    let s0 = spanheap::stats();
    s0.check().unwrap();
    let before = inuse();
    assert_eq!(before, s0.heap_bytes);
    let mut peak = before;
    for w in 0..THREADS / WAVE {
        wave((WARMUP_WAVES + w) * WAVE);
        if w % 64 == 0 {
            peak = peak.max(inuse());
        }
    }
    spanheap::flush_thread_cache();
    let s1 = spanheap::stats();
    s1.check().unwrap();
    let after = inuse();
    eprintln!(
        "hundred_thousand_threads: {} + {THREADS} threads in {:.2?}; heap in use {before} -> \
         {after} (peak sampled {peak}); all spans in use (incl. metadata) {} -> {}; \
         thread caches {} -> {}; small live objects {} -> {}",
        WARMUP_WAVES * WAVE,
        t0.elapsed(),
        s0.inuse_bytes,
        s1.inuse_bytes,
        s0.thread_caches,
        s1.thread_caches,
        s0.small_live_objects(),
        s1.small_live_objects(),
    );
    assert!(
        s1.inuse_bytes <= s0.inuse_bytes + (1 << 20),
        "spans in use (incl. metadata) grew from {} to {} bytes",
        s0.inuse_bytes,
        s1.inuse_bytes
    );
    assert!(
        after <= before + (1 << 20),
        "in-use grew from {before} to {after} bytes over {THREADS} threads"
    );
}

// ---------------------------------------------------------------------------------------
// Allocation inside thread-local destructors.
// ---------------------------------------------------------------------------------------

/// Destructors that ran, and destructors that found wrong contents (a destructor cannot
/// usefully panic, so it reports here).
static DTOR_RAN: AtomicU64 = AtomicU64::new(0);
static DTOR_BAD: AtomicU64 = AtomicU64::new(0);
/// Destructors that ran on a thread that had no spanheap cache any more.
static DTOR_CACHELESS: AtomicU64 = AtomicU64::new(0);

/// Allocates, fills and checks a few blocks (a Vec, a String, Boxes of several sizes),
/// frees them, and checks then frees the objects it was given. Counts a failure in
/// `DTOR_BAD`.
fn churn_in_destructor(seed: usize, given: Vec<Box<[u8]>>) {
    if !spanheap::__private::thread_has_cache() {
        DTOR_CACHELESS.fetch_add(1, Ordering::Relaxed);
    }
    let mut ok = true;
    for (i, b) in given.into_iter().enumerate() {
        ok &= *b == *payload(seed, i);
    }
    let v: Vec<u64> = (0..1000).map(|i| i * seed as u64).collect();
    let s = format!("destructor {seed}");
    let boxes: Vec<Box<[u8]>> = (0..20)
        .map(|i| payload(seed, 500 + i).into_boxed_slice())
        .collect();
    let big = vec![seed as u8; 100_000];
    ok &= v
        .iter()
        .enumerate()
        .all(|(i, &x)| x == i as u64 * seed as u64);
    ok &= s == format!("destructor {seed}");
    ok &= boxes
        .iter()
        .enumerate()
        .all(|(i, b)| **b == *payload(seed, 500 + i));
    ok &= big.iter().all(|&x| x == seed as u8);
    if !ok {
        DTOR_BAD.fetch_add(1, Ordering::Relaxed);
    }
    DTOR_RAN.fetch_add(1, Ordering::Relaxed);
}

/// A std thread-local whose destructor allocates and frees.
struct Holder {
    seed: usize,
    given: Vec<Box<[u8]>>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        churn_in_destructor(self.seed, std::mem::take(&mut self.given));
    }
}

thread_local! {
    static HOLDER: RefCell<Option<Holder>> = const { RefCell::new(None) };
}

/// A pthread key whose destructor allocates and frees. Created after spanheap's own key
/// (spanheap creates its key at the first small allocation, long before this test), so
/// glibc runs it after spanheap's cache teardown: the thread is cache-less by then.
fn late_key() -> libc::pthread_key_t {
    extern "C" fn dtor(arg: *mut libc::c_void) {
        // SAFETY: the value is a Box<Holder> leaked by `install_late`.
        drop(unsafe { Box::from_raw(arg.cast::<Holder>()) });
    }
    static KEY: std::sync::OnceLock<libc::pthread_key_t> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: a plain key creation with a valid destructor.
        assert_eq!(unsafe { libc::pthread_key_create(&mut k, Some(dtor)) }, 0);
        k
    })
}

fn install_late(seed: usize) {
    let h = Box::into_raw(Box::new(Holder {
        seed,
        given: (0..10)
            .map(|i| payload(seed, i).into_boxed_slice())
            .collect(),
    }));
    // SAFETY: setting this thread's value of our key.
    assert_eq!(
        unsafe { libc::pthread_setspecific(late_key(), h.cast()) },
        0
    );
}

#[test]
fn allocation_and_free_inside_thread_local_destructors() {
    let _q = shared();
    let t0 = Instant::now();
    let before = DTOR_RAN.load(Ordering::Relaxed);
    const THREADS: usize = 64;
    for t in 0..THREADS {
        std::thread::spawn(move || {
            // Normal allocation first, so the thread has a cache and live spans.
            let v: Vec<String> = (0..300).map(|i| format!("{t}-{i}")).collect();
            assert!(v.iter().enumerate().all(|(i, s)| *s == format!("{t}-{i}")));
            HOLDER.with(|h| {
                *h.borrow_mut() = Some(Holder {
                    seed: t,
                    given: (0..10).map(|i| payload(t, i).into_boxed_slice()).collect(),
                })
            });
            install_late(t + 1000);
            drop(v);
        })
        .join()
        .unwrap();
    }
    let ran = DTOR_RAN.load(Ordering::Relaxed) - before;
    let bad = DTOR_BAD.load(Ordering::Relaxed);
    let cacheless = DTOR_CACHELESS.load(Ordering::Relaxed);
    eprintln!(
        "tls_destructors: {ran} destructors ({cacheless} on cache-less threads) in {:.2?}",
        t0.elapsed()
    );
    assert_eq!(bad, 0, "{bad} destructors found wrong contents");
    assert_eq!(ran, 2 * THREADS as u64, "every destructor runs");
}
