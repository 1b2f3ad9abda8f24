"""Checkpoints that hold tensors and JSON only, written atomically and checked on load.

A file is a plain dict that ``torch.load(path, weights_only=True)`` reads without unpickling any
Python object: ``"state"`` maps the name of every TrainState leaf (``"params['torso']['w0']"``,
``"opt_state[1].mu['value']['b']"``, ``"step"``, ...) to its tensor, stacked seeds keeping their
leading axis; ``"config"`` and ``"architecture"`` are JSON strings; ``"extra"`` holds the
caller's named tensors; ``"step"`` repeats the step tensor for quick inspection.

Loading rebuilds the pytree structure from the stored config (``init_train_state`` makes a
template whose leaves are replaced), so no structure is ever unpickled, and every leaf's name,
shape and dtype is checked against that template. Seed 003 6.3: the architecture is stored
and validated, never inferred from weights. Seed 004 M4: an old format is refused with the way
to upgrade it, and ``upgrade_checkpoint`` does it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from funcppo import random as jr
from funcppo.config import PPOConfig
from funcppo.networks import check_params
from funcppo.normalize import init_running_stats
from funcppo.spec import ActionSpec
from funcppo.state import TrainState, init_train_state

__all__ = [
    "CHECKPOINT_VERSION",
    "config_from_dict",
    "config_to_dict",
    "load_checkpoint",
    "save_checkpoint",
    "upgrade_checkpoint",
]

CHECKPOINT_VERSION = 1
_FORMAT = "funcppo.checkpoint"
# Fields that may differ between the stored config and the caller's: they do not change the
# computation's result (compiling or not gives the same update).
_FREE_FIELDS = frozenset({"compile"})


def _spec_to_dict(spec: ActionSpec) -> dict[str, Any]:
    return {
        "heads": [[name, size] for name, size in spec.heads],
        "op_head": spec.op_head,
        "causal": [sorted(row) for row in spec.causal],
        "op_conditioned": sorted(spec.op_conditioned),
        "op_names": None if spec.op_names is None else list(spec.op_names),
    }


def config_to_dict(config: PPOConfig) -> dict[str, Any]:
    """Every field of ``config`` as JSON-able values (tuples become lists, the spec a dict)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, ActionSpec):
            out[field.name] = _spec_to_dict(value)
        elif isinstance(value, tuple):
            out[field.name] = [list(v) if isinstance(v, tuple) else v for v in value]
        else:
            out[field.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> PPOConfig:
    """The inverse of ``config_to_dict``; the config validates itself on construction."""
    known = {field.name for field in dataclasses.fields(PPOConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config: unknown fields {unknown}")
    values = dict(data)
    spec = values.get("spec")
    if not isinstance(spec, dict):
        raise ValueError(f"config.spec: expected a dict, got {type(spec).__name__}")
    values["spec"] = ActionSpec(
        [tuple(pair) for pair in spec["heads"]],
        spec["op_head"],
        spec["causal"],
        op_conditioned=spec["op_conditioned"],
        op_names=spec["op_names"],
    )
    for name in ("torso_sizes", "head_ent_coef", "entropy_floor"):
        if name in values:
            values[name] = tuple(tuple(v) if isinstance(v, list) else v for v in values[name])
    return PPOConfig(**values)


def _architecture(config: PPOConfig) -> dict[str, Any]:
    """What sets the parameter shapes (seed 003 6.3: stored, not inferred)."""
    return {
        "obs_dim": config.obs_dim,
        "heads": [[name, size] for name, size in config.spec.heads],
        "torso_sizes": list(config.torso_sizes),
        "recurrent": config.recurrent,
        "lstm_size": config.lstm_size if config.recurrent else None,
        "shared_torso": config.shared_torso,
    }


def _leaf_name(accessor: optree.PyTreeAccessor) -> str:
    return accessor.codify("").removeprefix(".")


def _flatten(state: TrainState) -> dict[str, Tensor]:
    accessors, leaves, _ = optree.tree_flatten_with_accessor(state, none_is_leaf=False)
    return {_leaf_name(a): leaf for a, leaf in zip(accessors, leaves, strict=True)}


def _template(
    config: PPOConfig, batch_shape: tuple[int, ...], device, names: Any = ()
) -> TrainState:
    """The TrainState a file for ``config`` holds; with observation statistics where ``names``
    (the stored leaf names) has them (``make_train`` with ``normalize_obs``)."""
    if len(batch_shape) > 1:
        raise ValueError(f"state.step: expected shape [] or [S], got {list(batch_shape)}")
    base = jr.key(0, device)
    keys = jr.split(base, batch_shape[0]) if batch_shape else base
    template = init_train_state(keys, config)
    if any(name.startswith("obs_stats.") for name in names):
        stats = init_running_stats((config.obs_dim,), device)
        stats = optree.tree_map(lambda x: x.expand(*batch_shape, *x.shape).clone(), stats)
        template = template._replace(obs_stats=stats)
    return template


def _check_leaves(tensors: dict[str, Any], template: TrainState, where: str) -> None:
    """Every template leaf present with the same shape and dtype, and nothing else."""
    expected = _flatten(template)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{where}[{extra[0]!r}]: not a leaf of the TrainState for this config")
    for name, want in expected.items():
        if name not in tensors:
            raise ValueError(f"{where}[{name!r}]: missing; expected shape {list(want.shape)}")
        got = tensors[name]
        if not isinstance(got, Tensor):
            raise ValueError(f"{where}[{name!r}]: expected a tensor, got {type(got).__name__}")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{where}[{name!r}]: expected {want.dtype} {list(want.shape)}, "
                f"got {got.dtype} {list(got.shape)}"
            )


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over ``path``, fsync the dir.

    A crash at any point leaves either the old file or the new one at ``path``, never a mix.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike,
    state: TrainState,
    config: PPOConfig,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """Write ``state`` (one agent or S stacked seeds) and ``config`` atomically to ``path``.

    ``state`` is checked against ``config`` first, so a file that cannot be loaded is never
    written. ``extra`` holds any named tensors the caller wants back (e.g. env statistics).
    """
    if not isinstance(state, TrainState):
        raise ValueError(f"state: expected a TrainState, got {type(state).__name__}")
    extra = {} if extra is None else dict(extra)
    for name, value in extra.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise ValueError(f"extra: expected str -> Tensor, got {name!r}: {type(value).__name__}")
    tensors = {name: leaf.detach() for name, leaf in _flatten(state).items()}
    batch_shape = tuple(state.step.shape)
    _check_leaves(tensors, _template(config, batch_shape, "cpu", tensors), "state")
    obj = {
        "format": _FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "architecture": json.dumps(_architecture(config), sort_keys=True),
        "batch_shape": list(batch_shape),
        "state": tensors,
        "step": tensors["step"],
        "extra": {name: value.detach() for name, value in extra.items()},
    }
    _atomic_save(obj, Path(path))


def _check_version(raw: Any, path: str | os.PathLike) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(raw).__name__}")
    if "version" not in raw and {"params", "step"} <= set(raw):
        raise ValueError(
            f"{path}: version 0 checkpoint (the bare CLI format: params and step only, no "
            f"optimizer state or config); this loader reads version {CHECKPOINT_VERSION}. "
            "Upgrade it with funcppo.checkpoint.upgrade_checkpoint(path, config)."
        )
    version = raw.get("version")
    if raw.get("format") != _FORMAT or not isinstance(version, int):
        raise ValueError(f"{path}: not a funcppo checkpoint (no format/version fields)")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {version}, this funcppo reads version "
            f"{CHECKPOINT_VERSION}; "
            + (
                "upgrade funcppo to read it."
                if version > CHECKPOINT_VERSION
                else "upgrade it with funcppo.checkpoint.upgrade_checkpoint."
            )
        )


def _check_config(stored: PPOConfig, config: PPOConfig) -> None:
    """Name the first field where ``config`` differs from the stored one."""
    if not isinstance(config, PPOConfig):
        raise ValueError(f"config: expected a PPOConfig, got {type(config).__name__}")
    have, want = config_to_dict(stored), config_to_dict(config)
    for name in want:
        if name not in _FREE_FIELDS and have.get(name) != want[name]:
            raise ValueError(
                f"config.{name}: checkpoint has {have.get(name)!r}, expected {want[name]!r}"
            )


def load_checkpoint(
    path: str | os.PathLike,
    config: PPOConfig | None = None,
    device: torch.device | str | None = None,
) -> tuple[TrainState, PPOConfig, dict[str, Tensor]]:
    """Read a checkpoint written by ``save_checkpoint``: ``(state, config, extra)`` on ``device``.

    Loads with ``weights_only=True``, so a file carrying pickled objects is refused before any
    of its code runs. With ``config`` given, every stored field but ``compile`` must match it
    (the error names the field) and ``config`` is returned; otherwise the stored config is.
    ``device`` None means CPU.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    raw = torch.load(path, map_location=device, weights_only=True)
    _check_version(raw, path)
    stored = config_from_dict(json.loads(raw["config"]))
    architecture = json.loads(raw["architecture"])
    if architecture != _architecture(stored):
        raise ValueError(f"{path}: architecture does not match the stored config")
    if config is not None:
        _check_config(stored, config)
    config = stored if config is None else config
    tensors = raw["state"]
    template = _template(config, tuple(raw["batch_shape"]), device, tensors)
    _check_leaves(tensors, template, "state")
    accessors, _, treespec = optree.tree_flatten_with_accessor(template, none_is_leaf=False)
    leaves = [tensors[_leaf_name(a)] for a in accessors]
    state = optree.tree_unflatten(treespec, leaves)
    return state, config, dict(raw["extra"])


def upgrade_checkpoint(
    path: str | os.PathLike,
    config: PPOConfig,
    out_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> None:
    """Rewrite a version 0 file (the old CLI's ``{"params", "step", "config"}``) as version 1.

    Version 0 kept no optimizer state, no RNG key, no hyperparameters and only a ``repr`` of
    the config, so ``config`` must be given (the params are checked against it); the upgraded
    state has fresh AdamW moments (count 0), hyperparameters from ``config`` and keys from
    ``seed``. Written atomically to ``out_path`` (default: over ``path``).
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or "version" in raw or not {"params", "step"} <= set(raw):
        raise ValueError(f"{path}: expected a version 0 checkpoint (params and step, no version)")
    step = raw["step"]
    if not isinstance(step, Tensor) or step.dim() > 1:
        raise ValueError(f"{path}: step: expected a tensor of shape [] or [S]")
    check_params(raw["params"], config, batch_dims=step.dim())
    base = jr.key(seed)
    keys = jr.split(base, step.shape[0]) if step.dim() else base
    template = init_train_state(keys, config)
    state = template._replace(params=raw["params"], step=step.to(template.step.dtype))
    save_checkpoint(path if out_path is None else out_path, state, config)
