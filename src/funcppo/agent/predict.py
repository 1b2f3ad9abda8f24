"""Evaluation actions: the policy's choice for one step, sampled as in training or the most
probable valid value of each head, with nothing recorded. Pure functions, free of host syncs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from funcppo.core.config import PPOConfig
from funcppo.core.distributions import factored_sample, masked_logits
from funcppo.core.networks import LSTMState, Params, policy_apply
from funcppo.core.spec import ActionSpec, resolve_masks

__all__ = ["factored_argmax", "predict_actions"]


def factored_argmax(
    spec: ActionSpec, logits: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The most probable valid value of each head, int64 ``[...]``: the op head first, then the
    others under the masks of that op (:func:`funcppo.core.spec.resolve_masks`), in the order that
    :func:`funcppo.core.distributions.factored_sample` draws them. Masked entries hold
    :func:`funcppo.core.distributions.masked_logits`' fill, below every valid logit, so never win.
    """
    op = torch.argmax(masked_logits(logits[spec.op_head], masks[spec.op_head]), dim=-1)
    resolved = resolve_masks(spec, masks, op)
    return {
        name: op if name == spec.op_head else torch.argmax(masked_logits(logits[name], m), -1)
        for name, m in resolved.items()
    }


def predict_actions(
    config: PPOConfig,
    params: Params,
    obs: Tensor,
    masks: Mapping[str, Tensor],
    hidden: LSTMState | None,
    episode_start: Tensor | None,
    key: Tensor | None,
) -> tuple[dict[str, Tensor], LSTMState | None]:
    """One step of the policy on ``obs`` ``[B, obs_dim]``: ``(actions, next_hidden)``.

    ``actions`` are head -> int64 ``[B]``: :func:`factored_argmax` when ``key`` is None, else
    :func:`funcppo.core.distributions.factored_sample` with ``key`` ``[2]``. ``hidden`` and
    ``episode_start`` are ``policy_apply``'s; ``next_hidden`` is None for an MLP config.
    """
    out = policy_apply(params, config, obs, hidden, episode_start)
    if key is None:
        return factored_argmax(config.spec, out.logits, masks), out.hidden
    return factored_sample(config.spec, out.logits, masks, key), out.hidden
