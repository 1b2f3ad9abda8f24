"""Synthetic on-policy rollouts for tests and benchmarks.

``synthetic_batch`` draws random observations, random validity masks (at least one valid
action per row), then acts with the given policy, so old log-probs, values and LSTM states are
exactly what the rollout policy produced: the first minibatch step sees a ratio of 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.distributions import factored_logprob, factored_sample
from funcppo.core.networks import LSTMState, init_hidden, policy_apply
from funcppo.training.state import Batch

__all__ = ["random_masks", "synthetic_batch"]


def random_masks(config: PPOConfig, key: Tensor, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Bool masks per head with about half the actions valid and at least one valid per row."""
    spec = config.spec
    masks = {}
    for i, (name, size) in enumerate(spec.heads):
        full = (*shape, spec.n_ops, size) if name in spec.op_conditioned else (*shape, size)
        u = jr.uniform(jr.fold_in(key, i), full)
        forced = jr.bits(jr.fold_in(key, 100 + i), full[:-1]) % size
        one = forced.unsqueeze(-1) == torch.arange(size, device=key.device)
        masks[name] = (u < 0.5) | one
    return masks


@torch.no_grad()
def synthetic_batch(
    config: PPOConfig,
    params,
    key: Tensor,
    num_steps: int,
    num_envs: int,
    done_prob: float = 0.02,
) -> Batch:
    """A ``[num_steps, num_envs]`` rollout of ``params`` on random observations."""
    k_obs, k_mask, k_act, k_rew, k_done = jr.split(key, 5)
    t, b = num_steps, num_envs
    obs = jr.normal(k_obs, (t, b, config.obs_dim))
    masks = random_masks(config, k_mask, (t, b))
    u = jr.uniform(k_done, (t, b, 2))
    terminated, truncated = u[..., 0] < done_prob, u[..., 1] < done_prob / 2
    done = terminated | truncated
    episode_start = torch.cat([torch.ones(1, b, dtype=torch.bool, device=key.device), done[:-1]])
    hidden = init_hidden(config, b, key.device)
    hiddens, logits_t, values = [], [], []
    for step in range(t):
        if config.recurrent:
            hiddens.append(hidden)
        out = policy_apply(params, config, obs[step], hidden, episode_start[step])
        hidden = out.hidden
        logits_t.append(out.logits)
        values.append(out.value)
    logits = {h: torch.stack([lg[h] for lg in logits_t]) for h in config.spec.names}
    values = torch.stack(values)
    actions = factored_sample(config.spec, logits, masks, k_act)
    logprobs, _ = factored_logprob(config.spec, logits, masks, actions)
    # Values of the next observation: the next step's value, or a fresh one past a reset or the end.
    bootstrap = jr.normal(jr.fold_in(k_rew, 1), (t, b))
    next_values = torch.where(done, bootstrap, torch.cat([values[1:], bootstrap[-1:]]))
    stacked_hidden = None
    if config.recurrent:
        stacked_hidden = LSTMState(
            torch.stack([h.h for h in hiddens]), torch.stack([h.c for h in hiddens])
        )
    return Batch(
        obs=obs,
        actions=actions,
        masks=masks,
        logprobs=logprobs,
        values=values,
        next_values=next_values,
        rewards=jr.normal(k_rew, (t, b)),
        terminated=terminated,
        truncated=truncated,
        episode_start=episode_start,
        hidden=stacked_hidden,
    )
