"""Functional optimisers over pytrees of tensors, after optax (Babuschkin et al. 2020).

A ``GradientTransformation`` is a pair of pure functions: ``init(params) -> state`` and
``update(updates, state, params) -> (updates, state)``. Nothing mutates its inputs and no step
syncs with the host, so one update runs under ``torch.func.vmap`` (a leading seed axis on
params, grads and state) and ``torch.compile(fullgraph=True)``.

Every hyperparameter may be a Python float or a 0-d floating tensor. To sweep one per seed,
build the transformation *inside* the vmapped function from the vmapped 0-d tensor; its
closure then holds one value per seed.

Paths are read with ``optree.tree_flatten_with_path``, never ``optree.tree_map_with_path``:
under ``torch.compile`` (torch 2.13) the latter hands the callback wrong paths, silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcppo.core.config import PPOConfig
from funcppo.core.constants import ADAM_EPS, CLIP_NORM_EPS

__all__ = [
    "CRITIC_KEYS",
    "EmptyState",
    "GradientTransformation",
    "ScaleByAdamState",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "critic_mask",
    "global_norm",
    "is_critic_path",
    "make_optimizer",
    "scale_by_adam",
    "scale_by_learning_rate",
]

Params = Any
Updates = Any
State = Any
Hyper = float | Tensor
DecayMask = Any  # None, a pytree of bools shaped like params, or a callable path -> bool

# Keys that mark critic parameters: decay on actor heads, whose gradients causal masking leaves
# sparse, kills exploration, so only the critic decays (docs/design.md, Critic-only weight decay).
CRITIC_KEYS = frozenset({"value", "critic"})


class GradientTransformation(NamedTuple):
    """A pure optimiser: ``init(params) -> state``, ``update(updates, state, params)``."""

    init: Callable[[Params], State]
    update: Callable[[Updates, State, Params | None], tuple[Updates, State]]


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class ScaleByAdamState(NamedTuple):
    """Adam moments: ``count`` int64 ``[]``; ``mu``, ``nu`` pytrees shaped like params."""

    count: Tensor
    mu: Updates
    nu: Updates


def _hyper(name: str, value: Hyper, ok: Callable[[float], bool], expected: str) -> Hyper:
    """Validate a hyperparameter from static information only (Python value or tensor shape)."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name}: expected a float or a 0-d floating tensor, "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a float or a 0-d tensor, got {type(value).__name__}")
    if not ok(float(value)):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return float(value)


def _like(h: Hyper, x: Tensor) -> Hyper:
    """A hyperparameter in ``x``'s dtype, so a 0-d leaf keeps its dtype."""
    return h.to(x.dtype) if isinstance(h, Tensor) else h


def _double(h: Hyper) -> Hyper:
    """A hyperparameter in float64: a tensor is cast, a Python float already is one."""
    return h.to(torch.float64) if isinstance(h, Tensor) else h


def _leaves(tree: Any, name: str) -> list[Tensor]:
    leaves = optree.tree_leaves(tree)
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise ValueError(f"{name}: expected a pytree of tensors, got a {type(leaf).__name__}")
    return leaves


def global_norm(tree: Updates) -> Tensor:
    """``sqrt(sum_i ||x_i||^2)`` over every leaf, as ``clip_grad_norm_`` computes it.

    Returns a 0-d tensor. Under vmap each seed gets its own norm: the seed axis is not a leaf
    dimension, so seeds never share one norm.
    """
    leaves = _leaves(tree, "tree")
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in leaves]))


def clip_by_global_norm(max_norm: Hyper) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (global_norm + 1e-6))``.

    The formula of ``torch.nn.utils.clip_grad_norm_`` (Pascanu et al. 2013), with its clamp in
    place of a branch, so no host sync. Stateless.
    """
    max_norm = _hyper("max_norm", max_norm, lambda v: v > 0, "a value > 0")

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None):
        norm = global_norm(updates)
        coef = torch.clamp(_like(max_norm, norm) / (norm + CLIP_NORM_EPS), max=1.0)
        return optree.tree_map(lambda u: u * coef.to(u.dtype), updates), state

    return GradientTransformation(init, update)


def scale_by_adam(
    b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = ADAM_EPS
) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015, Alg. 1), with torch.optim.Adam's arithmetic.

    ``m = lerp(m, g, 1 - b1)``, ``v = b2 v + (1 - b2) g^2``, and the update is
    ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``: eps is added after the bias
    correction of ``v``, as in torch (not to ``sqrt(v_hat)`` of the paper, which differs only
    in eps's scale). Bias corrections are computed in float64, then cast per leaf.
    """
    b1 = _hyper("b1", b1, lambda v: 0 <= v < 1, "a value in [0, 1)")
    b2 = _hyper("b2", b2, lambda v: 0 <= v < 1, "a value in [0, 1)")
    eps = _hyper("eps", eps, lambda v: v >= 0, "a value >= 0")

    def init(params: Params) -> ScaleByAdamState:
        leaves = _leaves(params, "params")
        device = leaves[0].device if leaves else None
        count = torch.zeros((), dtype=torch.int64, device=device)
        return ScaleByAdamState(
            count,
            optree.tree_map(torch.zeros_like, params),
            optree.tree_map(torch.zeros_like, params),
        )

    def update(updates: Updates, state: ScaleByAdamState, params: Params | None = None):
        if not isinstance(state, ScaleByAdamState):
            raise ValueError(f"state: expected a ScaleByAdamState, got {type(state).__name__}")
        count = state.count + 1
        t = count.to(torch.float64)
        bc1, bc2 = 1 - _double(b1) ** t, 1 - _double(b2) ** t
        mu = optree.tree_map(lambda g, m: torch.lerp(m, g, _like(1 - b1, g)), updates, state.mu)
        nu = optree.tree_map(
            lambda g, v: v * _like(b2, g) + _like(1 - b2, g) * g * g, updates, state.nu
        )
        sqrt_bc2, inv_bc1 = bc2.sqrt(), 1 / bc1

        def direction(m: Tensor, v: Tensor) -> Tensor:
            denom = v.sqrt() / sqrt_bc2.to(v.dtype) + _like(eps, v)
            return m / denom * inv_bc1.to(m.dtype)

        return optree.tree_map(direction, mu, nu), ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def is_critic_path(path: tuple) -> bool:
    """True when any key of an optree path names the critic (``"value"`` or ``"critic"``)."""
    return any(isinstance(k, str) and k in CRITIC_KEYS for k in path)


def critic_mask(params: Params) -> Any:
    """A pytree of Python bools shaped like ``params``: True on critic leaves."""
    paths, _, spec = optree.tree_flatten_with_path(params)
    return optree.tree_unflatten(spec, [is_critic_path(p) for p in paths])


def _decay_flags(mask: DecayMask, params: Params) -> list[bool]:
    """One static bool per leaf of ``params`` (flatten order)."""
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):
        return [bool(mask(p)) for p in paths]
    flags, mask_spec = optree.tree_flatten(mask)
    if mask_spec != spec or not all(isinstance(f, bool) for f in flags):
        raise ValueError(
            f"mask: expected Python bools in the structure of params {spec}, got {mask_spec} "
            f"with leaves of types {sorted({type(f).__name__ for f in flags})}"
        )
    return flags


def add_decayed_weights(
    weight_decay: Hyper = 0.0, mask: DecayMask = None
) -> GradientTransformation:
    """``u + weight_decay * p`` on masked leaves: decoupled decay (Loshchilov & Hutter 2019).

    Placed after Adam and before the learning rate, it gives AdamW's
    ``p <- p - lr * (adam(g) + wd * p)``. ``mask`` is None (decay all), a pytree of bools
    like params, or a callable ``path -> bool`` on optree paths (e.g. ``is_critic_path``).
    Masked-out leaves come back as copies.
    """
    weight_decay = _hyper("weight_decay", weight_decay, lambda v: v >= 0, "a value >= 0")

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None):
        if params is None:
            raise ValueError("params: add_decayed_weights needs the current params, got None")
        flags = _decay_flags(mask, params)
        u_leaves, u_spec = optree.tree_flatten(updates)
        p_leaves, p_spec = optree.tree_flatten(params)
        if u_spec != p_spec:
            raise ValueError(f"updates: expected the structure of params {p_spec}, got {u_spec}")
        out = [
            u + _like(weight_decay, u) * p if decay else u.clone()
            for u, p, decay in zip(u_leaves, p_leaves, flags, strict=True)
        ]
        return optree.tree_unflatten(u_spec, out), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: Hyper) -> GradientTransformation:
    """``u -> -learning_rate * u``: turns a descent direction into a parameter step."""
    learning_rate = _hyper("learning_rate", learning_rate, lambda v: v >= 0, "a value >= 0")

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None):
        return optree.tree_map(lambda u: u * -_like(learning_rate, u), updates), state

    return GradientTransformation(init, update)


def _identity() -> GradientTransformation:
    """Passes updates through; holds a slot so a chain's state layout never changes."""
    return GradientTransformation(
        lambda params: EmptyState(), lambda updates, state, params=None: (updates, state)
    )


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: Params) -> tuple:
        return tuple(tx.init(params) for tx in transforms)

    def update(updates: Updates, state: tuple, params: Params | None = None):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"state: expected a tuple of {len(transforms)} states, got {type(state).__name__}"
            )
        new_state = []
        for tx, inner in zip(transforms, state, strict=True):
            updates, inner = tx.update(updates, inner, params)
            new_state.append(inner)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def adamw(
    learning_rate: Hyper,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = ADAM_EPS,
    weight_decay: Hyper = 0.0,
    decay_mask: DecayMask = None,
    max_grad_norm: Hyper | None = None,
) -> GradientTransformation:
    """torch.optim.AdamW after ``clip_grad_norm_``, as one chain.

    ``chain(clip_by_global_norm, scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.
    The state is always a 4-tuple, Adam's at index 1; a clip with ``max_grad_norm=None`` or a
    decay with a Python ``weight_decay == 0`` is an identity slot. ``decay_mask=None`` decays
    every leaf, as torch does; pass ``is_critic_path`` to decay the critic only.
    """
    no_decay = not isinstance(weight_decay, Tensor) and weight_decay == 0
    return chain(
        _identity() if max_grad_norm is None else clip_by_global_norm(max_grad_norm),
        scale_by_adam(b1, b2, eps),
        _identity() if no_decay else add_decayed_weights(weight_decay, decay_mask),
        scale_by_learning_rate(learning_rate),
    )


def make_optimizer(config: PPOConfig, hparams: Any) -> GradientTransformation:
    """PPO's optimizer for ``config``: AdamW with decay on the critic only and clipping by
    global norm, its learning rate and clip from ``hparams`` (a ``Hyperparams``: tensors, per
    seed under vmap), ``adam_eps`` and ``weight_decay`` from ``config``.

    Decay on actor layers kills exploration (docs/design.md, Critic-only weight decay).
    """
    return adamw(
        learning_rate=hparams.learning_rate,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        decay_mask=is_critic_path,
        max_grad_norm=hparams.max_grad_norm,
    )


def apply_updates(params: Params, updates: Updates) -> Params:
    """``p + u`` leaf by leaf, in each parameter's dtype; returns new tensors."""
    return optree.tree_map(lambda p, u: p + u.to(p.dtype), params, updates)
