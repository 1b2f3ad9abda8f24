"""PPO loss math on per-head log-probs: pure functions, no network.

Per-head quantities are dicts ``head name -> Tensor`` sharing one batch shape ``[...]`` (``[N]``
or ``[T, B]``). ``causal[h]`` is bool ``[...]``: True where the taken op used head ``h``. The op
head's causal mask is all True, so the total KL weight is >= 1 (no clamp). Coefficients may be
Python floats or 0-d tensors, so a per-seed sweep can vmap them. Nothing here syncs with the host.

``ppo_loss`` is ``ppo_objective`` of the batch's means (``loss_stats``), its metrics
``loss_info`` of the same: a batch cut into parts (``funcppo.training.accumulation``) has as means
its parts' means weighted by their share of each count, so its loss follows from theirs exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import optree
import torch
from torch import Tensor

from funcppo.core.constants import (
    HEAD_LOG_RATIO_CLAMP,
    JOINT_LOG_RATIO_CLAMP,
    RATIO_COLLAPSE_THRESHOLD,
    RATIO_EXPLOSION_THRESHOLD,
)

__all__ = [
    "LossCoefs",
    "LossCounts",
    "LossInfo",
    "LossMeans",
    "LossStats",
    "RatioDiagnostic",
    "RatioExtremes",
    "RatioStats",
    "clip_fraction",
    "clipped_surrogate",
    "head_kl",
    "head_log_ratios",
    "joint_log_ratio",
    "loss_info",
    "loss_stats",
    "masked_mean",
    "ppo_loss",
    "ppo_objective",
    "ratio_diagnostic",
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


class LossCounts(NamedTuple):
    """The step counts a batch's means divide by (``max(1, n)``): ``steps`` (a Python int), and
    per head 0-d ``causal[h]``, the steps where head h was relevant, and ``available[h]``, the
    steps where it was available (entropy-floored heads only)."""

    steps: int
    causal: dict[str, Tensor]
    available: dict[str, Tensor]


class LossMeans(NamedTuple):
    """The means a batch's PPO loss and metrics are functions of, 0-d each.

    ``causal[f][h]``: the mean of f over the steps where head h was relevant, for f in
    ``policy`` (clipped surrogate), ``entropy``, ``kl`` (KL3) and ``clip`` (head ratio outside
    the clip range). ``steps[f]``: over all steps, for f in ``value`` (the value loss), ``clip``
    (joint ratio outside the clip range), ``ratio`` (the joint ratio r), ``ratio_sq``
    ((r - 1)^2), ``explosion`` and ``collapse`` (r beyond the thresholds). ``available[h]``:
    floored head h's entropy over the steps where it was available. Each divides by the
    ``LossCounts`` field of its name. Policy, entropy, value and ``available`` carry gradients.
    """

    causal: dict[str, dict[str, Tensor]]
    steps: dict[str, Tensor]
    available: dict[str, Tensor]


class RatioExtremes(NamedTuple):
    """The joint ratio's ``max`` and ``min`` over a batch's steps, and per head the extremes of
    ``r_h`` over the steps where the head was relevant (-inf / +inf where it never was)."""

    max: Tensor
    min: Tensor
    head_max: dict[str, Tensor]
    head_min: dict[str, Tensor]


class LossStats(NamedTuple):
    """Everything a batch's loss (``ppo_objective``) and metrics (``loss_info``) are made of."""

    counts: LossCounts
    means: LossMeans
    extremes: RatioExtremes


def masked_mean(x: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean ``sum(x * w) / max(1, W)`` over all elements, 0-d; ``W = sum(w)``.

    The floor of 1 on the denominator is the original agent's ``mask.sum().clamp(min=1)``: an
    empty mask gives 0, not NaN. Entries with ``w == 0`` are dropped with ``torch.where``, so a
    non-finite value where the mask is off leaks neither into the mean nor into its gradient.
    ``x``: ``[...]``; ``weight``: bool or float ``[...]``.
    """
    w = weight.to(x.dtype)
    numerator = torch.where(w != 0, x * w, torch.zeros_like(x)).sum()
    return numerator / w.sum().clamp_min(1.0)


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


def _weighted_kl(head_kls: Heads, counts: Heads, steps: int) -> Tensor:
    weights = {h: counts[h].to(kl.dtype) / steps for h, kl in head_kls.items()}
    # The op head is relevant at every step, so the total weight is >= 1: no clamp, no guard.
    total = torch.stack(list(weights.values())).sum()
    return torch.stack([head_kls[h] * w for h, w in weights.items()]).sum() / total


def head_kl(new_logprobs: Heads, old_logprobs: Heads, causal: Heads) -> dict[str, Tensor]:
    """Per-head KL3 estimate, 0-d each: ``masked_mean((r_h - 1) - log r_h, causal_h)``.

    Schulman, "Approximating KL divergence" (2020), estimator k3, on the CLAMPED head log-ratio
    (an unclamped exp overflows and makes the KL NaN). Finite for any finite inputs, >= 0.
    """
    log_ratios = head_log_ratios(new_logprobs, old_logprobs, causal)
    return {h: masked_mean(_kl3(lr), causal[h]) for h, lr in log_ratios.items()}


def weighted_kl(new_logprobs: Heads, old_logprobs: Heads, causal: Heads) -> Tensor:
    """Approximate KL, 0-d: ``sum_h w_h KL3_h / sum_h w_h`` with ``w_h = mean(causal_h)``.

    Each head's KL3 (see ``head_kl``) is weighted by the fraction of steps where it was
    relevant, as the original agent's early-stopping KL. Exactly 0 when new == old.
    """
    steps = next(iter(causal.values())).numel()
    counts = {h: c.sum() for h, c in causal.items()}
    return _weighted_kl(head_kl(new_logprobs, old_logprobs, causal), counts, steps)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_coef: Coef) -> Tensor:
    """Elementwise PPO-clip loss to minimise, ``[...]``.

    ``-min(r A, clip(r, 1 - c, 1 + c) A)``: Schulman et al. (2017), "Proximal Policy
    Optimization Algorithms", eq. 7, negated.
    """
    clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def clip_fraction(ratio: Tensor, clip_coef: Coef, weight: Tensor | None = None) -> Tensor:
    """Fraction of steps with ``|r - 1| > c``, 0-d: ``masked_mean`` over ``weight`` (None: all
    steps)."""
    clipped = ((ratio - 1.0).abs() > clip_coef).to(ratio.dtype)
    return masked_mean(clipped, torch.ones_like(clipped) if weight is None else weight)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    clip_vloss: bool,
    value_clip: Coef,
) -> Tensor:
    """Value loss, 0-d, for ``values``, ``old_values``, ``returns`` of ``[...]``.

    ``0.5 mean((v - R)^2)``, or with ``clip_vloss`` (static) CleanRL's clipped form
    ``0.5 mean(max((v - R)^2, (v_old + clamp(v - v_old, -vc, vc) - R)^2))``. ``value_clip`` is
    its own range, not the policy's ``clip_coef``: values have the scale of returns.
    """
    sq = (values - returns).square()
    if clip_vloss:
        v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        sq = torch.maximum(sq, (v_clipped - returns).square())
    return 0.5 * sq.mean()


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


def _check_coefs(coefs: LossCoefs, heads: list[str], availability: Heads | None, shape) -> None:
    for name, extra in [
        ("head_ent_coef", coefs.head_ent_coef),
        ("entropy_floor", coefs.entropy_floor),
    ]:
        unknown = sorted(set(extra or {}) - set(heads))
        if unknown:
            raise ValueError(f"coefs.{name}: expected heads among {heads}, got unknown {unknown}")
    if not coefs.entropy_floor:
        return
    if availability is None:
        raise ValueError(
            "availability: expected per-head weights when coefs.entropy_floor is set, got None"
        )
    _check_heads("availability", availability, availability, shape)
    missing = sorted(set(coefs.entropy_floor) - set(availability))
    if missing:
        raise ValueError(f"availability: expected entries for floored heads {missing}, got none")


def loss_stats(
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
) -> LossStats:
    """The counts, means and ratio extremes of one batch (arguments as ``ppo_loss``'s).

    The ratio summaries use the TRUE joint ratio ``exp(joint clamped log r)``, never a single
    head's, which can hide divergence; they, the KL and the clip fractions are detached.
    """
    _check_inputs(new_logprobs, old_logprobs, entropies, advantages, causal, values)
    heads = list(new_logprobs)
    _check_coefs(coefs, heads, availability, values.shape)
    floored = list(coefs.entropy_floor or {})
    log_ratios = head_log_ratios(new_logprobs, old_logprobs, causal)
    ratios = {h: torch.exp(lr) for h, lr in log_ratios.items()}
    detached = {h: lr.detach() for h, lr in log_ratios.items()}
    seen = {h: r.detach() for h, r in ratios.items()}  # the ratios, for metrics only
    joint = torch.exp(joint_log_ratio(detached))
    c = coefs.clip_coef

    def over_causal(per_head: Heads) -> dict[str, Tensor]:
        return {h: masked_mean(per_head[h], causal[h]) for h in heads}

    def fraction(hit: Tensor) -> Tensor:
        return hit.to(joint.dtype).mean()

    means = LossMeans(
        causal={
            "policy": over_causal(
                {h: clipped_surrogate(ratios[h], advantages[h], c) for h in heads}
            ),
            "entropy": over_causal(entropies),
            "kl": over_causal({h: _kl3(lr) for h, lr in detached.items()}),
            "clip": {h: clip_fraction(seen[h], c, causal[h]) for h in heads},
        },
        steps={
            "value": value_loss(values, old_values, returns, coefs.clip_vloss, coefs.value_clip),
            "clip": clip_fraction(joint, c),
            "ratio": joint.mean(),
            "ratio_sq": (joint - 1.0).square().mean(),
            "explosion": fraction(joint > RATIO_EXPLOSION_THRESHOLD),
            "collapse": fraction(joint < RATIO_COLLAPSE_THRESHOLD),
        },
        available={h: masked_mean(entropies[h], availability[h]) for h in floored},
    )
    extremes = RatioExtremes(
        max=joint.amax(),
        min=joint.amin(),
        head_max={h: torch.where(causal[h], r, -torch.inf).amax() for h, r in seen.items()},
        head_min={h: torch.where(causal[h], r, torch.inf).amin() for h, r in seen.items()},
    )
    counts = LossCounts(
        steps=values.numel(),
        causal={h: causal[h].sum() for h in heads},
        available={h: availability[h].sum() for h in floored},
    )
    return LossStats(counts, means, extremes)


def _floor_penalty(means: LossMeans, counts: LossCounts, coefs: LossCoefs) -> Tensor:
    # relu(floor_h - mean entropy where head h could have mattered), summed over floored heads
    # (fed by masks, so it adapts per head, unlike the original's mask-free global coefficient).
    if not coefs.entropy_floor:
        return torch.zeros_like(means.steps["value"])
    gaps = [
        # Without an available step the mean is an empty 0, not an entropy below the floor.
        torch.where(counts.available[h] > 0, torch.relu(floor - means.available[h]), 0.0)
        for h, floor in coefs.entropy_floor.items()
    ]
    return coefs.entropy_floor_coef * torch.stack(gaps).sum()


def ppo_objective(means: LossMeans, counts: LossCounts, coefs: LossCoefs) -> Tensor:
    """The PPO loss of a batch from its means and counts (see ``ppo_loss``), 0-d."""
    policy = torch.stack(list(means.causal["policy"].values())).sum()
    head_ent_coef = dict(coefs.head_ent_coef or {})
    entropy = [head_ent_coef.get(h, 1.0) * e for h, e in means.causal["entropy"].items()]
    entropy_bonus = coefs.ent_coef * torch.stack(entropy).mean()
    value = means.steps["value"]
    return policy + coefs.vf_coef * value - entropy_bonus + _floor_penalty(means, counts, coefs)


def loss_info(stats: LossStats, coefs: LossCoefs) -> LossInfo:
    """The metrics of a batch from its stats (see ``ppo_loss``), detached.

    The ratio's spread is taken around 1, where ratios sit, from the means of ``r`` and
    ``(r - 1)^2``: ``std^2 = E[(r - 1)^2] - (E[r] - 1)^2`` (population), a mean of means, so
    parts of a batch pool it exactly as they pool everything else.
    """
    counts, extremes = stats.counts, stats.extremes
    means = optree.tree_map(Tensor.detach, stats.means)
    heads, steps = means.causal, means.steps
    spread = steps["ratio_sq"] - (steps["ratio"] - 1.0).square()
    return LossInfo(
        policy_loss=torch.stack(list(heads["policy"].values())).sum(),
        head_policy_loss=heads["policy"],
        value_loss=steps["value"],
        entropy=torch.stack(list(heads["entropy"].values())).mean(),
        head_entropy=heads["entropy"],
        entropy_floor_penalty=_floor_penalty(means, counts, coefs),
        approx_kl=_weighted_kl(heads["kl"], counts.causal, counts.steps),
        head_kl=heads["kl"],
        clip_fraction=steps["clip"],
        head_clip_fraction=heads["clip"],
        ratio=RatioStats(
            mean=steps["ratio"],
            min=extremes.min,
            max=extremes.max,
            std=spread.clamp(min=0.0).sqrt(),
            explosion_fraction=steps["explosion"],
            collapse_fraction=steps["collapse"],
        ),
        head_ratio_max=extremes.head_max,
        head_ratio_min=extremes.head_min,
    )


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
      ``funcppo.core.spec.entropy_floor_masks``: the steps where some valid op uses the head and
      the head has more than one valid action.

    Shapes: every per-head tensor and ``values``, ``old_values``, ``returns`` share ``[...]``;
    ``advantages`` are per head (0 where irrelevant, the op head carries the full advantage);
    ``entropies`` are normalised to [0, 1] and unmasked; ``causal`` is bool.
    Info metrics are detached; the clip fraction and ratio stats use the TRUE joint ratio
    ``exp(joint clamped log r)``, never a single head's, which can hide divergence.

    It is ``ppo_objective`` of ``loss_stats``' means and counts, with ``loss_info`` of them.
    """
    stats = loss_stats(
        new_logprobs,
        old_logprobs,
        entropies,
        values,
        old_values,
        returns,
        advantages,
        causal,
        coefs,
        availability,
    )
    return ppo_objective(stats.means, stats.counts, coefs), loss_info(stats, coefs)
