"""How an update's pieces are vmapped, compiled and looped: the compile scopes, the scanned
loops of the update's minibatch steps and of the rollout (``scan_rollout``).

``make_update_fn`` writes one PPO update as five plain pieces (``UpdatePieces``), per seed and
eager. ``compose_update`` runs them: the seeds vmapped, the pieces compiled in one of three
scopes, the minibatch steps looped in Python or, scanned, in inductor's C++.

- ``"update"``: the whole update as one graph; torch.compile unrolls the minibatch loop, so
  compile time grows with ``update_epochs * num_minibatches``.
- ``"minibatch"``: ``prepare``, the step and ``finish`` compiled once each, the step called from
  a Python loop, which bounds compile time.
- ``"scan"``: as ``"minibatch"``, with the steps one compiled ``scan`` over the step index
  (``scan_steps``) looped in inductor's C++: one call and one guard check per update, compile
  time as bounded as the step's. Graphs holding collectives (data parallel), eager updates
  and updates compiled ahead of time (``CompileSettings.ahead_of_time``: a gradient inside a
  scan cannot be exported) loop in Python instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._higher_order_ops.scan import scan
from torch.func import vmap

from funcppo.accel.compiling import (
    CompileSettings,
    compile_fn,
    fresh,
    scan_cacheable,
    scan_carry,
    unaliased,
)
from funcppo.core.config import PPOConfig

__all__ = [
    "SCOPES",
    "UpdatePieces",
    "compose_update",
    "scan_rollout",
    "scan_steps",
    "stacked_tree_map",
]

SCOPES = ("minibatch", "scan", "update")


class UpdatePieces(NamedTuple):
    """One update as pure functions of one seed's tensors (``state``: a ``TrainState``):

    - ``shuffle(state, batch) -> order``, the minibatches' indices; it must also take a
      leading seed axis: outside the ``"update"`` scope it runs neither vmapped (vmap's
      dispatch of its hundred small integer ops cost 1.97 against 1.59 ms for 8 seeds) nor
      compiled (inductor inlines the hash of a hash of the key into one expression, and
      generating its code took 10-20 s of the compile for 0.3 ms of work);
    - ``prepare(state, batch, order) -> (prep, stats, flat)``;
    - ``start(state, flat) -> carry``, elementwise on ``state.step`` so that it needs neither
      vmap nor compile (compiled, two equal outputs could come back as one aliased buffer);
    - ``step(carry, prep, hparams, k) -> (carry, metrics)``, minibatch step ``k`` (a 0-d
      tensor, shared by the seeds), ``metrics`` a pytree of tensors;
    - ``finish(step, key, carry, stats, metrics) -> out``, ``metrics`` the steps' stacked on a
      leading axis.
    """

    shuffle: Callable
    prepare: Callable
    start: Callable
    step: Callable
    finish: Callable


def scan_steps(step: Callable, num_steps: int) -> Callable:
    """``steps(carry, *args) -> (carry, metrics)``: ``step(carry, *args, k) -> (carry, metrics)``
    for ``k`` in ``range(num_steps)`` as one ``scan``; ``metrics``, any pytree of tensors, come
    back as the same pytree with each leaf stacked on a leading step axis.

    Inductor lowers the scan to one loop: compile time does not grow with the number of steps,
    and dynamo's guards run once per call, not once per step. The carry's highest-rank leaves
    (parameters and moments) are carried as they are; its others (counters, flags) are packed
    into one vector per dtype (``scan_carry``), so that no two carries can be one buffer, which
    inductor's C++ loop needs (see ``compile_fn``). Packing the large vectors too cost 0.91x on
    8 seeds: a copy of every parameter and moment per step.
    """

    def steps(carry: Any, *args: Any) -> tuple[Any, Any]:
        leaves, spec = pytree.tree_flatten(carry)
        rank = max(x.dim() for x in leaves)
        pack, unpack = scan_carry(leaves, keep=lambda x: x.dim() == rank)

        def body(packed: list, k: torch.Tensor) -> tuple[list, Any]:
            new, metrics = step(pytree.tree_unflatten(unpack(packed), spec), *args, k)
            # A scan body may return no input and no two views of one buffer: fresh metrics.
            return pack(pytree.tree_leaves(new)), pytree.tree_map(torch.clone, metrics)

        ks = torch.arange(num_steps, device=leaves[0].device)
        out, metrics = scan(body, pack(leaves), ks)
        return pytree.tree_unflatten(fresh(unpack(out)), spec), metrics

    return steps


def stacked_tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """``optree.tree_map(fn, tree)``, computed as one call of ``fn`` on the leaves stacked on
    a new leading axis: the leaves must share one shape and dtype, and ``fn`` treat leading
    axes as a batch. Compiled, each leaf of a tree map becomes kernels of its own: the update's
    ``finish`` reducing its metrics leaf by leaf took 6 s more to compile here (14.9 against
    8.9 s, benchmarks/update_step.py's MLP).
    """
    leaves: list[Tensor] = []
    optree.tree_map(leaves.append, tree)  # not tree_leaves: see funcppo.training.distributed
    if not leaves:
        return tree
    columns = iter(fn(torch.stack(leaves)).unbind(0))
    return optree.tree_map(lambda _: next(columns), tree)


def _stacked(trees: list) -> Any:
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def compose_update(
    pieces: UpdatePieces,
    config: PPOConfig,
    scope: str,
    num_seeds: int | None,
    dp: Any,
    settings: CompileSettings | None,
) -> Callable:
    """``run(state, batch) -> finish's output``: the pieces composed in compile ``scope`` (see
    the module), ``update_epochs * num_minibatches`` steps of ``config``, vmapped over a
    leading seed axis of ``num_seeds`` (None: none), compiled with ``settings`` (None: eager).
    Where ``dp.collectives`` (the pieces reduce over processes), their graphs keep the Python
    wrapper and the steps loop in Python."""
    if scope not in SCOPES:
        raise ValueError(f"compile_scope: expected one of {SCOPES}, got {scope!r}")
    shuffle, prepare, start, step, finish = pieces
    collectives = dp.collectives
    num_steps = config.update_epochs * config.num_minibatches

    def seeded(fn: Callable, in_dims: Any = 0) -> Callable:
        return fn if num_seeds is None else vmap(fn, in_dims=in_dims, randomness="error")

    def wrap(fn: Callable, in_dims: Any = 0) -> Callable:
        fn = seeded(fn, in_dims)
        if settings is None:
            return fn
        # The graphs that hold collectives keep the Python wrapper.
        return compile_fn(
            fn, "update", settings.replace(cpp_wrapper=False) if collectives else settings
        )

    def drive(shuffle, prepare, steps, finish) -> Callable:
        def run(state, batch):
            prep, stats, flat = prepare(state, batch, shuffle(state, batch))
            carry, metrics = steps(start(state, flat), prep, state.hparams)
            return finish(state.step, state.key, carry, stats, metrics)

        return run

    def loop(step: Callable) -> Callable:
        def steps(carry, prep, hparams):
            metrics = []
            device = optree.tree_leaves(carry)[0].device  # the step index lives with the data
            for k in range(num_steps):
                carry, m = step(carry, prep, hparams, torch.tensor(k, device=device))
                metrics.append(m)
            return carry, _stacked(metrics)

        return steps

    step_dims = (0, 0, 0, None)  # carry, prep, hparams per seed; the step index shared
    # Vmapped piece by piece, the stacked metrics are [steps, seeds, ...].
    finish_dims = (0, 0, 0, 0, 1)
    if scope == "update":
        return wrap(drive(shuffle, prepare, loop(step), finish))
    if scope == "scan" and settings is not None and not collectives and not settings.ahead_of_time:
        scanned = compile_fn(scan_steps(seeded(step, step_dims), num_steps), "update", settings)

        def steps(carry, prep, hparams):
            # A scan's inputs may not alias (two heads' masks can share a buffer).
            with scan_cacheable():
                return scanned(*unaliased((carry, prep, hparams)))

        return drive(shuffle, wrap(prepare), steps, wrap(finish, finish_dims))
    return drive(shuffle, wrap(prepare), loop(wrap(step, step_dims)), wrap(finish, finish_dims))


def scan_rollout(env_step: Callable, num_steps: int, time_axis: int) -> tuple[Callable, Callable]:
    """``(scanned, drive)``: ``scanned(rs)``, one ``scan`` over time to be compiled, and
    ``drive(compiled, rs) -> (rs, batch)``, which calls the compiled one: ``num_steps`` calls
    of ``env_step(params, rs) -> (rs, transition)`` (``rs`` a runner state, a NamedTuple with
    ``train``, the train state, and ``key``), the transitions stacked on ``time_axis``.

    The carry is the runner state without the train state (parameters are read, not carried)
    packed into one vector per dtype (``scan_carry``), the form a scan body takes and
    returns, and one that inductor's C++ loop can carry. ``batch``'s tree structure comes
    from one eager step on the first call (a traced body cannot hand it out).
    """
    batch_spec: list[pytree.TreeSpec] = []

    def scanned(rs: Any) -> tuple[Any, list[Tensor]]:
        train = rs.train
        params = optree.tree_map(torch.clone, train.params)
        leaves, spec = pytree.tree_flatten(rs._replace(train=()))
        pack, unpack = scan_carry(leaves)

        def body(carry: list[Tensor], _: Tensor) -> tuple[list[Tensor], list[Tensor]]:
            state = pytree.tree_unflatten(unpack(carry), spec)
            new, transition = env_step(params, state)
            return pack(pytree.tree_leaves(new._replace(train=()))), fresh(
                pytree.tree_leaves(transition)
            )

        xs = torch.zeros(num_steps, device=rs.key.device)  # scan's length; the body ignores it
        carry, ys = scan(body, pack(leaves), xs)
        ys = [y.movedim(0, time_axis).contiguous() for y in ys]
        # Fresh tensors, not views of the packed carry (the next call guards on strides).
        carry = fresh(unpack(carry))
        return pytree.tree_unflatten(carry, spec)._replace(train=train), ys

    def rollout(compiled: Callable, rs: Any) -> tuple[Any, Any]:
        if not batch_spec:
            batch_spec.append(pytree.tree_structure(env_step(rs.train.params, rs)[1]))
        with scan_cacheable():
            rs, ys = compiled(unaliased(rs))
        return rs, pytree.tree_unflatten(ys, batch_spec[0])

    return scanned, rollout
