"""The layers: the math and the networks know nothing of torch's compiler (importing them loads
neither dynamo nor funcppo's compiler seam, and their source has no branch on being compiled, so
a compiled function runs the same arithmetic as its eager twin); each subpackage imports only
the layers below it; no module imports another in a cycle or takes a private name of another;
``import funcppo`` loads no torch."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE = tuple(
    f"core.{name}"
    for name in (
        "random",
        "spec",
        "distributions",
        "advantages",
        "losses",
        "optim",
        "normalize",
        "networks",
        "flat",
        "constants",
        "config",
    )
)
COMPILER = (
    "torch._dynamo",
    "torch._inductor",
    "funcppo.accel.compiling",
    "funcppo.accel.precompile",
)
# Text that only code aware of the compiler writes.
COMPILER_WORDS = (
    "is_compiling",
    "torch.compiler",
    "torch._dynamo",
    "torch._inductor",
    "funcppo.accel.compiling",
    "funcppo.accel.precompile",
    "import compiling",
    "import precompile",
)

# Imports the modules one after the other in a fresh interpreter and prints, after each, the
# compiler modules loaded so far: the first module with a non-empty list is the one to blame.
PROBE = f"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
report = {{}}
for name in sys.argv[2:]:
    importlib.import_module("funcppo." + name)
    report[name] = [m for m in {COMPILER!r} if m in sys.modules]
print(json.dumps(report))
"""


def source(name: str) -> str:
    spec = importlib.util.find_spec(f"funcppo.{name}")
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin).read_text()


def test_importing_the_math_loads_no_compiler():
    # The funcppo under test, wherever it was imported from.
    src = Path(importlib.util.find_spec("funcppo").origin).parent.parent
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(src), *PURE],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(report) == list(PURE)
    assert {name: loaded for name, loaded in report.items() if loaded} == {}


@pytest.mark.parametrize("name", PURE)
def test_the_math_has_no_compile_only_code(name):
    text = source(name)
    assert [word for word in COMPILER_WORDS if word in text] == []


# Each layer and the layers it may import (its own included).
LAYERS = {
    "core": {"core"},
    "accel": {"core", "accel"},
    "envs": {"core", "envs"},
    "training": {"core", "accel", "envs", "training"},
    "agent": {"core", "accel", "envs", "training", "agent"},
    "cli": {"core", "accel", "envs", "training", "agent", "cli"},
}


def package_modules() -> dict[str, Path]:
    root = Path(importlib.util.find_spec("funcppo").origin).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("funcppo", *parts))] = path
    return modules


def imports_of(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from funcppo... import`` / ``import funcppo...`` in the
    file (those at module level only when ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("funcppo"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("funcppo")]
    return found


def test_every_subpackage_imports_only_the_layers_below_it():
    wrong = []
    for module, path in package_modules().items():
        layer = module.split(".")[1] if module.count(".") else None
        if layer not in LAYERS:
            continue  # funcppo itself and __main__: the entry points
        for target, _ in imports_of(path, top_level_only=False):
            used = target.split(".")[1] if target.count(".") else "funcppo"
            if used not in LAYERS[layer]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles_and_no_private_names_across_modules():
    modules = package_modules()
    graph = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for target, names in imports_of(path, top_level_only=False):
            private += [f"{module}: {target}.{n}" for n in names if n.startswith("_")]
        for target, names in imports_of(path, top_level_only=True):
            # ``from funcppo.pkg import mod`` imports the submodule ``funcppo.pkg.mod``.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            graph[module] |= {t for t in [target, *subs] if t in modules and t != module}
    assert private == []

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m)) is not None]
    assert cycles == []


def test_torchs_private_apis_are_used_inside_the_seam_only():
    """torch's private and experimental modules (``torch._*``, ``torch.utils._*``) are imported
    by ``funcppo.accel`` only, the one place to change for another torch release."""

    def private(name: str) -> bool:
        return any(part.startswith("_") for part in name.split(".")[1:])

    found = []
    for module, path in package_modules().items():
        if module.startswith("funcppo.accel"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [f"{module}: {n}" for n in names if n.startswith("torch") and private(n)]
    assert found == []
