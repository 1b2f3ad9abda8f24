"""Parameters as a few flat buffers: the update's working layout.

A policy has a dozen or more parameter leaves, and Adam keeps two moments per leaf. Carried
leaf by leaf through the minibatch steps, every optimizer formula becomes one small kernel per
leaf, every leaf is an input and an output of each compiled step (each checked by a guard and
handled by the compiled wrapper's Python), and the compiled code grows with the leaf count.
Inside the update, ``ravel`` packs the leaves into one contiguous vector per group (the critic,
decayed by AdamW, and the rest), ``unravel`` gives them back as views, and the optimizer runs on
the groups: the same arithmetic on the same numbers, element for element, in a handful of ops.

Layouts are static: computed once, on the host, from example trees. Under ``torch.compile``
a tree is rebuilt by ``optree.tree_map`` over an *index tree* (the tree's structure with leaf
i replaced by the int i), never by ``optree.tree_unflatten``: dynamo's optree support rejects
a real ``PyTreeSpec`` constant (torch 2.13).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

__all__ = [
    "FlatLayout",
    "TreeLayout",
    "flat_layout",
    "index_tree",
    "ravel",
    "ravel_leaves",
    "ravel_tree",
    "rebuild",
    "tree_layout",
    "unravel",
    "unravel_leaves",
    "unravel_tree",
]


class FlatLayout(NamedTuple):
    """Where each leaf of a parameter tree lives in its group's vector.

    ``groups``: ``(name, leaf indices)`` pairs, leaves in ``optree`` flatten order;
    ``index``: the tree with leaf i replaced by i.
    """

    treedef: optree.PyTreeSpec
    index: Any
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[str, tuple[int, ...]], ...]

    def sizes(self, leaves: tuple[int, ...]) -> list[int]:
        return [math.prod(self.shapes[i]) for i in leaves]


def flat_layout(params: Any, group_of: Callable[[tuple], str]) -> FlatLayout:
    """The layout of ``params``, each leaf in the group ``group_of(path)`` names."""
    paths, leaves, treedef = optree.tree_flatten_with_path(params)
    members: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        members.setdefault(group_of(path), []).append(i)
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) > 1:
        raise ValueError(f"params: expected one floating dtype, got {sorted(map(str, dtypes))}")
    return FlatLayout(
        treedef,
        index_tree(treedef),
        tuple(tuple(leaf.shape) for leaf in leaves),
        tuple((name, tuple(idx)) for name, idx in sorted(members.items())),
    )


def index_tree(treedef: optree.PyTreeSpec) -> Any:
    """The tree of ``treedef`` with leaf i replaced by the int i."""
    return optree.tree_unflatten(treedef, range(treedef.num_leaves))


def rebuild(index: Any, leaves: list) -> Any:
    """The tree of ``index`` (see ``index_tree``) holding ``leaves``; traceable by dynamo."""
    return optree.tree_map(lambda i: leaves[i], index)


# The leaf-list forms below are what ravel_tree and unravel_tree use: compiled, every tree
# built and walked again is interpreted by dynamo leaf by leaf, so the optimizer state's
# parameter-shaped parts go from leaves to groups and back without an intermediate tree.


def ravel_leaves(layout: FlatLayout, leaves: list) -> list[Tensor]:
    """The groups' vectors, in group-name order, from the tree's leaves in flatten order."""
    return [torch.cat([leaves[i].reshape(-1) for i in idx]) for _, idx in layout.groups]


def unravel_leaves(layout: FlatLayout, vectors: list[Tensor]) -> list[Tensor]:
    """The tree's leaves in flatten order, each a view of its group's vector."""
    leaves: list[Any] = [None] * len(layout.shapes)
    for (_, idx), vector in zip(layout.groups, vectors, strict=True):
        for i, part in zip(idx, torch.split(vector, layout.sizes(idx)), strict=True):
            leaves[i] = part.view(layout.shapes[i])
    return leaves


def ravel(layout: FlatLayout, params: Any) -> dict[str, Tensor]:
    """``{group: [n_group]}``, each the group's leaves flattened and concatenated."""
    vectors = ravel_leaves(layout, optree.tree_leaves(params))
    return {name: v for (name, _), v in zip(layout.groups, vectors, strict=True)}


def unravel(layout: FlatLayout, flat: dict[str, Tensor]) -> Any:
    """The parameter tree back from ``ravel``'s groups, each leaf a view of its group."""
    return rebuild(layout.index, unravel_leaves(layout, [flat[name] for name, _ in layout.groups]))


class TreeLayout(NamedTuple):
    """A tree (an optimizer state) whose parameter-shaped subtrees are stored raveled.

    ``parts``: per top-level item in flatten order, True for a parameter-shaped subtree.
    """

    params: FlatLayout
    index: Any
    flat_index: Any
    parts: tuple[bool, ...]


def tree_layout(layout: FlatLayout, tree: Any, flat_tree: Any) -> TreeLayout:
    """The layout of ``tree`` (e.g. an optimizer state built on the parameters) given the same
    tree built on ``ravel``'s groups, ``flat_tree``."""

    def is_params(x: Any) -> bool:
        return optree.tree_structure(x) == layout.treedef

    tops = optree.tree_leaves(tree, is_leaf=is_params)
    return TreeLayout(
        layout,
        index_tree(optree.tree_structure(tree)),
        index_tree(optree.tree_structure(flat_tree)),
        tuple(is_params(x) for x in tops),
    )


def _convert_parts(tl: TreeLayout, leaves: list, width: int, convert: Callable) -> list:
    """``leaves`` with each parameter-shaped run of ``width`` leaves replaced by
    ``convert(run)``, every other leaf kept."""
    out, pos = [], 0
    for is_params in tl.parts:
        if is_params:
            out.extend(convert(leaves[pos : pos + width]))
            pos += width
        else:
            out.append(leaves[pos])
            pos += 1
    return out


def ravel_tree(tl: TreeLayout, tree: Any) -> Any:
    """``tree`` with every parameter-shaped subtree replaced by its groups."""

    # The vectors stand where ravel's dict would flatten: in sorted name order, the groups'.
    convert = functools.partial(ravel_leaves, tl.params)
    leaves = optree.tree_leaves(tree)
    return rebuild(tl.flat_index, _convert_parts(tl, leaves, len(tl.params.shapes), convert))


def unravel_tree(tl: TreeLayout, flat_tree: Any) -> Any:
    """The inverse of ``ravel_tree``."""
    # The groups come back from tree_leaves in sorted key order, the order of the groups.
    convert = functools.partial(unravel_leaves, tl.params)
    leaves = optree.tree_leaves(flat_tree)
    return rebuild(tl.index, _convert_parts(tl, leaves, len(tl.params.groups), convert))
