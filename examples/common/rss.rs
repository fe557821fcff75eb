//! The process's peak resident set size, shared by the examples that report it.
//! Included with `#[path = "common/rss.rs"] mod rss;`.

/// Peak resident set size of this process (`VmHWM`), in KiB; 0 if it cannot be read.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
