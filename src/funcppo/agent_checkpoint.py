"""What ``PPOAgent`` saves beside its ``TrainState``: the settings, the carried episode state and
the running normalisers, as the named tensors that ``funcppo.checkpoint`` stores as ``extra``.

Reading them back checks every name, shape and dtype against what this agent would write, and
the settings by value, before anything is restored, so a checkpoint of an agent with other
settings fails with an error that names the tensor instead of resuming a different run.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcppo.networks import LSTMState
from funcppo.normalize import RewardScaleState, RunningStats

__all__ = ["AgentCarry", "carry_from_extra", "carry_to_extra"]


class AgentCarry(NamedTuple):
    """Everything but the ``TrainState`` that an exact resume needs; ``[num_envs]`` leading axis.

    Attributes:
      episode_start: bool ``[B]``, True where the next observation starts an episode.
      episode_return, episode_length: float64 ``[B]``, of each env's unfinished episode.
      hidden: the carried ``LSTMState`` ``[B, lstm_size]`` (None: an MLP config).
      obs_stats: ``RunningStats`` of the observations (None: not normalised).
      reward_scale: ``RewardScaleState`` (None: rewards not scaled).
    """

    episode_start: Tensor
    episode_return: Tensor
    episode_length: Tensor
    hidden: LSTMState | None
    obs_stats: RunningStats | None
    reward_scale: RewardScaleState | None


def carry_to_extra(settings: dict[str, Any], carry: AgentCarry) -> dict[str, Tensor]:
    """The settings (as 0-d tensors) and ``carry`` as named tensors, ``prefix/field`` each."""
    extra = {f"agent/{k}": torch.tensor(v) for k, v in settings.items()}
    extra |= {
        "agent/episode_start": carry.episode_start,
        "agent/episode_return": carry.episode_return,
        "agent/episode_length": carry.episode_length,
    }
    if carry.hidden is not None:
        extra |= {"agent/hidden_h": carry.hidden.h, "agent/hidden_c": carry.hidden.c}
    if carry.obs_stats is not None:
        extra |= {f"obs_stats/{k}": v for k, v in carry.obs_stats._asdict().items()}
    if carry.reward_scale is not None:
        extra["reward_scale/returns"] = carry.reward_scale.returns
        extra |= {f"reward_scale/{k}": v for k, v in carry.reward_scale.stats._asdict().items()}
    return extra


def _check_extra(
    path: str | os.PathLike, extra: dict[str, Tensor], want: dict[str, Tensor], settings: dict
) -> None:
    for name, mine in want.items():
        if name not in extra:
            raise ValueError(f"{path}: extra[{name!r}]: missing (saved by another agent?)")
        got = extra[name]
        if name.removeprefix("agent/") in settings and not torch.equal(got, mine):
            raise ValueError(f"{name}: checkpoint has {got.item()!r}, this agent {mine.item()!r}")
        if got.shape != mine.shape or got.dtype != mine.dtype:
            raise ValueError(
                f"{path}: extra[{name!r}]: expected {mine.dtype} {list(mine.shape)}, "
                f"got {got.dtype} {list(got.shape)}"
            )
    unknown = sorted(set(extra) - set(want))
    if unknown:
        raise ValueError(f"{path}: extra{unknown}: not expected by this agent's settings")


def carry_from_extra(
    path: str | os.PathLike, extra: dict[str, Tensor], settings: dict[str, Any], like: AgentCarry
) -> AgentCarry:
    """The ``AgentCarry`` stored in ``extra`` (read from ``path``), checked against ``like``.

    ``like`` is the agent's own carry: it fixes which entries must be present, with which shape
    and dtype; ``settings`` must match the stored ones exactly.
    """
    _check_extra(path, extra, carry_to_extra(settings, like), settings)
    hidden = obs_stats = reward_scale = None
    if like.hidden is not None:
        hidden = LSTMState(extra["agent/hidden_h"], extra["agent/hidden_c"])
    if like.obs_stats is not None:
        obs_stats = RunningStats(*(extra[f"obs_stats/{k}"] for k in RunningStats._fields))
    if like.reward_scale is not None:
        stats = RunningStats(*(extra[f"reward_scale/{k}"] for k in RunningStats._fields))
        reward_scale = RewardScaleState(returns=extra["reward_scale/returns"], stats=stats)
    return AgentCarry(
        extra["agent/episode_start"],
        extra["agent/episode_return"],
        extra["agent/episode_length"],
        hidden,
        obs_stats,
        reward_scale,
    )
