"""Checkpoints that hold tensors and JSON only, written atomically and verified on load.

A file is a plain dict that ``torch.load(path, weights_only=True)`` reads without unpickling any
Python object: ``"state"`` maps the name of every TrainState leaf (``"params['torso']['w0']"``,
``"opt_state[1].mu['value']['b']"``, ``"step"``, ...) to its tensor, stacked seeds keeping their
leading axis; ``"config"`` and ``"architecture"`` are JSON strings; ``"extra"`` holds the
caller's named tensors; ``"step"`` repeats the step tensor for quick inspection. ``"checksums"``
(``funcppo.training.checkpoint_file``) holds a sha256 of every tensor and one of the other fields.

Loading verifies every checksum first: a file damaged on disk or in transit, or no checkpoint
at all, is refused with a ``CheckpointError`` that names the file and the damaged entry, and so
is a state with NaN or infinite weights or optimizer moments (every update from it would be
skipped). The pytree structure is rebuilt from the config (``init_train_state`` makes a
template whose leaves are replaced), so no structure is ever unpickled, and every leaf's name,
shape and dtype is checked against that template.

The architecture (``ARCHITECTURE``) is stored, never inferred from weights, and must match the
config a caller loads with; every other field may differ, so a checkpoint is evaluated with a
compiled update or fine-tuned with another learning rate. The loaded state's hyperparameters
(``TrainState.hparams``) take the caller's config's value for each one that the config changes
from the stored config, and keep the stored values (a sweep's per-seed ones) for the rest.

Version 1 files, which carry no checksums, load unverified; ``upgrade_checkpoint`` rewrites
them, and version 0 files (parameters and step only), as the current version.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import optree
import torch
from torch import Tensor

from funcppo.core import random as jr
from funcppo.core.atomic import write_atomic
from funcppo.core.config import TENSOR_HYPERPARAMS, PPOConfig
from funcppo.core.networks import check_params
from funcppo.core.normalize import init_running_stats
from funcppo.core.spec import ActionSpec
from funcppo.training.checkpoint_file import (
    CHECKPOINT_VERSION,
    FORMAT,
    CheckpointError,
    check_fields,
    checksums,
    read_checkpoint_file,
    verify_checksums,
)
from funcppo.training.state import TrainState, init_train_state, make_hyperparams

__all__ = [
    "ARCHITECTURE",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "config_from_dict",
    "config_to_dict",
    "load_checkpoint",
    "save_checkpoint",
    "upgrade_checkpoint",
]

# The config fields that set the network's parameters and what it computes from them: a
# checkpoint loads only under a config that agrees on each (lstm_size for an LSTM only,
# shared_torso for an MLP only, as each is ignored otherwise).
ARCHITECTURE = (
    "obs_dim",
    "spec",
    "torso_sizes",
    "activation",
    "recurrent",
    "lstm_size",
    "shared_torso",
)


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
    """The ``ARCHITECTURE`` fields as JSON-able values (stored, not inferred)."""
    return {
        "obs_dim": config.obs_dim,
        "spec": _spec_to_dict(config.spec),
        "torso_sizes": list(config.torso_sizes),
        "activation": config.activation,
        "recurrent": config.recurrent,
        "lstm_size": config.lstm_size if config.recurrent else None,
        "shared_torso": None if config.recurrent else config.shared_torso,
    }


def _leaf_name(accessor: optree.PyTreeAccessor) -> str:
    return accessor.codify("").removeprefix(".")


def _flatten(state: TrainState) -> dict[str, Tensor]:
    accessors, leaves, _ = optree.tree_flatten_with_accessor(state, none_is_leaf=False)
    return {_leaf_name(a): leaf for a, leaf in zip(accessors, leaves, strict=True)}


def _template(config: PPOConfig, batch_shape: tuple[int, ...], names: Any = ()) -> TrainState:
    """The TrainState (on the CPU) a file for ``config`` holds; with observation statistics
    where ``names`` (the stored leaf names) has them (``make_train`` with ``normalize_obs``)."""
    if len(batch_shape) > 1:
        raise ValueError(f"state.step: expected shape [] or [S], got {list(batch_shape)}")
    base = jr.key(0)
    keys = jr.split(base, batch_shape[0]) if batch_shape else base
    template = init_train_state(keys, config)
    if any(name.startswith("obs_stats.") for name in names):
        stats = init_running_stats((config.obs_dim,))
        stats = optree.tree_map(lambda x: x.expand(*batch_shape, *x.shape).clone(), stats)
        template = template._replace(obs_stats=stats)
    return template


def _check_leaves(tensors: dict[str, Any], template: TrainState, where: str, error=ValueError):
    """Every template leaf present with the same shape and dtype, and nothing else."""
    expected = _flatten(template)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise error(f"{where}[{extra[0]!r}]: not a leaf of the TrainState for this config")
    for name, want in expected.items():
        if name not in tensors:
            raise error(f"{where}[{name!r}]: missing; expected shape {list(want.shape)}")
        got = tensors[name]
        if not isinstance(got, Tensor):
            raise error(f"{where}[{name!r}]: expected a tensor, got {type(got).__name__}")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise error(
                f"{where}[{name!r}]: expected {want.dtype} {list(want.shape)}, "
                f"got {got.dtype} {list(got.shape)}"
            )


def _check_finite(tensors: dict[str, Tensor], where: str, error=ValueError) -> None:
    """No NaN anywhere and no infinity outside the hyperparameters (``target_kl`` None is
    stored as +inf): a NaN weight or moment makes every later update non-finite, so skipped."""
    for name, x in tensors.items():
        if not x.is_floating_point():
            continue
        count = int((x.isnan() if name.startswith("hparams.") else ~x.isfinite()).sum())
        if count:
            raise error(
                f"{where}[{name!r}]: {count} non-finite values (NaN or infinite) among "
                f"{x.numel()}; a state with them cannot train"
            )


def save_checkpoint(
    path: str | os.PathLike,
    state: TrainState,
    config: PPOConfig,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """Write ``state`` (one agent or S stacked seeds) and ``config`` atomically to ``path``.

    ``state`` is checked against ``config`` first, and refused with non-finite weights or
    moments, so a file that cannot be loaded is never written. ``extra`` holds any named
    tensors the caller wants back (e.g. env statistics). The file's mode is 0o666 less the
    umask, as ``torch.save`` gives.
    """
    if not isinstance(state, TrainState):
        raise ValueError(f"state: expected a TrainState, got {type(state).__name__}")
    extra = {} if extra is None else dict(extra)
    for name, value in extra.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise ValueError(f"extra: expected str -> Tensor, got {name!r}: {type(value).__name__}")
    tensors = {name: leaf.detach() for name, leaf in _flatten(state).items()}
    batch_shape = tuple(state.step.shape)
    _check_leaves(tensors, _template(config, batch_shape, tensors), "state")
    _check_finite(tensors, "state")
    obj = {
        "format": FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "architecture": json.dumps(_architecture(config), sort_keys=True),
        "batch_shape": list(batch_shape),
        "state": tensors,
        "step": tensors["step"],
        "extra": {name: value.detach() for name, value in extra.items()},
    }
    obj["checksums"] = checksums(obj)
    write_atomic(path, lambda file: torch.save(obj, file))


def _check_config(stored: PPOConfig, config: PPOConfig) -> None:
    """Name the first ``ARCHITECTURE`` field (or part of the spec) where ``config`` differs."""
    if not isinstance(config, PPOConfig):
        raise ValueError(f"config: expected a PPOConfig, got {type(config).__name__}")
    have, want = _architecture(stored), _architecture(config)
    pairs = [(name, have[name], want[name]) for name in ARCHITECTURE if name != "spec"]
    pairs[1:1] = [(f"spec.{k}", have["spec"][k], want["spec"][k]) for k in want["spec"]]
    for name, mine, yours in pairs:
        if mine != yours:
            raise ValueError(
                f"config.{name}: the checkpoint's architecture has {mine!r}, this config "
                f"{yours!r}; the architecture ({', '.join(ARCHITECTURE)}) must match, the "
                "other fields may differ"
            )


def _follow_config(state: TrainState, stored: PPOConfig, config: PPOConfig) -> TrainState:
    """``state`` with each hyperparameter that ``config`` changes from ``stored`` set to the
    config's value (for every seed); the others keep the stored values."""
    new = make_hyperparams(config)
    changed = {
        name: getattr(new, name).expand_as(getattr(state.hparams, name)).clone()
        for name in TENSOR_HYPERPARAMS
        if getattr(config, name) != getattr(stored, name)
    }
    return state._replace(hparams=state.hparams._replace(**changed))


def _from_file(
    raw: dict[str, Any], path: str | os.PathLike, config: PPOConfig | None
) -> tuple[TrainState, PPOConfig, dict[str, Tensor]]:
    """The checked ``(state, config, extra)``, on the CPU, of the file dict ``raw``."""
    where = os.fspath(path)
    version = check_fields(raw, path)
    if version >= 2:
        verify_checksums(raw, path)
    try:
        stored = config_from_dict(json.loads(raw["config"]))
        architecture = json.loads(raw["architecture"])
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{where}: config: unreadable ({error})") from None
    # Version 1 stored fewer architecture fields, and nothing vouches for them: not compared.
    if version >= 2 and architecture != _architecture(stored):
        raise CheckpointError(f"{where}: architecture does not match the stored config")
    if config is not None:
        _check_config(stored, config)
    tensors = raw["state"]
    try:
        template = _template(config or stored, tuple(raw["batch_shape"]), tensors)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    _check_leaves(tensors, template, f"{where}: state", CheckpointError)
    if not torch.equal(raw["step"], tensors["step"]):
        raise CheckpointError(f"{where}: step: differs from state['step'] (damaged?)")
    _check_finite(tensors, f"{where}: state", CheckpointError)
    accessors, _, treespec = optree.tree_flatten_with_accessor(template, none_is_leaf=False)
    state = optree.tree_unflatten(treespec, [tensors[_leaf_name(a)] for a in accessors])
    if config is None:
        return state, stored, dict(raw["extra"])
    return _follow_config(state, stored, config), config, dict(raw["extra"])


def load_checkpoint(
    path: str | os.PathLike,
    config: PPOConfig | None = None,
    device: torch.device | str | None = None,
) -> tuple[TrainState, PPOConfig, dict[str, Tensor]]:
    """Read a checkpoint written by ``save_checkpoint``: ``(state, config, extra)`` on ``device``.

    Loads with ``weights_only=True``, so a file carrying pickled objects is refused before any
    of its code runs. A missing file raises FileNotFoundError; one that is no checkpoint, is
    damaged (a checksum fails) or holds non-finite weights, a ``CheckpointError`` naming the
    file and the entry. With ``config`` given, its ``ARCHITECTURE`` fields must match the
    stored ones (the error names the field), the others may differ, and ``config`` is
    returned, the state's hyperparameters following it where it changes them (see the
    module's docstring); otherwise the stored config is. ``device`` None means CPU.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    state, config, extra = _from_file(read_checkpoint_file(path), path, config)
    state = optree.tree_map(lambda x: x.to(device), state, none_is_leaf=False)
    return state, config, {name: x.to(device) for name, x in extra.items()}


def upgrade_checkpoint(
    path: str | os.PathLike,
    config: PPOConfig | None = None,
    out_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> None:
    """Rewrite an older file as the current version, atomically to ``out_path`` (default: over
    ``path``).

    Version 1 (no checksums) is read unverified, as ``load_checkpoint`` reads it, and written
    with checksums; ``config``, when given, applies as it does in ``load_checkpoint``.
    Version 0 (``{"params", "step", "config"}`` only) kept no optimizer state, no RNG
    key, no hyperparameters and only a ``repr`` of the config, so ``config`` must be given (the
    params are checked against it); the upgraded state has fresh AdamW moments (count 0),
    hyperparameters from ``config`` and keys from ``seed``.
    """
    out_path = path if out_path is None else out_path
    raw = read_checkpoint_file(path)
    if "version" in raw or not {"params", "step"} <= set(raw):
        if check_fields(raw, path) == CHECKPOINT_VERSION:
            raise ValueError(
                f"{os.fspath(path)}: already version {CHECKPOINT_VERSION}; nothing to upgrade"
            )
        save_checkpoint(out_path, *_from_file(raw, path, config))
        return
    if not isinstance(config, PPOConfig):
        raise ValueError(
            "config: expected a PPOConfig to upgrade a version 0 checkpoint, got "
            f"{'None' if config is None else type(config).__name__}"
        )
    step = raw["step"]
    if not isinstance(step, Tensor) or step.dim() > 1:
        raise ValueError(f"{os.fspath(path)}: step: expected a tensor of shape [] or [S]")
    check_params(raw["params"], config, batch_dims=step.dim())
    base = jr.key(seed)
    keys = jr.split(base, step.shape[0]) if step.dim() else base
    template = init_train_state(keys, config)
    state = template._replace(params=raw["params"], step=step.to(template.step.dtype))
    save_checkpoint(out_path, state, config)
