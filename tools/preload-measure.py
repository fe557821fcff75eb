#!/usr/bin/env python3
"""Time and peak RSS of real programs with and without the LD_PRELOAD library.

Usage: tools/preload-measure.py [runs]   (default 5; run from anywhere)
Needs `cargo test --release -p spanheap-preload` to have run once (it builds the
library, the test binaries and target/tmp/sort-input.txt). Each program runs `runs`
times in each mode, alternating; prints the best and median wall time (/usr/bin/time,
10 ms resolution) and the largest peak RSS, and whether the outputs are equal.
"""
import glob, os, subprocess, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(root)
LIB = os.path.join(root, "target/release/libspanheap_preload.so")
JSON = r'''
import json, hashlib
doc = {"items": [{"id": i, "name": "item-%d" % i, "tags": ["t%d" % (i % 17), "u%d" % (i % 5)],
                  "price": i * 0.25, "nested": {"a": [i, i + 1, i + 2], "b": str(i) * 3}}
                 for i in range(300000)]}
s = json.dumps(doc, sort_keys=True)
back = json.loads(s)
assert back == doc
print(len(s), hashlib.sha256(s.encode()).hexdigest())
'''

def newest(pattern):
    c = [p for p in glob.glob(pattern) if not p.endswith(".d") and os.access(p, os.X_OK)]
    if not c:
        sys.exit(f"{pattern}: not built (run cargo test --release -p spanheap-preload)")
    return max(c, key=os.path.getmtime)

cases = [
    ("python3 JSON (300k records)", ["python3", "-c", JSON], {}, True),
    ("sort 400k lines", ["sort", "target/tmp/sort-input.txt"], {"LC_ALL": "C"}, True),
    ("Rust workload (preload test binary)",
     [newest("target/release/deps/preload-*"), "--exact", "rust_workload_child",
      "--nocapture", "--test-threads=1"], {"SPANHEAP_PRELOAD_CHILD": "1"}, False),
    ("core global_alloc test binary",
     [newest("target/release/deps/global_alloc-*"), "--test-threads=1"], {}, False),
]

def one(argv, env, pre):
    e = dict(os.environ)
    e.update(env)
    e.pop("LD_PRELOAD", None)
    if pre:
        e["LD_PRELOAD"] = LIB
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", "/tmp/spanheap-preload-time"]
                       + argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    t, m = open("/tmp/spanheap-preload-time").read().split()[-2:]
    return float(t), int(m), p.returncode, p.stdout

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for name, argv, env, exact in cases:
    res, outs = {False: [], True: []}, {}
    for _ in range(runs):
        for pre in (False, True):
            s, rss, code, out = one(argv, env, pre)
            if code != 0:
                sys.exit(f"{name} ({'preload' if pre else 'system'}) exited {code}")
            res[pre].append((s, rss))
            outs[pre] = out
    # The test binaries print timings; the cargo tests compare their filtered output.
    same = "same output" if not exact or outs[False] == outs[True] else "OUTPUT DIFFERS"
    t = {k: sorted(x[0] for x in v) for k, v in res.items()}
    r = {k: max(x[1] for x in v) for k, v in res.items()}
    print(f"{name:38s} system {t[False][0]:.2f} s (median {t[False][runs // 2]:.2f}), "
          f"{r[False] / 1024:.1f} MiB | preload {t[True][0]:.2f} s "
          f"(median {t[True][runs // 2]:.2f}), {r[True] / 1024:.1f} MiB | "
          f"time {t[True][0] / t[False][0]:.2f}x, RSS {r[True] / r[False]:.2f}x, {same}")
