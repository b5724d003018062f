"""The product's shape: no module over 400 lines, no import cycle (counting imports inside
functions too), the hook on the standard library alone, and nothing of the testbed inside."""

from __future__ import annotations

import ast
import os
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit
PKG = os.path.join(REPO, "vfio_hookd")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the product package."""
    out = {}
    for dirpath, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """Product modules that ``name`` imports anywhere in its file (module level or not)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_product_module_is_over_400_lines():
    sizes = {n: sum(1 for _ in open(p)) for n, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > 400} == {}


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    # a package importing its own submodules (re-exports) is not a cycle through the package
    for n in graph:
        graph[n] = {t for t in graph[n] if not t.startswith(n + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_the_hook_imports_only_the_standard_library():
    path = os.path.join(PKG, "qemu_hook.py")
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the hook is installed alone: no relative import"
            names.add(node.module.split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_the_product_knows_nothing_of_the_testbed():
    """No import of it, and no switch to a simulated host (the tests pass their host in)."""
    mods = _modules()
    for name, path in mods.items():
        text = open(path).read()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "testbed" for a in node.names), name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != "testbed", name
        for word in ('".sim"', "'.sim'", "SimHost", "VFIO_HOOKD_HOST_ROOT",
                     "simulated ="):
            assert word not in text, f"{name} mentions {word}"
    assert not any(n.startswith("vfio_hookd.sim") or n == "vfio_hookd.demo" for n in mods)
