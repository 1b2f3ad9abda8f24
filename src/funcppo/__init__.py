"""funcppo: functional PPO for factored, masked and recurrent action spaces on torch.func.

The PPO API a user calls is the list below; everything else is in its subpackage:

- ``funcppo.core``: the pure math over pytrees of tensors (action spaces and masks,
  distributions, advantages, losses, the networks, the functional optimizer, normalisation,
  counter-based random keys, ``PPOConfig``); it imports nothing from the other layers;
- ``funcppo.accel``: everything that knows torch's compiler: compile settings per device, graph
  rewrites, precompiled files, the scanned loops;
- ``funcppo.training``: the update (``make_update_fn``), its state, checks and checkpoints, data
  parallelism, and the vmapped training and evaluation loops on functional environments;
- ``funcppo.envs``: functional environments (CartPole, Lifecycle with its action space and
  presets);
- ``funcppo.agent``: the stateful shell (``PPOAgent``), its gymnasium adapter, evaluation and
  callbacks;
- ``funcppo.cli``: ``python -m funcppo train``.

Names are imported on first use (PEP 562), so that ``import funcppo`` and the command line's
``--help`` and argument errors answer without importing torch, and the compiler loads only when
something is compiled.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# Where each public name lives: the submodule imported when the name is first read.
_SOURCES: dict[str, tuple[str, ...]] = {
    "core.spec": ("ActionSpec", "availability_masks", "causal_masks"),
    "core.config": ("PPOConfig",),
    "core.networks": ("LSTMState", "PolicyOutput", "init_hidden", "policy_apply", "policy_init"),
    "core.distributions": (
        "factored_entropy",
        "factored_logprob",
        "factored_sample",
        "masked_logprob",
    ),
    "core.advantages": ("gae",),
    "core.losses": ("LossCoefs", "ppo_loss", "weighted_kl"),
    "core.optim": ("adamw",),
    "accel.compiling": ("CompileSettings",),
    "training.state": ("Batch", "Hyperparams", "TrainState", "init_train_state", "with_hparams"),
    "training.update": ("make_update_fn",),
    "training.train": ("TrainConfig", "make_train"),
    "training.evaluate": ("make_evaluate",),
    "training.checkpoint": ("CheckpointError", "load_checkpoint", "save_checkpoint"),
    "training.distributed": ("DataParallel",),
    "agent.agent": ("PPOAgent",),
    "agent.rollout": ("EnvStep",),
    "agent.gym_adapter": ("GymAdapter",),
    "agent.gym_evaluate": ("evaluate_policy",),
    "agent.gym_vector": ("SeedsAgent",),
    "agent.callbacks": ("Callback", "CheckpointCallback", "EvalCallback", "TensorBoardCallback"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
# ``from funcppo import random``: the counter-based keys, used as a module (``jr.split``).
_SUBMODULES = {"random": "core.random"}

__all__ = [
    "ActionSpec",
    "Batch",
    "Callback",
    "CheckpointCallback",
    "CheckpointError",
    "CompileSettings",
    "DataParallel",
    "EnvStep",
    "EvalCallback",
    "GymAdapter",
    "Hyperparams",
    "LSTMState",
    "LossCoefs",
    "PPOAgent",
    "PPOConfig",
    "PolicyOutput",
    "SeedsAgent",
    "TensorBoardCallback",
    "TrainConfig",
    "TrainState",
    "adamw",
    "availability_masks",
    "causal_masks",
    "evaluate_policy",
    "factored_entropy",
    "factored_logprob",
    "factored_sample",
    "gae",
    "init_hidden",
    "init_train_state",
    "load_checkpoint",
    "make_evaluate",
    "make_train",
    "make_update_fn",
    "masked_logprob",
    "policy_apply",
    "policy_init",
    "ppo_loss",
    "random",
    "save_checkpoint",
    "weighted_kl",
    "with_hparams",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{_SUBMODULES[name]}")
        # ``funcppo.random`` by its public name too, for tools that import what they document.
        sys.modules.setdefault(f"{__name__}.{name}", module)
        return module
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
