"""The functional environment protocol: pure ``reset`` and ``step`` over batched tensors.

An environment is a frozen, hashable dataclass (compiled code closes over it) that holds only
static configuration. Everything that changes lives in an ``env_state`` NamedTuple of tensors
with a leading ``[num_envs]`` axis, so ``reset`` and ``step`` are pure functions of their
inputs and a random key: they vmap over a leading seed axis and compile with
``fullgraph=True``.

Episodes reset automatically inside ``step``: where an env is done (terminated or truncated)
the returned state and obs start a fresh episode, and ``final_obs`` keeps the last observation
of the old one so that a truncated episode can bootstrap from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import optree
import torch
from torch import Tensor

from funcppo.core.spec import ActionSpec

__all__ = ["Env", "ResetResult", "StepResult", "check_actions", "full_masks", "where_done"]


class ResetResult(NamedTuple):
    """What ``reset`` returns.

    Attributes:
      env_state: the environment's state NamedTuple, every leaf ``[num_envs, ...]``.
      obs: float32 ``[num_envs, obs_dim]``.
      masks: head -> bool ``[num_envs, size]`` (``[num_envs, n_ops, size]`` for op-conditioned
        heads): which values of each head are valid.
    """

    env_state: Any
    obs: Tensor
    masks: dict[str, Tensor]


class StepResult(NamedTuple):
    """What ``step`` returns; every tensor has a leading ``[num_envs]`` axis.

    Attributes:
      env_state: the next state, already reset where the env was done.
      obs: float32 ``[num_envs, obs_dim]``, of a fresh episode where done.
      reward: float32 ``[num_envs]``, the reward of the step just taken.
      terminated: bool ``[num_envs]``, the episode reached a terminal state (no bootstrap).
      truncated: bool ``[num_envs]``, the episode hit the time limit (bootstrap from
        ``final_obs``). Both may be True on the same step, as in gymnasium's ``TimeLimit``.
      masks: head -> bool masks for ``obs`` (see ``ResetResult``).
      final_obs: float32 ``[num_envs, obs_dim]``, the observation the step reached, before any
        reset; equal to ``obs`` where not done.
    """

    env_state: Any
    obs: Tensor
    reward: Tensor
    terminated: Tensor
    truncated: Tensor
    masks: dict[str, Tensor]
    final_obs: Tensor


@runtime_checkable
class Env(Protocol):
    """A batch of ``num_envs`` independent copies of one environment."""

    num_envs: int
    obs_dim: int
    spec: ActionSpec
    max_steps: int

    def reset(self, key: Tensor) -> ResetResult:
        """Start ``num_envs`` fresh episodes from int64 key ``[2]``."""
        ...

    def step(self, env_state: Any, actions: Mapping[str, Tensor], key: Tensor) -> StepResult:
        """Apply ``actions`` (head -> int64 ``[num_envs]``); ``key`` draws any reset states."""
        ...


def where_done(done: Tensor, fresh: Any, current: Any) -> Any:
    """Leafwise ``torch.where(done, fresh, current)`` over two pytrees of equal structure.

    ``done`` is bool ``[num_envs]`` and is broadcast over each leaf's trailing axes.
    """

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(done.reshape(done.shape + (1,) * (a.dim() - done.dim())), a, b)

    return optree.tree_map(pick, fresh, current)


def full_masks(spec: ActionSpec, num_envs: int, device: torch.device | str | None = None):
    """All-True validity masks: head -> bool ``[num_envs, size]``.

    Op-conditioned heads get ``[num_envs, n_ops, size]``, the shape their masks always have.
    """

    def ones(name: str, size: int) -> Tensor:
        shape = (num_envs, spec.n_ops, size) if name in spec.op_conditioned else (num_envs, size)
        return torch.ones(shape, dtype=torch.bool, device=device)

    return {name: ones(name, size) for name, size in spec.heads}


def check_actions(spec: ActionSpec, num_envs: int, actions: Mapping[str, Tensor]) -> None:
    """ValueError unless ``actions`` maps every head to an int64 ``[num_envs]`` tensor.

    Uses only static facts (keys, shapes, dtypes), so it is safe under compile and vmap.
    """
    if not isinstance(actions, Mapping) or set(actions) != set(spec.names):
        got = sorted(actions) if isinstance(actions, Mapping) else type(actions).__name__
        raise ValueError(f"actions: expected a dict with heads {list(spec.names)}, got {got}")
    for name, value in actions.items():
        if (
            not isinstance(value, Tensor)
            or value.dtype != torch.int64
            or value.shape != (num_envs,)
        ):
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else value
            raise ValueError(
                f"actions[{name!r}]: expected an int64 tensor of shape [{num_envs}], got {got}"
            )
