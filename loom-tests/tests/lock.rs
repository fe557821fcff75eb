//! The heap lock (`sync::RawMutex`, the real implementation) gives mutual exclusion and
//! makes the previous holder's writes visible. Under the mutant
//! `spanheap_mutant="lock_relaxed"` the acquisition is Relaxed and loom must report the
//! unsynchronised access to the protected cell.
#![cfg(spanheap_loom)]

use loom::sync::Arc;
use spanheap::__private::LockedCounter;

#[test]
fn lock_excludes_and_publishes() {
    let result = std::panic::catch_unwind(|| {
        loom::model(|| {
            let c = Arc::new(LockedCounter::new());
            let ths: Vec<_> = (0..2)
                .map(|_| {
                    let c = c.clone();
                    loom::thread::spawn(move || c.increment())
                })
                .collect();
            c.increment();
            for t in ths {
                t.join().unwrap();
            }
            assert_eq!(c.get(), 3);
        })
    });
    if cfg!(spanheap_mutant = "lock_relaxed") {
        assert!(
            result.is_err(),
            "mutant lock_relaxed was not caught by the model"
        );
    } else if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
