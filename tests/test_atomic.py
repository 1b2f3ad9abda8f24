"""Files replaced whole: the umask's mode, no temporary left by an interrupted write, and the
temporaries of killed writers removed by the next write while a live writer's are kept."""

import os
import subprocess
import sys
import time

import pytest
import torch

from funcppo.core.atomic import STALE_AFTER_S, temporary_name, write_atomic


class Killed(BaseException):
    """Stands for a kill that Python sees (KeyboardInterrupt, SystemExit): not an Exception."""


@pytest.fixture
def umask():
    """Sets the process umask for a test and restores the one before."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_mode_follows_the_umask_as_torch_save_does(tmp_path, umask, mask):
    umask(mask)
    write_atomic(tmp_path / "a.bin", lambda f: f.write(b"data"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    assert mode == 0o666 & ~mask == (tmp_path / "b.pt").stat().st_mode & 0o777
    assert (tmp_path / "a.bin").read_bytes() == b"data"


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    write_atomic(path, lambda f: f.write(b"old"))

    def killed_midway(f):
        f.write(b"x" * 4096)
        raise Killed

    with pytest.raises(Killed):
        write_atomic(path, killed_midway)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert path.read_bytes() == b"old"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "c.pt"
    dead = tmp_path / temporary_name(path, _dead_pid())
    live = tmp_path / temporary_name(path, os.getpid())
    other_target = tmp_path / temporary_name(tmp_path / "c.pt.bak", _dead_pid())
    old_style = tmp_path / ".c.pt.k2j4x9_q.tmp"  # tempfile.mkstemp's name: no writer recorded
    fresh_old_style = tmp_path / ".c.pt.a8d3kd0s.tmp"
    unrelated = tmp_path / ".c.pt.notes"
    for p in (dead, live, other_target, old_style, fresh_old_style, unrelated):
        p.write_bytes(b"partial")
    stale = time.time() - STALE_AFTER_S - 60
    os.utime(old_style, (stale, stale))
    assert dead.name.startswith(".c.pt.") and dead.name.endswith(".tmp")

    write_atomic(path, lambda f: f.write(b"new"))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"c.pt", live.name, other_target.name, fresh_old_style.name, unrelated.name}

    # A temporary nobody has touched for longer than STALE_AFTER_S goes, whoever wrote it: a
    # live process with the recorded id may be a later one that reused a dead writer's id.
    os.utime(live, (stale, stale))
    write_atomic(path, lambda f: f.write(b"newer"))
    assert live.name not in {p.name for p in tmp_path.iterdir()}
    assert path.read_bytes() == b"newer"


def test_a_write_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_atomic(tmp_path / "nope" / "a.bin", lambda f: f.write(b"x"))
