"""The house rules of ``runtime/``, read from its source: imports point down the layers only,
the pure core reaches for no I/O, Ray is imported in one module, and no import cycle closes.

Every import counts, also the lazy ones inside functions. Layers, top to bottom (a module may
import its own package and any layer below its own; packages sharing a layer are independent):

    cli -> bench -> runtime (start/connect) -> launchers -> frontdoors | shells -> core
        -> backends -> wire -> config -> errors | env
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "runtime"
LAYERS = [{"cli"}, {"bench"}, {""}, {"launchers"}, {"frontdoors", "shells"}, {"core"},
          {"backends"}, {"wire"}, {"config"}, {"errors", "env"}]
NO_IO_IN_CORE = {"zmq", "ray", "subprocess", "aiohttp", "socket", "asyncio", "msgpack"}
RAY_ONLY_IN = {"runtime.launchers.ray"}


class Package:
    """The modules of a package folder and the imports of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = {self._name(p): p for p in root.rglob("*.py")}

    def _name(self, path: Path) -> str:
        parts = path.relative_to(self.root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def imports(self, name: str) -> list[tuple[str, int]]:
        """(absolute module imported, line) for every import statement of module ``name``."""
        path = self.modules[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from .. import env`` imports a module, not a name of the package
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in
                        self.modules]
                if len(subs) < len(node.names):
                    found.append((base, node.lineno))
                found += [(sub, node.lineno) for sub in subs]
        return found

    def internal(self) -> list[tuple[str, str, int]]:
        top = self.root.name
        return [(name, target, line) for name in sorted(self.modules)
                for target, line in self.imports(name)
                if target == top or target.startswith(top + ".")]

    def module_of(self, target: str) -> str:
        while target not in self.modules:  # a name inside a module
            target = target.rpartition(".")[0]
        return target


def part(module: str) -> str:
    """The top-level part of the package a module belongs to ("" for the package itself)."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def layer(module: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part(module) in parts)


def upward_imports(pkg: Package) -> list[str]:
    wrong = []
    for name, target, line in pkg.internal():
        if part(name) == part(target):
            continue  # inside one package
        if layer(target) <= layer(name):
            wrong.append(f"{pkg.modules[name].relative_to(pkg.root.parent)}:{line}: {name} "
                         f"imports {target} ({part(target) or 'the package'} is not below "
                         f"{part(name) or 'the package'})")
    return wrong


def import_cycles(pkg: Package) -> list[str]:
    graph: dict[str, set[str]] = {m: set() for m in pkg.modules}
    for name, target, _ in pkg.internal():
        target = pkg.module_of(target)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: not a cycle of ours.
        if target != name and not name.startswith(target + "."):
            graph[name].add(target)
    cycles, state = [], dict.fromkeys(graph, 0)

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif state[nxt] == 0:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    return cycles


RUNTIME = Package(ROOT)


def test_every_part_of_the_package_has_a_layer():
    unplaced = sorted({part(m) for m in RUNTIME.modules} - set().union(*LAYERS))
    assert not unplaced, f"runtime/ parts missing from LAYERS: {unplaced}"


def test_imports_point_down_the_layers_only():
    wrong = upward_imports(RUNTIME)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in RUNTIME.modules if part(m) == "core"))
def test_the_core_reaches_for_no_io(module):
    used = {t.split(".")[0] for t, _ in RUNTIME.imports(module)} & NO_IO_IN_CORE
    assert not used, f"{module} imports {sorted(used)}: the core is events in, actions out"


def test_ray_is_imported_only_by_the_ray_launcher():
    users = sorted(name for name in RUNTIME.modules for t, _ in RUNTIME.imports(name)
                   if t.split(".")[0] == "ray" and name not in RAY_ONLY_IN)
    assert not users, f"these modules import Ray: {users}"


def test_no_import_cycle_closes():
    cycles = import_cycles(RUNTIME)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checker itself, on a package made for it: a core module that imports a front door
    (lazily, inside a function), and two wire modules that import each other."""
    root = tmp_path / "runtime"
    files = {"__init__.py": "", "core/__init__.py": "", "frontdoors/__init__.py": "",
             "frontdoors/client.py": "", "wire/__init__.py": "",
             "core/x.py": "def f():\n    from ..frontdoors import client\n",
             "wire/a.py": "from . import b\n", "wire/b.py": "from .a import name\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    pkg = Package(root)
    assert upward_imports(pkg) == ["runtime/core/x.py:2: runtime.core.x imports "
                                   "runtime.frontdoors.client (frontdoors is not below core)"]
    assert import_cycles(pkg) == ["runtime.wire.a -> runtime.wire.b -> runtime.wire.a"]
