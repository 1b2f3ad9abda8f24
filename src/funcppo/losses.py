"""PPO loss math on per-head log-probs: pure functions, no network.

Per-head quantities are dicts ``head name -> Tensor`` sharing one batch shape ``[...]`` (``[N]``
or ``[T, B]``). ``causal[h]`` is bool ``[...]``: True where the taken op used head ``h``. The op
head's causal mask is all True, so the total KL weight is >= 1 (no clamp). Coefficients may be
Python floats or 0-d tensors, so a per-seed sweep can vmap them. Nothing here syncs with the host.
With ``totals`` (``funcppo.accumulation``), ``ppo_loss`` returns a micro-batch's share of the
loss of a whole minibatch (gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from funcppo.accumulation import LossTotals, check_totals, loss_totals
from funcppo.constants import (
    HEAD_LOG_RATIO_CLAMP,
    JOINT_LOG_RATIO_CLAMP,
    RATIO_COLLAPSE_THRESHOLD,
    RATIO_EXPLOSION_THRESHOLD,
)

__all__ = [
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
    "ratio_stats",
    "value_loss",
    "weighted_kl",
]

Coef = float | Tensor
Heads = Mapping[str, Tensor]


class LossCoefs(NamedTuple):
    """Loss coefficients; each float may also be a 0-d tensor (vmapped in a seed sweep).

    Defaults follow CleanRL's PPO where it has one. ``clip_vloss`` is static (a Python bool).
    ``head_ent_coef`` multiplies each head's entropy (None: 1.0 for every head, missing heads 1.0).
    ``entropy_floor`` maps heads to a floor in [0, 1] on their normalised entropy (None: off),
    averaged over the steps ``ppo_loss``'s ``availability`` marks.
    """

    clip_coef: Coef = 0.2
    vf_coef: Coef = 0.5
    ent_coef: Coef = 0.01
    head_ent_coef: Mapping[str, Coef] | None = None
    clip_vloss: bool = True
    value_clip: Coef = 0.2
    entropy_floor: Mapping[str, Coef] | None = None
    entropy_floor_coef: Coef = 0.1


class RatioStats(NamedTuple):
    """Summary of a ratio tensor, all 0-d (docs/design.md, Ratio diagnostics)."""

    mean: Tensor
    min: Tensor
    max: Tensor
    std: Tensor
    explosion_fraction: Tensor
    collapse_fraction: Tensor


class RatioDiagnostic(NamedTuple):
    """Which head's ratio strays furthest, and whether the joint ratio crossed a threshold.

    worst_head: int64 0-d, the index (in head order) of the head with the largest
      ``max(log max_h, -log min_h)``; -1 when no head has a finite ratio.
    worst_log_deviation: that head's ``max(log max_h, -log min_h)`` (NaN when none).
    explosion: bool 0-d, joint ratio max above ``RATIO_EXPLOSION_THRESHOLD``.
    collapse: bool 0-d, joint ratio min below ``RATIO_COLLAPSE_THRESHOLD``.
    """

    worst_head: Tensor
    worst_log_deviation: Tensor
    explosion: Tensor
    collapse: Tensor


class LossInfo(NamedTuple):
    """Detached metrics of one ``ppo_loss`` call: 0-d tensors or dicts of them.

    ``head_ratio_max``/``head_ratio_min``: per head, the extremes of ``r_h`` over the steps
    where the head was relevant (-inf/+inf where it never was), for the worst-head diagnostic
    (docs/design.md, Ratio diagnostics).
    """

    policy_loss: Tensor
    head_policy_loss: dict[str, Tensor]
    value_loss: Tensor
    entropy: Tensor
    head_entropy: dict[str, Tensor]
    entropy_floor_penalty: Tensor
    approx_kl: Tensor
    head_kl: dict[str, Tensor]
    clip_fraction: Tensor
    head_clip_fraction: dict[str, Tensor]
    ratio: RatioStats
    head_ratio_max: dict[str, Tensor]
    head_ratio_min: dict[str, Tensor]


def masked_mean(x: Tensor, weight: Tensor, total: Tensor | float | None = None) -> Tensor:
    """Weighted mean ``sum(x * w) / max(1, W)`` over all elements, 0-d; ``W = sum(w)``.

    The floor of 1 on the denominator is the original agent's ``mask.sum().clamp(min=1)``: an
    empty mask gives 0, not NaN. Entries with ``w == 0`` are dropped with ``torch.where``, so a
    non-finite value where the mask is off leaks neither into the mean nor into its gradient.
    ``x``: ``[...]``; ``weight``: bool or float ``[...]``. ``total``, when given, replaces ``W``
    (the weight of a whole batch of which ``x`` is a part: the parts' means sum to the whole's).
    """
    w = weight.to(x.dtype)
    numerator = torch.where(w != 0, x * w, torch.zeros_like(x)).sum()
    denominator = (
        w.sum() if total is None else torch.as_tensor(total, dtype=x.dtype, device=x.device)
    )
    return numerator / denominator.clamp_min(1.0)


def head_log_ratios(
    new_logprobs: Heads,
    old_logprobs: Heads,
    causal: Heads,
    clamp: float = HEAD_LOG_RATIO_CLAMP,
) -> dict[str, Tensor]:
    """Per-head ``log r_h = clamp(new_h - old_h, -clamp, clamp)``, exactly 0 where irrelevant.

    ``torch.where`` (not a product) keeps the gradient of an irrelevant head exactly 0, even
    where its log-probs are -inf. Each value ``[...]``.
    """
    return {
        h: torch.where(causal[h], (new_logprobs[h] - old_logprobs[h]).clamp(-clamp, clamp), 0.0)
        for h in new_logprobs
    }


def joint_log_ratio(log_ratios: Heads, clamp: float = JOINT_LOG_RATIO_CLAMP) -> Tensor:
    """Joint ``log r = clamp(sum_h log r_h, -clamp, clamp)``, ``[...]``.

    The joint ratio of the factored policy is the product of head ratios: the policy's actual
    change, even when every head's ratio is inside the clip range (1.15 twice is 1.32).
    """
    return torch.stack(list(log_ratios.values())).sum(0).clamp(-clamp, clamp)


def _kl3(log_ratio: Tensor) -> Tensor:
    # Schulman's k3 = (r - 1) - log r >= 0; expm1 keeps it exact near r = 1, and the clamp only
    # guards against a rounding error below zero.
    return (torch.expm1(log_ratio) - log_ratio).clamp_min(0.0)


def _head_kl(log_ratios: Heads, causal: Heads, totals: LossTotals) -> dict[str, Tensor]:
    n = totals.causal_count
    return {h: masked_mean(_kl3(lr), causal[h], n[h]) for h, lr in log_ratios.items()}


def _weighted_kl(head_kls: Heads, totals: LossTotals) -> Tensor:
    n, count = totals.num_samples, totals.causal_count
    weights = {h: count[h].to(kl.dtype) / n for h, kl in head_kls.items()}
    # The op head is relevant at every step, so the total weight is >= 1: no clamp, no guard.
    total = torch.stack(list(weights.values())).sum()
    return torch.stack([head_kls[h] * w for h, w in weights.items()]).sum() / total


def head_kl(new_logprobs: Heads, old_logprobs: Heads, causal: Heads) -> dict[str, Tensor]:
    """Per-head KL3 estimate, 0-d each: ``masked_mean((r_h - 1) - log r_h, causal_h)``.

    Schulman, "Approximating KL divergence" (2020), estimator k3, on the CLAMPED head log-ratio
    (an unclamped exp overflows and makes the KL NaN). Finite for any finite inputs, >= 0.
    """
    return _head_kl(
        head_log_ratios(new_logprobs, old_logprobs, causal), causal, loss_totals(causal)
    )


def weighted_kl(new_logprobs: Heads, old_logprobs: Heads, causal: Heads) -> Tensor:
    """Approximate KL, 0-d: ``sum_h w_h KL3_h / sum_h w_h`` with ``w_h = mean(causal_h)``.

    Each head's KL3 (see ``head_kl``) is weighted by the fraction of steps where it was
    relevant, as the original agent's early-stopping KL. Exactly 0 when new == old.
    """
    return _weighted_kl(head_kl(new_logprobs, old_logprobs, causal), loss_totals(causal))


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_coef: Coef) -> Tensor:
    """Elementwise PPO-clip loss to minimise, ``[...]``.

    ``-min(r A, clip(r, 1 - c, 1 + c) A)``: Schulman et al. (2017), "Proximal Policy
    Optimization Algorithms", eq. 7, negated.
    """
    clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def clip_fraction(
    ratio: Tensor, clip_coef: Coef, weight: Tensor | None = None, total: Coef | None = None
) -> Tensor:
    """Fraction of steps with ``|r - 1| > c``, 0-d: ``masked_mean`` over ``weight`` (None: all
    steps) with denominator ``max(1, total)`` when ``total`` is given."""
    clipped = ((ratio - 1.0).abs() > clip_coef).to(ratio.dtype)
    return masked_mean(clipped, torch.ones_like(clipped) if weight is None else weight, total)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    clip_vloss: bool,
    value_clip: Coef,
    total: int | None = None,
) -> Tensor:
    """Value loss, 0-d, for ``values``, ``old_values``, ``returns`` of ``[...]``.

    ``0.5 mean((v - R)^2)``, or with ``clip_vloss`` (static) CleanRL's clipped form
    ``0.5 mean(max((v - R)^2, (v_old + clamp(v - v_old, -vc, vc) - R)^2))``. ``value_clip`` is
    its own range, not the policy's ``clip_coef``: values have the scale of returns.
    With ``total`` (static), the mean is this part's share of a mean over ``total`` steps.
    """
    sq = (values - returns).square()
    if clip_vloss:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        sq = torch.maximum(sq, (v_clipped - returns).square())
    return 0.5 * (sq.mean() if total is None else sq.sum() / total)


def ratio_stats(ratio: Tensor) -> RatioStats:
    """Mean, min, max, population std, and the fractions above ``RATIO_EXPLOSION_THRESHOLD`` and
    below ``RATIO_COLLAPSE_THRESHOLD`` of a ratio tensor ``[...]`` (std uses correction 0, so
    one element gives 0, not NaN)."""
    return RatioStats(
        mean=ratio.mean(),
        min=ratio.amin(),
        max=ratio.amax(),
        std=ratio.std(correction=0),
        explosion_fraction=(ratio > RATIO_EXPLOSION_THRESHOLD).to(ratio.dtype).mean(),
        collapse_fraction=(ratio < RATIO_COLLAPSE_THRESHOLD).to(ratio.dtype).mean(),
    )


def ratio_diagnostic(
    head_ratio_max: Heads, head_ratio_min: Heads, ratio_max: Tensor, ratio_min: Tensor
) -> RatioDiagnostic:
    """The worst head and the joint-ratio flags: the head whose ratio is worst, not the op head
    alone, as an explosion is often one argument head's; thresholds on the TRUE joint ratio.

    ``head_ratio_max``/``head_ratio_min``: 0-d per head (non-finite: no data for the head);
    ``ratio_max``/``ratio_min``: 0-d extremes of the joint ratio. No host sync.
    """
    deviation = torch.stack(
        [
            torch.maximum(torch.log(head_ratio_max[h]), -torch.log(head_ratio_min[h]))
            for h in head_ratio_max
        ]
    )
    deviation = torch.where(torch.isfinite(deviation), deviation, -torch.inf)
    worst = deviation.argmax()
    found = torch.isfinite(deviation.max())
    return RatioDiagnostic(
        worst_head=torch.where(found, worst, -1),
        worst_log_deviation=torch.where(found, deviation.max(), torch.nan),
        explosion=ratio_max > RATIO_EXPLOSION_THRESHOLD,
        collapse=ratio_min < RATIO_COLLAPSE_THRESHOLD,
    )


def _check_heads(name: str, heads: Heads, names: Iterable[str], shape: torch.Size) -> None:
    names = list(names)
    if sorted(heads) != sorted(names):
        raise ValueError(f"{name}: expected heads {sorted(names)}, got {sorted(heads)}")
    for h, x in heads.items():
        if x.shape != shape:
            raise ValueError(f"{name}[{h!r}]: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def _check_inputs(new_logprobs, old_logprobs, entropies, advantages, causal, values) -> None:
    shape = values.shape
    for name, heads in [
        ("new_logprobs", new_logprobs),
        ("old_logprobs", old_logprobs),
        ("entropies", entropies),
        ("advantages", advantages),
        ("causal", causal),
    ]:
        _check_heads(name, heads, new_logprobs, shape)
    for h, c in causal.items():
        if c.dtype != torch.bool:
            raise ValueError(f"causal[{h!r}]: expected dtype torch.bool, got {c.dtype}")


def _entropy_floor_penalty(
    head_floor: Mapping[str, Coef], entropies: Heads, availability: Heads | None, totals: LossTotals
) -> Tensor:
    # relu(floor_h - mean entropy where head h could have mattered), summed over floored heads
    # (fed by masks, so it adapts per head, unlike the original's mask-free global coefficient).
    if availability is None:
        raise ValueError(
            "availability: expected per-head weights when coefs.entropy_floor is set, got None"
        )
    missing = sorted(set(head_floor) - set(availability))
    if missing:
        raise ValueError(f"availability: expected entries for floored heads {missing}, got none")
    share = next(iter(entropies.values())).numel() / totals.num_samples
    gaps = []
    for h, floor in head_floor.items():
        count = totals.availability_count[h]
        part = masked_mean(entropies[h], availability[h], count)
        if totals.floor_entropy is None:
            gap = torch.relu(floor - part)
        else:
            # Linearised at the whole-minibatch mean M_h: the shares sum to relu(floor_h - M_h)
            # and their gradients to its gradient, -1[floor_h > M_h] dM_h.
            active = floor > totals.floor_entropy[h]
            gap = torch.where(active, floor * share - part, torch.zeros_like(part))
        # Without an available step the mean is an empty 0, not an entropy below the floor.
        gaps.append(torch.where(count > 0, gap, torch.zeros_like(gap)))
    return torch.stack(gaps).sum()


def ppo_loss(
    new_logprobs: Heads,
    old_logprobs: Heads,
    entropies: Heads,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    advantages: Heads,
    causal: Heads,
    coefs: LossCoefs,
    availability: Heads | None = None,
    *,
    totals: LossTotals | None = None,
) -> tuple[Tensor, LossInfo]:
    """Factored PPO loss, 0-d: ``policy + vf_coef * value - entropy_bonus + floor_penalty``.

    - policy = ``sum_h masked_mean(clipped_surrogate(r_h, A_h, c), causal_h)`` with
      ``r_h = exp(clamped log r_h)`` (per-head clipped surrogate, as the original agent).
    - value = ``value_loss(values, old_values, returns, clip_vloss, value_clip)``.
    - entropy_bonus = ``ent_coef * mean_h(head_ent_coef_h * masked_mean(H_h, causal_h))``,
      averaged over heads, not summed, so ``ent_coef`` keeps its single-head meaning.
    - floor_penalty = ``entropy_floor_coef * sum_h relu(floor_h - masked_mean(H_h, avail_h))``
      over the heads of ``coefs.entropy_floor`` whose ``availability`` has at least one step (a
      head with none adds 0); 0 when ``coefs.entropy_floor`` is None, and then
      ``availability`` is unused. ``make_update_fn`` passes
      ``funcppo.spec.entropy_floor_masks``: the steps where some valid op uses the head and
      the head has more than one valid action.

    Shapes: every per-head tensor and ``values``, ``old_values``, ``returns`` share ``[...]``;
    ``advantages`` are per head (0 where irrelevant, the op head carries the full advantage);
    ``entropies`` are normalised to [0, 1] and unmasked; ``causal`` is bool.
    Info metrics are detached; the clip fraction and ratio stats use the TRUE joint ratio
    ``exp(joint clamped log r)``, never a single head's, which can hide divergence.

    ``totals``: the whole minibatch's ``LossTotals`` when the inputs are one of its micro-batches;
    the loss, its gradient and every info field but ``ratio`` are then this micro-batch's share
    (see ``funcppo.accumulation``).
    """
    _check_inputs(new_logprobs, old_logprobs, entropies, advantages, causal, values)
    heads = list(new_logprobs)
    head_ent_coef = dict(coefs.head_ent_coef or {})
    for name, extra in [("head_ent_coef", head_ent_coef), ("entropy_floor", coefs.entropy_floor)]:
        unknown = sorted(set(extra or {}) - set(heads))
        if unknown:
            raise ValueError(f"coefs.{name}: expected heads among {heads}, got unknown {unknown}")
    if totals is None:
        totals = loss_totals(causal, availability)
    else:
        check_totals(totals, heads, coefs.entropy_floor or {}, values.numel())
    n_causal, n = totals.causal_count, totals.num_samples

    log_ratios = head_log_ratios(new_logprobs, old_logprobs, causal)
    ratios = {h: torch.exp(lr) for h, lr in log_ratios.items()}
    surrogates = {h: clipped_surrogate(ratios[h], advantages[h], coefs.clip_coef) for h in heads}
    head_pl = {h: masked_mean(surrogates[h], causal[h], n_causal[h]) for h in heads}
    policy = torch.stack(list(head_pl.values())).sum()
    v_loss = value_loss(values, old_values, returns, coefs.clip_vloss, coefs.value_clip, n)
    head_ent = {h: masked_mean(entropies[h], causal[h], n_causal[h]) for h in heads}
    scaled_ent = [head_ent_coef.get(h, 1.0) * head_ent[h] for h in heads]
    entropy_bonus = coefs.ent_coef * torch.stack(scaled_ent).mean()
    if coefs.entropy_floor is None:
        floor_penalty = torch.zeros_like(policy)
    else:
        if availability is not None:
            _check_heads("availability", availability, availability, values.shape)
        gap = _entropy_floor_penalty(coefs.entropy_floor, entropies, availability, totals)
        floor_penalty = coefs.entropy_floor_coef * gap
    loss = policy + coefs.vf_coef * v_loss - entropy_bonus + floor_penalty

    detached = {h: lr.detach() for h, lr in log_ratios.items()}
    joint_ratio = torch.exp(joint_log_ratio(detached))
    head_kls = _head_kl(detached, causal, totals)
    info = LossInfo(
        policy_loss=policy.detach(),
        head_policy_loss={h: x.detach() for h, x in head_pl.items()},
        value_loss=v_loss.detach(),
        entropy=torch.stack(list(head_ent.values())).mean().detach(),
        head_entropy={h: x.detach() for h, x in head_ent.items()},
        entropy_floor_penalty=floor_penalty.detach(),
        approx_kl=_weighted_kl(head_kls, totals),
        head_kl=head_kls,
        clip_fraction=clip_fraction(joint_ratio, coefs.clip_coef, None, n),
        head_clip_fraction={
            h: clip_fraction(ratios[h].detach(), coefs.clip_coef, causal[h], n_causal[h])
            for h in heads
        },
        ratio=ratio_stats(joint_ratio),
        head_ratio_max={
            h: torch.where(causal[h], ratios[h].detach(), -torch.inf).amax() for h in heads
        },
        head_ratio_min={
            h: torch.where(causal[h], ratios[h].detach(), torch.inf).amin() for h in heads
        },
    )
    return loss, info
