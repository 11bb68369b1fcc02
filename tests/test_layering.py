"""The subpackages form a DAG with core at the bottom (DESIGN.md, "Layout").

Every import statement counts, including those inside functions: a lazy import is
still a dependency, and two lazily importing each other is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import deltakit

ROOT = Path(deltakit.__file__).parent


def _unit(module: str) -> str | None:
    """``deltakit.io.files`` -> ``io``; ``deltakit._fmt`` -> ``_fmt``; the package's front door
    (``deltakit``, or a name re-exported by it such as ``deltakit.attach``) -> ``deltakit``."""
    parts = module.split(".")
    if parts[0] != "deltakit":
        return None
    if len(parts) == 1 or not ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").is_file()):
        return "deltakit"
    return parts[1]


def _imports(source: str, pkg: list[str]) -> set[str]:
    """Absolute module names imported anywhere in ``source``, a module of package ``pkg``."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # "from .. import x": x may be a submodule
                    out.update(f"{mod}.{a.name}" for a in node.names)
                    continue
            else:
                mod = node.module or ""
            out.add(mod)
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if me == "__init__":
            continue  # the package's front door re-exports everything by design
        pkg = list(path.relative_to(ROOT.parent).parts[:-1])
        deps = {_unit(m) for m in _imports(path.read_text(), pkg)} - {None, me}
        if deps:
            edges.setdefault(me, set()).update(deps)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_core_imports_no_other_subpackage():
    edges = graph()
    assert edges.get("core", set()) <= set(), f"core imports {sorted(edges['core'])}"


def test_no_subpackage_imports_the_package_front_door():
    bad = sorted(u for u, deps in graph().items() if "deltakit" in deps)
    assert not bad, f"{bad} import the top-level deltakit package (import the defining module instead)"


def test_subpackages_form_a_dag():
    assert _cycle(graph()) is None, f"import cycle between subpackages: {' -> '.join(_cycle(graph()))}"


def test_the_checker_sees_cycles_lazy_and_relative_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    src = "from ..io import files\nfrom .. import attach\ndef f():\n    import deltakit.taskvec._lowrank\n"
    assert {_unit(m) for m in _imports(src, ["deltakit", "core"])} == {"io", "deltakit", "taskvec"}
