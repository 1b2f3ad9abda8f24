"""What ``PPOAgent`` saves beside its ``TrainState``: the settings, the carried episode state and
the running normalisers, as the named tensors that ``funcppo.training.checkpoint`` stores as
``extra``.

A checkpoint loads into an agent whose run-time settings differ from the saved agent's: with
another ``num_envs`` each env starts a new episode (fresh per-env entries, the agent's own),
while the statistics are kept; reward scaling may be switched on (fresh statistics) or off.
Only ``normalize_obs`` must match, since the observation statistics are part of the policy.
With the same ``num_envs`` everything is restored, so a resumed run continues exactly.
Every stored entry that is used is checked for name, shape and dtype first, so a checkpoint
written by something else fails with an error that names the tensor.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcppo.core.config import PPOConfig
from funcppo.core.networks import LSTMState
from funcppo.core.normalize import RewardScaleState, RunningStats
from funcppo.training.checkpoint import load_checkpoint

__all__ = [
    "SETTINGS",
    "AgentCarry",
    "agent_from_checkpoint",
    "carry_from_extra",
    "carry_to_extra",
]

# PPOAgent's settings, stored as 0-d tensors ``agent/<name>``; each is also an argument of its
# constructor.
SETTINGS = ("num_envs", "num_steps", "normalize_obs", "normalize_reward", "clip_obs", "clip_reward")
# Entries with a leading [num_envs] axis, restored only into an agent with as many envs.
_PER_ENV = (
    "agent/episode_start",
    "agent/episode_return",
    "agent/episode_length",
    "agent/hidden_h",
    "agent/hidden_c",
    "reward_scale/returns",
    "agent/next_valid",
)

_REWARD_SCALE = ("reward_scale/returns", *(f"reward_scale/{k}" for k in RunningStats._fields))


class AgentCarry(NamedTuple):
    """Everything but the ``TrainState`` that an exact resume needs; ``[num_envs]`` leading axis.

    Attributes:
      episode_start: bool ``[B]``, True where the next observation starts an episode.
      episode_return, episode_length: float64 ``[B]``, of each env's unfinished episode.
      hidden: the carried ``LSTMState`` ``[B, lstm_size]`` (None: an MLP config).
      obs_stats: ``RunningStats`` of the observations (None: not normalised).
      reward_scale: ``RewardScaleState`` (None: rewards not scaled).
      next_valid: bool ``[B]``, False where the env will ignore the next action (the last
        ``EnvStep.next_valid``); None in a carry made without one, and in files written
        before it was stored, where the agent's own is kept.
    """

    episode_start: Tensor
    episode_return: Tensor
    episode_length: Tensor
    hidden: LSTMState | None
    obs_stats: RunningStats | None
    reward_scale: RewardScaleState | None
    next_valid: Tensor | None = None


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
    if carry.next_valid is not None:
        extra["agent/next_valid"] = carry.next_valid
    return extra


def _stored_setting(path: str | os.PathLike, extra: dict[str, Tensor], name: str) -> Any:
    value = extra.get(f"agent/{name}")
    if value is None:
        return None
    if value.dim() != 0:
        raise ValueError(
            f"{os.fspath(path)}: extra['agent/{name}']: expected a 0-d tensor, "
            f"got shape {list(value.shape)}"
        )
    return value.item()


def _entry(path, extra: dict[str, Tensor], name: str, mine: Tensor, same_envs: bool) -> Tensor:
    """The stored ``name``, checked against the agent's own ``mine``; ``mine`` itself for a
    per-env entry when the numbers of envs differ."""
    where = f"{os.fspath(path)}: extra[{name!r}]"
    if name not in extra:
        raise ValueError(f"{where}: missing (saved by another agent?)")
    got = extra[name]
    if same_envs or name not in _PER_ENV:
        fits, want = got.shape == mine.shape, str(list(mine.shape))
    else:
        fits = got.dim() == mine.dim() and got.shape[1:] == mine.shape[1:]
        want = "[" + ", ".join(["num_envs", *map(str, mine.shape[1:])]) + "]"
    if got.dtype != mine.dtype or not fits:
        raise ValueError(
            f"{where}: expected {mine.dtype} {want}, got {got.dtype} {list(got.shape)}"
        )
    return got if same_envs or name not in _PER_ENV else mine


def carry_from_extra(
    path: str | os.PathLike, extra: dict[str, Tensor], settings: dict[str, Any], like: AgentCarry
) -> AgentCarry:
    """The ``AgentCarry`` stored in ``extra`` (read from ``path``), fitted to an agent whose
    own carry is ``like`` and whose settings are ``settings``.

    ``settings["normalize_obs"]`` must equal the stored one; see the module's docstring for
    what is restored and what is taken from ``like``.
    """
    for name in settings:
        stored, mine = _stored_setting(path, extra, name), settings[name]
        if stored is None:
            where = f"{os.fspath(path)}: extra['agent/{name}']"
            raise ValueError(f"{where}: missing (saved by another agent?)")
        if name == "normalize_obs" and stored != mine:
            raise ValueError(
                f"agent/normalize_obs: checkpoint has {stored!r}, this agent {mine!r}; the "
                "observation statistics are part of the policy, so it must match"
            )
    stored_envs = extra.get("agent/episode_start")
    same_envs = stored_envs is not None and stored_envs.shape == like.episode_start.shape
    mine = carry_to_extra({}, like)
    # Entries a file may lack, the agent's own kept: reward statistics of an agent that did
    # not scale rewards, and next_valid of files written before it was stored.
    optional = set() if "reward_scale/returns" in extra else set(_REWARD_SCALE)
    optional |= {"agent/next_valid"} - set(extra)
    got = {
        name: value if name in optional else _entry(path, extra, name, value, same_envs)
        for name, value in mine.items()
    }
    known = {f"agent/{name}" for name in SETTINGS} | set(mine) | set(_REWARD_SCALE)
    known.add("agent/next_valid")
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"{os.fspath(path)}: extra[{unknown[0]!r}]: not written by PPOAgent.save")
    hidden = obs_stats = reward_scale = None
    if like.hidden is not None:
        hidden = LSTMState(got["agent/hidden_h"], got["agent/hidden_c"])
    if like.obs_stats is not None:
        obs_stats = RunningStats(*(got[f"obs_stats/{k}"] for k in RunningStats._fields))
    if like.reward_scale is not None:
        stats = RunningStats(*(got[f"reward_scale/{k}"] for k in RunningStats._fields))
        reward_scale = RewardScaleState(returns=got["reward_scale/returns"], stats=stats)
    return AgentCarry(
        got["agent/episode_start"],
        got["agent/episode_return"],
        got["agent/episode_length"],
        hidden,
        obs_stats,
        reward_scale,
        got.get("agent/next_valid"),
    )


def agent_from_checkpoint(agent_class: type, path: str | os.PathLike, overrides: dict[str, Any]):
    """An ``agent_class`` (``PPOAgent``) built with the config and settings stored in ``path``,
    then loaded from it. ``overrides`` names constructor arguments (``num_envs``, ``device``,
    ``seed``, ...) or config fields (``learning_rate``, ...), which replace the stored ones."""
    _, config, extra = load_checkpoint(path)
    settings = {name: _stored_setting(path, extra, name) for name in SETTINGS}
    missing = [name for name, value in settings.items() if value is None]
    if missing:
        raise ValueError(
            f"{os.fspath(path)}: no agent settings ({', '.join(missing)}): written by "
            "save_checkpoint, not PPOAgent.save; build a PPOAgent and call load instead"
        )
    arguments = set(inspect.signature(agent_class).parameters) - {"config"}
    fields = {field.name for field in dataclasses.fields(PPOConfig)}
    unknown = sorted(set(overrides) - arguments - fields)
    if unknown:
        raise ValueError(
            f"overrides: expected PPOAgent's arguments {sorted(arguments)} or PPOConfig's "
            f"fields, got {unknown}"
        )
    config = config.replace(**{k: v for k, v in overrides.items() if k in fields})
    kwargs = settings | {k: v for k, v in overrides.items() if k in arguments}
    agent = agent_class(config, **kwargs)
    agent.load(path)
    return agent
