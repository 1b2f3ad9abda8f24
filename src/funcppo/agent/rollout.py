"""The rollout that ``PPOAgent`` assembles: ``EnvStep``, what the environment answered to one
step, and functions over the ``Batch`` rows it becomes: an all-zero rollout (to check a rollout
shape before any environment step), the stacking of the observed rows into the
``[num_steps, num_envs]`` batch that the update trains on, the running episode returns, and the
update's metrics as host values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcppo.core.config import PPOConfig
from funcppo.core.networks import init_hidden
from funcppo.core.spec import ActionSpec
from funcppo.envs.base import full_masks
from funcppo.training.state import Batch

__all__ = ["EnvStep", "compact_rollout", "host_metrics", "step_episodes", "zero_rollout"]


class EnvStep(NamedTuple):
    """What the environment answered to ``act``'s actions; leading axis ``[num_envs]``.

    Attributes:
      obs: float ``[B, obs_dim]``, the observation to act on next (a new episode's after a reset).
      reward: float ``[B]``. terminated, truncated: bool ``[B]``.
      masks: head -> bool masks for ``obs`` (None: every action valid); ``act`` takes them.
      final_obs: float ``[B, obs_dim]``, the observation reached before any reset, from which a
        truncated step bootstraps (None: ``obs``).
      valid: bool ``[B]``, False where the step was no transition (None: all True).
      episode_start: bool ``[B]``, True where ``obs`` starts an episode (None: done).
      next_valid: bool ``[B]``, False where the env will ignore the next action and reset
        instead, so the next step comes back with ``valid`` False (None: all True); the
        agent then leaves ``obs`` out of its observation statistics.
    """

    obs: Any
    reward: Any
    terminated: Any
    truncated: Any
    masks: dict[str, Any] | None = None
    final_obs: Any = None
    valid: Any = None
    episode_start: Any = None
    next_valid: Any = None


def zero_rollout(
    config: PPOConfig, num_steps: int, num_envs: int, device: torch.device | str | None = None
) -> Batch:
    """A ``[num_steps, num_envs]`` rollout of zeros, every action valid."""
    t, b, spec = num_steps, num_envs, config.spec
    z = torch.zeros(t, b, device=device)
    no = z.bool()
    masks = {k: v.expand(t, *v.shape) for k, v in full_masks(spec, b, device).items()}
    heads = {h: z.long() for h in spec.names}
    hidden = init_hidden(config, (t, b), device)
    return Batch(z[..., None].expand(t, b, config.obs_dim), heads, masks,
                 dict.fromkeys(spec.names, z), z, z, z, no, no, no, hidden)  # fmt: skip


def compact_rollout(rows: Sequence[Batch], valid: Sequence[Tensor], num_steps: int) -> Batch:
    """Rows ``[num_envs, ...]`` stacked on a new time axis, keeping each env column's first
    ``num_steps`` valid steps (``valid``: one bool ``[num_envs]`` per row), in time order.

    Every column must hold at least ``num_steps`` valid steps; the agent checks this first.
    """
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *rows, none_is_leaf=False)
    valid = torch.stack(list(valid))
    if bool(valid.all()) and valid.shape[0] == num_steps:
        return stacked
    # Stable sort puts each column's valid steps first, in time order.
    index = torch.argsort((~valid).long(), dim=0, stable=True)[:num_steps]

    def take(x: Tensor) -> Tensor:
        idx = index.reshape(*index.shape, *(1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
        return torch.take_along_dim(x, idx, dim=0)

    return optree.tree_map(take, stacked, none_is_leaf=False)


def step_episodes(
    episode_return: Tensor, episode_length: Tensor, reward: Tensor, done: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, tuple[float, float, int]]:
    """One env step of each env's running episode return and length, float64 ``[num_envs]``.

    Steps with ``valid`` False add nothing. Returns the new running values (0 where an episode
    ended) and the host sums ``(return, length, count)`` over the episodes that this step ended,
    which cost one host sync: this runs between environment steps, never in compiled code.
    """
    ret = episode_return + torch.where(valid, reward.double(), 0.0)
    length = episode_length + valid.double()
    ended = done & valid
    on_host = ended.cpu()
    sums = (0.0, 0.0, 0)
    if bool(on_host.any()):
        sums = (
            float(ret.cpu()[on_host].sum()),
            float(length.cpu()[on_host].sum()),
            int(on_host.sum()),
        )
    return torch.where(ended, 0.0, ret), torch.where(ended, 0.0, length), sums


def host_metrics(
    spec: ActionSpec,
    metrics: Mapping[str, Tensor],
    finished: Sequence[float],
    discarded: int,
) -> dict[str, Any]:
    """The update's 0-d metrics as host floats, in one device-to-host transfer, and:

    ``ratio_worst_head`` as the head's name (``ActionSpec.head_name``), in place of the
    update's index in head order (None where the index is -1: no head had a finite ratio);
    ``episode_return``/``episode_length``, the means over the episodes ``finished``
    (``(summed return, summed length, count)``; NaN for none) and ``episodes``, their count;
    ``discarded_steps``, the ``discarded`` valid steps beyond ``num_steps`` per column.
    """
    names = list(metrics)
    values = torch.stack([metrics[n].float() for n in names]).cpu().tolist()
    host: dict[str, Any] = dict(zip(names, values, strict=True))
    host["ratio_worst_head"] = spec.head_name(host["ratio_worst_head"])
    total, length, count = finished
    host["episode_return"] = total / count if count else math.nan
    host["episode_length"] = length / count if count else math.nan
    host["episodes"] = count
    host["discarded_steps"] = discarded
    return host
