"""The pytrees the update step carries and consumes: TrainState, Hyperparams and Batch."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig, check_hparam
from funcppo.core.losses import LossCoefs
from funcppo.core.networks import policy_init
from funcppo.core.optim import make_optimizer

__all__ = [
    "Batch",
    "Hyperparams",
    "TrainState",
    "init_train_state",
    "make_hyperparams",
    "make_loss_coefs",
    "with_hparams",
]


class Hyperparams(NamedTuple):
    """Hyperparameters that may differ per seed: 0-d tensors, vmapped with the state.

    These fields of ``PPOConfig`` (``config.TENSOR_HYPERPARAMS``) travel with the state, and the
    update reads them from ``state.hparams`` only: the config's values of them seed a new state
    (``make_hyperparams``, ``init_train_state``) and are otherwise only compared with the
    state's (``make_update_fn``'s ``hparams`` argument). Change a state's values with
    ``with_hparams``. A sweep passes ``[S]`` tensors to ``init_train_state`` and runs S
    settings in one program. ``target_kl`` is +inf where there is no target.
    """

    learning_rate: Tensor
    ent_coef: Tensor
    clip_coef: Tensor
    vf_coef: Tensor
    gamma: Tensor
    gae_lambda: Tensor
    max_grad_norm: Tensor
    target_kl: Tensor


class TrainState(NamedTuple):
    """Everything one agent carries from update to update.

    ``obs_stats``: the running observation statistics (``funcppo.core.normalize.RunningStats``) the
    policy's inputs are normalised with, when ``make_train`` normalises observations; ``()``
    otherwise. They belong to the policy (a checkpoint keeps them); the update passes them on.
    """

    params: dict[str, Any]
    opt_state: Any
    step: Tensor
    key: Tensor
    hparams: Hyperparams
    obs_stats: Any = ()


class Batch(NamedTuple):
    """One rollout, time-major ``[T, B]``.

    Attributes:
      obs: ``[T, B, obs_dim]`` observation seen before each action.
      actions: per head, int64 ``[T, B]``.
      masks: per head, bool ``[T, B, size]`` (op-conditioned heads ``[T, B, n_ops, size]``).
      logprobs: per head, the behaviour policy's log-prob ``[T, B]`` (0 where irrelevant).
      values: the behaviour critic's ``V(obs)`` ``[T, B]``.
      next_values: ``V`` of the observation after each step ``[T, B]``; for a truncated step,
        of the final observation before the reset.
      rewards, terminated, truncated: ``[T, B]``; terminated and truncated are bool.
      episode_start: bool ``[T, B]``, True where ``obs`` starts an episode (LSTM reset).
      hidden: the LSTM state before each step, ``LSTMState`` of ``[T, B, H]``; None for the MLP.
    """

    obs: Tensor
    actions: dict[str, Tensor]
    masks: dict[str, Tensor]
    logprobs: dict[str, Tensor]
    values: Tensor
    next_values: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    episode_start: Tensor
    hidden: Any = None


def _check_fields(argument: str | None, names) -> None:
    """Unknown field names are a ValueError that starts with ``argument`` (None: with nothing,
    for keyword arguments that the message's unknown names already name)."""
    unknown = sorted(set(names) - set(Hyperparams._fields))
    if unknown:
        start = "" if argument is None else f"{argument}: "
        raise ValueError(
            f"{start}expected fields of Hyperparams {list(Hyperparams._fields)}, "
            f"got unknown {unknown}"
        )


def _checked_values(name: str, value: Any) -> Any:
    """``value`` (a number, None, or a tensor of any shape) with every element checked against
    ``name``'s range in ``PPOConfig``; None becomes +inf for ``target_kl``."""
    if not isinstance(value, Tensor):
        return check_hparam(name, value)
    if not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a float tensor, got {value.dtype}")
    flat = value.detach().reshape(-1).tolist()  # host side, once per change
    for i, v in enumerate(flat):
        check_hparam(name, v, name if value.dim() == 0 else f"{name}[{i}]")
    return value


def make_hyperparams(config: PPOConfig, device: torch.device | str | None = None, **overrides):
    """Hyperparams from the config, with any field overridden by a float or a tensor.

    Overrides pass the config's own range checks (a ValueError names the field). ``target_kl``
    of None is stored as +inf: early stopping then never fires.
    """
    _check_fields("overrides", overrides)
    values = {name: check_hparam(name, getattr(config, name)) for name in Hyperparams._fields}
    values.update({name: _checked_values(name, v) for name, v in overrides.items()})
    return Hyperparams(
        **{k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in values.items()}
    )


def with_hparams(state: TrainState, **changes: Any) -> TrainState:
    """``state`` with the named hyperparameters (fields of ``Hyperparams``) replaced.

    Each value is a number (None for ``target_kl``: no target), a 0-d tensor, or for stacked
    states an ``[S]`` tensor (one value per seed); numbers and 0-d tensors apply to every seed.
    Every value passes the range check ``PPOConfig`` gives its field, and an unknown field or
    a wrong shape is a ValueError naming it. The new tensors are fresh and dense, with the
    dtype and device of the ones they replace. ``state`` itself is unchanged.
    """
    _check_fields(None, changes)
    old, new = state.hparams, {}
    for name, value in changes.items():
        ref = getattr(old, name)
        value = _checked_values(name, value)
        value = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
        if value.dim() > 0 and value.shape != ref.shape:
            raise ValueError(
                f"{name}: expected a float or a tensor of shape () or {tuple(ref.shape)} (one per "
                f"seed), got shape {tuple(value.shape)}"
            )
        # Fresh and dense: compiled functions guard on strides (an expanded tensor has 0).
        new[name] = value.expand_as(ref).clone()
    return state._replace(hparams=old._replace(**new))


def make_loss_coefs(config: PPOConfig, hparams: Hyperparams) -> LossCoefs:
    """The loss's coefficients: the tensor ones from ``hparams``, the others from ``config``."""
    return LossCoefs(
        clip_coef=hparams.clip_coef,
        vf_coef=hparams.vf_coef,
        ent_coef=hparams.ent_coef,
        head_ent_coef=config.head_ent_coefs(),
        clip_vloss=config.clip_vloss,
        value_clip=config.value_clip,
        entropy_floor=config.entropy_floors() or None,
        entropy_floor_coef=config.entropy_floor_coef,
    )


def init_train_state(keys: Tensor, config: PPOConfig, **hparam_overrides) -> TrainState:
    """A TrainState for one key ``[2]``, or S stacked states for keys ``[S, 2]``.

    Overrides are floats, or ``[S]`` tensors for a per-seed sweep.
    """
    jr.check_key(keys, "keys")
    if keys.dim() == 1:
        hparams = make_hyperparams(config, keys.device, **hparam_overrides)
        k_params, k_state = jr.split(keys, 2)
        params = policy_init(k_params, config)
        opt_state = make_optimizer(config, hparams).init(params)
        step = torch.zeros((), dtype=torch.int64, device=keys.device)
        return TrainState(params, opt_state, step, k_state, hparams)
    if keys.dim() != 2:
        raise ValueError(f"keys: expected shape [2] or [S, 2], got {tuple(keys.shape)}")
    num_seeds = keys.shape[0]
    states = []
    for i in range(num_seeds):
        per_seed = {
            k: (v[i] if isinstance(v, Tensor) and v.dim() > 0 else v)
            for k, v in hparam_overrides.items()
        }
        states.append(init_train_state(keys[i], config, **per_seed))
    return optree.tree_map(lambda *xs: torch.stack(xs), *states, none_is_leaf=False)
