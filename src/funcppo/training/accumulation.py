"""Gradient accumulation: one minibatch's PPO loss, gradient and metrics from its parts, exactly.

A minibatch may be cut into parts: micro-batches, run forward and backward one at a time so that
only one part's autograd graph is alive, and in a data-parallel step the processes' shares of
the global minibatch. Every mean of the loss (``funcppo.core.losses.LossMeans``) divides by a count,
so the minibatch's means are its parts' means, each weighted by the part's share of that count,
summed (``weigh``). The loss is linear in its means except for the entropy floor's relu, so by
the chain rule through the means a part's share of the minibatch's gradient is the gradient of
``ppo_objective`` at the part's weighted means, with the floor's mean set to the minibatch's own
(from a no-grad pre-pass) so that the relu's slope is the minibatch's. The shares' gradients sum
to the minibatch's, and its loss and metrics follow from the summed means: equal, up to
rounding, to the minibatch computed at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import optree
import torch
from torch import Tensor
from torch.func import grad_and_value

from funcppo.core.losses import (
    LossCoefs,
    LossCounts,
    LossMeans,
    LossStats,
    RatioExtremes,
    ppo_objective,
)

__all__ = ["Processes", "accumulate", "merge_extremes", "split_tree", "tree_add", "weigh"]


class Processes(Protocol):
    """The processes a minibatch is spread over (``funcppo.training.distributed``): their number and
    an elementwise sum of a pytree of tensors over them."""

    world_size: int

    def tree_sum(self, tree: Any) -> Any: ...


def split_tree(tree: Any, parts: int, dim: int) -> list[Any]:
    """``parts`` equal, contiguous slices along ``dim`` of every leaf of ``tree`` (views, no
    copies; ``dim`` must be divisible by ``parts``). A tree without leaves (None) is repeated."""
    leaves, treespec = optree.tree_flatten(tree)
    if not leaves:
        return [tree] * parts
    pieces = [leaf.tensor_split(parts, dim) for leaf in leaves]
    return [optree.tree_unflatten(treespec, [p[j] for p in pieces]) for j in range(parts)]


def tree_add(trees: Sequence[Any]) -> Any:
    """The elementwise sum of ``trees``, pytrees of tensors of one structure."""
    return optree.tree_map(lambda *xs: functools.reduce(torch.add, xs), *trees)


def weigh(means: LossMeans, part: LossCounts, whole: LossCounts) -> LossMeans:
    """A part's ``means``, each times the part's share of the count it divides by: summed over
    the parts, the whole batch's means. A part's mean ``s / max(1, n_p)`` times
    ``n_p / max(1, n)`` is ``s / max(1, n)``, its share of the whole's, also where ``n_p = 0``."""

    def share(mean: Tensor, n_part: Tensor, n_whole: Tensor) -> Tensor:
        return mean * (n_part.to(mean.dtype) / n_whole.to(mean.dtype).clamp(min=1.0))

    return LossMeans(
        causal={
            f: {h: share(m, part.causal[h], whole.causal[h]) for h, m in heads.items()}
            for f, heads in means.causal.items()
        },
        steps={f: m * (part.steps / whole.steps) for f, m in means.steps.items()},
        available={
            h: share(m, part.available[h], whole.available[h]) for h, m in means.available.items()
        },
    )


def merge_extremes(extremes: Sequence[RatioExtremes]) -> RatioExtremes:
    """The ratio extremes of a batch from its parts': the largest maxima, the smallest minima."""

    def top(*xs: Tensor) -> Tensor:
        return functools.reduce(torch.maximum, xs)

    def bottom(*xs: Tensor) -> Tensor:
        return functools.reduce(torch.minimum, xs)

    return RatioExtremes(
        max=top(*[e.max for e in extremes]),
        min=bottom(*[e.min for e in extremes]),
        head_max=optree.tree_map(top, *[e.head_max for e in extremes]),
        head_min=optree.tree_map(bottom, *[e.head_min for e in extremes]),
    )


def accumulate(
    part_stats: Callable[..., tuple[LossStats, Tensor]],
    params: Any,
    parts: Sequence[tuple],
    whole: LossCounts,
    coefs: LossCoefs,
    processes: Processes,
) -> tuple[Any, LossMeans, RatioExtremes, Tensor]:
    """``(grads, means, extremes, finite)`` of a minibatch cut into ``parts`` on this process
    and spread over ``processes``: the gradient of its PPO loss with respect to ``params``
    and its means, summed over every part and process; the ratio extremes of this process's
    parts (merged over the processes once per update, by the caller); and whether every
    part on every process was finite.

    ``part_stats(params, *part) -> (stats, finite)`` runs one part forward (``finite``: its
    outputs are finite); ``whole``: the minibatch's counts over every part and process. Each
    part runs forward and backward before the next starts. With an entropy floor and more
    than one part in all, a no-grad pre-pass over the parts first gives the minibatch's mean
    entropy where each floored head was available.
    """
    whole_at_once = len(parts) == 1 and processes.world_size == 1
    floor = None
    if coefs.entropy_floor and not whole_at_once:
        with torch.no_grad():
            stats = [part_stats(params, *part)[0] for part in parts]
            shares = [weigh(s.means, s.counts, whole).available for s in stats]
        floor = processes.tree_sum(tree_add(shares))

    def objective(params: Any, *part: Any) -> tuple[Tensor, tuple]:
        stats, finite = part_stats(params, *part)
        # A part that is the whole minibatch has all of each count: weighing it is the identity.
        shares = stats.means if whole_at_once else weigh(stats.means, stats.counts, whole)
        at = shares
        if floor is not None:
            # Valued at the minibatch's mean, with this part's share of its gradient.
            moved = {h: floor[h] + m - m.detach() for h, m in shares.available.items()}
            at = shares._replace(available=moved)
        loss = ppo_objective(at, whole, coefs)
        return loss, (shares, stats.extremes, finite & torch.isfinite(loss))

    grad_fn = grad_and_value(objective, has_aux=True)
    outs = [grad_fn(params, *part) for part in parts]
    grads = tree_add([g for g, _ in outs])
    means = tree_add([aux[0] for _, (_, aux) in outs])
    finite = torch.stack([aux[2] for _, (_, aux) in outs]).all()
    # One collective for all three: what decides the step (KL, finiteness) is then global.
    grads, means, bad = processes.tree_sum((grads, means, (~finite).to(means.steps["value"])))
    return grads, means, merge_extremes([aux[1] for _, (_, aux) in outs]), bad == 0
