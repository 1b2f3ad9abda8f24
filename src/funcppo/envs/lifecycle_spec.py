"""The Lifecycle product's action space and presets: the original agent's eight heads and
causal table (``lifecycle_spec``) and its hyperparameters on them (``esper_config``)."""

from __future__ import annotations

from typing import Any

from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec

__all__ = ["LIFECYCLE_OPS", "esper_config", "lifecycle_spec"]

LIFECYCLE_OPS = ("WAIT", "GERMINATE", "SET_ALPHA_TARGET", "PRUNE", "FOSSILIZE", "ADVANCE")


def lifecycle_spec(num_slots: int = 3) -> ActionSpec:
    """The original agent's eight heads and causal table; the slot mask depends on the op."""
    if num_slots < 1:
        raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
    heads = {
        "op": len(LIFECYCLE_OPS),
        "slot": num_slots,
        "blueprint": 13,
        "style": 4,
        "tempo": 3,
        "alpha_target": 3,
        "alpha_speed": 4,
        "alpha_curve": 5,
    }
    causal = (
        {"op"},
        {"op", "slot", "blueprint", "style", "tempo", "alpha_target"},
        {"op", "slot", "style", "alpha_target", "alpha_speed", "alpha_curve"},
        {"op", "slot", "alpha_speed", "alpha_curve"},
        {"op", "slot"},
        {"op", "slot"},
    )
    return ActionSpec(heads, "op", causal, op_conditioned=("slot",), op_names=LIFECYCLE_OPS)


def esper_config(obs_dim: int, num_slots: int = 3, **overrides: Any) -> PPOConfig:
    """The original agent's hyperparameters on its lifecycle action space.

    Recurrent (LSTM 128), lr 3e-4, gamma 0.995, lambda 0.98, clip 0.2, target KL 0.015, max grad
    norm 5.0; one epoch (``update_epochs=1``, the original's recurrent epoch count) over the
    whole rollout as one batch of sequences (``num_minibatches=1``); entropy coefficient 0.05
    with per-head multipliers and per-head normalised-entropy floors (op 0.30, slot 0.15,
    blueprint 0.20, style 0.15, tempo 0.20, each alpha head 0.10); value clipping off
    (``clip_vloss=False``), with the original's range 10.0 when turned on. ``overrides`` replace
    any field.
    """
    values: dict[str, Any] = {
        "spec": lifecycle_spec(num_slots),
        "learning_rate": 3e-4,
        "gamma": 0.995,
        "gae_lambda": 0.98,
        "clip_coef": 0.2,
        "target_kl": 0.015,
        "recurrent": True,
        "lstm_size": 128,
        "ent_coef": 0.05,
        "head_ent_coef": {
            "op": 1.0,
            "slot": 1.0,
            "blueprint": 1.3,
            "tempo": 1.3,
            "style": 1.2,
            "alpha_target": 1.2,
            "alpha_speed": 1.2,
            "alpha_curve": 1.2,
        },
        "entropy_floor": {
            "op": 0.30,
            "slot": 0.15,
            "blueprint": 0.20,
            "style": 0.15,
            "tempo": 0.20,
            "alpha_target": 0.10,
            "alpha_speed": 0.10,
            "alpha_curve": 0.10,
        },
        "update_epochs": 1,
        "num_minibatches": 1,
        "max_grad_norm": 5.0,
        "clip_vloss": False,
        "value_clip": 10.0,
    }
    values.update(overrides)
    return PPOConfig(obs_dim=obs_dim, **values)
