"""Acting on host environments as pure functions: one call per env step for every env and seed.

``act`` and ``observe`` do what ``PPOAgent.act`` and ``PPOAgent.observe`` do, with the same
arithmetic, keys and normalisers, but on tensors only: what the agent keeps between steps is an
``ActCarry`` (a named pytree), the running episode sums stay on the device (no host sync per
step), and the caller's inputs are not checked again (the ``GymAdapter`` made them). Both are
free of data-dependent Python, so they vmap over a leading seed axis and compile whole;
``make_acting`` builds them for ``num_seeds`` seeds, eager or compiled through
``funcppo.accel.compiling``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcppo.accel.compiling import CompileSettings, compile_fn, per_device
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.constants import ACT_STREAM
from funcppo.core.distributions import factored_logprob, factored_sample
from funcppo.core.networks import Params, init_hidden, policy_apply
from funcppo.core.normalize import (
    init_reward_scale,
    init_running_stats,
    normalize_obs,
    scale_reward,
    update_reward_scale,
    update_running_stats,
)
from funcppo.training.state import Batch

__all__ = [
    "ActCarry",
    "Acted",
    "Acting",
    "act",
    "init_act_carry",
    "make_acting",
    "observe",
    "observe_act",
]


class ActCarry(NamedTuple):
    """What acting carries from one env step to the next, for ``E`` envs of one seed.

    ``obs_stats``/``reward_scale``: the running normalisers (``()`` when off); ``hidden``: the
    LSTM state ``[E, H]`` (``()`` for an MLP); ``episode_start``, ``next_valid``: bool ``[E]``,
    as ``PPOAgent``'s; ``act_count``: int64 ``[]``, acts since the last update (the sampling
    key's counter); ``episode_return``/``episode_length``: float64 ``[E]``, the running
    episodes; ``finished``: float64 ``[3]``, summed return, summed length and count of the
    episodes ended since the last update.
    """

    obs_stats: Any
    reward_scale: Any
    hidden: Any
    episode_start: Tensor
    next_valid: Tensor
    act_count: Tensor
    episode_return: Tensor
    episode_length: Tensor
    finished: Tensor


class Acted(NamedTuple):
    """One ``act``'s transition so far (the ``Batch`` fields that the env's answer does not
    give; ``hidden`` ``()`` for an MLP) and what ``observe`` needs besides: the LSTM state after
    the step (``()`` for an MLP) and the raw observation."""

    obs: Tensor
    actions: dict[str, Tensor]
    masks: dict[str, Tensor]
    logprobs: dict[str, Tensor]
    values: Tensor
    episode_start: Tensor
    hidden: Any
    next_hidden: Any
    raw_obs: Tensor


def init_act_carry(
    config: PPOConfig,
    num_envs: int,
    normalize_obs: bool,
    normalize_reward: bool,
    device: torch.device | str | None = None,
) -> ActCarry:
    """A fresh carry for one seed: every env starts an episode, normalisers at their start."""
    hidden = init_hidden(config, num_envs, device)
    zeros = torch.zeros(num_envs, dtype=torch.float64, device=device)
    return ActCarry(
        obs_stats=init_running_stats((config.obs_dim,), device) if normalize_obs else (),
        reward_scale=init_reward_scale(num_envs, device) if normalize_reward else (),
        hidden=() if hidden is None else hidden,
        episode_start=torch.ones(num_envs, dtype=torch.bool, device=device),
        next_valid=torch.ones(num_envs, dtype=torch.bool, device=device),
        act_count=torch.zeros((), dtype=torch.int64, device=device),
        episode_return=zeros,
        episode_length=zeros.clone(),
        finished=torch.zeros(3, dtype=torch.float64, device=device),
    )


def _hidden(carry_hidden: Any) -> Any:
    return None if isinstance(carry_hidden, tuple) and not carry_hidden else carry_hidden


def act(
    config: PPOConfig,
    clip_obs: float,
    params: Params,
    key: Tensor,
    carry: ActCarry,
    obs: Tensor,
    masks: dict[str, Tensor],
    room: Tensor,
) -> tuple[ActCarry, Acted, dict[str, Tensor]]:
    """``PPOAgent.act``: sample every head for ``obs`` float ``[E, obs_dim]`` under ``masks``.

    ``key`` is the train state's ``[2]``; the draw's key is ``fold_in(fold_in(key, ACT_STREAM),
    act_count)``. ``room``: bool ``[E]``, the env columns that still lack ``num_steps``
    transitions. As SB3, the policy sees ``obs`` normalised by statistics that include it
    (those rows the env's last ``next_valid`` says will be trained on).
    Returns ``(carry, acted, actions)``, actions head -> int64 ``[E]``.
    """
    raw_obs = obs
    if carry.obs_stats:
        seen = update_running_stats(carry.obs_stats, obs, carry.next_valid & room)
        obs = normalize_obs(seen, obs, clip_obs)
    draw = jr.fold_in(jr.fold_in(key, ACT_STREAM), carry.act_count)
    hidden = _hidden(carry.hidden)
    out = policy_apply(params, config, obs, hidden, carry.episode_start)
    actions = factored_sample(config.spec, out.logits, masks, draw)
    logprobs, _ = factored_logprob(config.spec, out.logits, masks, actions)
    next_hidden = () if out.hidden is None else out.hidden
    acted = Acted(obs, actions, masks, logprobs, out.value, carry.episode_start, carry.hidden,
                  next_hidden, raw_obs)  # fmt: skip
    carry = carry._replace(act_count=carry.act_count + 1)
    return carry, acted, actions


def observe(
    config: PPOConfig,
    clip_obs: float,
    clip_reward: float,
    params: Params,
    gamma: Tensor,
    carry: ActCarry,
    acted: Acted,
    step: tuple[Tensor, ...],
    room: Tensor,
) -> tuple[ActCarry, Batch]:
    """``PPOAgent.observe``: the transition ``acted`` started, completed by the env's answer.

    ``step`` is ``(reward, terminated, truncated, final_obs, valid, episode_start,
    next_valid)``, ``[E]`` each (``final_obs`` ``[E, obs_dim]``), as a ``GymAdapter``'s
    ``EnvStep`` gives them. ``gamma`` discounts the reward normaliser's returns. Returns the
    carry after the step and the completed row (``next_values`` from ``final_obs`` under the
    post-step LSTM state; ``hidden`` ``()`` for an MLP). Episodes that end on a valid step add
    to ``carry.finished``.
    """
    reward, terminated, truncated, final, valid, start, next_valid = step
    done = terminated | truncated
    trained = valid & room
    obs_stats = carry.obs_stats
    if obs_stats:
        obs_stats = update_running_stats(obs_stats, acted.raw_obs, trained)
        final = normalize_obs(obs_stats, final, clip_obs)
    no = torch.zeros_like(valid)
    next_value = policy_apply(params, config, final, _hidden(acted.next_hidden), no).value
    reward_scale, train_reward = carry.reward_scale, reward
    if reward_scale:
        reward_scale = update_reward_scale(reward_scale, reward, done, gamma, valid, trained)
        train_reward = scale_reward(reward_scale, reward, clip_reward)
    ret = carry.episode_return + torch.where(valid, reward.double(), 0.0)
    length = carry.episode_length + valid.double()
    ended = done & valid
    sums = torch.stack([torch.where(ended, x, 0.0).sum() for x in (ret, length, ended.double())])
    a = acted
    row = Batch(a.obs, a.actions, a.masks, a.logprobs, a.values, next_value, train_reward,
                terminated, truncated, a.episode_start, a.hidden)  # fmt: skip
    carry = ActCarry(
        obs_stats=obs_stats,
        reward_scale=reward_scale,
        hidden=acted.next_hidden,
        episode_start=start,
        next_valid=next_valid,
        act_count=carry.act_count,
        episode_return=torch.where(ended, 0.0, ret),
        episode_length=torch.where(ended, 0.0, length),
        finished=carry.finished + sums,
    )
    return carry, row


def observe_act(
    config: PPOConfig,
    clip_obs: float,
    clip_reward: float,
    params: Params,
    key: Tensor,
    gamma: Tensor,
    carry: ActCarry,
    acted: Acted,
    step: tuple[Tensor, ...],
    room: Tensor,
    obs: Tensor,
    masks: dict[str, Tensor],
    next_room: Tensor,
) -> tuple[ActCarry, Batch, Acted, dict[str, Tensor]]:
    """``observe`` of one env step, then ``act`` on the observation it reached (``next_room``:
    the columns with room after the step): one call per env step inside a rollout.
    Returns ``(carry, row, acted, actions)``."""
    carry, row = observe(config, clip_obs, clip_reward, params, gamma, carry, acted, step, room)
    carry, acted, actions = act(config, clip_obs, params, key, carry, obs, masks, next_room)
    return carry, row, acted, actions


class Acting(NamedTuple):
    """``act(params, key, carry, obs, masks, room)``, ``observe(params, gamma, carry, acted,
    step, room)`` and ``observe_act(params, key, gamma, carry, acted, step, room, obs, masks,
    next_room)``, for one seed's arguments or, vmapped, for ``[S, ...]`` stacks."""

    act: Callable
    observe: Callable
    observe_act: Callable


def make_acting(
    config: PPOConfig,
    *,
    num_seeds: int | None = None,
    clip_obs: float = 10.0,
    clip_reward: float = 10.0,
    compile: bool = False,
    compiler: CompileSettings | None = None,
) -> Acting:
    """``act`` and ``observe`` with the config closed over, vmapped over a leading seed axis
    of every argument when ``num_seeds`` is given (each seed's draws are those of its own
    key), and compiled when ``compile`` is True (``compiler``: None is
    ``CompileSettings.for_device`` of the key's device at the first call)."""
    fns = {
        "act": functools.partial(act, config, clip_obs),
        "observe": functools.partial(observe, config, clip_obs, clip_reward),
        "observe_act": functools.partial(observe_act, config, clip_obs, clip_reward),
    }
    if num_seeds is not None:
        fns = {name: torch.func.vmap(fn, randomness="error") for name, fn in fns.items()}
    if not compile:
        return Acting(**fns)

    def build(name: str, settings: CompileSettings) -> Callable:
        return compile_fn(fns[name], f"gym_{name}", settings)

    def device_of(*args: Any) -> torch.device:
        return args[1].device

    built = {
        name: per_device(functools.partial(build, name), compiler, None, device_of) for name in fns
    }
    return Acting(**built)
