"""Several processes on PyTorch's own engine (torch.distributed, launched by torchrun).

Two ways to use K processes:

- Seeds across processes: the S seeds of a run are split into K contiguous shards
  (``shard_seeds``); each process runs its shard vmapped with keys taken from the same
  ``split(key(seed), S)`` as a single-process run, so seed i is the same run wherever it lands,
  and rank 0 gathers per-seed metrics and states (``gather_to_root``).
- Data-parallel updates: ``DataParallel`` sums pytrees over the processes inside the update
  step (``make_update_fn(..., data_parallel=...)``), so one agent (or one vmapped set of seeds)
  learns from the rollouts of every process. ``SingleProcess`` has the same interface, each
  reduction the identity or the plain formula, so the update reads the same for one process.

The sum is one custom operator, ``funcppo::all_reduce``, wrapping ``dist.all_reduce`` on a
copy. ``torch.compile(fullgraph=True)`` keeps it as one opaque node (aot_eager and inductor),
and its vmap rule reduces the whole ``[S, ...]`` seed batch in one collective. torch's
functional collectives (``_c10d_functional.all_reduce``) trace under compile too, but have no
vmap batching rule: on 2 gloo processes with torch 2.13 the per-slice fallback returned the
*unreduced* input under eager vmap, and a wrong slice under compiled vmap, with only a
performance warning. Hence the custom operator.

A data-parallel update makes one all-reduce per minibatch step (gradients, the loss's weighted
means, finiteness: one float buffer), plus one more per step with an entropy floor (the
floor's mean entropy); and per update five small ones (moments for advantage normalisation
and explained variance, mask statistics, every minibatch's counts, ratio extremes).

A process that fails or hangs stops the others: every collective runs under the process
group's timeout, and a failed collective raises ``DistributedError`` naming this rank.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from funcppo.core.advantages import explained_variance, normalize_advantages
from funcppo.core.constants import ADV_STD_FLOOR
from funcppo.core.distributions import MaskStats

__all__ = [
    "DataParallel",
    "DistributedError",
    "SingleProcess",
    "check_same_shapes",
    "close_distributed",
    "data_parallel",
    "gather_to_root",
    "init_distributed",
    "replicated_advantage_stats",
    "replicated_mask_stats",
    "replicated_moments",
    "shard_seeds",
]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# Process groups by name: a custom operator takes strings, not ProcessGroup objects.
_GROUPS: dict[str, dist.ProcessGroup] = {}


class DistributedError(RuntimeError):
    """A collective failed: another process raised, exited, or missed the timeout."""


def _failed(what: str, err: BaseException) -> DistributedError:
    rank = dist.get_rank() if dist.is_initialized() else "?"
    return DistributedError(
        f"rank {rank}: {what} failed; another process of the run raised, exited or did not "
        f"answer within the process group's timeout ({type(err).__name__}: {err})"
    )


@torch.library.custom_op("funcppo::all_reduce", mutates_args=())
def _all_reduce(x: Tensor, op: str, group_name: str) -> Tensor:
    out = x.clone()
    try:
        dist.all_reduce(out, op=_OPS[op], group=_GROUPS[group_name])
    except (RuntimeError, ValueError) as err:
        raise _failed(f"all_reduce of a {tuple(x.shape)} tensor", err) from err
    return out


@_all_reduce.register_fake
def _(x: Tensor, op: str, group_name: str) -> Tensor:
    return torch.empty_like(x)


@_all_reduce.register_vmap
def _(info, in_dims, x: Tensor, op: str, group_name: str):
    # Elementwise over processes, so one collective reduces every vmapped slice at once.
    (dim, _, _) = in_dims
    if dim is None:
        return _all_reduce(x, op, group_name), None
    return _all_reduce(x.movedim(dim, 0).contiguous(), op, group_name), 0


def _tree_reduce(tree: Any, op: str, group_name: str) -> Any:
    """Reduce every leaf of ``tree`` over the group with one collective per dtype."""
    # Leaves gathered and put back by tree_map: compiled, dynamo's optree flatten fails on an
    # empty dict (the loss's entropy-floor means without a floor; torch 2.13), its map does not.
    leaves: list[Tensor] = []
    optree.tree_map(leaves.append, tree)
    if not leaves:
        return tree
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(leaf.dtype, []).append(i)
    out: list[Tensor | None] = [None] * len(leaves)
    for idx in by_dtype.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        reduced = _all_reduce(flat, op, group_name)
        sizes = [leaves[i].numel() for i in idx]
        for i, piece in zip(idx, reduced.split(sizes), strict=True):
            out[i] = piece.reshape(leaves[i].shape)
    pieces = iter(out)
    return optree.tree_map(lambda _: next(pieces), tree)


class SingleProcess(NamedTuple):
    """One process: the interface of ``DataParallel`` with nothing to reduce over. The sums and
    maxima are the identity, the statistics the plain formulas (``normalize_advantages``,
    ``explained_variance``, the mask statistics as they are)."""

    world_size: int = 1
    rank: int = 0

    @property
    def collectives(self) -> bool:
        """Whether the reductions communicate with other processes."""
        return False

    def tree_sum(self, tree: Any) -> Any:
        return tree

    def tree_max(self, tree: Any) -> Any:
        return tree

    def advantage_stats(
        self, advantages: Tensor, returns: Tensor, values: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(normalised advantages, explained variance)`` over the steps where ``weight``."""
        normed = normalize_advantages(advantages, weight)
        return normed, explained_variance(values, returns, weight)

    def mask_stats(self, stats: dict[str, MaskStats], num_steps: int) -> dict[str, MaskStats]:
        return stats

    def check_same_shapes(self, tree: Any) -> None:
        pass


class DataParallel(NamedTuple):
    """The processes of a data-parallel update: their number, this one's rank among them, and
    the name of the group to reduce over.

    ``tree_sum``/``tree_max`` reduce a pytree of tensors over the group, elementwise, with
    one collective per leaf dtype: every process must pass the same structure and shapes. They
    work eager, under ``torch.func.vmap`` and under ``torch.compile(fullgraph=True)``. The
    statistics are those of every process's steps (``SingleProcess`` has the same methods).
    """

    world_size: int
    rank: int
    group_name: str

    @property
    def collectives(self) -> bool:
        return True

    def tree_sum(self, tree: Any) -> Any:
        return _tree_reduce(tree, "sum", self.group_name)

    def tree_max(self, tree: Any) -> Any:
        return _tree_reduce(tree, "max", self.group_name)

    def advantage_stats(
        self, advantages: Tensor, returns: Tensor, values: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        return replicated_advantage_stats(advantages, returns, values, weight, self)

    def mask_stats(self, stats: dict[str, MaskStats], num_steps: int) -> dict[str, MaskStats]:
        return replicated_mask_stats(stats, num_steps, self)

    def check_same_shapes(self, tree: Any) -> None:
        check_same_shapes(tree, self)


def data_parallel(group: dist.ProcessGroup | None = None) -> DataParallel:
    """A ``DataParallel`` over ``group`` (default: every process); needs an initialised group."""
    if not dist.is_initialized():
        raise ValueError(
            "group: expected an initialised torch.distributed process group (launch with "
            "torchrun and call funcppo.training.distributed.init_distributed()), got none"
        )
    group = dist.group.WORLD if group is None else group
    _GROUPS[group.group_name] = group
    return DataParallel(dist.get_world_size(group), dist.get_rank(group), group.group_name)


def init_distributed(timeout_s: float = 300.0, backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns ``(rank, world)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``backend`` None picks
    ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. ``timeout_s`` bounds joining
    and every later collective: a process that hangs makes the others raise after it.
    """
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise ValueError(
            f"environment: expected {missing} as set by torchrun (torchrun --nproc-per-node=K "
            "-m funcppo ...), got them unset"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=timeout_s), init_method="env://"
            )
        except (RuntimeError, ValueError) as err:
            raise _failed("joining the process group", err) from err
    return dist.get_rank(), dist.get_world_size()


def close_distributed(wait: bool = True) -> None:
    """Leave the process group, if one was joined: wait for every process (skip that with
    ``wait=False`` after an error, when the others may never arrive), then destroy the group.

    A process that exits with the group alive can abort at interpreter exit while gloo's
    threads still run ("terminate called without an active exception", exit signal 6).
    """
    if not dist.is_initialized():
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_seeds(num_seeds: int, rank: int, world_size: int) -> range:
    """Seeds ``[start, stop)`` of process ``rank``: contiguous shards whose sizes differ by at
    most one (the first ``num_seeds % world_size`` processes take one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if num_seeds < world_size:
        raise ValueError(
            f"seeds: expected at least one seed per process ({world_size} processes), "
            f"got {num_seeds}"
        )
    base, extra = divmod(num_seeds, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_to_root(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` (picklable; tensors on CPU) in rank order on rank 0, else None."""
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == 0 else None
    try:
        dist.gather_object(obj, out, dst=0)
    except (RuntimeError, ValueError) as err:
        raise _failed("gathering results on rank 0", err) from err
    return out


def replicated_moments(
    xs: list[Tensor], weight: Tensor, dp: DataParallel | SingleProcess
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Weighted means and population variances of each ``x`` over every process's entries.

    Two collectives: the sums, then the squared deviations around the global means (two
    passes, so no ``E[x^2] - E[x]^2`` cancellation). Entries where ``weight`` is False are
    ignored, even if NaN. Shapes: each ``x`` and ``weight`` ``[...]``; returns 0-d means,
    variances and the total weight (0 total: means and variances 0).
    """
    w = weight.to(xs[0].dtype)
    xs = [torch.where(weight, x, 0.0) for x in xs]
    total, sums = dp.tree_sum((w.sum(), [(x * w).sum() for x in xs]))
    safe = torch.where(total > 0, total, 1.0)
    means = [s / safe for s in sums]
    squares = dp.tree_sum(
        [
            (w * torch.where(weight, x - m, 0.0).square()).sum()
            for x, m in zip(xs, means, strict=True)
        ]
    )
    return means, [s / safe for s in squares], total


def replicated_advantage_stats(
    advantages: Tensor,
    returns: Tensor,
    values: Tensor,
    weight: Tensor,
    dp: DataParallel | SingleProcess,
) -> tuple[Tensor, Tensor]:
    """``SingleProcess.advantage_stats`` over every process's steps: the formulas of
    ``normalize_advantages`` and ``explained_variance`` on the moments of ``replicated_moments``
    (``dp``: anything with ``tree_sum``)."""
    (mean, _, _), (var, var_r, var_e), total = replicated_moments(
        [advantages, returns, returns - values], weight, dp
    )
    normed = (advantages - mean) / var.clamp(min=ADV_STD_FLOOR**2).sqrt()
    explained = torch.where(var_r > 0, 1.0 - var_e / var_r, torch.nan)
    return torch.where(total > 0, normed, 0.0), explained


def replicated_mask_stats(
    stats: dict[str, MaskStats], num_steps: int, dp: DataParallel | SingleProcess
) -> dict[str, MaskStats]:
    """``mask_stats`` over every process's steps from each process's own (``num_steps`` each).

    The two step fractions average over processes; ``learnable_fraction`` is a ratio of counts,
    so each process's learnable count (its fraction times ``max(1, relevant)``) is summed.
    """
    parts = {}
    for h, s in stats.items():
        relevant = (s.relevant_fraction * num_steps).round()
        learnable = s.learnable_fraction * relevant.clamp(min=1)
        parts[h] = (s.single_action_fraction, s.relevant_fraction, relevant, learnable)
    summed = dp.tree_sum(parts)
    k = dp.world_size
    return {
        h: MaskStats(single / k, rel_frac / k, learn / rel.clamp(min=1))
        for h, (single, rel_frac, rel, learn) in summed.items()
    }


def check_same_shapes(tree: Any, dp: DataParallel) -> None:
    """Raise ValueError unless every process's ``tree`` has the same leaf count and shapes
    (host side, two small collectives): unequal batches would make the sums misalign."""
    shapes = [d for leaf in optree.tree_leaves(tree) for d in (leaf.dim(), *leaf.shape)]
    sizes = torch.tensor([len(shapes), -len(shapes)], dtype=torch.int64)
    top = dp.tree_max(sizes)
    if top[0] != -top[1]:
        raise ValueError(
            f"batch: expected the same structure on every process, got {len(shapes)} shape "
            f"entries here and between {-int(top[1])} and {int(top[0])} across processes"
        )
    mine = torch.tensor(shapes, dtype=torch.int64)
    top = dp.tree_max(torch.cat([mine, -mine]))
    if not torch.equal(top[: len(shapes)], -top[len(shapes) :]):
        raise ValueError(
            "batch: expected the same shapes on every process (each process's batch is one "
            f"part of the global batch), got {[tuple(x.shape) for x in optree.tree_leaves(tree)]}"
            " here and other shapes elsewhere"
        )
