"""The package's layout: no import cycle between modules, light modules stay light, the README's module map
matches the tree, and every seed stream is distinct."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "freezeasguard"
README = Path(__file__).resolve().parents[1] / "README.md"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any level: top, inside functions, TYPE_CHECKING too)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        pkg = mod if _is_package(path) else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [src] + [f"{src}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among modules, ignoring the edge from a package's __init__ to its own submodules (running a
    submodule runs its package first, which is not a dependency of the submodule on its siblings)."""
    def deps(m: str) -> set[str]:
        return {d for d in graph[m] if not d.startswith(m + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": set()}) is None  # a package importing its own module


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in SRC.rglob("*.py")} | {p.name for p in SRC.rglob("*") if p.is_dir()}
    clashes = sorted(n for n in names if n in sys.stdlib_module_names and n != "__init__" and n != "__main__")
    assert not clashes, f"modules named like the standard library's: {clashes}"


def test_light_modules_do_not_import_torch():
    for mod in ("freezeasguard.service.config", "freezeasguard.configs", "freezeasguard.bench.goals"):
        code = f"import sys, {mod}; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False", f"importing {mod} imports torch"


def test_readme_module_map_matches_the_tree():
    text = README.read_text()
    section = text[text.index("## Module map"):]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    listed = set(re.findall(r"`freezeasguard\.([\w.]+)`", section))
    actual = {_module_name(p).removeprefix("freezeasguard.") for p in SRC.rglob("*.py")
              if not p.name.startswith("_") or p.name == "__init__.py"}
    actual.discard("freezeasguard")
    missing = sorted(m for m in actual if m not in listed)
    stale = sorted(m for m in listed if m not in actual)
    assert not missing, f"modules missing from the README's module map: {missing}"
    assert not stale, f"README module map names modules that do not exist: {stale}"


def test_seed_streams_are_distinct():
    from freezeasguard import seeding

    values = list(seeding.streams().values())
    assert len(values) == len(set(values)), seeding.streams()
    assert len(values) >= 10
