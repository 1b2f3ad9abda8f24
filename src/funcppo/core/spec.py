"""The factored action space as data: heads, their sizes, and which heads each op uses.

An action is one integer per head. The op head picks what to do; the other heads are its
arguments. The causal table says, for each op value, which heads the environment reads. A head
that the taken op does not read carries no credit: its log-prob, entropy and advantage are 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ActionSpec",
    "availability_masks",
    "causal_masks",
    "entropy_floor_masks",
    "resolve_masks",
]


@dataclass(frozen=True)
class ActionSpec:
    """Ordered heads, the op head, and the causal table.

    Attributes:
      heads: ``(name, size)`` pairs in a fixed order; sizes may differ.
      op_head: the head whose value selects a row of ``causal``.
      causal: one set of head names per op value. The op head is added to every row, so it is
        relevant to every op by construction: the weighted KL's total weight is then >= 1 and
        needs no clamp (docs/design.md, Weighted KL).
      op_conditioned: heads whose validity mask depends on the op; their masks have shape
        ``[..., n_ops, size]`` and the row of the taken op applies.
      op_names: optional readable names of the op values.
    """

    heads: tuple[tuple[str, int], ...]
    op_head: str
    causal: tuple[frozenset[str], ...]
    op_conditioned: frozenset[str] = field(default_factory=frozenset)
    op_names: tuple[str, ...] | None = None

    def __init__(
        self,
        heads: Mapping[str, int] | Sequence[tuple[str, int]],
        op_head: str,
        causal: Sequence[Iterable[str]],
        op_conditioned: Iterable[str] = (),
        op_names: Sequence[str] | None = None,
    ) -> None:
        pairs = tuple(heads.items()) if isinstance(heads, Mapping) else tuple(heads)
        pairs = tuple((str(name), int(size)) for name, size in pairs)
        names = [name for name, _ in pairs]
        if not pairs:
            raise ValueError("heads: expected at least one (name, size) pair, got none")
        if len(set(names)) != len(names):
            raise ValueError(f"heads: expected unique names, got {names}")
        for name, size in pairs:
            if size < 1:
                raise ValueError(f"heads: head {name!r} must have size >= 1, got {size}")
        if op_head not in names:
            raise ValueError(f"op_head: expected one of {names}, got {op_head!r}")
        n_ops = dict(pairs)[op_head]
        rows = tuple(frozenset(row) | {op_head} for row in causal)
        if len(rows) != n_ops:
            raise ValueError(
                f"causal: expected one row per op value ({n_ops} for head {op_head!r}), "
                f"got {len(rows)}"
            )
        for op, row in enumerate(rows):
            unknown = sorted(row - set(names))
            if unknown:
                raise ValueError(f"causal: row {op} names unknown heads {unknown}")
        # A head that no op reads could never carry credit, and the mask functions OR over the
        # ops that use a head, which needs at least one.
        unused = [name for name in names if not any(name in row for row in rows)]
        if unused:
            raise ValueError(
                f"causal: expected every head in some op's row, got head {unused[0]!r} in none "
                f"(rows: {[sorted(row) for row in rows]})"
            )
        conditioned = frozenset(op_conditioned)
        if op_head in conditioned or not conditioned <= set(names):
            raise ValueError(
                f"op_conditioned: expected non-op heads from {names}, got {sorted(conditioned)}"
            )
        if op_names is not None and len(op_names) != n_ops:
            raise ValueError(f"op_names: expected {n_ops} names, got {len(op_names)}")
        object.__setattr__(self, "heads", pairs)
        object.__setattr__(self, "op_head", op_head)
        object.__setattr__(self, "causal", rows)
        object.__setattr__(self, "op_conditioned", conditioned)
        object.__setattr__(self, "op_names", None if op_names is None else tuple(op_names))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.heads)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.heads)

    @property
    def n_ops(self) -> int:
        return self.size(self.op_head)

    def size(self, name: str) -> int:
        return dict(self.heads)[name]

    def head_name(self, index: float) -> str | None:
        """The name of the head at ``index`` in head order, None for -1.

        How a report on the host gives a head the update identifies by index, such as
        ``ratio_worst_head`` (-1 where no head qualifies). ``index`` may be a float holding a
        whole number, as every metric crosses to the host.
        """
        i = int(index)
        if i != index or not -1 <= i < len(self.heads):
            raise ValueError(
                f"index: expected -1 or a head index in [0, {len(self.heads)}), got {index!r}"
            )
        return None if i == -1 else self.names[i]

    def causal_table(self, device: torch.device | str | None = None) -> Tensor:
        """Bool ``[n_ops, n_heads]``: entry (o, h) is True when op o uses head h."""
        rows = [[name in row for name in self.names] for row in self.causal]
        return torch.tensor(rows, dtype=torch.bool, device=device)


def _op_one_hot(op_actions: Tensor, n_ops: int) -> Tensor:
    # Comparison with arange instead of F.one_hot: one_hot checks its input's range on the
    # host, which breaks vmap and fullgraph compile.
    return op_actions.unsqueeze(-1) == torch.arange(n_ops, device=op_actions.device)


def _uses(spec: ActionSpec, op_hot: Tensor) -> dict[str, Tensor]:
    """Per head, ``op_hot[..., o]`` ORed over the ops o that use it (bool ``[...]``).

    Written from the table's Python values, not from a table tensor: a tensor constant inside a
    compiled ``scan`` body is not bound by inductor's loop lowering (torch 2.13).
    """
    out = {}
    for name in spec.names:
        ops = [o for o, row in enumerate(spec.causal) if name in row]
        used = op_hot[..., ops[0]]
        for o in ops[1:]:
            used = used | op_hot[..., o]
        out[name] = used
    return out


def causal_masks(spec: ActionSpec, op_actions: Tensor) -> dict[str, Tensor]:
    """Which heads the taken op used: bool ``[...]`` per head, for ``op_actions`` of ``[...]``.

    The op head's mask is all True, so the KL weights sum to at least 1.
    """
    return _uses(spec, _op_one_hot(op_actions, spec.n_ops))


def availability_masks(spec: ActionSpec, op_valid: Tensor) -> dict[str, Tensor]:
    """Which heads could have mattered: bool ``[...]`` per head, for ``op_valid`` ``[..., n_ops]``.

    A head is available where some valid op uses it. The entropy floor averages over the
    available steps where the head also has more than one valid action
    (:func:`entropy_floor_masks`).
    """
    return _uses(spec, op_valid.bool())


def entropy_floor_masks(
    spec: ActionSpec, masks: Mapping[str, Tensor], op_actions: Tensor
) -> dict[str, Tensor]:
    """Where the entropy floor averages each head's entropy: bool ``[...]`` per head.

    A step counts for head h where h is available (:func:`availability_masks` of the op head's
    mask: some valid op uses h) and h has more than one valid action in its mask, for an
    op-conditioned head in the row of the taken op ``op_actions`` ``[...]`` (the row its
    entropy is measured on). With one valid action the normalised entropy is 0 by construction
    and no gradient can raise it; counting such steps would only lower the mean and push the
    other steps harder.
    """
    available = availability_masks(spec, masks[spec.op_head])
    resolved = resolve_masks(spec, masks, op_actions)
    return {name: available[name] & (resolved[name].sum(-1) > 1) for name in spec.names}


def resolve_masks(
    spec: ActionSpec, masks: Mapping[str, Tensor], op_actions: Tensor
) -> dict[str, Tensor]:
    """Per-head validity masks ``[..., size]``, with op-conditioned heads at the taken op's row."""
    one_hot = _op_one_hot(op_actions, spec.n_ops).unsqueeze(-1)
    return {
        name: (masks[name].bool() & one_hot).any(-2)
        if name in spec.op_conditioned
        else masks[name].bool()
        for name in spec.names
    }
