"""``evaluate_policy``: whole episodes of a gymnasium environment under a ``PPOAgent``'s policy,
counted as Stable-Baselines3's ``evaluate_policy`` counts them.

Episodes are shared out among a vector env's ``n`` envs before any is played: env ``i`` plays
``(n_episodes + i) // n`` of them, and an episode that a fast env would finish beyond its share
is left out. Keeping the first episodes to finish, whichever env they come from, would favour
short episodes (SB3 explains this in the docstring of its own ``evaluate_policy``). An
episode's return is the sum of the rewards that the env reports, and its length the number of
steps: SB3's figures for an env without a ``Monitor`` wrapper. Steps that gymnasium's NEXT_STEP
autoreset spends on a reset belong to no episode. Masks are honoured as in training
(``GymAdapter``: ``info["action_mask"]`` or ``action_masks()``), as sb3-contrib's maskable
``evaluate_policy`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from funcppo.agent.gym_adapter import GymAdapter

if TYPE_CHECKING:
    from funcppo.agent.agent import PPOAgent

__all__ = ["evaluate_policy"]


def episode_targets(n_episodes: int, num_envs: int) -> np.ndarray:
    """How many episodes each env plays, int64 ``[num_envs]``: as even as can be, the extra
    ones to the last envs (SB3's split), summing to ``n_episodes``."""
    return np.array([(n_episodes + i) // num_envs for i in range(num_envs)], dtype=np.int64)


def _adapter(agent: PPOAgent, env: Any, seed: int | None) -> GymAdapter:
    adapter = env if isinstance(env, GymAdapter) else GymAdapter(env, seed=seed)
    if adapter.obs_dim != agent.config.obs_dim or adapter.spec.heads != agent.config.spec.heads:
        raise ValueError(
            f"env: expected observations of size {agent.config.obs_dim} and heads "
            f"{dict(agent.config.spec.heads)} (the agent's config), got size {adapter.obs_dim} "
            f"and heads {dict(adapter.spec.heads)}"
        )
    return adapter


def evaluate_policy(
    agent: PPOAgent,
    env: Any,
    n_episodes: int = 10,
    deterministic: bool = True,
    *,
    return_episode_rewards: bool = False,
    seed: int | None = None,
) -> tuple[float, float] | tuple[list[float], list[int]]:
    """The mean and standard deviation of the return of ``n_episodes`` whole episodes.

    Args:
      agent: its ``predict`` chooses the actions; nothing of the agent changes (its observation
        statistics are read, not updated; a stochastic policy draws from predict's own keys).
      env: a ``gymnasium.Env``, a ``gymnasium.vector.VectorEnv`` or a ``GymAdapter``; it is
        reset first, and ``n_episodes`` are shared out among its envs (see the module).
      deterministic: each head's most probable valid action, else sampled as in training.
      return_episode_rewards: return ``(returns, lengths)``, one entry per episode in the order
        they ended, instead of the mean and the (population) standard deviation.
      seed: passed to the env's first ``reset`` (None: a ``GymAdapter``'s own seed, else
        gymnasium goes on from where its generator is).
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 1:
        raise ValueError(f"n_episodes: expected an int >= 1, got {n_episodes!r}")
    if deterministic not in (True, False):
        raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
    adapter = _adapter(agent, env, seed)
    n = adapter.num_envs
    targets, counts = episode_targets(n_episodes, n), np.zeros(n, dtype=np.int64)
    running_return, running_length = np.zeros(n), np.zeros(n, dtype=np.int64)
    returns: list[float] = []
    lengths: list[int] = []
    obs, masks = adapter.reset(seed)
    hidden, start = None, torch.ones(n, dtype=torch.bool)
    while (counts < targets).any():
        actions, hidden = agent.predict(obs, masks, hidden, deterministic, episode_start=start)
        step = adapter.step(actions)
        valid = step.valid.cpu().numpy()
        # The adapter's terminated and truncated are False on steps that are no transition.
        done = (step.terminated | step.truncated).cpu().numpy()
        running_return += np.where(valid, step.reward.cpu().numpy().astype(np.float64), 0.0)
        running_length += valid
        for i in np.flatnonzero(done & (counts < targets)):
            returns.append(float(running_return[i]))
            lengths.append(int(running_length[i]))
            counts[i] += 1
        running_return[done], running_length[done] = 0.0, 0
        obs, masks, start = step.obs, step.masks, step.episode_start
    if return_episode_rewards:
        return returns, lengths
    return float(np.mean(returns)), float(np.std(returns))
