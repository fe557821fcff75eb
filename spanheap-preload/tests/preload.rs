//! The LD_PRELOAD library under real programs: a C program checking every C semantic
//! (compiled here with gcc), the fork test, and `python3`, `sort` and a Rust program
//! (this test binary itself) whose outputs must match a run without the preload.
//! Time and peak RSS of each run, with and without the preload, are printed
//! (`cargo test -p spanheap-preload --release -- --nocapture`).
//!
//! This file does not install a Rust global allocator: Rust's `System` allocator calls
//! `malloc`, so under the preload the Rust workload runs on spanheap-preload too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/libspanheap_preload.so`. Cargo does not build a cdylib for its
/// package's integration tests, so the first call builds it (`cargo build`, same
/// profile and target directory as this test binary; quick, everything else is built).
fn library() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().unwrap().parent().unwrap();
            let target_dir = profile_dir.parent().unwrap();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--offline", "--lib", "-p", "spanheap-preload"])
                .arg("--manifest-path")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir);
            if profile_dir.file_name().unwrap() == "release" {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("cargo build");
            assert!(st.success(), "building libspanheap_preload.so failed");
            let lib = profile_dir.join("libspanheap_preload.so");
            assert!(lib.exists(), "{} not built", lib.display());
            lib
        })
        .clone()
}

fn tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Compiles `tests/c/abi.c` (once per test binary run; each test uses its own path).
fn abi_binary(name: &str) -> PathBuf {
    c_binary("abi.c", name)
}

/// Compiles `tests/c/<src>` to the temporary directory as `name`.
fn c_binary(src: &str, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(src);
    let out = tmp().join(name);
    let st = Command::new("gcc")
        .args([
            "-O1",
            "-Wall",
            "-Wno-alloc-size-larger-than",
            "-pthread",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("gcc");
    assert!(st.success(), "gcc failed");
    out
}

/// What a measured run produced.
struct Run {
    stdout: Vec<u8>,
    stderr: String,
    code: i32,
    secs: f64,
    max_rss_kib: i64,
}

/// Runs `cmd` (with or without the preload), with a timeout; measures wall time and
/// peak RSS (`wait4`'s rusage).
fn run(mut cmd: Command, preload: bool, timeout: Duration) -> Run {
    if preload {
        cmd.env("LD_PRELOAD", library());
    } else {
        cmd.env_remove("LD_PRELOAD");
    }
    let out_path = tmp().join(format!("out-{}-{}", std::process::id(), rand_tag()));
    let err_path = out_path.with_extension("err");
    cmd.stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()));
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain-old-data out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if start.elapsed() > timeout {
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = start.elapsed().as_secs_f64();
    std::mem::forget(child); // reaped above
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    let r = Run {
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        code,
        secs,
        max_rss_kib: usage.ru_maxrss,
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    r
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Runs `make()` without and with the preload; both must succeed with the same output
/// (the lines `keep` accepts). Prints the comparison line.
fn compare(name: &str, keep: fn(&str) -> bool, make: impl Fn() -> Command) {
    let base = run(make(), false, Duration::from_secs(120));
    assert_eq!(
        base.code, 0,
        "{name} without the preload failed: {}",
        base.stderr
    );
    let pre = run(make(), true, Duration::from_secs(120));
    assert_eq!(
        pre.code, 0,
        "{name} under the preload failed: {}",
        pre.stderr
    );
    let lines = |out: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(out)
            .lines()
            .filter(|l| keep(l))
            .map(str::to_owned)
            .collect()
    };
    let (a, b) = (lines(&base.stdout), lines(&pre.stdout));
    assert!(
        !b.is_empty(),
        "{name} printed nothing: {:?} {}",
        String::from_utf8_lossy(&pre.stdout),
        pre.stderr
    );
    assert!(a == b, "{name}: output differs under the preload");
    println!(
        "{name:<22} system {:>7.3} s {:>7} KiB   spanheap-preload {:>7.3} s {:>7} KiB   (time {:.2}x, RSS {:.2}x)",
        base.secs,
        base.max_rss_kib,
        pre.secs,
        pre.max_rss_kib,
        pre.secs / base.secs,
        pre.max_rss_kib as f64 / base.max_rss_kib as f64
    );
}

#[test]
fn c_semantics_under_the_preload() {
    let abi = abi_binary("abi-semantics");
    let r = run(
        {
            let mut c = Command::new(&abi);
            c.arg("libspanheap_preload");
            c
        },
        true,
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "abi failed:\n{}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "abi: ok");
    // Without the preload the check that spanheap answers must fail: the test can fail.
    let r = run(
        {
            let mut c = Command::new(&abi);
            c.arg("libspanheap_preload");
            c
        },
        false,
        Duration::from_secs(60),
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("malloc comes from"), "{}", r.stderr);
}

#[test]
fn fork_from_a_thread_while_others_allocate() {
    let abi = abi_binary("abi-fork");
    let r = run(
        {
            let mut c = Command::new(&abi);
            c.arg("fork");
            c
        },
        true,
        Duration::from_secs(90),
    );
    assert_eq!(r.code, 0, "fork test failed:\n{}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "fork: ok");
}

/// Issue 26 in C: under `RLIMIT_AS`, blocks of 24 B .. 3 MB until `malloc` returns
/// NULL, all freed, then `malloc(100 MiB)` must succeed (`tests/c/addrspace.c`; spanheap
/// gives its wholly free arenas back when the growth is refused).
#[test]
fn a_freed_heap_serves_100_mib_under_rlimit_as_in_c() {
    let bin = c_binary("addrspace.c", "addrspace");
    compare(
        "c addrspace (RLIMIT_AS)",
        |l| l.starts_with("addrspace:"),
        || Command::new(&bin),
    );
}

/// Cache creation is reentrant: `tests/c/keys.c` creates 40 pthread keys before its
/// first `malloc`, so glibc's `pthread_setspecific` allocates (through the preload)
/// while spanheap creates each thread's cache. Before the fix this recursed until the
/// stack overflowed (SIGSEGV).
#[test]
fn cache_creation_with_40_pthread_keys_in_c() {
    let bin = c_binary("keys.c", "keys");
    compare("c keys (40 keys)", |_| true, || Command::new(&bin));
}

/// Misuses glibc catches are caught under the preload too: a free or realloc of a
/// pointer into a block (not its start), a double free (found when the thread's free
/// stack goes back to the spans at its exit), a second free of a huge block. Each run
/// must die by SIGABRT with spanheap's one-line report.
#[test]
fn misuses_abort_under_the_preload() {
    let bin = c_binary("misuse.c", "misuse");
    for (mode, expect) in [
        ("interior-free", "free of 0x"),
        ("interior-free-large", "points inside a block"),
        ("interior-realloc", "realloc of 0x"),
        ("double-free", "double free of 0x"),
        ("free-freed-huge", "not a live block"),
    ] {
        let r = run(
            {
                let mut c = Command::new(&bin);
                c.arg(mode);
                c
            },
            true,
            Duration::from_secs(60),
        );
        assert_eq!(
            r.code,
            -libc::SIGABRT,
            "{mode}: not aborted: {}",
            String::from_utf8_lossy(&r.stdout)
        );
        let line = r.stderr.lines().find(|l| l.starts_with("spanheap: "));
        assert!(
            line.is_some_and(|l| l.contains(expect)),
            "{mode}: report {line:?} does not say {expect:?}"
        );
        println!("{mode:<20} {}", line.unwrap());
    }
}

/// The same from a Rust program: this binary's `.init_array` hook creates 40 pthread
/// keys before the Rust runtime's first allocation when `SPANHEAP_KEYS_CHILD` is set,
/// then the Rust workload runs (threads, maps, channels) under the preload.
#[test]
fn cache_creation_with_40_pthread_keys_in_rust() {
    compare(
        "rust keys (40 keys)",
        |l| l.contains("checksum"),
        || {
            let mut c = rust_workload();
            c.env("SPANHEAP_KEYS_CHILD", "1");
            c
        },
    );
}

/// Runs before `main` (and before the Rust runtime allocates): with
/// `SPANHEAP_KEYS_CHILD` set, takes 40 pthread keys so that the allocator's own key,
/// made on the first allocation, has an index of 32 or more.
#[used]
#[link_section = ".init_array"]
static MAKE_KEYS: extern "C" fn() = make_keys;

extern "C" fn make_keys() {
    // SAFETY: getenv reads the environment (set up before constructors run) and does
    // not allocate.
    if unsafe { libc::getenv(c"SPANHEAP_KEYS_CHILD".as_ptr()) }.is_null() {
        return;
    }
    for _ in 0..40 {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: a key with no destructor, written to a valid out-pointer.
        unsafe { libc::pthread_key_create(&mut k, None) };
    }
}

#[test]
fn python_builds_and_serialises_a_large_json_document() {
    let script = r#"
import json, hashlib
doc = {"items": [{"id": i, "name": "item-%d" % i, "tags": ["t%d" % (i % 17), "u%d" % (i % 5)],
                  "price": i * 0.25, "nested": {"a": [i, i + 1, i + 2], "b": str(i) * 3}}
                 for i in range(300000)]}
s = json.dumps(doc, sort_keys=True)
back = json.loads(s)
assert back == doc
print(len(s), hashlib.sha256(s.encode()).hexdigest())
"#;
    compare(
        "python3 json (300k)",
        |_| true,
        || {
            let mut c = Command::new("python3");
            c.args(["-c", script]);
            c
        },
    );
}

#[test]
fn sort_of_a_few_hundred_thousand_lines() {
    let input = tmp().join("sort-input.txt");
    let mut text = String::new();
    let mut x: u64 = 12345;
    for i in 0..400_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(&format!(
            "{:016x} line {i} {}\n",
            x,
            "abc".repeat((x >> 60) as usize)
        ));
    }
    std::fs::write(&input, text).unwrap();
    compare(
        "sort (400k lines)",
        |_| true,
        || {
            let mut c = Command::new("sort");
            c.arg(&input).env("LC_ALL", "C");
            c
        },
    );
}

/// The Rust workload run in a child (this binary, `--exact rust_workload_child`).
#[test]
fn rust_test_binary_under_the_preload() {
    compare(
        "rust test binary",
        |l| l.contains("checksum"),
        rust_workload,
    );
}

/// This binary's `rust_workload_child`, alone, as a child process.
fn rust_workload() -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "rust_workload_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("SPANHEAP_PRELOAD_CHILD", "1");
    c
}

/// The core crate's own test binary `tests/global_alloc.rs` (which uses `SpanHeap` as
/// its Rust global allocator, so under the preload the C library's allocations go to
/// the preload's heap and Rust's to the executable's: two independent heaps in one
/// process), built here with `cargo test --no-run` and run with one test thread; the
/// list of passing tests must be the same with and without the preload.
#[test]
fn core_test_binary_under_the_preload() {
    let bin = core_test_binary("global_alloc");
    compare(
        "spanheap global_alloc",
        |l| l.starts_with("test ") && !l.contains("finished in"),
        || {
            let mut c = Command::new(&bin);
            c.args(["--test-threads=1"]);
            c
        },
    );
}

/// Builds the core crate's integration test `name` (same profile and target directory
/// as this binary, the same features as the workspace build, so nothing is rebuilt
/// when `cargo test --workspace` built it already) and returns its path.
fn core_test_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "test",
        "--offline",
        "--no-run",
        "--message-format=json",
        "-p",
        "spanheap",
    ])
    .args(["--features", "static-tls", "--test", name])
    .arg("--manifest-path")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
    .arg("--target-dir")
    .arg(profile_dir.parent().unwrap())
    .stderr(Stdio::inherit());
    if profile_dir.file_name().unwrap() == "release" {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cargo test --no-run");
    assert!(out.status.success(), "building the {name} test failed");
    // The artifact line of the test target names its executable.
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("\"executable\":\"") && l.contains(&format!("\"name\":\"{name}\"")))
        .unwrap_or_else(|| panic!("no executable for {name} in cargo's output"));
    let start = line.find("\"executable\":\"").unwrap() + "\"executable\":\"".len();
    let end = start + line[start..].find('"').unwrap();
    PathBuf::from(&line[start..end])
}

/// Threads building maps and strings and passing boxes between them; prints a
/// checksum (the same with and without the preload).
#[test]
fn rust_workload_child() {
    if std::env::var_os("SPANHEAP_PRELOAD_CHILD").is_none() {
        return;
    }
    use std::collections::{BTreeMap, HashMap};
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut sum = 0u64;
                for round in 0..20u64 {
                    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
                    for i in 0..5000u64 {
                        m.entry(format!("k{}", (i * 7 + t) % 3000))
                            .or_default()
                            .push(i + round);
                    }
                    let b: BTreeMap<&String, usize> = m.iter().map(|(k, v)| (k, v.len())).collect();
                    sum += b.values().map(|&v| v as u64).sum::<u64>();
                    let big: Vec<u8> = vec![t as u8; 1 << 20];
                    sum += big.iter().map(|&x| x as u64).sum::<u64>();
                }
                sum
            })
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel::<Box<[u64]>>();
    let producer = std::thread::spawn(move || {
        for i in 0..20_000u64 {
            tx.send(vec![i; (i % 100) as usize + 1].into_boxed_slice())
                .unwrap();
        }
    });
    let mut total: u64 = rx.iter().map(|b| b.iter().sum::<u64>()).sum();
    producer.join().unwrap();
    for h in handles {
        total = total.wrapping_add(h.join().unwrap());
    }
    println!("checksum {total}");
}

/// The heap profile of a C program, with no change to the program: `SPANHEAP_PROF_RATE`
/// and `SPANHEAP_PROF_FILE` under the preload. The collapsed stacks written at exit name
/// its two leaking functions, with about the 3:1 ratio of bytes they leak.
#[test]
fn heap_profile_of_a_c_program_names_its_functions() {
    let bin = c_binary("profile.c", "profile");
    let path = tmp().join(format!("profile-{}.folded", std::process::id()));
    let mut cmd = Command::new(&bin);
    cmd.env("SPANHEAP_PROF_RATE", "16K")
        .env("SPANHEAP_PROF_FILE", &path);
    let r = run(cmd, true, Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&path).expect("no profile written");
    let _ = std::fs::remove_file(&path);
    let bytes = |f: &str| -> u64 {
        text.lines()
            .filter(|l| l.split(' ').next().unwrap().split(';').any(|n| n == f))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let (three, one) = (bytes("leak_three"), bytes("leak_one"));
    assert!(three > 0 && one > 0, "sites missing:\n{text}");
    let ratio = three as f64 / one as f64;
    assert!((2.2..=3.8).contains(&ratio), "{three} / {one}\n{text}");
    // In use at exit: 30 MiB and 10 MiB, estimated from the samples.
    assert!((22 << 20..38 << 20).contains(&three), "{three}");
    assert_eq!(bytes("churn"), 0, "freed blocks left in use:\n{text}");
}

/// The library loads no libm: the heap profile's math (the sampling countdown's log,
/// the scaling's exp) comes from the `libm` crate, not from the system's `libm.so`,
/// which every process under the preload would otherwise map at start-up (and every
/// Rust program with the profile; docs/benchmarks.md, "Start-up").
#[test]
fn the_library_loads_no_libm() {
    let out = Command::new("cat")
        .arg("/proc/self/maps")
        .env("LD_PRELOAD", library())
        .output()
        .expect("cat");
    assert!(out.status.success());
    let maps = String::from_utf8_lossy(&out.stdout);
    assert!(
        maps.contains("libspanheap_preload"),
        "the library is not loaded:\n{maps}"
    );
    assert!(
        !maps
            .lines()
            .any(|l| l.contains("/libm.so") || l.contains("/libm-")),
        "libm is loaded:\n{maps}"
    );
}
