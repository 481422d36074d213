"""
reading_path.py: how long the lesson is, and whether the repository keeps its shape.

    python tools/reading_path.py            # the reading-path table the README shows

nanofuse is read top to bottom: the method and its plain path live in the top-level files, everything a
learner does not need (file formats, fast paths, distributed plumbing, benchmark readers) one import away in
extras/. This counts the lines of each part, the lines wider than 100 characters, and checks that no two
modules import each other, directly or around a loop (imports inside functions count; a script's
`if __name__ == "__main__":` block does not, since it runs only as the program). The tests hold the
figures to the budgets below.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READING_ORDER = ("fusellm.py", "align.py", "data.py", "train.py", "eval.py", "model.py", "tokenizer.py",
                 "common.py")
DEMO = "demo.py"
MAX_TOTAL = 2400          # lines of the reading path together
MAX_FILE = 450            # lines of any one top-level file (demo.py included)
MAX_WIDTH = 100           # characters a line


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def wide_lines(path: Path, width: int = MAX_WIDTH) -> list[int]:
    """The 1-based numbers of the lines longer than `width` characters."""
    return [i for i, line in enumerate(lines(path), 1) if len(line) > width]


def modules() -> dict[str, Path]:
    """The project's own modules by import name: top-level files, extras.NAME and tools.NAME."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in ("extras", "tools"):
        for p in (ROOT / package).glob("*.py"):
            found[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return found


def is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere (functions included), except in its __main__ block."""
    found = set()

    def visit(node):
        if is_main_block(node):
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in known)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_cycles() -> list[list[str]]:
    """Every loop in the import graph, each as the modules around it (empty: none)."""
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    cycles, done = [], set()

    def walk(name, stack):
        if name in stack:
            cycles.append(stack[stack.index(name):] + [name])
            return
        if name in done:
            return
        for nxt in sorted(graph[name]):
            walk(nxt, stack + [name])
        done.add(name)
    for name in sorted(graph):
        walk(name, [])
    return cycles


def table() -> str:
    rows = ["| part | lines | wider than 100 |", "| --- | ---: | ---: |"]
    total = 0
    for f in READING_ORDER:
        n = len(lines(ROOT / f))
        total += n
        rows.append(f"| {f} | {n} | {len(wide_lines(ROOT / f))} |")
    rows.append(f"| **reading path** ({len(READING_ORDER)} files) | **{total}** | |")
    rows.append(f"| {DEMO} | {len(lines(ROOT / DEMO))} | {len(wide_lines(ROOT / DEMO))} |")
    for package in ("extras", "tools"):
        files = sorted((ROOT / package).glob("*.py"))
        rows.append(f"| {package}/ ({len(files)} files) | {sum(len(lines(p)) for p in files)} | |")
    return "\n".join(rows)


def main():
    print(table())
    cycles = import_cycles()
    print("\nimport cycles: " + ("none" if not cycles else "; ".join(" -> ".join(c) for c in cycles)))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
