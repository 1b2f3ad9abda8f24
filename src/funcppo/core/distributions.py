"""Masked categorical distributions, one per head, and their factored products.

Logits are ``[..., n]`` and masks bool ``[..., n]`` (True = valid). Masked entries are filled
with a large *finite* negative, ``finfo(dtype).min * MASK_FILL_FRACTION``, never ``-inf``: it lies
below every valid logit however negative (a fixed ``-1e4`` does not when valid logits are below
``-1e4``), its probability underflows to exactly 0, and no ``0 * -inf`` NaN can arise. Every
function except :func:`validate_masks` is free of host syncs, compiles with ``fullgraph=True``
and vmaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from funcppo.core import random
from funcppo.core.constants import MASK_FILL_FRACTION
from funcppo.core.spec import ActionSpec, causal_masks, resolve_masks

__all__ = [
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
]


def _check_pair(logits: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.shape != logits.shape:
        raise ValueError(
            f"mask: expected the shape of logits {tuple(logits.shape)}, got {tuple(mask.shape)}"
        )


def masked_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """``where(mask, logits, finfo.min * MASK_FILL_FRACTION)``, ``[..., n]``."""
    _check_pair(logits, mask)
    return torch.where(mask, logits, torch.finfo(logits.dtype).min * MASK_FILL_FRACTION)


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """``log pi(a) = l_a - logsumexp_{b valid} l_b`` for valid ``a``, ``[..., n]``.

    Masked entries get about ``finfo.min / 2``: finite, and ``exp`` of it is exactly 0.
    """
    return torch.log_softmax(masked_logits(logits, mask), dim=-1)


def masked_logprob(logits: Tensor, mask: Tensor, actions: Tensor) -> Tensor:
    """``log pi(actions)``, ``[...]``, for int64 ``actions`` ``[...]`` and logits ``[..., n]``."""
    if actions.dtype != torch.int64:
        raise ValueError(f"actions: expected dtype torch.int64, got {actions.dtype}")
    if actions.shape != logits.shape[:-1]:
        raise ValueError(
            f"actions: expected shape {tuple(logits.shape[:-1])}, got {tuple(actions.shape)}"
        )
    log_p = masked_log_softmax(logits, mask)
    return torch.gather(log_p, -1, actions.unsqueeze(-1)).squeeze(-1)


def masked_entropy_raw(logits: Tensor, mask: Tensor) -> Tensor:
    """Shannon entropy in nats over valid actions, ``-sum_{a valid} pi(a) log pi(a)``, ``[...]``.

    ``torch.where`` drops masked terms, so no ``0 * log 0`` enters the sum or its gradient.
    Each ``log pi(a) <= 0`` exactly (log_softmax subtracts a logsumexp >= the max), so the
    result is >= 0; with one valid action it is exactly 0.
    """
    log_p = masked_log_softmax(logits, mask)
    return -torch.where(mask, log_p.exp() * log_p, 0.0).sum(-1)


def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy normalised by its maximum, ``H / log(n_valid)`` in [0, 1], ``[...]``.

    Exactly 0 where at most one action is valid (the division is guarded, so no 0/0), which
    makes entropies of heads with different sizes comparable and an entropy floor meaningful.
    Rounding can push ``H`` an ulp above ``log(n_valid)``; the result is clamped to 1.
    """
    n_valid = mask.sum(-1)
    several = n_valid > 1
    log_n = torch.log(torch.where(several, n_valid, 2).to(logits.dtype))
    h = masked_entropy_raw(logits, mask)
    return torch.where(several, h / log_n, 0.0).clamp(max=1.0)


def masked_sample(logits: Tensor, mask: Tensor, key: Tensor) -> Tensor:
    """One action per row by Gumbel-max, int64 ``[...]`` (Gumbel 1954; Maddison et al. 2014).

    ``argmax_a where(mask, l_a + g_a, -inf)`` with ``g = random.gumbel(key, logits.shape)``, one
    ``key`` of shape ``[2]`` for the whole batch. Masked entries are ``-inf`` inside the argmax
    only (no arithmetic follows), so one can never win, however negative the valid logits are.
    A row with no valid action returns 0; :func:`validate_masks` rejects such rows upstream.
    """
    _check_pair(logits, mask)
    _check_one_key(key)
    return _gumbel_argmax(logits, mask, random.gumbel(key, logits.shape, _noise_dtype(logits)))


def _check_one_key(key: Tensor) -> None:
    if key.shape != (2,):
        raise ValueError(f"key: expected one key of shape [2], got {tuple(key.shape)}")


def _noise_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _gumbel_argmax(logits: Tensor, mask: Tensor, noise: Tensor) -> Tensor:
    score = logits.to(noise.dtype) + noise
    return torch.argmax(torch.where(mask, score, float("-inf")), dim=-1)


def factored_sample(
    spec: ActionSpec, logits: Mapping[str, Tensor], masks: Mapping[str, Tensor], key: Tensor
) -> dict[str, Tensor]:
    """One action per head, int64 ``[...]`` each: the op head first, then the others under
    the masks of the sampled op (:func:`funcppo.core.spec.resolve_masks`). Heads the op does not
    use are still sampled (the environment ignores them) and get exactly 0 log-prob in
    :func:`factored_logprob`.

    The Gumbel noise of every head is one draw, ``random.gumbel(key, [..., sum of head
    sizes])``, head ``i`` (in spec order) taking the next ``size_i`` columns: one hash in the
    compiled rollout instead of one per head (each hash call site costs seconds of inductor
    code generation).
    """
    _check_pair(logits[spec.op_head], masks[spec.op_head])
    _check_one_key(key)
    first = logits[spec.op_head]
    sizes = [size for _, size in spec.heads]
    draw = random.gumbel(key, (*first.shape[:-1], sum(sizes)), _noise_dtype(first))
    noise = dict(zip(spec.names, draw.split(sizes, -1), strict=True))
    op = _gumbel_argmax(first, masks[spec.op_head], noise[spec.op_head])
    resolved = resolve_masks(spec, masks, op)
    return {
        name: op
        if name == spec.op_head
        else _gumbel_argmax(logits[name], resolved[name], noise[name])
        for name in spec.names
    }


def factored_logprob(
    spec: ActionSpec,
    logits: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    actions: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-head ``log pi_h(a_h)`` and the joint ``sum_h c_h log pi_h(a_h)``, all ``[...]``.

    ``c_h`` is the causal mask of the taken op; an irrelevant head contributes exactly 0 (by
    ``torch.where``, so its logits also get exactly zero gradient). Op-conditioned heads use
    the mask row of the taken op.
    """
    op = actions[spec.op_head]
    resolved = resolve_masks(spec, masks, op)
    causal = causal_masks(spec, op)
    per_head = {
        name: torch.where(
            causal[name], masked_logprob(logits[name], resolved[name], actions[name]), 0.0
        )
        for name in spec.names
    }
    return per_head, torch.stack(list(per_head.values())).sum(0)


def factored_entropy(
    spec: ActionSpec,
    logits: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    actions: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Per-head normalised entropy :func:`masked_entropy`, ``[...]`` each, *not* causal-masked.

    Only ``actions[spec.op_head]`` is read, to pick the row of op-conditioned masks. The loss
    weights these by causal masks itself, and the entropy floor by availability.
    """
    resolved = resolve_masks(spec, masks, actions[spec.op_head])
    return {name: masked_entropy(logits[name], resolved[name]) for name in spec.names}


class MaskStats(NamedTuple):
    """Per-head mask diagnostics over all steps, 0-d float32 each (docs/design.md, Mask statistics).

    single_action_fraction: steps with exactly one valid action (mask collapse: log-prob is
      constant 0 there, so the head gets no gradient by design).
    relevant_fraction: steps where the taken op uses the head (causal mask).
    learnable_fraction: among relevant steps, those with more than one valid action; 0 when
      no step is relevant (nothing to learn).
    """

    single_action_fraction: Tensor
    relevant_fraction: Tensor
    learnable_fraction: Tensor


def mask_stats(
    spec: ActionSpec, masks: Mapping[str, Tensor], op_actions: Tensor
) -> dict[str, MaskStats]:
    """:class:`MaskStats` per head for masks ``[..., n]`` and taken ops ``[...]``; no host sync."""
    resolved = resolve_masks(spec, masks, op_actions)
    causal = causal_masks(spec, op_actions)
    stats = {}
    for name in spec.names:
        n_valid = resolved[name].sum(-1)
        relevant = causal[name]
        learnable = (relevant & (n_valid > 1)).sum()
        stats[name] = MaskStats(
            single_action_fraction=(n_valid == 1).float().mean(),
            relevant_fraction=relevant.float().mean(),
            learnable_fraction=learnable.float() / relevant.sum().clamp(min=1).float(),
        )
    return stats


def _first_index(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(bad)[0])


def validate_masks(
    spec: ActionSpec, masks: Mapping[str, Tensor], op_actions: Tensor | None = None
) -> None:
    """Host-side boundary check of environment masks; not for compiled or vmapped code.

    Every head of ``spec`` present, bool, ``[*batch, size]`` (op-conditioned heads
    ``[*batch, n_ops, size]``), one batch shape for all heads, and a valid action in every row
    the policy may sample: every row of a plain head; for an op-conditioned head the rows of
    valid ops, or with ``op_actions`` ``[*batch]`` given, the row of the taken op only (which
    must itself be valid). Raises ValueError naming the head and the first bad batch index.
    """
    missing = [n for n in spec.names if n not in masks]
    extra = sorted(set(masks) - set(spec.names))
    if missing or extra:
        raise ValueError(
            f"masks: expected heads {list(spec.names)}, missing {missing}, unknown {extra}"
        )
    batch = tuple(masks[spec.op_head].shape[:-1])
    for name in spec.names:
        m = masks[name]
        rows = (spec.n_ops, spec.size(name)) if name in spec.op_conditioned else (spec.size(name),)
        expected = (*batch, *rows)
        if m.dtype != torch.bool:
            raise ValueError(f"masks[{name!r}]: expected dtype torch.bool, got {m.dtype}")
        if tuple(m.shape) != expected:
            raise ValueError(f"masks[{name!r}]: expected shape {expected}, got {tuple(m.shape)}")
    needed = masks[spec.op_head]  # [*batch, n_ops]: the op rows that must offer an action
    if op_actions is not None:
        if op_actions.dtype != torch.int64 or tuple(op_actions.shape) != batch:
            raise ValueError(
                f"op_actions: expected int64 of shape {batch}, got "
                f"{op_actions.dtype} {tuple(op_actions.shape)}"
            )
        in_range = (op_actions >= 0) & (op_actions < spec.n_ops)
        if not bool(in_range.all()):
            raise ValueError(
                f"op_actions: out of range [0, {spec.n_ops}) at batch index "
                f"{_first_index(~in_range)}"
            )
        needed = op_actions.unsqueeze(-1) == torch.arange(spec.n_ops, device=op_actions.device)
        taken_ok = (needed & masks[spec.op_head]).any(-1)
    for name in spec.names:
        empty = ~masks[name].any(-1)
        if name in spec.op_conditioned:
            empty = empty & needed
        if bool(empty.any()):
            where = _first_index(empty)
            detail = ""
            if name in spec.op_conditioned:
                op = where[-1]
                label = f" {spec.op_names[op]}" if spec.op_names else ""
                where, detail = where[:-1], f" for op {op}{label}"
            raise ValueError(f"masks[{name!r}]: no valid action at batch index {where}{detail}")
    if op_actions is not None and not bool(taken_ok.all()):
        raise ValueError(
            f"op_actions: taken op is masked in masks[{spec.op_head!r}] at "
            f"batch index {_first_index(~taken_ok)}"
        )
