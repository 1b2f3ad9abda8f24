"""funcppo: functional PPO for factored, masked and recurrent action spaces on torch.func.

The public API is the explicit list below; everything is a pure function over pytrees of
tensors; ``make_train`` and the CLI drive them, and checkpoints hold tensors and JSON only.
"""

from funcppo import random
from funcppo.advantages import gae, normalize_advantages, per_head_advantages
from funcppo.agent import EnvStep, PPOAgent
from funcppo.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)
from funcppo.config import PPOConfig, esper_config
from funcppo.distributions import (
    MaskStats,
    factored_entropy,
    factored_logprob,
    factored_sample,
    mask_stats,
    masked_entropy,
    masked_entropy_raw,
    masked_log_softmax,
    masked_logits,
    masked_logprob,
    masked_sample,
    validate_masks,
)
from funcppo.gym_adapter import GymAdapter, gym_action_spec
from funcppo.losses import (
    LossCoefs,
    LossInfo,
    RatioDiagnostic,
    RatioStats,
    clip_fraction,
    clipped_surrogate,
    head_kl,
    head_log_ratios,
    joint_log_ratio,
    masked_mean,
    ppo_loss,
    ratio_diagnostic,
    ratio_stats,
    value_loss,
    weighted_kl,
)
from funcppo.networks import (
    LSTMState,
    PolicyOutput,
    check_params,
    init_hidden,
    make_policy_apply,
    policy_apply,
    policy_init,
)
from funcppo.normalize import (
    RewardScaleState,
    RunningStats,
    init_reward_scale,
    init_running_stats,
    normalize_obs,
    scale_reward,
    update_reward_scale,
    update_running_stats,
)
from funcppo.optim import (
    GradientTransformation,
    ScaleByAdamState,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    global_norm,
    scale_by_adam,
    scale_by_learning_rate,
)
from funcppo.spec import (
    LIFECYCLE_OPS,
    ActionSpec,
    availability_masks,
    causal_masks,
    lifecycle_spec,
    resolve_masks,
)
from funcppo.state import Batch, Hyperparams, TrainState, init_train_state, make_hyperparams
from funcppo.synthetic import synthetic_batch
from funcppo.train import TrainConfig, make_train
from funcppo.update import make_update_fn
from funcppo.validation import check_batch

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_VERSION",
    "LIFECYCLE_OPS",
    "ActionSpec",
    "Batch",
    "EnvStep",
    "GradientTransformation",
    "GymAdapter",
    "Hyperparams",
    "LSTMState",
    "LossCoefs",
    "LossInfo",
    "MaskStats",
    "PPOAgent",
    "PPOConfig",
    "PolicyOutput",
    "RatioDiagnostic",
    "RatioStats",
    "RewardScaleState",
    "RunningStats",
    "ScaleByAdamState",
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
    "esper_config",
    "factored_entropy",
    "factored_logprob",
    "factored_sample",
    "gae",
    "global_norm",
    "gym_action_spec",
    "head_kl",
    "head_log_ratios",
    "init_hidden",
    "init_reward_scale",
    "init_running_stats",
    "init_train_state",
    "joint_log_ratio",
    "lifecycle_spec",
    "load_checkpoint",
    "make_hyperparams",
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
    "ratio_stats",
    "resolve_masks",
    "save_checkpoint",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_reward",
    "synthetic_batch",
    "update_reward_scale",
    "update_running_stats",
    "upgrade_checkpoint",
    "validate_masks",
    "value_loss",
    "weighted_kl",
]
