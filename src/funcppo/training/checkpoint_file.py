"""A checkpoint file's dict: read without running anything, its fields checked, its checksums
made and verified. ``funcppo.training.checkpoint`` gives the fields their meaning.

Every tensor under ``"state"`` and ``"extra"`` has a checksum, the sha256 of its dtype and
shape (``f"{dtype} {list(shape)}"``) followed by its bytes in C order, and ``"meta"`` is the
sha256 of the JSON (sorted keys) of ``format``, ``version``, ``config``, ``architecture`` and
``batch_shape``. A flipped bit anywhere in a tensor or in the metadata fails its checksum; a
damaged zip structure fails ``torch.load`` itself. Either way the file is refused with a
``CheckpointError``, never read with unpickling turned on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_VERSION",
    "FORMAT",
    "CheckpointError",
    "check_fields",
    "checksums",
    "read_checkpoint_file",
    "tensor_digest",
    "verify_checksums",
]

# 2: checksums of every tensor and of the metadata; 1: the same dict without them.
CHECKPOINT_VERSION = 2
FORMAT = "funcppo.training.checkpoint"
_META = ("format", "version", "config", "architecture", "batch_shape")


class CheckpointError(ValueError):
    """A file that is not a funcppo checkpoint, is damaged, or holds unusable values; the
    message names the file and, where one is at fault, the entry."""


def _refuse(path: str | os.PathLike, why: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: not a funcppo checkpoint or is damaged: {why}")


def _load_failure(error: Exception) -> str:
    """Why ``torch.load`` failed, in words of our own: torch's messages for these cases advise
    unpickling with weights_only=False, which would run whatever code the file carries."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds pickled Python objects or is no pickle at all; refused unread"
    if isinstance(error, EOFError):
        return "it is empty or ends early"
    return f"torch.load cannot read it as a zip archive of tensors ({type(error).__name__})"


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in ``path``, loaded on the CPU with ``weights_only=True``.

    Raises FileNotFoundError for a missing file and ``CheckpointError`` for one that torch
    cannot read or that holds anything but a dict; the fields are not checked here.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no checkpoint at this path", os.fspath(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (IsADirectoryError, PermissionError):
        raise
    except Exception as error:
        # from None: the chained torch error would print the unpickling advice after all.
        raise _refuse(path, _load_failure(error)) from None
    if not isinstance(raw, dict):
        raise _refuse(path, f"expected a dict, got {type(raw).__name__}")
    return raw


def check_fields(raw: dict[str, Any], path: str | os.PathLike) -> int:
    """The file's version, after checking that ``raw`` is a readable funcppo checkpoint
    (version 1 or 2) whose fields have their types; the way to upgrade an older file."""
    if "version" not in raw and {"params", "step"} <= set(raw):
        raise CheckpointError(
            f"{os.fspath(path)}: version 0 checkpoint (the bare CLI format: params and step "
            f"only, no optimizer state or config); this loader reads version "
            f"{CHECKPOINT_VERSION}. Upgrade it with "
            "funcppo.training.checkpoint.upgrade_checkpoint(path, config)."
        )
    version = raw.get("version")
    if raw.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int):
        raise _refuse(path, "no format/version fields")
    if version > CHECKPOINT_VERSION or version < 1:
        raise CheckpointError(
            f"{os.fspath(path)}: checkpoint version {version}, this funcppo reads versions 1 "
            f"to {CHECKPOINT_VERSION}; "
            + ("upgrade funcppo to read it." if version > CHECKPOINT_VERSION else "damaged?")
        )
    kinds = {"config": str, "architecture": str, "batch_shape": list, "state": dict}
    kinds |= {"extra": dict, "step": Tensor}
    for name, kind in kinds.items():
        if not isinstance(raw.get(name), kind):
            got = "nothing" if name not in raw else type(raw[name]).__name__
            raise _refuse(path, f"{name}: expected a {kind.__name__}, got {got}")
    shape = raw["batch_shape"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise _refuse(path, f"batch_shape: expected positive ints, got {shape!r:.80}")
    for section in ("state", "extra"):
        for name, value in raw[section].items():
            if not isinstance(name, str) or not isinstance(value, Tensor):
                got = type(value).__name__
                raise _refuse(path, f"{section}[{name!r}]: expected a tensor, got {got}")
    return version


def tensor_digest(x: Tensor) -> str:
    """The sha256 of ``x``'s dtype, shape and bytes (C order), as hex."""
    x = x.detach().cpu()
    digest = hashlib.sha256(f"{x.dtype} {list(x.shape)}".encode())
    flat = x.reshape(-1)
    if flat.numel() and flat.stride() != (1,):  # a broadcast element (stride 0) or a gather
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _meta_digest(raw: dict[str, Any]) -> str:
    meta = json.dumps({name: raw[name] for name in _META}, sort_keys=True)
    return hashlib.sha256(meta.encode()).hexdigest()


def checksums(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``"checksums"`` field for the file dict ``raw``."""
    return {
        "meta": _meta_digest(raw),
        "state": {name: tensor_digest(x) for name, x in raw["state"].items()},
        "extra": {name: tensor_digest(x) for name, x in raw["extra"].items()},
    }


def verify_checksums(raw: dict[str, Any], path: str | os.PathLike) -> None:
    """Every checksum in ``raw`` matches, and every tensor has one, or a ``CheckpointError``
    naming the first entry that does not."""
    where = os.fspath(path)
    sums = raw.get("checksums")
    if not isinstance(sums, dict) or not {"meta", "state", "extra"} <= set(sums):
        raise CheckpointError(f"{where}: checksums: missing; version 2 files have them (damaged?)")
    if sums["meta"] != _meta_digest(raw):
        raise CheckpointError(
            f"{where}: metadata ({', '.join(_META)}): checksum mismatch; the file is damaged"
        )
    for section in ("state", "extra"):
        tensors, listed = raw[section], sums[section]
        if not isinstance(listed, dict):
            raise CheckpointError(f"{where}: checksums[{section!r}]: expected a dict (damaged?)")
        for name in sorted(set(tensors) | set(listed)):
            if name not in tensors:
                raise CheckpointError(f"{where}: {section}[{name!r}]: missing (damaged?)")
            if name not in listed:
                raise CheckpointError(f"{where}: {section}[{name!r}]: no checksum (damaged?)")
            if tensor_digest(tensors[name]) != listed[name]:
                raise CheckpointError(
                    f"{where}: {section}[{name!r}]: checksum mismatch; its bytes are damaged"
                )
