#!/usr/bin/env python3
"""Lists the import cycles between the modules (files) of Rust crates.

    hack/modcycles.py operator/src worker/src crds/src     # one line a cycle; exit 1 when there is one
    hack/modcycles.py --edges operator/src                 # also every edge, file -> file

A file's module path comes from where it sits (lib.rs, or main.rs where there is no lib.rs: the root; a/mod.rs and a.rs: `a`;
a/b.rs: `a::b`). An edge A -> B is any path in A's code or doc comments (plain `//` comments left out) that names B: `crate::b::...`,
`super::...`, `self::...`, or a child module by its bare name (`apply::apply(...)` in the parent that declares
`mod apply`). A path that names an item inside a module counts for the module that holds it. Declaring a
module (`mod x;`) is not an import, and `#[cfg(test)]` items are left out. Cycles are the strongly connected
components of more than one file; the same is then done with every file folded into its top-level module
(`reconcile/apply.rs` counts as `reconcile`), which finds `error -> reconcile -> error` even when no one file
closes the circle.
"""
import os
import re
import sys

PATH = re.compile(r"\b(crate|super|self|[a-z_][a-z0-9_]*)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text, flags=re.S)  # strings can hold `crate::` in messages (re.S: a backslash-newline continues one)
    # Doc comments (`///`, `//!`) stay: their paths are rustdoc links, references as real as a `use`.
    return "\n".join(
        line if line.lstrip().startswith(("///", "//!")) else line.split("//", 1)[0] for line in text.splitlines()
    )


def strip_tests(text):
    """Leaves out `#[cfg(test)]` items (test modules): they may import what the code they test may not."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        j = text.find("{", m.end())
        semi = text.find(";", m.end())
        if j < 0 or (0 <= semi < j):
            i = semi + 1  # `#[cfg(test)] mod memory;` or a `use`: one item
            continue
        depth, j = 1, j + 1
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_groups(text):
    """`use crate::a::{b, c::d};` -> `crate::a::b crate::a::c::d` (nested groups one level at a time)."""
    while True:
        m = GROUP.search(text)
        if not m:
            return text
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        inner = text[m.end() : i - 1]
        parts, depth, cur = [], 0, ""
        for ch in inner:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        parts.append(cur)
        prefix = m.group(1) + m.group(2)
        expanded = " ".join(
            prefix if p.strip() == "self" else f"{prefix}::{p.strip()}" for p in parts if p.strip()
        )
        text = text[: m.start()] + expanded + text[i:]


def modules(src):
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod",) or (len(parts) == 1 and parts[0] in ("lib", "main")):
                parts = parts[:-1]
            if parts and parts[0] == "bin":
                continue  # each bin is a crate of its own
            if rel == "main.rs" and os.path.exists(os.path.join(src, "lib.rs")):
                continue  # beside lib.rs, main.rs is a crate of its own that imports the library by name
            mods[tuple(parts)] = rel
    return mods


def resolve(mods, path):
    """The longest module prefix of `path` that is a file."""
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return None


def edges(src):
    mods = modules(src)
    out = {m: set() for m in mods}
    for mod, rel in mods.items():
        text = expand_groups(strip_tests(strip_comments(open(os.path.join(src, rel), encoding="utf-8").read())))
        children = {m[-1] for m in mods if len(m) == len(mod) + 1 and m[: len(mod)] == mod}
        for m in PATH.finditer(text):
            head, rest = m.group(1), [p for p in m.group(2).split("::") if p]
            if head == "crate":
                target = rest
            elif head == "self":
                target = list(mod) + rest
            elif head == "super":
                base = list(mod)
                while rest and rest[0] == "super":
                    rest = rest[1:]
                    base = base[:-1]
                target = base[:-1] + rest
            elif head in children:
                target = list(mod) + [head] + rest
            else:
                continue
            to = resolve(mods, target)
            if to is not None and to != mod:
                out[mod].add(to)
    return mods, out


def sccs(graph):
    index, low, stack, on, res, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            res.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return res


def main(argv):
    show_edges = "--edges" in argv
    srcs = [a for a in argv if a != "--edges"]
    if not srcs:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    found = 0
    for src in srcs:
        mods, graph = edges(src)
        name = lambda m: mods[m]  # noqa: E731
        if show_edges:
            for m in sorted(graph):
                for t in sorted(graph[m]):
                    print(f"{src}: {name(m)} -> {name(t)}")
        comps = [sorted(c) for c in sccs(graph) if len(c) > 1]
        # The same graph with every file folded into its top-level module (reconcile/apply.rs is
        # `reconcile`): a circle between two modules counts even when no single file closes it.
        top = {}
        for a, targets in graph.items():
            for b in targets:
                if a[:1] != b[:1] and a and b:
                    top.setdefault(a[:1], set()).add(b[:1])
                    top.setdefault(b[:1], set())
        for c in sccs(top):
            if len(c) > 1:
                found += 1
                print(f"{src}: modules in a circle: " + " ".join(sorted(m[0] for m in c)))
        for c in comps:
            inside = sum(1 for a in c for b in graph[a] if b in c)
            print(f"{src}: cycle of {len(c)} files ({inside} imports inside it): " + " ".join(name(m) for m in c))
        if not comps and not any(len(c) > 1 for c in sccs(top)):
            print(f"{src}: no cycles ({len(mods)} files)")
        found += len(comps)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
