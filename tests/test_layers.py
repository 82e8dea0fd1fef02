"""The package's layers, checked: every mxfx module imports only from its own layer or the ones below
(module-level and function-local imports alike), and no two modules import each other in a loop.

The layers, bottom up (docs/architecture.md): errors/_compat (and progress, resume_files), numerics, recovery, the graph model
(config, export, sites), passes, the graph tools (prepare, checks, inspect, ...), analysis, io and
integrations, then cli and the package face. A new module takes its layer from its folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # (rank, module name or package prefix); the longest matching name wins
    (0, "mxfx.errors"), (0, "mxfx._compat"), (0, "mxfx.progress"), (0, "mxfx.resume_files"),
    (1, "mxfx.numerics"),
    (2, "mxfx.recovery"),
    (3, "mxfx.graph.config"), (3, "mxfx.graph.export"), (3, "mxfx.graph.sites"),
    (4, "mxfx.passes"),
    (5, "mxfx.graph"),
    (6, "mxfx.analysis"),
    (7, "mxfx.io"), (7, "mxfx.integrations"), (7, "mxfx.testing"),
    (8, "mxfx.cli"), (8, "mxfx.__main__"), (8, "mxfx"),
]


def rank(module: str) -> int:
    best = max((name for _, name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return dict((name, r) for r, name in LAYERS)[best]


def modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "mxfx", "mxfx"), (ROOT / "passes", "mxfx.passes")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str], package: bool) -> list[tuple[str, int, bool]]:
    """(imported mxfx module, line, at module level) for each import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.startswith("mxfx"):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                out.append((target, node.lineno, id(node) in top_level))
    return out


def test_no_module_imports_from_a_higher_layer():
    found = modules()
    upward = []
    for name, path in found.items():
        for target, line, _ in imports(name, path, set(found), path.name == "__init__.py"):
            if target != "mxfx" and rank(target) > rank(name):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {name} (layer {rank(name)}) imports {target} "
                              f"(layer {rank(target)})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = modules()
    edges = {name: {t for t, _, _ in imports(name, path, set(found), path.name == "__init__.py") if t != name}
             for name, path in found.items()}
    # a package's face (__init__) re-exports its modules; only module -> module loops matter
    edges = {n: {t for t in ts if t not in ("mxfx",)} for n, ts in edges.items() if n != "mxfx"}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a numerics module importing the analysis layer is caught."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from mxfx.analysis.search import search\n")
    found = modules()
    (target, _, at_top), = imports("mxfx.numerics.bad", path, set(found), False)
    assert target == "mxfx.analysis.search" and not at_top and rank(target) > rank("mxfx.numerics.bad")
