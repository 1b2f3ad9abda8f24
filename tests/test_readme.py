"""The README's Python blocks run as written, in order, in one fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_script() -> str:
    """The README's ```python blocks as one script, each code line on its README line number
    (the other lines blank), so that a traceback points into the README."""
    lines = README.read_text(encoding="utf-8").splitlines()
    script, inside = [], False
    for line in lines:
        if not inside and line.strip() == "```python":
            inside = True
            script.append("")
        elif inside and line.strip() == "```":
            inside = False
            script.append("")
        else:
            script.append(line if inside else "")
    assert not inside, "README.md: a ```python block is not closed"
    return "\n".join(script) + "\n"


def test_readme_blocks_parse_and_fit():
    script = readme_script()
    assert script.strip(), "README.md has no ```python block"
    ast.parse(script, filename=str(README))
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 450


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    path = tmp_path / "readme.py"
    path.write_text(readme_script(), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,  # the blocks write under runs/
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"README.md's Python blocks failed (line numbers are README's):\n{output}"
    )
