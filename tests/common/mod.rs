//! Helpers shared by the integration test binaries (each installs spanheap as its own
//! global allocator).
#![allow(dead_code)] // each binary uses a different subset

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tests that measure the heap's in-use bytes take this lock for writing; every other
/// test of the binary holds it for reading (they may run concurrently with each other,
/// never with a measurement).
static QUIET: RwLock<()> = RwLock::new(());

pub fn shared() -> RwLockReadGuard<'static, ()> {
    QUIET.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    QUIET.write().unwrap_or_else(|e| e.into_inner())
}

/// Bytes in live heap spans of the process-wide heap.
pub fn inuse() -> u64 {
    spanheap::__private::global_counters().heap_inuse
}

/// splitmix64: a small, fast, deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs this test binary's test `test` alone in a child process with `env` set to 1;
/// kills it and panics (saying it hung `what`) if it runs longer than `limit`, panics
/// if it fails. Returns its stdout.
pub fn run_child(test: &str, env: &str, limit: std::time::Duration, what: &str) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the child hung {what} after {:.1} s:\n{}\n{}",
                t0.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs this test binary's test `test` in a child process with `env` set to `case`; the
/// child must die of SIGABRT with a line starting "spanheap: " on stderr that contains
/// `expect`. Returns that line.
pub fn expect_abort(test: &str, env: &str, case: &str, expect: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(env, case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("spanheap: "))
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{case}: the child did not abort (status {:?}); stderr:\n{stderr}",
        out.status
    );
    assert!(
        line.contains(expect),
        "{case}: report {line:?} does not say {expect:?}"
    );
    line
}

// ---------------------------------------------------------------------------------------
// Address-space limits (`RLIMIT_AS`), for children that run the heap out of address
// space (`faults.rs`, `addrspace.rs`).
// ---------------------------------------------------------------------------------------

/// The soft `RLIMIT_AS` as it was before `limit_address_space` lowered it.
static SAVED_AS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This process's virtual size (`VmSize`), in bytes, from `/proc/self/statm`.
pub fn vm_size() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = s.split_whitespace().next().unwrap().parse().unwrap();
    pages * 4096
}

fn set_soft_as_limit(cur: libc::rlim_t) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading our own limit into a valid struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) }, 0);
    rl.rlim_cur = cur;
    // SAFETY: setting the soft limit at or below the (unchanged) hard limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
}

/// Lowers the soft `RLIMIT_AS` to `bytes`, keeping the soft limit it had for
/// `restore_address_space` and `bail`. Allocates nothing.
pub fn limit_address_space(bytes: usize) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading our own limit into a valid struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) }, 0);
    SAVED_AS.store(rl.rlim_cur, std::sync::atomic::Ordering::Relaxed);
    set_soft_as_limit(bytes as libc::rlim_t);
}

/// Puts back the soft limit `limit_address_space` lowered.
pub fn restore_address_space() {
    set_soft_as_limit(SAVED_AS.load(std::sync::atomic::Ordering::Relaxed));
}

/// Raises the limit back, then panics with `msg` (a `&'static str`: no formatting while
/// memory is exhausted).
#[cold]
pub fn bail(msg: &'static str) -> ! {
    restore_address_space();
    panic!("{msg}");
}

/// `bail(msg)` unless `ok`.
pub fn ensure(ok: bool, msg: &'static str) {
    if !ok {
        bail(msg);
    }
}
