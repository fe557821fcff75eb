//! The parent side of the comparison examples: each allocator runs in a child process
//! of its own (the same program, `DEMO_ALLOC` naming the allocator, see `switch.rs`),
//! one after another.
//!
//! Included with `#[path = "common/children.rs"] mod children;` beside `switch`.

use std::process::Command;

/// Runs this program with `args` once per allocator, in `switch::CHOICES` order
/// (spanheap first); returns each allocator's name and its child's stdout. A child
/// that fails stops the parent with the child's stderr.
pub fn run_each<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<(&'static str, String)> {
    let exe = std::env::current_exe().unwrap();
    crate::switch::CHOICES
        .iter()
        .map(|&(name, _)| {
            let out = Command::new(&exe)
                .args(args)
                .env("DEMO_ALLOC", name)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (name, String::from_utf8(out.stdout).unwrap())
        })
        .collect()
}
