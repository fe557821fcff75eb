#!/usr/bin/env bash
# Prints the side-by-side table of the last `cargo bench --bench suite` run: one row per
# workload, criterion's median per allocator and its ratio to spanheap (below 1.00x:
# faster than spanheap). Usage: tools/bench-table.sh [criterion-dir...]
# With several directories (copies of target/criterion from separate runs), each cell
# is the lowest of the runs' medians: on a shared machine a slow spell only adds time.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 0 ] && set -- target/criterion
python3 - "$@" <<'PY'
import json, os, sys
roots = sys.argv[1:]
allocs = ["spanheap", "mimalloc", "jemalloc", "system"]
groups = ["pair/16B", "pair/64B", "pair/256B", "pair/1KiB", "pair/4KiB", "pair/16KiB",
          "pair/64KiB", "pair/256KiB", "batch-lifo", "batch-fifo", "batch-random",
          "churn-10k", "vec-growth", "producer-consumer", "two-threads",
          "large/64KiB", "large/256KiB", "large/1MiB", "large/4MiB", "large/16MiB"]
def median(g, a):
    found = []
    for root in roots:
        p = os.path.join(root, g.replace("/", "_"), a, "new", "estimates.json")
        if os.path.exists(p):
            found.append(json.load(open(p))["median"]["point_estimate"])
    return min(found) if found else None
def fmt(ns):
    if ns >= 1e6: return f"{ns/1e6:.2f} ms"
    if ns >= 1e3: return f"{ns/1e3:.2f} µs"
    return f"{ns:.1f} ns"
print("| workload | " + " | ".join(allocs) + " |")
print("|---|" + "---:|" * len(allocs))
for g in groups:
    m = [median(g, a) for a in allocs]
    if m[0] is None:
        continue
    cells = [fmt(m[0])]
    for x in m[1:]:
        cells.append("-" if x is None else f"{fmt(x)} ({x / m[0]:.2f}x)")
    print(f"| {g} | " + " | ".join(cells) + " |")
PY
