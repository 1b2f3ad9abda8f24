"""``compile_fn``: torch.compile with a compile cache of the function's own; and the helpers
that a compiled ``scan`` (the rollout, the update's minibatch steps) needs.

Dynamo keeps its compiled graphs and guards on the Python code object that it enters. Every
``torch.func.vmap`` wrapper, and every closure made by one factory, shares one code object, so
distinct functions would count against one recompile limit and, with ``fullgraph=True``, fail
once it is reached. ``compile_fn`` enters ``fn`` through a fresh copy of a trampoline's code
object, so each compiled function gets its own cache.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import types
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch._inductor.config as inductor_config
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._subclasses.fake_tensor import FakeTensor

from funcppo.flat import FlatLayout, ravel_leaves, unravel_leaves
from funcppo.precompile import Precompiled, savable

__all__ = [
    "GUARD_FILTER",
    "INDUCTOR_OPTIONS",
    "PowAsExp",
    "ThinProducts",
    "compile_fn",
    "fresh",
    "keep_input_guards",
    "pack_by_dtype",
    "scan_cacheable",
    "scan_carry",
    "unaliased",
]

_counter = itertools.count()


class ThinProducts(CustomGraphPass):
    """Inductor pass over dynamo's graph, before autograd: ``x @ w`` with a two-dimensional
    ``w`` of at most ``thin_max`` rows or columns, on CPU, as pointwise work.

    With k rows (k <= n), the k products ``x[..., i:i+1] * w[i]`` summed; with n columns, the n
    reductions ``(x * w[:, j]).sum(-1)`` stacked. Inductor fuses them, and the gradients that
    autograd derives from them, into the kernels around them, where a batched matmul call for
    such a shape cost far more than its arithmetic on CPU (97 us for 8 seeds x
    ``[128, 64] @ [64, 2]``, against 142 us for ``[128, 64] @ [64, 64]``; benchmarks/RESULTS.md).
    Shapes are the traced ones, so under vmap a seed axis does not count. The values are the
    matmul's up to rounding.
    """

    def __init__(self, thin_max: int = 4) -> None:
        self.thin_max = thin_max

    def __repr__(self) -> str:  # in the precompiled files' key: no address
        return f"ThinProducts(thin_max={self.thin_max})"

    def uuid(self) -> bytes:  # in inductor's cache keys
        return get_hash_for_files((__file__,), repr(self))

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


class PowAsExp(CustomGraphPass):
    """Inductor pass over the graph after autograd: ``pow(base, t)`` with a Python ``base > 0``
    (not 1) and a float64 result, on CPU, as ``exp(t * log(base))``, equal up to rounding.

    Adam's bias corrections ``1 - beta^t``: inductor inlines a ``pow`` into every vector of each
    loop that reads it (two double-precision ``pow`` calls per 8 parameters, most of the
    optimizer's time on a small network), but computes a value that holds an ``exp`` once, into
    a buffer of its own (benchmarks/RESULTS.md).
    """

    def __repr__(self) -> str:
        return "PowAsExp()"

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,), repr(self))

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


# Inductor's generated code checks every input's sizes and strides on each call, again on
# each iteration of a scan's loop (the rollout's carry holds dozens of tensors), which here
# costs more than some of the kernels it guards. The compiled function's entry is guarded
# by dynamo on the same sizes and strides, and a loop's carry is made by its own body, so
# the checks are off: 1.10x on 8 vmapped CartPole seeds' rollout and update, 1.03-1.07x on
# the update benchmark (benchmarks/RESULTS.md). And vectorised tanh as 2 / (1 + exp(-2x)) - 1:
# the library's tanh cost 3 ns per element here, 2.4x the exp form, for every hidden layer
# (the results agree to 2e-7; benchmarks/RESULTS.md). And under the C++ wrapper, the entry
# function and the kernels built as two libraries, not one file: a small update with its
# steps scanned in C++ compiled cold in 83 s instead of 145 s here, and ran as fast
# (benchmarks/RESULTS.md). And the CPU's vector instruction sets taken from its flags: by
# default inductor proves each one by compiling a probe and loading it in a fresh Python
# process, which took 13.9 s of every first compile into an empty cache here and 1.5 s of
# every later process, for the same list of instruction sets (3.1 s and 0.4 s trusted).
# A user's TORCHINDUCTOR_VEC_ISA_OK still decides.
INDUCTOR_OPTIONS = {
    "size_asserts": False,
    "alignment_asserts": False,
    "cpp.use_decompose_tanh": True,
    "cpp_wrapper_build_separate": True,
    "pre_grad_custom_pass": ThinProducts(),
    "post_grad_custom_post_pass": PowAsExp(),
}
if inductor_config.cpp.vec_isa_ok is None:
    INDUCTOR_OPTIONS["cpp.vec_isa_ok"] = True

# A guard whose source is rooted in the compiled function's closure or in a module's globals.
_FIXED_SOURCE = re.compile(r"^(?:(?:type|len|id)\()?(?:fn\b|G\[|__import__\()")


def keep_input_guards(entries: list) -> list[bool]:
    """Dynamo's guards to keep (a ``guard_filter_fn``): those on the arguments and on global
    state (grad mode, default device, ...); not those on the closure or on modules.

    A compiled step here is a closure over a frozen config, its layouts and funcppo's and
    torch's modules; dynamo guarded every value it read from them (about a thousand checks,
    0.4 ms per call of the minibatch step, against 3 ms for the step itself), though
    nothing rebinds them. Only the arguments vary between calls, and their tensors, types
    and structure stay guarded: 1.10x on 8 vmapped CartPole seeds (benchmarks/RESULTS.md).
    Monkeypatching funcppo or torch after the first call is not seen by a compiled step.
    """
    return [not (e.is_global or _FIXED_SOURCE.match(e.name)) for e in entries]


# Read by compile_fn when a function is built: benchmarks/compile_options.py sets them to
# None / {} / False to measure what each is worth.
GUARD_FILTER: Callable | None = keep_input_guards
CPP_WRAPPER = True


def compile_fn(
    fn: Callable, name: str, backend: str = "inductor", cpp_wrapper: bool = False
) -> Callable:
    """``torch.compile(fn, fullgraph=True, backend=backend)`` with a cache of its own, the
    guards that ``GUARD_FILTER`` keeps and, with inductor, ``INDUCTOR_OPTIONS``; with
    inductor, kept on disk whole when precompiling is on (``funcppo.precompile``).

    ``cpp_wrapper``: inductor calls the graph's kernels from generated C++ instead of Python
    (``CPP_WRAPPER`` must be on too). The update's pieces take it: 1.11x on the MLP update,
    1.14x on the LSTM's, whose unrolled sequence makes hundreds of calls per step, for some
    more seconds of cold compile; and the scans, the rollout's (1.48x) and the update's
    minibatch steps (1.06-1.25x), their loop bodies run without Python (benchmarks/RESULTS.md).
    No two carries of a scan under it may be one buffer: torch 2.13's C++ loop moves each
    carried output into its slot, so two carries that inductor computes as one buffer
    (CartPole's observation is its float32 state) leave the second slot empty and the next
    iteration crashes. Carries that could coincide are packed by ``scan_carry``.
    """

    def trampoline(*args):
        return fn(*args)

    code = trampoline.__code__.replace(co_name=f"{name}_{next(_counter)}")
    fresh = types.FunctionType(
        code, trampoline.__globals__, code.co_name, None, trampoline.__closure__
    )
    options = {} if GUARD_FILTER is None else {"guard_filter_fn": GUARD_FILTER}
    if backend == "inductor":
        options |= INDUCTOR_OPTIONS | {"cpp_wrapper": cpp_wrapper and CPP_WRAPPER}
    compiled = torch.compile(fresh, fullgraph=True, backend=backend, options=options or None)
    if backend != "inductor":  # only inductor's compiled code can be written to a file
        return compiled

    def savable_guards(entries: list) -> list[bool]:
        keep = [True] * len(entries) if GUARD_FILTER is None else GUARD_FILTER(entries)
        return [k and savable(e) for k, e in zip(keep, entries, strict=True)]

    def make_savable() -> Callable:
        saved = options | {"guard_filter_fn": savable_guards}
        return torch.compile(fresh, fullgraph=True, backend=backend, options=saved)

    inductor = sorted((k, v) for k, v in options.items() if k != "guard_filter_fn")
    context = (inductor, getattr(GUARD_FILTER, "__qualname__", None))
    return Precompiled(fn, name, compiled, make_savable, repr(context))


def scan_cacheable():
    """Let inductor's on-disk caches keep a graph that holds a scan (lowered to a while loop).

    torch 2.13 marks neither operator cacheable, so every process compiled the rollout afresh
    (about 55 s for CartPole's, against 9 s from a warm cache). Their subgraphs are part of
    the graph module that the cache key hashes; the operators themselves are keyed by the
    torch version, through inductor's own setting for this.
    """
    marked = dict(inductor_config.unsafe_marked_cacheable_functions)
    for op in (torch.ops.higher_order.scan, torch.ops.higher_order.while_loop):
        marked[f"{op.__module__}.{op.__name__}"] = torch.__version__
    return inductor_config.patch(unsafe_marked_cacheable_functions=marked)


def unaliased(tree: Any) -> Any:
    """``tree`` with every leaf that shares memory with an earlier leaf cloned.

    Dynamo guards on which inputs alias: a fresh runner state (an env's reset may hand out one
    zero tensor for several fields) would otherwise compile the rollout a second time once
    the first rollout has returned distinct tensors.
    """
    seen: set[int] = set()

    def own(x: Tensor) -> Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            return x.clone()
        seen.add(ptr)
        return x

    return optree.tree_map(own, tree, none_is_leaf=False)


def fresh(leaves: list[Tensor]) -> list[Tensor]:
    # A scan body may neither return its inputs nor two views of one buffer.
    return [x.clone() for x in leaves]


def pack_by_dtype(leaves: list[Tensor]) -> tuple[list[Tensor], FlatLayout]:
    """``(vectors, layout)``: ``leaves`` flattened into one vector per dtype (in order of first
    appearance), and their layout, one group per dtype: ``flat.ravel_leaves(layout, leaves)``
    packs leaves of the same shapes and dtypes again, ``flat.unravel_leaves(layout, vectors)``
    gives them back as views (the parameters' flat groups, grouped by dtype instead of role).

    A scan's carry packed this way holds one tensor per dtype, which no two carries can share
    (see ``compile_fn``'s ``cpp_wrapper``). The layout is static: shapes and groups, no tensors
    (no tree either: ``treedef`` and ``index`` are None).
    """
    layout = _dtype_layout(leaves)
    return ravel_leaves(layout, leaves), layout


def _dtype_layout(leaves: list[Tensor]) -> FlatLayout:
    groups: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(x.dtype, []).append(i)
    return FlatLayout(
        None,
        None,
        tuple(tuple(x.shape) for x in leaves),
        tuple((str(dtype), tuple(idx)) for dtype, idx in groups.items()),
    )


def scan_carry(
    leaves: list[Tensor], keep: Callable[[Tensor], bool] | None = None
) -> tuple[Callable[[list[Tensor]], list[Tensor]], Callable[[list[Tensor]], list[Tensor]]]:
    """``(pack, unpack)`` between a scan's carry and leaves shaped like ``leaves``.

    ``pack(leaves)`` gives the carry: the leaves where ``keep`` holds as they are (cloned, since
    a scan body may not return its inputs), then the others packed by dtype (``pack_by_dtype``),
    so that no two carries can be one buffer (see ``compile_fn``'s ``cpp_wrapper``).
    ``unpack(carry)`` gives the leaves back in their order, the packed ones as views.
    """
    kept = [i for i, x in enumerate(leaves) if keep is not None and keep(x)]
    rest = [i for i in range(len(leaves)) if i not in kept]
    layout = _dtype_layout([leaves[i] for i in rest])

    def pack(xs: list[Tensor]) -> list[Tensor]:
        return fresh([xs[i] for i in kept]) + ravel_leaves(layout, [xs[i] for i in rest])

    def unpack(carry: list[Tensor]) -> list[Tensor]:
        out: list[Any] = [None] * len(leaves)
        parts = carry[: len(kept)] + unravel_leaves(layout, carry[len(kept) :])
        for i, x in zip(kept + rest, parts, strict=True):
            out[i] = x
        return out

    return pack, unpack
