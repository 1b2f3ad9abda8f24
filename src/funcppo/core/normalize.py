"""Running observation normalisation and reward scaling as pure functions over NamedTuples.

``RunningStats`` is the running mean and population variance of a stream of batches, merged
batch by batch with the parallel formula of Chan, Golub & LeVeque (1979), as gymnasium's and
Stable-Baselines3's ``RunningMeanStd``: same start (mean 0, var 1, count ``STATS_INIT_COUNT``),
same merge, same ``(x - mean) / sqrt(var + eps)``, all in float64.

Reward scaling divides each reward by the running standard deviation of the discounted return
``R_t = gamma * R_{t-1} + r_t`` (reset to 0 after an episode ends), as SB3's ``VecNormalize``
(gymnasium's ``NormalizeReward`` computes the same while no episode ends).

Departure from both: rows that are not finite, or that carry weight False (steps that are no
transition), never enter the statistics, and non-finite values come out unchanged instead of
clipped, so that the update's finiteness gate still sees them (and one NaN cannot poison the
normaliser for the rest of the run). Every function is free of host syncs and vmaps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from funcppo.core.constants import NORMALIZE_EPS, STATS_INIT_COUNT

__all__ = [
    "RewardScaleState",
    "RunningStats",
    "init_reward_scale",
    "init_running_stats",
    "normalize_obs",
    "scale_reward",
    "update_reward_scale",
    "update_running_stats",
]


class RunningStats(NamedTuple):
    """Running moments of values of shape ``[*shape]``: float64 ``mean`` and population ``var``
    ``[*shape]``, and the 0-d float64 ``count`` of rows merged so far (plus the initial count)."""

    mean: Tensor
    var: Tensor
    count: Tensor


class RewardScaleState(NamedTuple):
    """``returns``: float64 ``[num_envs]``, the discounted return of each env's current episode;
    ``stats``: ``RunningStats`` of shape ``[]`` over every return seen."""

    returns: Tensor
    stats: RunningStats


def init_running_stats(
    shape: tuple[int, ...], device: torch.device | str | None = None
) -> RunningStats:
    """Mean 0, variance 1, count ``STATS_INIT_COUNT`` (gymnasium's and SB3's start)."""
    f64 = torch.float64
    return RunningStats(
        mean=torch.zeros(shape, dtype=f64, device=device),
        var=torch.ones(shape, dtype=f64, device=device),
        count=torch.tensor(STATS_INIT_COUNT, dtype=f64, device=device),
    )


def update_running_stats(
    stats: RunningStats, x: Tensor, weight: Tensor | None = None
) -> RunningStats:
    """Merge the rows of ``x`` ``[N, *shape]`` into ``stats``.

    Only rows whose every entry is finite and whose ``weight`` (bool ``[N]``, None: all) is
    True count. With ``n`` such rows of mean ``m_b`` and population variance ``v_b``, and
    ``delta = m_b - mean``, ``total = count + n`` (Chan et al. 1979)::

        mean' = mean + delta * n / total
        var'  = (var * count + v_b * n + delta^2 * count * n / total) / total

    With no such row ``stats`` come back unchanged.
    """
    if x.shape[1:] != stats.mean.shape:
        raise ValueError(
            f"x: expected [N, {', '.join(map(str, stats.mean.shape))}] rows, got {tuple(x.shape)}"
        )
    x = x.to(torch.float64)
    ok = torch.isfinite(x).reshape(x.shape[0], -1).all(-1)
    if weight is not None:
        ok = ok & weight
    w = ok.reshape(ok.shape + (1,) * (x.ndim - 1))
    n = ok.sum().to(torch.float64)
    n_safe = n.clamp(min=1.0)
    batch_mean = torch.where(w, x, 0.0).sum(0) / n_safe
    batch_var = torch.where(w, (x - batch_mean).square(), 0.0).sum(0) / n_safe
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * n / total
    m2 = stats.var * stats.count + batch_var * n + delta.square() * stats.count * n / total
    any_row = n > 0
    return RunningStats(
        mean=torch.where(any_row, mean, stats.mean),
        var=torch.where(any_row, m2 / total, stats.var),
        count=total,
    )


def normalize_obs(
    stats: RunningStats, obs: Tensor, clip: float | None = None, eps: float = NORMALIZE_EPS
) -> Tensor:
    """``clamp((obs - mean) / sqrt(var + eps), -clip, clip)`` in ``obs.dtype``, ``[..., *shape]``.

    ``clip`` None does not clip (gymnasium's ``NormalizeObservation``; SB3 clips at 10).
    Non-finite entries pass through unchanged.
    """
    z = (obs.to(torch.float64) - stats.mean) / torch.sqrt(stats.var + eps)
    if clip is not None:
        z = z.clamp(-clip, clip)
    return torch.where(torch.isfinite(obs), z.to(obs.dtype), obs)


def init_reward_scale(num_envs: int, device: torch.device | str | None = None) -> RewardScaleState:
    """Returns 0 for every env and fresh ``RunningStats`` of shape ``[]``."""
    return RewardScaleState(
        returns=torch.zeros(num_envs, dtype=torch.float64, device=device),
        stats=init_running_stats((), device),
    )


def update_reward_scale(
    state: RewardScaleState,
    reward: Tensor,
    done: Tensor,
    gamma: float | Tensor,
    weight: Tensor | None = None,
    count: Tensor | None = None,
) -> RewardScaleState:
    """One env step: ``R = gamma * R + r``, merge ``R`` into the stats, then ``R = 0`` where done.

    ``reward`` float ``[num_envs]``, ``done`` bool ``[num_envs]`` (terminated or truncated),
    ``weight`` bool ``[num_envs]`` (None: all): rows with weight False or a non-finite reward
    leave their ``R`` as it was and stay out of the stats. ``count`` bool ``[num_envs]`` (None:
    all): rows with count False advance their ``R`` but stay out of the stats (a real step that
    is not trained on). This is SB3 ``VecNormalize``'s order (update, then reset), so scale the
    reward of this step with the returned state.
    """
    ok = torch.isfinite(reward)
    if weight is not None:
        ok = ok & weight
    returns = torch.where(ok, state.returns * gamma + reward.to(torch.float64), state.returns)
    stats = update_running_stats(state.stats, returns, ok if count is None else ok & count)
    return RewardScaleState(returns=torch.where(done, 0.0, returns), stats=stats)


def scale_reward(
    state: RewardScaleState, reward: Tensor, clip: float | None = None, eps: float = NORMALIZE_EPS
) -> Tensor:
    """``clamp(reward / sqrt(var_R + eps), -clip, clip)`` in ``reward.dtype``, ``[...]``.

    Non-finite rewards pass through unchanged.
    """
    z = reward.to(torch.float64) / torch.sqrt(state.stats.var + eps)
    if clip is not None:
        z = z.clamp(-clip, clip)
    return torch.where(torch.isfinite(reward), z.to(reward.dtype), reward)
