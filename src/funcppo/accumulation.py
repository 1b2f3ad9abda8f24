"""Gradient accumulation over micro-batches: exact shares of a minibatch loss.

A minibatch is split into micro-batches that run forward and backward one at a time, so only
one micro-batch's autograd graph is alive. ``ppo_loss`` given the whole minibatch's
``LossTotals`` returns one micro-batch's share of the whole-minibatch loss: every mean divides
by the whole minibatch's count (``max(1, n)`` as before) and the entropy floor, nonlinear in
its mean, is linearised at the whole minibatch's mean entropy. The shares and their gradients
sum to the whole; ``combine_infos`` merges the micro-batches' metrics into the whole's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch
from torch import Tensor

if TYPE_CHECKING:
    from funcppo.losses import LossInfo, RatioStats

__all__ = [
    "LossTotals",
    "accumulate_grads",
    "check_totals",
    "combine_infos",
    "combine_ratio_stats",
    "loss_totals",
    "split_tree",
]

Heads = Mapping[str, Tensor]


def split_tree(tree: Any, parts: int, dim: int) -> list[Any]:
    """``parts`` equal, contiguous slices along ``dim`` of every leaf of ``tree`` (views, no
    copies; ``dim`` must be divisible by ``parts``). A tree without leaves (None) is repeated."""
    leaves, treespec = optree.tree_flatten(tree)
    if not leaves:
        return [tree] * parts
    pieces = [leaf.tensor_split(parts, dim) for leaf in leaves]
    return [optree.tree_unflatten(treespec, [p[j] for p in pieces]) for j in range(parts)]


def accumulate_grads(
    grad_fn: Callable[..., tuple[Any, Any]], params: Any, parts: Sequence[tuple], *args: Any
) -> tuple[Any, list[Any]]:
    """Sum over ``parts`` of the gradients of ``grad_fn(params, *part, *args) -> (grads, out)``
    and the list of the ``out`` in order. Each call runs forward and backward before the next
    starts, so one part's autograd graph is alive at a time."""
    grads, outs = None, []
    for part in parts:
        g, out = grad_fn(params, *part, *args)
        grads = g if grads is None else optree.tree_map(torch.add, grads, g)
        outs.append(out)
    return grads, outs


class LossTotals(NamedTuple):
    """Whole-minibatch denominators that make ``ppo_loss`` return one micro-batch's share.

    ``num_samples``: steps in the whole minibatch (static int). ``causal_count[h]`` and
    ``availability_count[h]``: 0-d sums of the whole minibatch's masks (the latter None without
    availability). ``floor_entropy[h]``: per floored head, the whole minibatch's detached
    ``masked_mean(H_h, avail_h)`` (None: the micro-batch must be the whole minibatch).
    """

    num_samples: int
    causal_count: dict[str, Tensor]
    availability_count: dict[str, Tensor] | None = None
    floor_entropy: dict[str, Tensor] | None = None


def loss_totals(
    causal: Heads, availability: Heads | None = None, floor_entropy: Heads | None = None
) -> LossTotals:
    """``LossTotals`` of the whole minibatch's masks ``causal`` (and ``availability``), ``[...]``
    each, and its mean entropy ``floor_entropy`` of floored heads (0-d each) where needed."""
    return LossTotals(
        num_samples=next(iter(causal.values())).numel(),
        causal_count={h: c.sum() for h, c in causal.items()},
        availability_count=None
        if availability is None
        else {h: a.sum() for h, a in availability.items()},
        floor_entropy=None if floor_entropy is None else dict(floor_entropy),
    )


def check_totals(totals: LossTotals, heads: Iterable[str], floored: Iterable[str], n: int) -> None:
    """Raise ValueError unless ``totals`` fit a micro-batch of ``n`` steps over ``heads`` with an
    entropy floor on ``floored`` (static checks only)."""
    heads, floored = sorted(heads), sorted(floored)
    if sorted(totals.causal_count) != heads or totals.num_samples < n:
        raise ValueError(
            f"totals: expected causal counts for heads {heads} over at least {n} steps, "
            f"got {sorted(totals.causal_count)} over {totals.num_samples}"
        )
    if not floored:
        return
    if totals.availability_count is None or set(floored) - set(totals.availability_count):
        raise ValueError(f"totals.availability_count: expected counts for heads {floored}")
    if totals.num_samples != n and (
        totals.floor_entropy is None or set(floored) - set(totals.floor_entropy)
    ):
        got = None if totals.floor_entropy is None else sorted(totals.floor_entropy)
        raise ValueError(
            f"totals.floor_entropy: expected the whole minibatch's mean entropy of heads "
            f"{floored} for a micro-batch of {n} of {totals.num_samples} steps, got {got}"
        )


def combine_ratio_stats(stats: Sequence[RatioStats], counts: Sequence[int]) -> RatioStats:
    """``ratio_stats`` of a concatenation, from its parts' stats and element ``counts``.

    Means and fractions average with weights ``n_j / n``; the population variance pools as
    ``sum_j n_j / n (s_j^2 + (m_j - m)^2)`` (Chan, Golub & LeVeque 1979), which does not cancel
    as ``E[r^2] - m^2`` does in float32. Min and max are those of the parts'.
    """
    n = sum(counts)
    weights = [c / n for c in counts]

    def average(values: Iterable[Tensor]) -> Tensor:
        return functools.reduce(torch.add, [w * v for w, v in zip(weights, values, strict=True)])

    mean = average(s.mean for s in stats)
    return stats[0]._replace(
        mean=mean,
        min=functools.reduce(torch.minimum, [s.min for s in stats]),
        max=functools.reduce(torch.maximum, [s.max for s in stats]),
        std=average(s.std.square() + (s.mean - mean).square() for s in stats).sqrt(),
        explosion_fraction=average(s.explosion_fraction for s in stats),
        collapse_fraction=average(s.collapse_fraction for s in stats),
    )


def combine_infos(infos: Sequence[LossInfo], counts: Sequence[int]) -> LossInfo:
    """The whole minibatch's ``LossInfo`` from its micro-batches' (``ppo_loss`` with totals).

    Every field but the ratio summaries is a share, so the shares sum; ``ratio`` summarises its
    own micro-batch of ``counts[j]`` steps and merges with ``combine_ratio_stats``; the per-head
    ratio extremes merge by max and min.
    """
    extremes = {"ratio": None, "head_ratio_max": None, "head_ratio_min": None}
    shares = [info._replace(**extremes) for info in infos]
    summed = optree.tree_map(lambda *xs: functools.reduce(torch.add, xs), *shares)
    return summed._replace(
        ratio=combine_ratio_stats([i.ratio for i in infos], counts),
        head_ratio_max=optree.tree_map(
            lambda *xs: functools.reduce(torch.maximum, xs), *[i.head_ratio_max for i in infos]
        ),
        head_ratio_min=optree.tree_map(
            lambda *xs: functools.reduce(torch.minimum, xs), *[i.head_ratio_min for i in infos]
        ),
    )
