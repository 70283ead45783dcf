#!/usr/bin/env python3
"""The import graph of Weir's sources, file by file, and the checks the layout map promises.

    scripts/import-graph.py            # check: exit 1 on a circle or a layer violation
    scripts/import-graph.py --edges    # also print every edge (file -> file)

A file imports another when it names an item defined there: `use crate::bus::Delivery` in
`handlers/dispatch.rs` is an edge to the file that defines `Delivery`, wherever re-exports
(`pub use`) route the name. `mod x;` is not an import, and neither is anything inside a
`#[cfg(test)]` module: a test may reach anywhere. Two crates are read, the library (`src/lib.rs`)
and the binary (`src/bin/weir/main.rs`); the binary's `weir::` paths are the library's API and
not followed.

Checks:
  1. no circle: no two files import each other, directly or through others;
  2. no import through the crate root: inside the library, `crate::Router` instead of
     `crate::handlers::Router` hides the real direction;
  3. every import between the library's top-level modules follows LAYERS, the direction
     `src/lib.rs`'s layout map states (keep the two in step).

It reads Rust with regular expressions, not a parser: enough for this code base's style (one item
per `use` tree, modules in files), and it fails loudly on a path it cannot resolve.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# What each top-level module of the library may import, besides itself. Mirrors the layout map
# in src/lib.rs: contracts <- telemetry <- handlers <- bus <- outbox; the rest beside them.
LAYERS = {
    "contracts": set(),
    "telemetry": {"contracts"},
    "handlers": {"contracts", "telemetry"},
    "bus": {"contracts", "telemetry", "handlers"},
    "outbox": {"contracts", "telemetry", "handlers", "bus"},
    "admin": {"telemetry"},
    "testing": {"contracts", "telemetry", "handlers", "bus"},
    "temporal": {"contracts", "telemetry", "handlers"},
    "schema": {"contracts", "handlers"},
}

ITEM_RE = re.compile(
    r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+(?=fn))*"
    r"(struct|enum|trait|fn|type|const|static|union|macro_rules!|mod)\s+([A-Za-z_][A-Za-z0-9_]*)",
    re.M,
)
USE_RE = re.compile(r"^\s*(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M | re.S)
INLINE_PATH_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)")


class Module:
    def __init__(self, path, file, crate):
        self.path = path  # tuple of names from the crate root
        self.file = file  # the file that holds it
        self.crate = crate
        self.children = {}  # name -> Module
        self.items = set()  # names defined here
        self.bindings = {}  # name -> the absolute path a `use` binds it to
        self.globs = []  # absolute module paths re-exported with `pub use x::*`
        self.uses = []  # (absolute path) imported by the module's own code
        self.macros = {}  # at the crate root: exported macro -> the file defining it


TOKEN_RE = re.compile(
    "|".join(
        [
            r"//[^\n]*",  # line comment
            r"/\*.*?\*/",  # block comment
            r'b?r(?P<hashes>#*)".*?"(?P=hashes)',  # raw string
            r'b?"(?:\\.|[^"\\])*"',  # string
            r"b?'(?:\\.|[^'\\\n])'",  # char literal (a lifetime has no closing quote)
        ]
    ),
    re.S,
)


def strip_comments(text):
    """Blanks comments, strings and char literals, in one left-to-right pass (a quote inside a
    comment, or `//` inside a string, must not fool the other)."""

    def blank(m):
        token = m.group(0)
        if token.startswith("/"):
            return "\n" * token.count("\n")
        return '""'

    return TOKEN_RE.sub(blank, text)


def strip_test_modules(text):
    """Drops `#[cfg(test)] mod name { ... }` blocks (and `#[cfg(doctest)]` items)."""
    out, i = [], 0
    pattern = re.compile(r"#\[cfg\((?:test|doctest)\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(?:mod|struct)\s+\w+\s*[{;]")
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : m.start()])
        if text[m.end() - 1] == ";":
            i = m.end()
            continue
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j


def expand_use_tree(tree):
    """`a::{b, c::{d, e as f}}` -> [([a, b], None), ([a, c, d], None), ([a, c, e], "f")]."""
    tree = re.sub(r"\s+as\s+", "@", tree)
    tree = re.sub(r"\s+", "", tree)

    def parse(s, prefix):
        results, depth, start, parts = [], 0, 0, []
        for k, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:k])
                start = k + 1
        parts.append(s[start:])
        for part in filter(None, parts):
            if "{" in part:
                head, rest = part.split("{", 1)
                results += parse(rest[:-1], prefix + [x for x in head.split("::") if x])
            else:
                name, _, alias = part.partition("@")
                results.append((prefix + [x for x in name.split("::") if x], alias or None))
        return results

    return parse(tree, [])


def load_crate(root_file, crate):
    modules = {}
    macros = {}

    def load(path, file, text=None):
        module = Module(path, file, crate)
        modules[path] = module
        raw = file.read_text() if text is None else text
        code = strip_test_modules(strip_comments(raw))
        # Inline modules are rare here; `mod x;` names a file.
        for m in re.finditer(r"(?:#\[path\s*=\s*\"([^\"]+)\"\]\s*)?(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code):
            name = m.group(2)
            if m.group(1):
                child = (file.parent / m.group(1)).resolve()
            else:
                base = file.parent if file.name in ("mod.rs", "lib.rs", "main.rs") else file.parent / file.stem
                child = base / f"{name}.rs"
                if not child.exists():
                    child = base / name / "mod.rs"
            if child.exists():
                module.children[name] = load(path + (name,), child)
        for m in re.finditer(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*\{", code):
            # an inline module: its items count as the file's own
            module.items.add(m.group(1))
        for m in ITEM_RE.finditer(code):
            module.items.add(m.group(2))
        for m in re.finditer(r"#\[macro_export\]\s*macro_rules!\s*(\w+)", code):
            macros[m.group(1)] = file  # `#[macro_export]` puts it at the crate root
        for m in USE_RE.finditer(code):
            is_pub = bool(m.group(1))
            for segments, alias in expand_use_tree(m.group(2)):
                if segments and segments[-1] == "self":
                    segments = segments[:-1]
                absolute = absolutize(segments, path, module)
                if absolute is None:
                    if is_pub and segments and segments[-1] not in ("*", "self"):
                        # An external name re-exported here: to the crate, defined here.
                        module.items.add(alias or segments[-1])
                    continue
                # Every `use` binds the name for the module's children too; a module root's
                # `pub use` is its facade (a re-export), not an import of its own.
                if not (is_pub and file.name in ("mod.rs", "lib.rs", "main.rs")):
                    module.uses.append(absolute)
                if absolute[-1] == "*":
                    module.globs.append(absolute[:-1])
                else:
                    module.bindings[alias or absolute[-1]] = absolute
        for m in re.finditer(r"\$crate((?:::[A-Za-z_][A-Za-z0-9_]*)+)", code):
            # An exported macro's `$crate::` paths are its defining file's dependencies.
            module.uses.append(("crate",) + tuple(m.group(1).split("::")[1:]))
        for m in INLINE_PATH_RE.finditer(code):
            segments = m.group(1).split("::")
            absolute = absolutize(segments, path, module)
            if absolute is not None:
                module.uses.append(absolute)
        return module

    load((), root_file)
    for name, file in macros.items():
        modules[()].macros[name] = file
    return modules


def absolutize(segments, module_path, module):
    if not segments:
        return None
    head = segments[0]
    if head in module.children:  # `use child::Item`, relative to the module
        return ("crate",) + tuple(module_path) + tuple(segments)
    if head == "crate":
        return ("crate",) + tuple(segments[1:])
    if head in ("self", "super"):
        base = list(module_path)
        rest = list(segments)
        while rest and rest[0] in ("self", "super"):
            if rest.pop(0) == "super":
                if not base:
                    return None
                base.pop()
        return ("crate",) + tuple(base) + tuple(rest)
    return None  # an external crate, std, or a name relative to the module (not followed)


class Resolver:
    def __init__(self, modules):
        self.modules = modules

    def resolve(self, absolute, seen=None):
        """The file defining the item `absolute` names (or the module's file if it names a
        module); follows `use` bindings and re-exports."""
        seen = seen or set()
        if absolute in seen:
            return None
        seen.add(absolute)
        parts = list(absolute[1:])
        if parts and parts[-1] == "*":
            parts = parts[:-1]
        module = self.modules[()]
        i = 0
        while i < len(parts) and parts[i] in module.children:
            module = module.children[parts[i]]
            i += 1
        if i == len(parts):
            return module.file
        name = parts[i]
        if i == 0 and name in module.macros:
            return module.macros[name]
        if name in module.bindings:
            target = module.bindings[name]
            return self.resolve(target + tuple(parts[i + 1 :]), seen)
        if name in module.items:
            return module.file
        for glob in module.globs:
            inner = glob + (name,)
            try:
                found = self.resolve(inner + tuple(parts[i + 1 :]), seen)
            except KeyError:
                found = None
            if found:
                return found
        return None


def tarjan(graph):
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            result.append(component)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return result


def main():
    show_edges = "--edges" in sys.argv
    problems = []
    graph = {}
    edge_count = 0
    for crate, root in (("lib", SRC / "lib.rs"), ("bin", SRC / "bin" / "weir" / "main.rs")):
        modules = load_crate(root, crate)
        resolver = Resolver(modules)
        root_module = modules[()]
        for module in modules.values():
            rel = module.file.relative_to(ROOT).as_posix()
            graph.setdefault(rel, set())
            for absolute in module.uses:
                target = resolver.resolve(absolute)
                if target is None:
                    if absolute[1:2] and absolute[1] in ("__private",):
                        continue
                    problems.append(f"{rel}: cannot resolve {'::'.join(absolute)}")
                    continue
                target_rel = target.relative_to(ROOT).as_posix()
                named = absolute[1:]
                if module.path[: len(named)] == named:
                    continue  # `super::super`, an ancestor module: containment, not an import
                # Importing a name the crate root re-exports from elsewhere (`crate::Router`).
                if (
                    crate == "lib"
                    and module.path
                    and len(absolute) >= 2
                    and absolute[1] not in root_module.children
                    and absolute[1] in root_module.bindings
                ):
                    problems.append(
                        f"{rel}: imports {'::'.join(absolute)} through the crate root; name its module"
                    )
                if target == module.file or target == root:
                    continue
                # A parent naming a child module is containment, not an import.
                if target_rel not in graph[rel]:
                    graph[rel].add(target_rel)
                    edge_count += 1
                if crate == "lib":
                    src_top = module.path[0] if module.path else None
                    target_top = target.relative_to(SRC).parts[0].removesuffix(".rs")
                    if src_top and src_top != target_top and src_top in LAYERS:
                        if target_top not in LAYERS[src_top]:
                            problems.append(
                                f"{rel} imports {target_rel} ({'::'.join(absolute)}): "
                                f"`{src_top}` may not depend on `{target_top}` (src/lib.rs's layout map)"
                            )
    for component in tarjan(graph):
        if len(component) > 1:
            problems.append("import circle: " + " -> ".join(sorted(component)))
    if show_edges:
        for source in sorted(graph):
            for target in sorted(graph[source]):
                print(f"{source} -> {target}")
    problems = list(dict.fromkeys(problems))
    for problem in problems:
        print(problem)
    print(f"import graph: {len(graph)} files, {edge_count} edges, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
