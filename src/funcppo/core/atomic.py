"""Files replaced whole: written to a temporary file beside the target, then renamed over it.

A reader of the target sees the old file or the new one, never a mix, whatever happens to the
writer. The temporary file is created with mode ``0o666`` and the process umask applies, so
the target gets the mode that ``open``, ``torch.save`` or ``numpy.save`` would give it (mkstemp's
``0o600`` would hide a checkpoint from the rest of a group that shares runs). A write that
raises (KeyboardInterrupt included) removes its temporary file; one killed outright cannot, so
every write first removes the temporaries of the same target that a dead writer left behind.

A temporary file is named ``.NAME.PID@HOST.TOKEN.tmp``: the writer's process id and a short hash
of its host name. One is stale, and removed, when its writer is a process of this host that no
longer runs, or when nobody has written to it for ``STALE_AFTER_S`` (a process id can be
reused, and another host's processes cannot be asked); a live writer's file is left alone.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["STALE_AFTER_S", "temporary_name", "write_atomic"]

# A writer updates its temporary file's mtime with every write, and renames it right after
# the last one; half an hour untouched is far beyond any real pause between writes.
STALE_AFTER_S = 30 * 60
# The random part of tempfile.mkstemp's names, which earlier funcppo versions used: they
# record no writer, so only their age makes them stale.
_MKSTEMP_NAME = r"[a-z0-9_]{8}"


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_name(path: str | os.PathLike, pid: int) -> str:
    """The name of a temporary file for ``path`` written by process ``pid`` of this host."""
    return f".{Path(path).name}.{pid}@{_host()}.{secrets.token_hex(4)}.tmp"


def _pid_is_dead(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of ``path`` whose writers are dead or long gone quiet."""
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.(\d+)@([0-9a-f]{{8}})\.[0-9a-f]+\.tmp")
    old = re.compile(rf"\.{name}\.{_MKSTEMP_NAME}\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = ours.fullmatch(entry.name)
        if match is None and old.fullmatch(entry.name) is None:
            continue
        try:
            quiet = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            dead = match is not None and match[2] == _host() and _pid_is_dead(int(match[1]))
            if quiet or dead:
                os.unlink(entry.path)
        except OSError:  # removed meanwhile by another writer, or not ours to remove
            continue


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, atomically and durably.

    ``write`` gets a binary file open for writing; its data is fsynced, the file renamed over
    ``path`` and the folder fsynced, so after a crash ``path`` holds the old contents or the
    new ones. Any exception, KeyboardInterrupt included, removes the temporary file and
    propagates. The folder must exist.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder to write into", str(directory))
    _remove_stale(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = directory / temporary_name(path, os.getpid())
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as it does for open()
            break
        except FileExistsError:  # a random token repeated: draw another
            continue
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # a folder cannot be opened for fsync elsewhere
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
