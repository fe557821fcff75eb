#!/usr/bin/env python3
"""Exec cost of short-lived C programs under the LD_PRELOAD library (issue 27).

Usage: tools/exec-measure.py [--rounds R] [--execs N] [name=/path/lib.so ...]

Runs each program N times in a shell loop (the loop's shell is not preloaded, only the
programs are), once per mode: no preload, spanheap's preload library
(target/release/libspanheap_preload.so, `cargo build --release -p spanheap-preload`)
and every other library named on the command line (for example a mimalloc built as
a shared library: `mimalloc=/tmp/libmimalloc.so`). The modes take turns within each
of R rounds; prints each mode's best round in microseconds per exec and the ratio to
no preload and to the first named peer.

Programs: `/bin/true` (allocates nothing: loading the library is the whole cost),
`sort -rn /dev/null` (a few allocations at start), and a three-process pipeline
`seq 200 | sort -rn | head -1` run by `sh -c` (four execs per iteration).
"""
import os, subprocess, sys, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(root, "target/release/libspanheap_preload.so")

args = sys.argv[1:]
rounds, execs, peers = 5, 300, []
while args:
    a = args.pop(0)
    if a == "--rounds":
        rounds = int(args.pop(0))
    elif a == "--execs":
        execs = int(args.pop(0))
    elif "=" in a:
        name, path = a.split("=", 1)
        peers.append((name, os.path.abspath(path)))
    else:
        sys.exit(__doc__)
if not os.path.exists(LIB):
    sys.exit(f"{LIB}: not built (cargo build --release -p spanheap-preload)")
modes = [("none", None), ("spanheap", LIB)] + peers

programs = [
    ("/bin/true", "/bin/true"),
    ("sort -rn /dev/null", "sort -rn /dev/null"),
    ("sh -c 'seq 200 | sort -rn | head -1'", "sh -c 'seq 200 | sort -rn | head -1' >/dev/null"),
]


def loop(cmd, lib):
    """Seconds for `execs` runs of `cmd`, preloading `lib` into them (not the loop)."""
    pre = f"LD_PRELOAD={lib} " if lib else ""
    script = f"for i in $(seq {execs}); do {pre}{cmd}; done"
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    start = time.perf_counter()
    subprocess.run(["bash", "-c", script], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


for title, cmd in programs:
    best = {name: float("inf") for name, _ in modes}
    for _ in range(rounds):
        for name, lib in modes:
            best[name] = min(best[name], loop(cmd, lib))
    print(f"\n{title}: best of {rounds} rounds of {execs}, microseconds per iteration")
    print("| mode | us | / none |" + (f" / {peers[0][0]} |" if peers else ""))
    print("|---|---:|---:|" + ("---:|" if peers else ""))
    for name, _ in modes:
        us = best[name] * 1e6 / execs
        row = f"| {name} | {us:.0f} | {best[name] / best['none']:.3f}x |"
        if peers:
            row += f" {best[name] / best[peers[0][0]]:.3f}x |"
        print(row)
