"""``compile_fn``: torch.compile with a compile cache of the function's own.

Dynamo keeps its compiled graphs and guards on the Python code object that it enters. Every
``torch.func.vmap`` wrapper, and every closure made by one factory, shares one code object, so
distinct functions would count against one recompile limit and, with ``fullgraph=True``, fail
once it is reached. ``compile_fn`` enters ``fn`` through a fresh copy of a trampoline's code
object, so each compiled function gets its own cache.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch

__all__ = ["compile_fn"]

_counter = itertools.count()


def compile_fn(fn: Callable, name: str, backend: str = "inductor") -> Callable:
    """``torch.compile(fn, fullgraph=True, backend=backend)`` with a cache of its own."""

    def trampoline(*args):
        return fn(*args)

    code = trampoline.__code__.replace(co_name=f"{name}_{next(_counter)}")
    fresh = types.FunctionType(
        code, trampoline.__globals__, code.co_name, None, trampoline.__closure__
    )
    return torch.compile(fresh, fullgraph=True, backend=backend)
