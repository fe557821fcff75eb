//! Links the unwinder statically (libgcc_eh) where the C toolchain has it, so that the
//! preload library does not pull `libgcc_s.so` into every process it is preloaded into
//! (one more library to open, map and relocate at each exec; issue 27). Nothing in the
//! library unwinds (it never panics), but `std` refers to the unwinder's symbols; with
//! them resolved from the archive, the linker (`--as-needed`) drops `libgcc_s`. Where
//! `cc -print-file-name=libgcc_eh.a` finds no such archive, nothing changes.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("linux-gnu") {
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let Ok(out) = Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
    else {
        return;
    };
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = Path::new(&path);
    if !out.status.success() || !path.is_absolute() || !path.exists() {
        return;
    }
    if let Some(dir) = path.parent() {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-lib=static=gcc_eh");
    }
}
