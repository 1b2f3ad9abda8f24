"""Advantages: GAE without a Python loop, causal per-head masking, and normalisation.

Every function here is pure, loop-free and free of host syncs, so it runs unchanged under
``torch.func.vmap`` (a leading seed axis) and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from funcppo.core.constants import ADV_STD_FLOOR, GAE_BLOCK_SIZE

__all__ = ["explained_variance", "gae", "normalize_advantages", "per_head_advantages"]

Scalar = float | Tensor


def _check_scalar(name: str, value: Scalar, like: Tensor) -> Scalar:
    """A Python real in [0, 1] stays a float; a 0-d tensor is cast to ``like``'s dtype/device.

    The device move matters under vmap: a CPU 0-d tensor may meet CUDA tensors, but a batched
    one is physically 1-d and may not.
    """
    if isinstance(value, Tensor):
        if value.ndim != 0:
            raise ValueError(f"{name}: expected a 0-d tensor, got shape {tuple(value.shape)}")
        return value.to(dtype=like.dtype, device=like.device)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name}: expected a float or 0-d tensor, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    return value


def _check_like(name: str, value: Tensor, ref: Tensor, dtype: torch.dtype | None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)}, got {tuple(value.shape)}")
    want = ref.dtype if dtype is None else dtype
    if value.dtype != want:
        raise ValueError(f"{name}: expected dtype {want}, got {value.dtype}")


def _suffix_sums(x: Tensor, done: Tensor, decay: Scalar) -> tuple[Tensor, Tensor]:
    """Closed form of the backward recursion ``y_t = x_t + decay * (1 - done_t) * y_{t+1}``
    along the last axis.

    ``y_t = sum_{s >= t} M[t, s] x_s`` with ``M[t, s] = decay^(s-t) [no done in t..s-1]``; the
    "no done" test compares exact integer counts of earlier dones, so it never drifts. Also
    returns ``carry_t = decay^(T-t) [no done in t..T-1]``, the weight of ``y_T`` (the value just
    past the block) in ``y_t``. Shapes: ``x``, ``done`` ``[*batch, T]``; both outputs the same.
    Memory is O(T^2 * batch). Time is the last axis, so the ``[T, T]`` weights and the sum over
    ``s`` run along contiguous memory.
    """
    length = x.shape[-1]
    steps = torch.arange(length, device=x.device)
    lag = steps[None, :] - steps[:, None]  # [t, s]: s - t
    # Dones strictly before each step: t and s share an episode exactly when these integer
    # counts agree, so the test is exact for any T.
    counts = done.long()
    before = torch.cumsum(torch.cat([torch.zeros_like(counts[..., :1]), counts[..., :-1]], -1), -1)
    total = before[..., -1:] + counts[..., -1:]
    open_path = (lag >= 0) & (before[..., None, :] == before[..., :, None])
    # decay^0 .. decay^T once, then looked up: T + 1 powers rather than one per entry of the
    # [T, T] weights.
    ones = x.new_ones(length + 1)
    powers = torch.cumprod(torch.cat([ones[:1], ones[1:] * decay]), 0)
    weight = torch.where(open_path, powers[lag.clamp(min=0)], 0.0)
    to_end = powers[length - steps]
    carry = torch.where(before == total, to_end, 0.0)
    # where, not a product with 0: a non-finite delta must not reach another episode.
    return torch.where(open_path, weight * x[..., None, :], 0.0).sum(-1), carry


def _blocked_suffix_sums(x: Tensor, done: Tensor, decay: Scalar) -> Tensor:
    """``y_t = x_t + decay * (1 - done_t) * y_{t+1}``, ``y_T = 0``, in O(T * K + (T/K)^2) memory.

    Time is cut into N blocks of K = ``GAE_BLOCK_SIZE`` steps, the tail padded with zeros. Within
    a block the closed form gives the local sums; the values at block starts obey the same
    recursion one level up, with decay ``decay^K`` and a block counted as done when any of its
    steps is. A fixed K keeps the graph valid for a symbolic T. Shapes ``[T, *batch]``.
    """
    length, batch = x.shape[0], x.shape[1:]
    size = GAE_BLOCK_SIZE
    blocks = -(-length // size)
    pad = blocks * size - length  # padded steps: zero delta, so they add nothing
    x = torch.cat([x.movedim(0, -1), x.new_zeros(*batch, pad)], -1)
    done = torch.cat([done.movedim(0, -1), done.new_zeros(*batch, pad)], -1)
    x, done = x.reshape(*batch, blocks, size), done.reshape(*batch, blocks, size)
    local, carry = _suffix_sums(x, done, decay)  # [*batch, N, K]
    starts, _ = _suffix_sums(local[..., 0], done.any(-1), decay**size)  # y at each block's start
    after = torch.cat([starts[..., 1:], starts.new_zeros(*batch, 1)], -1)
    y = local + torch.where(carry != 0, carry * after[..., None], 0.0)
    return y.reshape(*batch, blocks * size)[..., :length].movedim(-1, 0)


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: Scalar,
    gae_lambda: Scalar,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), loop-free.

    ``delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t`` and
    ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``, ``A_T = 0``, with
    ``done_t = terminated_t | truncated_t`` (TorchRL keeps the two apart): a terminated step
    does not bootstrap, a truncated one bootstraps from ``V'_t`` (the value of the final
    observation before the auto-reset), and no credit crosses an episode boundary or a column.
    The recursion is solved in closed form per block (see ``_blocked_suffix_sums``), so
    ``torch.compile`` has no loop to unroll.

    Args:
      rewards, values, next_values: float ``[T, B]`` (any trailing batch dims work);
        ``next_values[t]`` is the critic's value of the observation after step ``t``.
      terminated, truncated: bool ``[T, B]``.
      gamma, gae_lambda: Python floats in [0, 1] or 0-d tensors (e.g. vmapped per seed).

    Returns:
      ``(advantages, returns)``, both ``[T, B]``, with ``returns = advantages + values``.
    """
    if not isinstance(rewards, Tensor) or not rewards.is_floating_point() or rewards.ndim < 1:
        got = rewards.dtype if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a float tensor [T, B], got {got}")
    if rewards.shape[0] < 1:
        raise ValueError(f"rewards: expected T >= 1 steps, got shape {tuple(rewards.shape)}")
    _check_like("values", values, rewards, None)
    _check_like("next_values", next_values, rewards, None)
    _check_like("terminated", terminated, rewards, torch.bool)
    _check_like("truncated", truncated, rewards, torch.bool)
    gamma = _check_scalar("gamma", gamma, rewards)
    gae_lambda = _check_scalar("gae_lambda", gae_lambda, rewards)
    bootstrap = torch.where(terminated, 0.0, next_values)  # NaN after a real end cannot leak
    delta = rewards + gamma * bootstrap - values
    advantages = _blocked_suffix_sums(delta, terminated | truncated, gamma * gae_lambda)
    return advantages, advantages + values


def per_head_advantages(advantages: Tensor, causal: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each head's advantage: the full advantage where the taken op used it, exactly +0.0 else.

    A head the op did not read carries no credit: the environment ignored its value.
    ``torch.where`` rather than a product, so an irrelevant entry is +0.0 even for a negative or
    non-finite advantage.

    Args:
      advantages: float ``[...]``.
      causal: head name -> bool ``[...]`` (``spec.causal_masks``; the op head's is all True).
    """
    for name, mask in causal.items():
        _check_like(f"causal[{name!r}]", mask, advantages, torch.bool)
    return {name: torch.where(mask, advantages, 0.0) for name, mask in causal.items()}


def normalize_advantages(advantages: Tensor, weights: Tensor | None = None) -> Tensor:
    """``(A - mean) / max(std, ADV_STD_FLOOR)`` with weighted mean and population std.

    ``mean = sum(w A) / sum(w)`` and ``std^2 = sum(w (A - mean)^2) / sum(w)`` over all elements;
    ``weights`` (float >= 0, or bool) default to ones. Entries of weight 0 do not enter the
    statistics (even if NaN) but are normalised with them. Both sums are taken around a pivot,
    one weighted entry, so equal values give exactly 0 rather than rounding noise over the
    floor. One sample gives 0; all weights 0 give zeros.

    Shapes: ``advantages`` and ``weights`` ``[...]``; output the same.
    """
    if not isinstance(advantages, Tensor) or not advantages.is_floating_point():
        got = advantages.dtype if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages: expected a float tensor, got {got}")
    if advantages.numel() == 0:
        raise ValueError("advantages: expected at least one element, got an empty tensor")
    if weights is None:
        weights = torch.ones_like(advantages)
    elif not isinstance(weights, Tensor) or weights.shape != advantages.shape:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights: expected shape {tuple(advantages.shape)}, got {got}")
    elif not (weights.dtype == torch.bool or weights.is_floating_point()):
        raise ValueError(f"weights: expected a float or bool tensor, got {weights.dtype}")
    w = weights.to(advantages.dtype)
    used = w != 0
    flat = advantages.reshape(-1)
    pivot = flat.gather(0, used.reshape(-1).to(torch.uint8).argmax().reshape(1)).squeeze(0)
    shifted = torch.where(used, advantages - pivot, 0.0)
    total = w.sum()
    safe_total = torch.where(total > 0, total, 1.0)
    mean = pivot + (w * shifted).sum() / safe_total
    centered = torch.where(used, advantages - mean, 0.0)
    var = (w * centered * centered).sum() / safe_total
    normed = (advantages - mean) / var.clamp(min=ADV_STD_FLOOR**2).sqrt()
    return torch.where(total > 0, normed, 0.0)


def explained_variance(values: Tensor, returns: Tensor, weight: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the steps where ``weight`` (bool), 0-d; NaN where
    ``Var[R] = 0``, as CleanRL reports it. Population variances; ``values``, ``returns`` and
    ``weight`` share ``[...]``; entries off the weight are ignored, even if NaN."""
    w = weight.to(values.dtype)
    n = w.sum().clamp(min=1.0)

    def var(x: Tensor) -> Tensor:
        x = torch.where(weight, x, 0.0)
        mean = (x * w).sum() / n
        return ((x - mean) ** 2 * w).sum() / n

    var_r = var(returns)
    return torch.where(var_r > 0, 1.0 - var(returns - values) / var_r, torch.nan)
