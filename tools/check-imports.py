#!/usr/bin/env python3
"""Fails if the top-level modules of src/ import each other in a cycle.

The allocator is meant to be layered, with every dependency pointing down:
malloc -> mcache -> mcentral -> mheap -> pagealloc/arena -> os, with stats and sync
beside them, and global (the process-wide heap, idle visits, the background scavenger,
fork handlers, checked mode), malloc and lib.rs (the front ends) on top. A lower layer
that must reach up does it through a callback or a trait, not by naming the upper
module.

How: for every .rs file under src/ (tests.rs files and `#[cfg(test)]` items skipped,
comments and string literals stripped), every `crate::<module>` reference (including
`use crate::{a, b}` groups) is an edge from the file's top-level module (src/foo.rs and
src/foo/*.rs are `foo`; lib.rs and the modules declared inline in it are `lib`). The
strongly connected components of that graph are printed with their edges; any
component of more than one module fails the check (exit 1).
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

TOKEN = re.compile(
    r"//[^\n]*"  # line comment (and doc comment)
    r"|/\*"  # block comment start (nested; handled below)
    r'|b?r(#*)"'  # raw string start
    r'|b?"(?:\\.|[^"\\])*"'  # string
    r"|b?'(?:\\.|[^'\\])'"  # char literal (a lifetime has no closing quote)
    ,
    re.S,
)


def strip_comments_and_strings(text: str) -> str:
    out, i = [], 0
    while True:
        m = TOKEN.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : m.start()])
        tok = m.group(0)
        if tok == "/*":
            depth, j = 1, m.end()
            while depth and j < len(text):
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
        elif m.group(1) is not None:  # raw string: skip to `"` plus as many `#`
            end = text.find('"' + m.group(1), m.end())
            i = len(text) if end < 0 else end + 1 + len(m.group(1))
        else:
            i = m.end()
        out.append(" ")


CFG = re.compile(r"#\[cfg\(((?:[^()\]]|\((?:[^()]|\([^()]*\))*\))*)\)\]")


def test_only(cfg: str) -> bool:
    """`cfg(test)` or `cfg(all(test, ...))`: compiled for unit tests only."""
    cfg = cfg.replace(" ", "")
    if cfg == "test":
        return True
    if cfg.startswith("all(") and cfg.endswith(")"):
        terms, depth, cur = [], 0, ""
        for ch in cfg[4:-1]:
            if ch == "," and depth == 0:
                terms.append(cur)
                cur = ""
                continue
            depth += (ch == "(") - (ch == ")")
            cur += ch
        return "test" in terms + [cur]
    return False


def strip_test_items(text: str) -> str:
    """Drops each item under a test-only cfg: up to its `;` or its closing brace."""
    out, i = [], 0
    for m in CFG.finditer(text):
        if m.start() < i or not test_only(m.group(1)):
            continue
        out.append(text[i : m.start()])
        depth, j = 0, m.end()
        while j < len(text):
            ch = text[j]
            j += 1
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0 and ch == "}":
                    break
            elif ch == ";" and depth == 0:
                break
        i = j
    out.append(text[i:])
    return "".join(out)


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return "lib" if rel.parts == ("lib.rs",) else rel.parts[0].removesuffix(".rs")


def referenced(code: str, modules: set, reexports: dict) -> set:
    """Top-level modules named by `crate::x` and `crate::{x, y::z}` in `code`."""
    names = []
    for m in re.finditer(r"\bcrate\s*::\s*(\{|\w+)", code):
        if m.group(1) != "{":
            names.append(m.group(1))
            continue
        depth, j, start = 1, m.end(), m.end()
        while depth:
            depth += (code[j] == "{") - (code[j] == "}")
            if depth == 1 and code[j] == ",":
                names.append(code[start:j])
                start = j + 1
            j += 1
        names.append(code[start : j - 1])
    out = set()
    for name in names:
        first = re.match(r"\s*(\w*)", name).group(1)
        if first and first != "self":
            out.add(first if first in modules else reexports.get(first, "lib"))
    return out


def graph() -> dict:
    files = [p for p in sorted(SRC.rglob("*.rs")) if p.name != "tests.rs"]
    lib = strip_comments_and_strings((SRC / "lib.rs").read_text())
    modules = {module_of(p) for p in files} - {"lib"}
    # Items named at the crate root: `pub use stats::Stats` makes crate::Stats stats's.
    reexports = {}
    for m in re.finditer(r"\buse\s+(\w+)::(\{[^}]*\}|\w+)\s*;", lib):
        if m.group(1) in modules:
            for item in re.findall(r"\w+", m.group(2)):
                reexports[item] = m.group(1)
    edges = {}
    for p in files:
        src = module_of(p)
        code = strip_test_items(strip_comments_and_strings(p.read_text()))
        dsts = referenced(code, modules, reexports)
        if src == "lib":  # the crate root also names its modules without `crate::`
            dsts |= set(re.findall(r"(?<![\w:])(\w+)\s*::", code)) & modules
        for dst in dsts - {src}:
            edges.setdefault(src, set()).add(dst)
    return edges


def sccs(edges: dict) -> list:
    """Tarjan's algorithm; components with more than one module, sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    edges = graph()
    comps = sccs(edges)
    if not comps:
        print("no import cycle among src/ modules")
        return 0
    for comp in comps:
        print("import cycle among: " + ", ".join(comp))
        for a in comp:
            for b in sorted(edges.get(a, ())):
                if b in comp:
                    print(f"  {a} -> {b}")
    print(
        "a lower layer must not name an upper one: pass a callback or use a trait "
        "(see the header of tools/check-imports.py)"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
