#!/usr/bin/env python3
"""Fails if a hand-written source file under src/ has more than LIMIT lines of code.

Lines of code: not blank, not a comment, not inside a `#[cfg(test)] mod ... { }` block;
files named tests.rs (unit tests split out of a directory module) are not counted.
Generated files are listed in GENERATED. Run by .ci/run; `tools/check-layout.py -v`
prints every file's count.
"""
import pathlib
import re
import sys

LIMIT = 900
GENERATED = {"sizeclasses.rs"}  # by tools/sizeclasses-gen


def code_lines(text: str) -> int:
    lines = text.split("\n")
    n, depth, in_tests = 0, 0, False
    for i, line in enumerate(lines):
        s = line.strip()
        if (
            not in_tests
            and s == "#[cfg(test)]"
            and i + 1 < len(lines)
            and re.match(r"^\s*(pub(\(\w+\))? )?mod \w+\s*\{", lines[i + 1])
        ):
            in_tests, depth = True, 0
            continue
        if in_tests:
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line:
                in_tests = False
            continue
        if s and not s.startswith("//"):
            n += 1
    return n


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent / "src"
    bad = []
    for p in sorted(root.rglob("*.rs")):
        if p.name == "tests.rs" or str(p.relative_to(root)) in GENERATED:
            continue
        n = code_lines(p.read_text())
        if "-v" in sys.argv:
            print(f"{n:5} {p.relative_to(root.parent)}")
        if n > LIMIT:
            bad.append((p.relative_to(root.parent), n))
    for p, n in bad:
        print(f"{p}: {n} lines of code (limit {LIMIT}): split it by concept", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
