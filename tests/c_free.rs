//! `free` without a size (the C ABI, `spanheap::raw`): the fast half
//! (`raw::free_fast`) takes a block only when it is an object of the calling thread's
//! current span of its size class, found from the page's size-class hint, and leaves
//! everything else to the validating half; and `raw::free`, which runs both, keeps
//! every block's contents through a churn of frees from the owner and from other
//! threads.

use std::collections::HashMap;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

use spanheap::raw;

#[test]
fn the_fast_half_takes_objects_of_the_current_span_and_nothing_else() {
    unsafe {
        // The first free goes the validating way and points the thread's arena memo at
        // the heap; the object comes back on the next malloc of its class.
        let a = raw::malloc(100);
        raw::free(a);
        let b = raw::malloc(100);
        assert_eq!(a, b, "a freed object is reused first");
        // Now the fast half takes it (the feature: without it, false here).
        assert!(raw::free_fast(b), "an object of the current span");
        assert_eq!(raw::malloc(100), b, "pushed on the class's free stack");

        assert!(!raw::free_fast(std::ptr::null_mut()), "null");
        let local = 7u64;
        assert!(
            !raw::free_fast(&local as *const u64 as *mut u8),
            "a stack address"
        );
        let d = raw::malloc(100);
        assert!(!raw::free_fast(d.add(8)), "inside an object");
        let big = raw::malloc(1 << 20);
        assert!(!raw::free_fast(big), "a large block");
        raw::free(big);

        // Another thread's object lies in a span this thread's cache does not own.
        let theirs = std::thread::spawn(|| raw::malloc(100) as usize)
            .join()
            .unwrap() as *mut u8;
        assert!(!raw::free_fast(theirs), "another thread's span");
        raw::free(theirs);

        // A class this thread has no current span of yet.
        let other_class = raw::malloc(3000);
        raw::free(other_class);
        raw::free(d);
        raw::free(b);
    }
}

/// Random mallocs and frees of 1 B .. 4 KiB through `raw` on four threads, a third of
/// the frees handed to the next thread; every block is filled with a pattern of its
/// own at malloc and checked at free, and no two live blocks overlap.
#[test]
fn blocks_keep_their_contents_through_fast_and_validated_frees() {
    use std::sync::mpsc;
    const THREADS: usize = 4;
    const STEPS: usize = 200_000;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| mpsc::channel::<(usize, usize, u8)>())
        .unzip();
    let mut rxs: Vec<Option<mpsc::Receiver<(usize, usize, u8)>>> =
        rxs.into_iter().map(Some).collect();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let rx = rxs[t].take().unwrap();
            let tx = txs[(t + 1) % THREADS].clone();
            std::thread::spawn(move || {
                let check = |p: usize, n: usize, tag: u8| {
                    let s = unsafe { std::slice::from_raw_parts(p as *const u8, n) };
                    assert!(s.iter().all(|&b| b == tag), "block {p:#x} ({n} B) changed");
                };
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                let mut live: HashMap<usize, (usize, u8)> = HashMap::new();
                let mut keys: Vec<usize> = Vec::new();
                for step in 0..STEPS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    while let Ok((p, n, tag)) = rx.try_recv() {
                        check(p, n, tag);
                        unsafe { raw::free(p as *mut u8) };
                    }
                    if keys.len() < 512 && (rng & 1 == 0 || keys.is_empty()) {
                        let n = 1 + (rng >> 8) as usize % 4096;
                        let p = raw::malloc(n) as usize;
                        assert_ne!(p, 0);
                        let tag = (step as u8) | 1;
                        unsafe { std::ptr::write_bytes(p as *mut u8, tag, n) };
                        assert!(
                            live.insert(p, (n, tag)).is_none(),
                            "{p:#x} handed out twice"
                        );
                        keys.push(p);
                    } else {
                        let i = (rng >> 20) as usize % keys.len();
                        let p = keys.swap_remove(i);
                        let (n, tag) = live.remove(&p).unwrap();
                        check(p, n, tag);
                        if rng % 3 == 0 {
                            tx.send((p, n, tag)).unwrap();
                        } else {
                            unsafe { raw::free(p as *mut u8) };
                        }
                    }
                }
                for p in keys {
                    let (n, tag) = live.remove(&p).unwrap();
                    check(p, n, tag);
                    unsafe { raw::free(p as *mut u8) };
                }
                drop(tx);
                // What the previous thread still sends.
                for (p, n, tag) in rx {
                    check(p, n, tag);
                    unsafe { raw::free(p as *mut u8) };
                }
            })
        })
        .collect();
    drop(txs);
    for h in handles {
        h.join().unwrap();
    }
}
