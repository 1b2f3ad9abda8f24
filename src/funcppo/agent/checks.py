"""Host-side checks of what a caller hands ``PPOAgent``: arrays become tensors on the agent's
device, and a wrong shape, dtype or value fails with an error that names the argument, what was
expected and what came. Nothing here runs inside compiled or vmapped code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from funcppo.agent.rollout import EnvStep
from funcppo.core.config import PPOConfig
from funcppo.core.distributions import validate_masks
from funcppo.core.networks import LSTMState, init_hidden
from funcppo.envs.base import full_masks

__all__ = [
    "check_agent_args",
    "checked_hidden",
    "checked_masks",
    "checked_obs",
    "checked_policy_inputs",
    "checked_step",
    "checked_tensor",
    "describe",
]


def describe(x: Any) -> str:
    """``dtype (shape)`` of a tensor, else the type's name: the "got" of an error message."""
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def _as_tensor(name: str, x: Any, expected: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected {expected}, got {type(x).__name__}") from None


def checked_tensor(name: str, x: Any, shape: tuple, kind: str, device) -> Tensor:
    """``x`` (tensor or array) as a tensor on ``device``, checked: ``kind`` is float or bool."""
    x = _as_tensor(name, x, f"{kind} {shape}")
    ok = x.is_floating_point() if kind == "float" else x.dtype == torch.bool
    if tuple(x.shape) != shape or not ok:
        raise ValueError(f"{name}: expected {kind} {shape}, got {describe(x)}")
    return x.to(device=device, dtype=torch.float32 if kind == "float" else torch.bool)


def checked_obs(name: str, obs: Any, obs_dim: int, device) -> tuple[Tensor, bool]:
    """Float ``[B, obs_dim]`` observations for any batch size ``B >= 1``, or one observation
    ``[obs_dim]``: float32 ``[B, obs_dim]`` (``B`` = 1 for one), and whether it was one."""
    expected = f"float ({obs_dim},) or (B, {obs_dim})"
    obs = _as_tensor(name, obs, expected)
    one = obs.ndim == 1
    batched = obs.ndim == 2 and obs.shape[0] >= 1
    if not (one or batched) or obs.shape[-1] != obs_dim or not obs.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got {describe(obs)}")
    return obs.to(device=device, dtype=torch.float32).reshape(-1, obs_dim), one


def checked_masks(config: PPOConfig, masks: Any, batch: int, device) -> dict[str, Tensor]:
    """Head -> bool masks for ``batch`` rows (None: all valid), checked by ``validate_masks``."""
    if masks is None:
        return full_masks(config.spec, batch, device)
    if not isinstance(masks, dict):
        raise ValueError(f"masks: expected a dict over heads, got {type(masks).__name__}")
    masks = {h: torch.as_tensor(m).to(device) for h, m in masks.items()}
    validate_masks(config.spec, masks)
    got = tuple(masks[config.spec.op_head].shape[:-1])
    if got != (batch,):
        raise ValueError(f"masks: expected batch shape {(batch,)} (that of obs), got {got}")
    return masks


def checked_hidden(config: PPOConfig, hidden: Any, batch: int, device) -> LSTMState:
    """An ``LSTMState`` of float ``[batch, lstm_size]`` tensors; a recurrent config only."""
    if not config.recurrent:
        raise ValueError(f"hidden: expected None for an MLP config, got {describe(hidden)}")
    want = (batch, config.lstm_size)
    return LSTMState(*(checked_tensor("hidden", x, want, "float", device) for x in hidden))


def _one_masks(config: PPOConfig, masks: Any) -> Any:
    """One observation's masks (head -> ``[size]``, ``[n_ops, size]`` op-conditioned) as a
    batch of one; anything else is left to ``checked_masks``."""
    if not isinstance(masks, dict):
        return masks
    spec, batched = config.spec, {}
    for name, m in masks.items():
        m = _as_tensor(f"masks[{name!r}]", m, "a bool tensor")
        if name in spec.names:
            size = spec.size(name)
            want = (spec.n_ops, size) if name in spec.op_conditioned else (size,)
            if tuple(m.shape) != want:
                raise ValueError(
                    f"masks[{name!r}]: expected shape {want} for one observation "
                    f"(obs {(config.obs_dim,)}), got {tuple(m.shape)}"
                )
        batched[name] = m[None]
    return batched


def checked_policy_inputs(
    config: PPOConfig, obs: Any, masks: Any, hidden: Any, episode_start: Any, device
) -> tuple[Tensor, dict[str, Tensor], LSTMState | None, Tensor, bool]:
    """``obs`` ``[B, obs_dim]`` for any ``B``, its masks (None: all valid), the LSTM state
    (None: zeros; None for an MLP config) and ``episode_start`` bool ``[B]`` (None: all False),
    checked and on ``device``, and False. One observation ``[obs_dim]`` comes with inputs that
    lack the batch axis too (masks per head ``[size]``, hidden ``[lstm_size]``, episode_start
    ``[]``); they are returned as a batch of one, and True."""
    obs, one = checked_obs("obs", obs, config.obs_dim, device)
    b = obs.shape[0]
    if one:
        masks = _one_masks(config, masks)
        if episode_start is not None:
            episode_start = checked_tensor("episode_start", episode_start, (), "bool", device)
            episode_start = episode_start.reshape(1)
        if hidden is not None and config.recurrent:
            want = (config.lstm_size,)
            checked = (checked_tensor("hidden", x, want, "float", device) for x in hidden)
            hidden = LSTMState(*(x[None] for x in checked))
    masks = checked_masks(config, masks, b, device)
    if episode_start is None:
        episode_start = torch.zeros(b, dtype=torch.bool, device=device)
    episode_start = checked_tensor("episode_start", episode_start, (b,), "bool", device)
    if hidden is None:
        hidden = init_hidden(config, b, device)
    else:
        hidden = checked_hidden(config, hidden, b, device)
    return obs, masks, hidden, episode_start, one


def checked_step(step: EnvStep, num_envs: int, obs_dim: int, device) -> EnvStep:
    """``step`` with every field but ``masks`` a checked tensor ``[num_envs, ...]`` on ``device``
    and the defaults filled in: ``final_obs`` = ``obs``, ``valid`` and ``next_valid`` all True,
    ``episode_start`` = terminated or truncated."""
    b, rows = (num_envs,), (num_envs, obs_dim)
    obs = checked_tensor("step.obs", step.obs, rows, "float", device)
    reward = checked_tensor("step.reward", step.reward, b, "float", device)
    terminated = checked_tensor("step.terminated", step.terminated, b, "bool", device)
    truncated = checked_tensor("step.truncated", step.truncated, b, "bool", device)
    valid = next_valid = torch.ones(b, dtype=torch.bool, device=device)
    if step.valid is not None:
        valid = checked_tensor("step.valid", step.valid, b, "bool", device)
    if step.next_valid is not None:
        next_valid = checked_tensor("step.next_valid", step.next_valid, b, "bool", device)
    start = terminated | truncated if step.episode_start is None else step.episode_start
    start = checked_tensor("step.episode_start", start, b, "bool", device)
    final = obs
    if step.final_obs is not None:
        final = checked_tensor(
            "step.final_obs", step.final_obs, (num_envs, obs_dim), "float", device
        )
    return EnvStep(obs, reward, terminated, truncated, step.masks, final, valid, start, next_valid)


def check_agent_args(
    config: Any, num_envs: Any, num_steps: Any, clip_obs: Any, clip_reward: Any
) -> None:
    """The constructor's arguments: a ``PPOConfig``, ints >= 1 and numbers > 0."""
    if not isinstance(config, PPOConfig):
        raise ValueError(f"config: expected a PPOConfig, got {type(config).__name__}")
    for name, value in (("num_envs", num_envs), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    for name, value in (("clip_obs", clip_obs), ("clip_reward", clip_reward)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
