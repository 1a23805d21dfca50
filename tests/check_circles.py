#!/usr/bin/env python3
"""Import circles between the files of one Rust crate.

Arrows: a file's `use crate::/super::/self::/<child mod>::...` trees (each leaf counted),
and fully qualified `crate::x::Y` / `super::x` / `self::x` / `<child mod>::x` paths in code.
`mod` declarations are not arrows. A path resolves to the deepest file module that is a
prefix of it (so `crate::protocol::Prepared` -> protocol/mod.rs, `crate::spawn` -> lib.rs).
Comments and string/char literals are ignored; inline modules (`mod tests { .. }`) are
tracked so `super::` inside them means the file itself.

Usage: check_circles.py SRC_DIR [--edges]
Prints every strongly connected component of more than one file (and self-contained
edges with --edges). Exit code 1 when a circle exists.
"""
import os
import re
import sys


def strip(src):
    """Source with comments and string/char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * src.count("\n", i, j))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(src, i)) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            end = '"' + m.group(1)
            j = src.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'" and (m := re.compile(r"'(?:\\[^']+|[^\\'\n])'").match(src, i)):
            out.append("' '")
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(rel):
    parts = rel[:-3].split("/")
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def use_leaves(tree):
    """`a::{b, c::{d, e as f}, self}` -> [[a, b], [a, c, d], [a, c, e], [a]]."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+", "@", tree))
    pos = 0

    def parse_list():
        nonlocal pos
        items = []
        while pos < len(tree) and tree[pos] != "}":
            items.extend(parse_tree())
            if pos < len(tree) and tree[pos] == ",":
                pos += 1
        return items

    def parse_tree():
        nonlocal pos
        segs = []
        while pos < len(tree):
            if tree[pos] == "{":
                pos += 1
                subs = parse_list()
                pos += 1  # '}'
                return [segs + s for s in subs]
            m = re.compile(r"\*|[A-Za-z_][A-Za-z0-9_]*").match(tree, pos)
            if not m:
                break
            pos = m.end()
            if m.group(0) == "*":
                return [segs]
            if m.group(0) == "self" and segs:
                pass  # `x::{self}` names x itself
            else:
                segs.append(m.group(0))
            m2 = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)").match(tree, pos)
            if tree.startswith("::", pos):
                pos += 2
                continue
            if m2:
                pos = m2.end()
                return [segs + ["as " + m2.group(1)]]
            break
        return [segs]

    return parse_tree()


def refs(src, here, children, modules):
    """(line, path-from-crate-root) for every crate-internal path in `src` (stripped).

    Modules brought in by `use` (`use crate::protocol;`, `use super::pull::{self, ..}`) are
    followed in code too, so `protocol::bootstrap::query` counts as an arrow to bootstrap.rs.
    """
    found = []
    aliases = {}
    stack = []  # (inline module name, brace depth it opened at)
    depth = 0
    token = re.compile(
        r"(?P<use>\buse\s+(?P<tree>[^;]+);)"
        r"|(?P<mod>\bmod\s+(?P<name>\w+)\s*\{)"
        r"|(?P<path>(?<![\w:])(?:[A-Za-z_]\w*)(?:::[A-Za-z_]\w*)+)"
        r"|(?P<open>\{)|(?P<close>\})"
    )
    for m in token.finditer(src):
        line = src.count("\n", 0, m.start()) + 1
        cur = here + tuple(name for name, _ in stack)
        if m.group("open"):
            depth += 1
        elif m.group("close"):
            depth -= 1
            if stack and stack[-1][1] == depth:
                stack.pop()
        elif m.group("mod"):
            stack.append((m.group("name"), depth))
            depth += 1
        else:
            if m.group("use"):
                paths = []
                for segs in use_leaves(m.group("tree")):
                    alias = None
                    if segs and segs[-1].startswith("as "):
                        alias, segs = segs[-1][3:], segs[:-1]
                    paths.append(segs)
                    target = resolve(segs, cur, here, children)
                    if target is not None and target in modules and target:
                        aliases[alias or target[-1]] = target
            else:
                segs = m.group("path").split("::")
                if segs[0] in aliases and segs[0] not in ("crate", "super", "self"):
                    segs = ["crate", *aliases[segs[0]], *segs[1:]]
                paths = [segs]
            for segs in paths:
                target = resolve(segs, cur, here, children)
                if target is not None:
                    found.append((line, target))
    return found


def resolve(segs, cur, here, children):
    if not segs:
        return None
    head, rest = segs[0], list(segs[1:])
    if head == "crate":
        base = ()
    elif head in ("super", "self"):
        base = cur
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        rest = list(segs)
    elif head in children and len(cur) == len(here):
        # A child module named from its parent's own scope (`vllm_nixl::prepare` in mod.rs).
        base, rest = here, list(segs)
    else:
        return None  # an external crate, a type's associated item, a local name
    return tuple(base) + tuple(rest)


def scc(nodes, edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = args[0] if args else "/work/wt-engine-circle/engine-sim/src"
    files = {}
    for d, _, names in os.walk(root):
        for f in names:
            if f.endswith(".rs"):
                rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                files[rel] = module_of(rel)
    by_module = {m: f for f, m in files.items()}
    edges, why = {}, {}
    for rel, here in sorted(files.items()):
        with open(os.path.join(root, rel), encoding="utf-8") as fh:
            src = strip(fh.read())
        children = set(re.findall(r"\bmod\s+(\w+)\s*;", src))
        for line, path in refs(src, here, children, by_module):
            # The deepest file module that is a prefix of the path.
            for k in range(len(path), -1, -1):
                if path[:k] in by_module:
                    target = by_module[path[:k]]
                    break
            else:
                continue
            if target != rel:
                edges.setdefault(rel, set()).add(target)
                why.setdefault((rel, target), []).append(f"{line}:{'::'.join(path)}")
    if "--edges" in sys.argv:
        for (a, b), w in sorted(why.items()):
            print(f"{a} -> {b}    ({', '.join(w[:4])}{' ...' if len(w) > 4 else ''})")
        print()
    circles = [c for c in scc(files, edges) if len(c) > 1]
    print(f"{len(files)} files, {sum(len(v) for v in edges.values())} arrows, {len(circles)} circle(s)")
    for c in circles:
        print(f"circle of {len(c)} files: {', '.join(c)}")
        for a in c:
            for b in sorted(edges.get(a, ())):
                if b in c:
                    print(f"    {a} -> {b}    ({', '.join(why[(a, b)][:3])})")
    sys.exit(1 if circles else 0)


if __name__ == "__main__":
    main()
