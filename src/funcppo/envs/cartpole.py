"""CartPole-v1 as a pure, batched torch function (gymnasium's dynamics, exactly).

Source: gymnasium ``envs/classic_control/cartpole.py`` (Barto, Sutton & Anderson 1983): the
same constants, the same explicit Euler step, termination at ``|x| > 2.4`` or
``|theta| > 12 deg`` checked on the new state, reward 1.0 on every step including the
terminating one, and the 500-step limit that ``gymnasium.make("CartPole-v1")`` adds through
``TimeLimit``. Initial states are uniform in ``[-0.05, 0.05]^4``.

``partial=True`` is the POMDP variant: obs is ``[x, theta]`` without the velocities, so only
a policy with memory can solve it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from funcppo.core import random
from funcppo.core.spec import ActionSpec
from funcppo.envs.base import ResetResult, StepResult, check_actions, full_masks, where_done

__all__ = ["CARTPOLE_SPEC", "CartPole", "CartPoleState", "cartpole_dynamics", "cartpole_terminated"]

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_POLE + MASS_CART
HALF_LENGTH = 0.5  # gymnasium's ``length`` is half the pole's length
POLEMASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE_MAG = 10.0
TAU = 0.02  # seconds per step
X_THRESHOLD = 2.4
THETA_THRESHOLD = 12 * 2 * math.pi / 360  # 12 degrees in radians, written as gymnasium does
INIT_BOUND = 0.05
MAX_STEPS = 500  # gymnasium's registered max_episode_steps for CartPole-v1
# float32 matches gymnasium's float64 step to ~1e-7 (tests/test_envs_cartpole.py checks 1e-6),
# so the state stays in the dtype of the obs and the GPU's fast path.
STATE_DTYPE = torch.float32

CARTPOLE_SPEC = ActionSpec({"action": 2}, "action", [(), ()])


class CartPoleState(NamedTuple):
    """Per-env state.

    Attributes:
      physics: ``[num_envs, 4]`` in STATE_DTYPE, columns ``(x, x_dot, theta, theta_dot)``.
      steps: int64 ``[num_envs]``, steps taken in the current episode.
    """

    physics: Tensor
    steps: Tensor


def cartpole_dynamics(physics: Tensor, action: Tensor) -> Tensor:
    """One explicit Euler step of the cart-pole equations of motion: ``[..., 4] -> [..., 4]``.

    With ``F = +10`` for action 1 and ``-10`` otherwise, ``m_p l = 0.05``, ``M = 1.1``::

        temp      = (F + m_p l theta_dot^2 sin theta) / M
        theta_acc = (g sin theta - cos theta temp) / (l (4/3 - m_p cos^2 theta / M))
        x_acc     = temp - m_p l theta_acc cos theta / M

    then ``x += tau x_dot; x_dot += tau x_acc; theta += tau theta_dot;
    theta_dot += tau theta_acc``, every update reading the old state. ``action`` is ``[...]``.
    """
    x, x_dot, theta, theta_dot = physics.unbind(-1)
    force = torch.where(action == 1, FORCE_MAG, -FORCE_MAG).to(physics.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    temp = (force + POLEMASS_LENGTH * theta_dot.square() * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (
        HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos.square() / TOTAL_MASS)
    )
    x_acc = temp - POLEMASS_LENGTH * theta_acc * cos / TOTAL_MASS
    return torch.stack(
        [
            x + TAU * x_dot,
            x_dot + TAU * x_acc,
            theta + TAU * theta_dot,
            theta_dot + TAU * theta_acc,
        ],
        dim=-1,
    )


def cartpole_terminated(physics: Tensor) -> Tensor:
    """Bool ``[...]``: ``|x| > 2.4`` or ``|theta| > 12 deg`` (strict, as in gymnasium)."""
    return (physics[..., 0].abs() > X_THRESHOLD) | (physics[..., 2].abs() > THETA_THRESHOLD)


@dataclass(frozen=True)
class CartPole:
    """``num_envs`` CartPole-v1 copies; ``partial=True`` observes only ``[x, theta]``."""

    num_envs: int
    partial: bool = False
    max_steps: int = MAX_STEPS

    def __post_init__(self) -> None:
        if not isinstance(self.num_envs, int) or self.num_envs < 1:
            raise ValueError(f"num_envs: expected an int >= 1, got {self.num_envs!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps: expected an int >= 1, got {self.max_steps!r}")

    @property
    def obs_dim(self) -> int:
        return 2 if self.partial else 4

    @property
    def spec(self) -> ActionSpec:
        return CARTPOLE_SPEC

    def observe(self, physics: Tensor) -> Tensor:
        """float32 obs ``[num_envs, obs_dim]``: all four numbers, or ``[x, theta]`` if partial."""
        obs = physics[..., 0::2] if self.partial else physics
        return obs.to(torch.float32)

    def initial_state(self, key: Tensor) -> CartPoleState:
        """Fresh episodes: physics uniform in ``[-0.05, 0.05]^4``, step counters at 0."""
        u = random.uniform(key, (self.num_envs, 4), STATE_DTYPE)
        physics = (2.0 * u - 1.0) * INIT_BOUND
        return CartPoleState(
            physics, torch.zeros(self.num_envs, dtype=torch.int64, device=key.device)
        )

    def reset(self, key: Tensor) -> ResetResult:
        state = self.initial_state(key)
        return ResetResult(state, self.observe(state.physics), self._masks(key.device))

    def step(
        self, env_state: CartPoleState, actions: Mapping[str, Tensor], key: Tensor
    ) -> StepResult:
        """Advance every env by one step and reset those that end (fresh states from ``key``)."""
        check_actions(self.spec, self.num_envs, actions)
        physics = cartpole_dynamics(env_state.physics, actions["action"])
        steps = env_state.steps + 1
        terminated = cartpole_terminated(physics)
        truncated = steps >= self.max_steps
        done = terminated | truncated
        state = where_done(done, self.initial_state(key), CartPoleState(physics, steps))
        return StepResult(
            env_state=state,
            obs=self.observe(state.physics),
            reward=torch.ones(self.num_envs, dtype=torch.float32, device=physics.device),
            terminated=terminated,
            truncated=truncated,
            masks=self._masks(physics.device),
            final_obs=self.observe(physics),
        )

    def _masks(self, device: torch.device) -> dict[str, Tensor]:
        return full_masks(self.spec, self.num_envs, device)
