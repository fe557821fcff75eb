//! spanheap's lock counters per 1,000 operations, for the comparison examples
//! (`threads`, `larson`). Included with `#[path = "common/locks.rs"] mod locks;`.
//!
//! A child process running on spanheap prints, after each workload, one line
//! `locks <workload> <threads> <kind>=<acquisitions>/<contended> ...` (per 1,000
//! operations, the kinds taken at least once), then, if there were any, the remote
//! frees and the atomics they took per 1,000 operations (`spanheap::remote_free_stats`);
//! the parent prints those lines under the workload's table.

pub type Snapshot = (
    [spanheap::LockStats; spanheap::LOCK_KINDS],
    spanheap::RemoteFreeStats,
);

/// The counters now, or `None` when the process does not run on spanheap.
pub fn snapshot(on_spanheap: bool) -> Option<Snapshot> {
    on_spanheap.then(|| (spanheap::lock_stats(), spanheap::remote_free_stats()))
}

/// The `locks` line of workload `w` at `t` threads: the counts since `before` per 1,000
/// of `ops` operations.
pub fn line(w: &str, t: usize, before: &Snapshot, ops: usize) -> String {
    let now = spanheap::lock_stats();
    let r = spanheap::remote_free_stats().since(&before.1);
    let mut s = format!("locks {w} {t}");
    let k = 1000.0 / ops.max(1) as f64;
    for (n, b) in now.iter().zip(&before.0) {
        let d = n.since(b);
        if d.acquisitions == 0 && d.try_busy == 0 {
            continue;
        }
        s += &format!(
            " {}={:.3}/{:.4}",
            d.name.replace(' ', "_"),
            d.acquisitions as f64 * k,
            d.contended as f64 * k
        );
        if d.contended != 0 {
            s += &format!(
                "(sleeps {:.4}, wait {:.1} us)",
                d.sleeps as f64 * k,
                d.wait_ns as f64 * k / 1000.0
            );
        }
    }
    if r.objects != 0 {
        s += &format!(
            " | remote frees {:.1}: fetch_or {:.2}, fetch_add {:.2}, announce {:.3}",
            r.objects as f64 * k,
            r.bitmap_rmws as f64 * k,
            r.state_rmws as f64 * k,
            r.announces as f64 * k
        );
    }
    s
}

/// Prints the spanheap child's `locks` lines for workload `w` (its output `out`).
pub fn print_for(w: &str, out: &str) {
    let prefix = format!("locks {w} ");
    let mut any = false;
    for l in out.lines().filter(|l| l.starts_with(&prefix)) {
        if !any {
            println!(
                "  spanheap locks per 1,000 ops, acquisitions/contended (sleeps, wait per 1,000 ops where contended):"
            );
            any = true;
        }
        let rest = &l[prefix.len()..];
        let (t, kinds) = rest.split_once(' ').unwrap_or((rest, ""));
        println!("  {t:>6} threads: {kinds}");
    }
}
