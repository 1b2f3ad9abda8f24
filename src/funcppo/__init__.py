"""funcppo: functional PPO for factored, masked and recurrent action spaces on torch.func.

The public API is the explicit list below; everything is a pure function over pytrees of
tensors; ``make_train`` and the CLI drive them, and checkpoints hold tensors and JSON only.

Names are imported on first use (PEP 562), so that ``import funcppo`` and the command line's
``--help`` and argument errors answer without importing torch, which takes seconds.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Where each public name lives: the submodule imported when the name is first read.
_SOURCES: dict[str, tuple[str, ...]] = {
    "advantages": ("gae", "normalize_advantages", "per_head_advantages"),
    "agent": ("EnvStep", "PPOAgent"),
    "callbacks": (
        "Callback",
        "CallbackList",
        "CheckpointCallback",
        "EvalCallback",
        "TensorBoardCallback",
    ),
    "checkpoint": (
        "CHECKPOINT_VERSION",
        "CheckpointError",
        "load_checkpoint",
        "save_checkpoint",
        "upgrade_checkpoint",
    ),
    "config": ("PPOConfig", "esper_config"),
    "distributed": (
        "DataParallel",
        "DistributedError",
        "close_distributed",
        "data_parallel",
        "gather_to_root",
        "init_distributed",
        "shard_seeds",
    ),
    "distributions": (
        "MaskStats",
        "factored_entropy",
        "factored_logprob",
        "factored_sample",
        "mask_stats",
        "masked_entropy",
        "masked_entropy_raw",
        "masked_log_softmax",
        "masked_logits",
        "masked_logprob",
        "masked_sample",
        "validate_masks",
    ),
    "evaluate": ("make_evaluate",),
    "gym_adapter": ("GymAdapter", "gym_action_spec"),
    "gym_evaluate": ("evaluate_policy",),
    "gym_spaces": ("ObsEncoder", "make_obs_encoder"),
    "losses": (
        "LossCoefs",
        "LossInfo",
        "RatioDiagnostic",
        "RatioStats",
        "clip_fraction",
        "clipped_surrogate",
        "head_kl",
        "head_log_ratios",
        "joint_log_ratio",
        "masked_mean",
        "ppo_loss",
        "ratio_diagnostic",
        "value_loss",
        "weighted_kl",
    ),
    "networks": (
        "LSTMState",
        "PolicyOutput",
        "check_params",
        "init_hidden",
        "make_policy_apply",
        "policy_apply",
        "policy_init",
    ),
    "normalize": (
        "RewardScaleState",
        "RunningStats",
        "init_reward_scale",
        "init_running_stats",
        "normalize_obs",
        "scale_reward",
        "update_reward_scale",
        "update_running_stats",
    ),
    "optim": (
        "GradientTransformation",
        "ScaleByAdamState",
        "adamw",
        "add_decayed_weights",
        "apply_updates",
        "chain",
        "clip_by_global_norm",
        "global_norm",
        "scale_by_adam",
        "scale_by_learning_rate",
    ),
    "spec": (
        "LIFECYCLE_OPS",
        "ActionSpec",
        "availability_masks",
        "causal_masks",
        "entropy_floor_masks",
        "lifecycle_spec",
        "resolve_masks",
    ),
    "state": (
        "Batch",
        "Hyperparams",
        "TrainState",
        "init_train_state",
        "make_hyperparams",
        "with_hparams",
    ),
    "synthetic": ("synthetic_batch",),
    "train": ("TrainConfig", "make_train"),
    "update": ("make_update_fn",),
    "validation": ("check_batch",),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
# Public submodules: ``funcppo.random`` is the API itself (``from funcppo import random``).
_SUBMODULES = ("random",)

__all__ = [
    "CHECKPOINT_VERSION",
    "LIFECYCLE_OPS",
    "ActionSpec",
    "Batch",
    "Callback",
    "CallbackList",
    "CheckpointCallback",
    "CheckpointError",
    "DataParallel",
    "DistributedError",
    "EnvStep",
    "EvalCallback",
    "GradientTransformation",
    "GymAdapter",
    "Hyperparams",
    "LSTMState",
    "LossCoefs",
    "LossInfo",
    "MaskStats",
    "ObsEncoder",
    "PPOAgent",
    "PPOConfig",
    "PolicyOutput",
    "RatioDiagnostic",
    "RatioStats",
    "RewardScaleState",
    "RunningStats",
    "ScaleByAdamState",
    "TensorBoardCallback",
    "TrainConfig",
    "TrainState",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "availability_masks",
    "causal_masks",
    "chain",
    "check_batch",
    "check_params",
    "clip_by_global_norm",
    "clip_fraction",
    "clipped_surrogate",
    "close_distributed",
    "data_parallel",
    "entropy_floor_masks",
    "esper_config",
    "evaluate_policy",
    "factored_entropy",
    "factored_logprob",
    "factored_sample",
    "gae",
    "gather_to_root",
    "global_norm",
    "gym_action_spec",
    "head_kl",
    "head_log_ratios",
    "init_distributed",
    "init_hidden",
    "init_reward_scale",
    "init_running_stats",
    "init_train_state",
    "joint_log_ratio",
    "lifecycle_spec",
    "load_checkpoint",
    "make_evaluate",
    "make_hyperparams",
    "make_obs_encoder",
    "make_policy_apply",
    "make_train",
    "make_update_fn",
    "mask_stats",
    "masked_entropy",
    "masked_entropy_raw",
    "masked_log_softmax",
    "masked_logits",
    "masked_logprob",
    "masked_mean",
    "masked_sample",
    "normalize_advantages",
    "normalize_obs",
    "per_head_advantages",
    "policy_apply",
    "policy_init",
    "ppo_loss",
    "random",
    "ratio_diagnostic",
    "resolve_masks",
    "save_checkpoint",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_reward",
    "shard_seeds",
    "synthetic_batch",
    "update_reward_scale",
    "update_running_stats",
    "upgrade_checkpoint",
    "validate_masks",
    "value_loss",
    "weighted_kl",
    "with_hparams",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
