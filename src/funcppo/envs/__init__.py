"""Functional environments: pure, batched ``reset``/``step`` (see ``funcppo.envs.base``)."""

from __future__ import annotations

from collections.abc import Callable

from funcppo.envs.base import (
    Env,
    ResetResult,
    StepResult,
    check_actions,
    full_masks,
    where_done,
)
from funcppo.envs.cartpole import CARTPOLE_SPEC, CartPole, CartPoleState
from funcppo.envs.lifecycle import Lifecycle, LifecycleState

__all__ = [
    "CARTPOLE_SPEC",
    "ENVS",
    "CartPole",
    "CartPoleState",
    "Env",
    "Lifecycle",
    "LifecycleState",
    "ResetResult",
    "StepResult",
    "check_actions",
    "full_masks",
    "make_env",
    "where_done",
]

# Name -> constructor taking num_envs. Adding an environment is one line here.
ENVS: dict[str, Callable[[int], Env]] = {
    "cartpole": lambda num_envs: CartPole(num_envs),
    "cartpole-pomdp": lambda num_envs: CartPole(num_envs, partial=True),
    "lifecycle": lambda num_envs: Lifecycle(num_envs),
}


def make_env(name: str, num_envs: int) -> Env:
    """The environment registered as ``name``, batched over ``num_envs`` copies."""
    if name not in ENVS:
        raise ValueError(f"name: expected one of {sorted(ENVS)}, got {name!r}")
    return ENVS[name](num_envs)
