"""A plain eager PyTorch PPO update in the style of CleanRL's single-file ``ppo.py``.

Written for ``vs_peers.py`` as the baseline a user would write by hand: an ``nn.Module`` agent
(separate actor and critic MLPs, orthogonal init), ``torch.optim.Adam``, a Python loop over
epochs and shuffled minibatches, GAE by a reverse loop, per-minibatch advantage normalisation,
clipped surrogate, clipped value loss, entropy bonus and gradient clipping at 0.5.

The action space is the benchmark's factored one, handled as CleanRL's multi-discrete masked
variant (``ppo_multidiscrete_mask.py``) handles MultiDiscrete: one logits vector split per head,
invalid actions set to -1e8. Two additions make it do the same work as funcppo's update: head
``a``'s mask has one row per op (the row of the sampled op is used), and each head counts in the
joint log-prob and entropy only where the op uses it (``CAUSAL``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

HEADS = (3, 5, 4, 6)  # op, a, b, c
CAUSAL = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
MASK_SIZES = (3, 3 * 5, 4, 6)  # head a's mask: one row of 5 per op
MASK_DIM = sum(MASK_SIZES)


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor and critic MLPs of ``hidden`` x 2 tanh, as CleanRL's ``ppo.py``."""

    def __init__(self, obs_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, sum(HEADS)), std=0.01),
        )

    def get_value(self, x: Tensor) -> Tensor:
        return self.critic(x)

    def get_action_and_value(self, x: Tensor, mask: Tensor, action: Tensor | None = None):
        """x ``[N, obs]``, mask bool ``[N, MASK_DIM]``, action int ``[N, 4]`` (sampled if None).

        Returns action ``[N, 4]``, joint log-prob ``[N]``, entropy ``[N]``, value ``[N, 1]``.
        """
        logits = torch.split(self.actor(x), HEADS, dim=1)
        op_mask, a_mask, b_mask, c_mask = torch.split(mask, MASK_SIZES, dim=1)
        op_dist = torch.distributions.Categorical(logits=_masked(logits[0], op_mask))
        op = op_dist.sample() if action is None else action[:, 0]
        a_rows = a_mask.view(-1, 3, 5)[torch.arange(x.shape[0]), op]
        dists = [op_dist] + [
            torch.distributions.Categorical(logits=_masked(lg, m))
            for lg, m in zip(logits[1:], (a_rows, b_mask, c_mask), strict=True)
        ]
        if action is None:
            action = torch.stack([op] + [d.sample() for d in dists[1:]], dim=1)
        rel = CAUSAL[action[:, 0]]
        logprob = torch.stack([d.log_prob(action[:, i]) for i, d in enumerate(dists)], 1)
        entropy = torch.stack([d.entropy() for d in dists], 1)
        return action, (logprob * rel).sum(1), (entropy * rel).sum(1), self.critic(x)


def _masked(logits: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, logits, torch.tensor(-1e8))


@torch.no_grad()
def rollout(agent: Agent, obs: Tensor, masks: Tensor, rewards: Tensor, dones: Tensor) -> dict:
    """Act with ``agent`` on given ``[T, B, ...]`` observations, masks, rewards and dones.

    Stands in for CleanRL's rollout phase: stores actions, log-probs and values as it would.
    """
    t, b = obs.shape[:2]
    flat = obs.reshape(t * b, -1)
    action, logprob, _, value = agent.get_action_and_value(flat, masks.reshape(t * b, -1))
    return {
        "obs": obs,
        "masks": masks,
        "actions": action.view(t, b, -1),
        "logprobs": logprob.view(t, b),
        "values": value.view(t, b),
        "rewards": rewards,
        "dones": dones.float(),
        "next_obs": obs[-1],
        "next_done": torch.zeros(b),
    }


def ppo_update(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    data: dict,
    update_epochs: int = 4,
    num_minibatches: int = 4,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
    clip_coef: float = 0.2,
    ent_coef: float = 0.01,
    vf_coef: float = 0.5,
    max_grad_norm: float = 0.5,
) -> dict[str, float]:
    """One PPO update over ``data`` (from ``rollout``), CleanRL's ``ppo.py`` loop body."""
    num_steps, num_envs = data["rewards"].shape
    with torch.no_grad():
        next_value = agent.get_value(data["next_obs"]).reshape(1, -1)
        advantages = torch.zeros_like(data["rewards"])
        lastgaelam = 0
        for t in reversed(range(num_steps)):
            if t == num_steps - 1:
                nextnonterminal = 1.0 - data["next_done"]
                nextvalues = next_value
            else:
                nextnonterminal = 1.0 - data["dones"][t + 1]
                nextvalues = data["values"][t + 1]
            delta = data["rewards"][t] + gamma * nextvalues * nextnonterminal - data["values"][t]
            advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        returns = advantages + data["values"]

    b_obs = data["obs"].reshape(num_steps * num_envs, -1)
    b_masks = data["masks"].reshape(num_steps * num_envs, -1)
    b_actions = data["actions"].reshape(num_steps * num_envs, -1)
    b_logprobs = data["logprobs"].reshape(-1)
    b_advantages = advantages.reshape(-1)
    b_returns = returns.reshape(-1)
    b_values = data["values"].reshape(-1)

    batch_size = num_steps * num_envs
    minibatch_size = batch_size // num_minibatches
    b_inds = np.arange(batch_size)
    clipfracs = []
    for _epoch in range(update_epochs):
        np.random.shuffle(b_inds)
        for start in range(0, batch_size, minibatch_size):
            mb_inds = b_inds[start : start + minibatch_size]
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                b_obs[mb_inds], b_masks[mb_inds], b_actions[mb_inds]
            )
            logratio = newlogprob - b_logprobs[mb_inds]
            ratio = logratio.exp()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs += [((ratio - 1.0).abs() > clip_coef).float().mean().item()]
            mb_advantages = b_advantages[mb_inds]
            mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
            pg_loss1 = -mb_advantages * ratio
            pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
            pg_loss = torch.max(pg_loss1, pg_loss2).mean()
            newvalue = newvalue.view(-1)
            v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
            v_clipped = b_values[mb_inds] + torch.clamp(
                newvalue - b_values[mb_inds], -clip_coef, clip_coef
            )
            v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
            v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
            optimizer.step()
    return {
        "approx_kl": approx_kl.item(),
        "clipfrac": float(np.mean(clipfracs)),
        "value_loss": v_loss.item(),
    }
