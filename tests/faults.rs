//! Address-space exhaustion: in a child process with `RLIMIT_AS` lowered to what it
//! uses plus 512 MiB, allocations must fail with null (large, then small), the program
//! must go on, frees must work, blocks allocated before must be intact, allocation must
//! work again after frees, and the statistics must stay consistent.

use std::alloc::{alloc, dealloc, Layout};
use std::process::Command;

#[global_allocator]
static GLOBAL: spanheap::SpanHeap = spanheap::SpanHeap;

const MIB: usize = 1 << 20;

fn vm_size() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = s.split_whitespace().next().unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn address_space_exhaustion_fails_cleanly() {
    if std::env::var_os("SPANHEAP_FAULTS_CHILD").is_some() {
        exhaust();
        return;
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "address_space_exhaustion_fails_cleanly",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SPANHEAP_FAULTS_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A hung child must fail the test, not hang CI.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        // SAFETY: signalling our own child (a no-op if it has been reaped and the
        // pid not reused within this short window).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    });
    drop(watchdog);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("exhaustion: ok"), "{stdout}\n{stderr}");
    println!(
        "{}",
        stdout.lines().find(|l| l.contains("exhaustion")).unwrap()
    );
}

/// Writes a progress line to stderr without allocating.
fn note(msg: &str, n: usize) {
    use std::fmt::Write;
    struct Buf([u8; 128], usize);
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let k = s.len().min(self.0.len() - self.1);
            self.0[self.1..self.1 + k].copy_from_slice(&s.as_bytes()[..k]);
            self.1 += k;
            Ok(())
        }
    }
    let mut b = Buf([0; 128], 0);
    let _ = writeln!(b, "{msg} {n}");
    // SAFETY: write(2) from a stack buffer.
    unsafe { libc::write(2, b.0.as_ptr().cast(), b.1) };
}

fn pattern(i: usize) -> u8 {
    (i * 31 % 251) as u8
}

fn exhaust() {
    // Everything the test needs is allocated before the limit goes down.
    let large_l = Layout::from_size_align(MIB, 8).unwrap();
    let small_l = Layout::from_size_align(64, 8).unwrap();
    let mut large: Vec<usize> = Vec::with_capacity(100_000);
    let mut small: Vec<usize> = Vec::with_capacity(4_000_000);
    let limit = vm_size() + 512 * MIB;
    let rl = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: setrlimit with a valid struct (lowering our own limit).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);

    // Large blocks until the address space runs out: null, not a crash.
    loop {
        // SAFETY: non-zero size.
        let p = std::hint::black_box(unsafe { alloc(large_l) });
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh 1 MiB block.
        unsafe {
            p.write(pattern(large.len()));
            p.add(MIB - 1).write(pattern(large.len() + 1));
        }
        large.push(p as usize);
        assert!(large.len() < 100_000, "the limit had no effect");
    }
    note("large blocks before null:", large.len());
    // Small objects until they fail too (the free pages left are used up first).
    loop {
        // SAFETY: non-zero size.
        let p = std::hint::black_box(unsafe { alloc(small_l) });
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh 64-byte object.
        unsafe { p.write(pattern(small.len())) };
        small.push(p as usize);
        assert!(small.len() < 4_000_000, "small objects never failed");
    }
    let (nl, ns) = (large.len(), small.len());
    note("small objects before null:", ns);
    let s = spanheap::stats();
    s.check().expect("statistics consistent at exhaustion");
    // Requests too large for what is left fail too, and disturb nothing.
    // (black_box: an allocation whose result is only compared with null may be
    // optimised away and assumed to succeed.)
    // SAFETY: non-zero size.
    let p = std::hint::black_box(unsafe { alloc(Layout::from_size_align(1 << 40, 8).unwrap()) });
    assert!(p.is_null(), "a 1 TiB block under RLIMIT_AS");

    // Everything allocated before is intact; free half of it.
    for (i, &p) in large.iter().enumerate() {
        let p = p as *mut u8;
        // SAFETY: live blocks written above.
        unsafe {
            assert_eq!(p.read(), pattern(i), "large block {i} corrupted");
            assert_eq!(p.add(MIB - 1).read(), pattern(i + 1));
        }
    }
    for (i, &p) in small.iter().enumerate() {
        // SAFETY: live objects written above.
        assert_eq!(
            unsafe { (p as *mut u8).read() },
            pattern(i),
            "object {i} corrupted"
        );
    }
    // (No allocation here: memory is exhausted until these frees.)
    for &p in &large[nl / 2..] {
        // SAFETY: live blocks of this layout, freed once.
        unsafe { dealloc(p as *mut u8, large_l) };
    }
    large.truncate(nl / 2);
    for &p in &small[ns / 2..] {
        // SAFETY: as above.
        unsafe { dealloc(p as *mut u8, small_l) };
    }
    small.truncate(ns / 2);
    // Allocation works again.
    let mut again = 0;
    for _ in 0..nl / 4 {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(large_l) };
        assert!(!p.is_null(), "no large block after frees");
        large.push(p as usize);
        again += 1;
    }
    for _ in 0..1000 {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(small_l) };
        assert!(!p.is_null(), "no small object after frees");
        small.push(p as usize);
    }
    spanheap::stats()
        .check()
        .expect("statistics consistent after frees");
    for p in large.drain(..) {
        // SAFETY: live blocks of this layout.
        unsafe { dealloc(p as *mut u8, large_l) };
    }
    for p in small.drain(..) {
        // SAFETY: as above.
        unsafe { dealloc(p as *mut u8, small_l) };
    }
    let s = spanheap::stats();
    s.check().expect("statistics consistent at the end");
    println!(
        "exhaustion: ok ({nl} blocks of 1 MiB and {ns} objects of 64 B before null; \
         {again} large blocks again after freeing half; live small objects at the end {})",
        s.small_live_objects()
    );
}
