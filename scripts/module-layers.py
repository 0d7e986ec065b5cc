#!/usr/bin/env python3
"""Checks that the top-level modules of every crate form layers: no import cycle.

A module `a` depends on `b` when code in a/ (or a.rs) names `crate::b` outside comments
and outside its `#[cfg(test)] mod tests` block or tests.rs files. A cycle means no file
of the cycle can be read without the others; this check fails naming it.
Usage: scripts/module-layers.py [CRATE_SRC_DIR ...]   (default: every src/ in the workspace)
"""
import os
import re
import sys


def module_graph(src):
    graph = {}
    for dirpath, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs") or name.startswith("tests"):
                continue
            path = os.path.join(dirpath, name)
            top = os.path.relpath(path, src).split(os.sep)[0].removesuffix(".rs")
            if top in ("lib", "main", "bin"):
                continue
            with open(path, encoding="utf-8") as f:
                text = "\n".join(l for l in f.read().split("\n") if not l.strip().startswith("//"))
            text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)
            deps = set(re.findall(r"crate::(\w+)", text)) - {top}
            graph.setdefault(top, set()).update(deps)
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    roots = sys.argv[1:]
    if not roots:
        for dirpath, dirs, _ in os.walk("."):
            dirs[:] = [d for d in dirs if d not in ("target", ".git", "fuzz", "node_modules")]
            if os.path.basename(dirpath) == "src" and os.path.exists(os.path.join(dirpath, "..", "Cargo.toml")):
                roots.append(dirpath)
    bad = 0
    for src in sorted(roots):
        graph = module_graph(src)
        for comp in cycles(graph):
            bad += 1
            print(f"{src}: import cycle between modules {', '.join(comp)}:")
            for m in comp:
                print(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}")
    if bad:
        sys.exit(1)
    print(f"module layers: no import cycle in {len(roots)} crates")


main()
