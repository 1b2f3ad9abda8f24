"""Host-side checks at the update boundary: shapes, dtypes and devices, never values.

They run before any computation, outside compiled code, so a wrong batch fails with an error
that names the argument, what was expected and what came.
"""

from __future__ import annotations

import optree
import torch
from torch import Tensor

from funcppo.config import PPOConfig
from funcppo.networks import check_params

__all__ = ["check_batch"]


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_tensor(name: str, x, shape: tuple, dtype_ok, dtype_name: str, device) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != shape or not dtype_ok(x.dtype):
        raise ValueError(f"{name}: expected {dtype_name} {shape}, got {_describe(x)}")
    if x.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the device of the train state), got one on "
            f"{x.device}; move the batch with .to({str(device)!r}) before calling update"
        )


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _is_bool(dtype: torch.dtype) -> bool:
    return dtype == torch.bool


def _is_int(dtype: torch.dtype) -> bool:
    return dtype in (torch.int64, torch.int32)


def check_batch(config: PPOConfig, state, batch, num_seeds: int | None = None) -> None:
    """Raise ValueError unless ``state`` and ``batch`` fit ``config`` (and ``num_seeds``)."""
    spec = config.spec
    lead = () if num_seeds is None else (num_seeds,)
    device = state.step.device
    if tuple(state.step.shape) != lead:
        raise ValueError(
            f"state: expected {'an unbatched state' if not lead else f'{num_seeds} stacked states'}"
            f" (step of shape {lead}), got step of shape {tuple(state.step.shape)}"
        )
    check_params(state.params, config, batch_dims=len(lead))
    for path, leaf in zip(*optree.tree_flatten_with_path(state)[:2], strict=True):
        if isinstance(leaf, Tensor) and leaf.device != device:
            raise ValueError(f"state{path}: expected a tensor on {device}, got {leaf.device}")
    obs = batch.obs
    if not isinstance(obs, Tensor) or obs.ndim != len(lead) + 3:
        raise ValueError(
            f"batch.obs: expected float {(*lead, 'T', 'B', config.obs_dim)}, got {_describe(obs)}"
        )
    t, b = obs.shape[len(lead)], obs.shape[len(lead) + 1]
    tb = (*lead, t, b)
    _check_tensor("batch.obs", obs, (*tb, config.obs_dim), _is_float, "float", device)
    seq_len = config.bptt_len if config.recurrent else 1
    if t % seq_len:
        raise ValueError(
            f"batch.obs: rollout length T={t} must be a multiple of config.bptt_len={seq_len}"
        )
    num_seq = (t // seq_len) * b
    if num_seq % config.num_minibatches:
        raise ValueError(
            f"batch.obs: {num_seq} sequences (T/bptt_len * B) must divide evenly into "
            f"config.num_minibatches={config.num_minibatches}"
        )
    per_minibatch = num_seq // config.num_minibatches
    if per_minibatch % config.grad_accum_steps:
        raise ValueError(
            f"config.grad_accum_steps: expected a divisor of the {per_minibatch} sequences per "
            f"minibatch (T/bptt_len * B / num_minibatches), got {config.grad_accum_steps}"
        )
    for field in ("actions", "masks", "logprobs"):
        heads = getattr(batch, field)
        if not isinstance(heads, dict) or set(heads) != set(spec.names):
            got = sorted(heads) if isinstance(heads, dict) else type(heads).__name__
            raise ValueError(f"batch.{field}: expected a dict over heads {spec.names}, got {got}")
    for name, size in spec.heads:
        _check_tensor(f"batch.actions[{name!r}]", batch.actions[name], tb, _is_int, "int64", device)
        mask_shape = (*tb, spec.n_ops, size) if name in spec.op_conditioned else (*tb, size)
        _check_tensor(
            f"batch.masks[{name!r}]", batch.masks[name], mask_shape, _is_bool, "bool", device
        )
        _check_tensor(
            f"batch.logprobs[{name!r}]", batch.logprobs[name], tb, _is_float, "float", device
        )
    for field in ("values", "next_values", "rewards"):
        _check_tensor(f"batch.{field}", getattr(batch, field), tb, _is_float, "float", device)
    for field in ("terminated", "truncated", "episode_start"):
        _check_tensor(f"batch.{field}", getattr(batch, field), tb, _is_bool, "bool", device)
    if not config.recurrent:
        if batch.hidden is not None:
            raise ValueError(
                f"batch.hidden: expected None for an MLP config, got {type(batch.hidden).__name__}"
            )
        return
    hidden = batch.hidden
    if not isinstance(hidden, tuple) or len(hidden) != 2:
        raise ValueError(
            f"batch.hidden: expected LSTMState(h, c) of {(*tb, config.lstm_size)}, "
            f"got {type(hidden).__name__}"
        )
    for part, x in zip("hc", hidden, strict=True):
        _check_tensor(
            f"batch.hidden.{part}", x, (*tb, config.lstm_size), _is_float, "float", device
        )
