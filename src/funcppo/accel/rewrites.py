"""Graph rewrites that the CPU compile settings give inductor: forms of the plain math that
inductor's C++ code generation runs faster, each equal to the plain form up to rounding
(tests/test_compiling.py). The math modules keep the plain form; only
``CompileSettings.for_device("cpu")`` selects these, and this module is imported only then.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["PowAsExp", "ThinProducts"]


class _Rewrite(CustomGraphPass):
    """A rewrite is its ``repr``: equal, hashed and keyed (inductor's cache, the precompiled
    files' key) by it, so two settings objects made alike compare equal."""

    def uuid(self) -> bytes:  # in inductor's cache keys
        return get_hash_for_files((__file__,), repr(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class ThinProducts(_Rewrite):
    """Inductor pass over dynamo's graph, before autograd: ``x @ w`` with a two-dimensional
    ``w`` of at most ``thin_max`` rows or columns, on CPU, as pointwise work.

    With k rows (k <= n), the k products ``x[..., i:i+1] * w[i]`` summed; with n columns, the n
    reductions ``(x * w[:, j]).sum(-1)`` stacked. Inductor fuses them, and the gradients that
    autograd derives from them, into the kernels around them, where a batched matmul call for
    such a shape cost far more than its arithmetic on CPU (97 us for 8 seeds x
    ``[128, 64] @ [64, 2]``, against 142 us for ``[128, 64] @ [64, 64]``; docs/design-notes.md).
    Shapes are the traced ones, so under vmap a seed axis does not count. The values are the
    matmul's up to rounding.
    """

    def __init__(self, thin_max: int = 4) -> None:
        self.thin_max = thin_max

    def __repr__(self) -> str:  # in the precompiled files' key: no address
        return f"ThinProducts(thin_max={self.thin_max})"

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in (operator.matmul, torch.matmul):
                self._rewrite(graph, node)

    def _rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs:
            return
        x, w = node.args
        val = node.meta.get("example_value")
        wval = w.meta.get("example_value") if isinstance(w, torch.fx.Node) else None
        if not (
            isinstance(val, Tensor) and isinstance(wval, Tensor) and isinstance(x, torch.fx.Node)
        ):
            return
        if val.device.type != "cpu" or not val.is_floating_point() or wval.ndim != 2:
            return
        k, n = wval.shape
        if not (isinstance(k, int) and isinstance(n, int)) or min(k, n) > self.thin_max:
            return  # a symbolic size is left alone: comparing it would guard on it

        def call(target: Any, *args: Any) -> torch.fx.Node:
            return graph.call_function(target, args)

        with graph.inserting_before(node):
            if k <= n:
                out = None
                for i in range(k):
                    term = call(
                        operator.mul,
                        call(operator.getitem, x, (Ellipsis, slice(i, i + 1))),
                        call(operator.getitem, w, i),
                    )
                    out = term if out is None else call(operator.add, out, term)
            else:
                columns = [
                    call(
                        torch.sum,
                        call(operator.mul, x, call(operator.getitem, w, (slice(None), j))),
                        -1,
                    )
                    for j in range(n)
                ]
                out = call(torch.stack, columns, -1)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


class PowAsExp(_Rewrite):
    """Inductor pass over the graph after autograd: ``pow(base, t)`` with a Python ``base > 0``
    (not 1) and a float64 result, on CPU, as ``exp(t * log(base))``, equal up to rounding.

    Adam's bias corrections ``1 - beta^t``: inductor inlines a ``pow`` into every vector of each
    loop that reads it (two double-precision ``pow`` calls per 8 parameters, most of the
    optimizer's time on a small network), but computes a value that holds an ``exp`` once, into
    a buffer of its own (docs/design-notes.md).
    """

    def __repr__(self) -> str:
        return "PowAsExp()"

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten.pow.Scalar:
                self._rewrite(graph, node)

    def _rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        base, exponent = node.args
        val = node.meta.get("val")
        exact = isinstance(base, int | float) and not isinstance(base, bool) and 0 < base != 1
        if not (exact and isinstance(val, FakeTensor) and val.device.type == "cpu"):
            return
        if val.dtype != torch.float64 or node.kwargs:
            return
        with graph.inserting_before(node):
            scaled = _with_fake_value(
                graph.call_function(torch.ops.aten.mul.Tensor, (exponent, math.log(base))), val
            )
            out = _with_fake_value(graph.call_function(torch.ops.aten.exp.default, (scaled,)), val)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _with_fake_value(node: torch.fx.Node, like: FakeTensor) -> torch.fx.Node:
    """``node`` with the fake value that later passes read: shaped, typed and placed as
    ``like`` (the pow it replaces)."""
    with like.fake_mode:
        node.meta["val"] = torch.empty_like(like)
    return node
