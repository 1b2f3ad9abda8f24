"""The math and the networks know nothing of torch's compiler: importing them loads neither
dynamo nor funcppo's compiler seam, and their source has no branch on being compiled, so a
compiled function runs the same arithmetic as its eager twin."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE = (
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
)
COMPILER = ("torch._dynamo", "torch._inductor", "funcppo.compiling", "funcppo.precompile")
# Text that only code aware of the compiler writes.
COMPILER_WORDS = (
    "is_compiling",
    "torch.compiler",
    "torch._dynamo",
    "torch._inductor",
    "funcppo.compiling",
    "funcppo.precompile",
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
