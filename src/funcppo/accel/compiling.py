"""``compile_fn``: torch.compile with a compile cache of the function's own, configured by a
``CompileSettings`` (chosen per device by ``CompileSettings.for_device``); and the helpers
that a compiled ``scan`` (the rollout, the update's minibatch steps) needs.

Dynamo keeps its compiled graphs and guards on the Python code object that it enters. Every
``torch.func.vmap`` wrapper, and every closure made by one factory, shares one code object, so
distinct functions would count against one recompile limit and, with ``fullgraph=True``, fail
once it is reached. ``compile_fn`` enters ``fn`` through a fresh copy of a trampoline's code
object, so each compiled function gets its own cache.

Inductor's config is imported where it is read, when settings are made or a scan is compiled.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from funcppo.accel.precompile import Precompiled, default_precompile_dir, savable
from funcppo.core.flat import FlatLayout, ravel_leaves, unravel_leaves

__all__ = [
    "CPU_INDUCTOR_OPTIONS",
    "REWRITES",
    "CompileSettings",
    "compile_fn",
    "fresh",
    "keep_input_guards",
    "pack_by_dtype",
    "per_device",
    "scan_cacheable",
    "scan_carry",
    "unaliased",
]

_counter = itertools.count()


# Inductor's generated code checks every input's sizes and strides on each call, again on
# each iteration of a scan's loop (the rollout's carry holds dozens of tensors), which here
# costs more than some of the kernels it guards. The compiled function's entry is guarded
# by dynamo on the same sizes and strides, and a loop's carry is made by its own body, so
# the checks are off: 1.10x on 8 vmapped CartPole seeds' rollout and update, 1.03-1.07x on
# the update benchmark (docs/design-notes.md). And vectorised tanh as 2 / (1 + exp(-2x)) - 1:
# the library's tanh cost 3 ns per element here, 2.4x the exp form, for every hidden layer
# (the results agree to 2e-7; docs/design-notes.md). And under the C++ wrapper, the entry
# function and the kernels built as two libraries, not one file: a small update with its
# steps scanned in C++ compiled cold in 83 s instead of 145 s here, and ran as fast
# (docs/design-notes.md). All measured on CPUs, and all about inductor's C++ code, so
# ``CompileSettings.for_device`` gives them to CPUs only. The CPU's vector instruction sets
# and the graph rewrites of ``funcppo.accel.rewrites`` are added there too (see
# ``_cpu_inductor_options``).
CPU_INDUCTOR_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("size_asserts", False),
    ("alignment_asserts", False),
    ("cpp.use_decompose_tanh", True),
    ("cpp_wrapper_build_separate", True),
)


def _cpu_inductor_options() -> tuple[tuple[str, Any], ...]:
    """``CPU_INDUCTOR_OPTIONS`` and the CPU's vector instruction sets taken from its flags:
    by default inductor proves each one by compiling a probe and loading it in a fresh Python
    process, which took 13.9 s of every first compile into an empty cache here and 1.5 s of
    every later process, for the same list of instruction sets (3.1 s and 0.4 s trusted).
    A user's choice (``TORCHINDUCTOR_VEC_ISA_OK``, or inductor's config set before the
    settings are made) still decides. Read without importing inductor, which loads dynamo
    (1.2 s here): a process that only loads ahead-of-time compiled code never needs either."""
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        decided = inductor_config.cpp.vec_isa_ok is not None
    else:  # inductor's own reading of the variable, when it is imported
        decided = os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") in ("0", "1")
    if decided:
        return CPU_INDUCTOR_OPTIONS
    return (*CPU_INDUCTOR_OPTIONS, ("cpp.vec_isa_ok", True))


# ``CompileSettings.rewrites``: each name's inductor option and pass (``funcppo.accel.rewrites``,
# imported when a function is compiled): thin matrix products as pointwise work (5-8% on the
# CartPole job) and ``pow`` of a constant base as ``exp`` (4-7% on the update benchmark;
# docs/design-notes.md).
REWRITES = {
    "thin_products": ("pre_grad_custom_pass", "ThinProducts"),
    "pow_as_exp": ("post_grad_custom_post_pass", "PowAsExp"),
}


# A guard whose source is rooted in the compiled function's closure or in a module's globals.
# ``G[...]`` also names the dicts that dynamo installs as ``___unnamed_scope_<id>_c<n>`` for a
# function whose globals are no module's (a namedtuple's ``__new__``): named by an address in
# this process, they exist in no other, so a saved file that kept them would never load.
_FIXED_SOURCE = re.compile(r"^(?:(?:type|len|id)\()?(?:fn\b|G\[|__import__\()")


def keep_input_guards(entries: list) -> list[bool]:
    """Dynamo's guards to keep (a ``guard_filter_fn``): those on the arguments and on global
    state (grad mode, default device, ...); not those on the closure or on modules.

    A compiled step here is a closure over a frozen config, its layouts and funcppo's and
    torch's modules; dynamo guarded every value it read from them (about a thousand checks,
    0.4 ms per call of the minibatch step, against 3 ms for the step itself), though
    nothing rebinds them. Only the arguments vary between calls, and their tensors, types
    and structure stay guarded: 1.10x on 8 vmapped CartPole seeds (docs/design-notes.md).
    Monkeypatching funcppo or torch after the first call is not seen by a compiled step.
    """
    return [not (e.is_global or _FIXED_SOURCE.match(e.name)) for e in entries]


@dataclass(frozen=True)
class CompileSettings:
    """How funcppo compiles and runs its compiled pieces: every knob of torch's compiler that
    it sets, and the thread count of the rollout.

    ``backend``: ``torch.compile``'s (``"aot_eager"`` traces without generating code; a
    callable backend is passed as it is). ``cpp_wrapper``: inductor calls a graph's kernels
    from generated C++ instead of Python (see ``compile_fn``). ``guard_filter``: dynamo keeps
    only the guards on the arguments (``keep_input_guards``); False keeps every guard.
    ``inductor_options``: inductor's config, as ``(name, value)`` pairs; with another
    backend, ``inductor_options`` and ``cpp_wrapper`` are not used. ``rollout_threads``:
    torch's intra-op threads while ``make_train``'s rollout runs (``train.with_threads``),
    compiled or not; None leaves the caller's count. ``precompile_dir``: a folder where each
    function compiled by inductor is written whole once made and read back by later
    processes (``funcppo.accel.precompile``), so that a warm start skips tracing; None: off.
    ``rewrites``: names in ``REWRITES``, graph rewrites given to inductor as passes.
    ``ahead_of_time``: each function traced once per argument signature, compiled by
    AOTInductor and called through torch's C++ runner (``funcppo.accel.ahead``), for code
    driven step by step from Python (the agents): a later process loads it without importing
    the compiler, and a call skips dynamo's guards and wrappers; CPU only, inductor only.

    Frozen and made of plain values: two settings objects share nothing, and each compiled
    function reads its own when it is built. ``for_device`` gives the tuned choices.
    """

    backend: str | Callable = "inductor"
    cpp_wrapper: bool = False
    guard_filter: bool = True
    inductor_options: tuple[tuple[str, Any], ...] = ()
    rollout_threads: int | None = None
    precompile_dir: str | None = None
    rewrites: tuple[str, ...] = ()
    ahead_of_time: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.rewrites if name not in REWRITES]
        if unknown:
            raise ValueError(f"rewrites: expected names in {tuple(REWRITES)}, got {unknown}")
        if self.precompile_dir is not None:  # a plain value, whatever path-like was given
            object.__setattr__(self, "precompile_dir", os.fspath(self.precompile_dir))
        threads = self.rollout_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"rollout_threads: expected None or an int >= 1, got {threads!r}")

    @classmethod
    def for_device(
        cls,
        device: torch.device | str,
        *,
        rollout_threads: int | None = None,
        precompile_dir: str | os.PathLike | None = None,
        ahead_of_time: bool = False,
    ) -> CompileSettings:
        """The settings for compiling for ``device``.

        CPU: the options measured there (``CPU_INDUCTOR_OPTIONS``, the CPU's vector
        instruction sets trusted unless the user decided, read when this is called), the
        rewrites, the C++ wrapper, ``rollout_threads`` and ``ahead_of_time``. Any other
        device: a plain ``torch.compile(fullgraph=True)``, since those options and the C++
        wrapper tune inductor's C++ code, which a GPU's graphs do not run in, and were never
        measured there; and the caller's thread count, ``rollout_threads`` ignored, since
        the kernels that the count splits run on the CPU. The guard filter is kept
        everywhere: it chooses among dynamo's guards, which are the same Python checks on
        any device. Needs no accelerator: ``for_device("cuda")`` can be made on a CPU-only
        machine. ``precompile_dir`` is kept on every device; ``ahead_of_time`` is ignored
        off the CPU, where it was never run. Imports no compiler: settings can be made in a
        process that only loads ahead-of-time code.
        """
        if torch.device(device).type != "cpu":
            return cls(precompile_dir=precompile_dir)
        return cls(
            cpp_wrapper=True,
            inductor_options=_cpu_inductor_options(),
            rollout_threads=rollout_threads,
            precompile_dir=precompile_dir,
            rewrites=tuple(REWRITES),
            ahead_of_time=ahead_of_time,
        )

    @classmethod
    def for_agent(cls, device: torch.device | str) -> CompileSettings:
        """What an agent (``PPOAgent``, ``SeedsAgent``) compiles with when given no settings:
        ``for_device``'s, with the pieces kept in ``default_precompile_dir()`` (the command
        line's folder) and, on a CPU, compiled ahead of time: a later process loads them
        without importing the compiler (a CartPole process 7.2 s against 11.9-12.7 s through
        torch.compile's precompiled files), and a call costs about what torch.compile's does
        (60 against 54 us on CartPole; benchmarks/RESULTS.md)."""
        return cls.for_device(device, precompile_dir=default_precompile_dir(), ahead_of_time=True)

    def replace(self, **changes: Any) -> CompileSettings:
        return dataclasses.replace(self, **changes)

    def plain(self) -> CompileSettings:
        """These settings compiling through torch.compile, not ahead of time."""
        return self.replace(ahead_of_time=False)

    def options(self) -> dict[str, Any]:
        """``torch.compile``'s ``options``: the guard filter and, with inductor, its config.
        A new dict on every call: ``torch.compile`` takes ``guard_filter_fn`` out of the dict
        it is given."""
        options: dict[str, Any] = {}
        if self.guard_filter:
            options["guard_filter_fn"] = keep_input_guards
        if self.backend == "inductor":
            options |= self.inductor_config() | {"cpp_wrapper": self.cpp_wrapper}
        return options

    def inductor_config(self) -> dict[str, Any]:
        """Inductor's config: ``inductor_options`` and the rewrites' passes (importing
        inductor)."""
        from funcppo.accel import rewrites

        passes = {REWRITES[n][0]: getattr(rewrites, REWRITES[n][1])() for n in self.rewrites}
        return dict(self.inductor_options) | passes


def per_device(
    build: Callable[[CompileSettings], Callable],
    compiler: CompileSettings | None,
    backend: str | None,
    device_of: Callable[..., torch.device],
) -> Callable:
    """``build(settings)``: with ``compiler`` given, built now; without, built on the first
    call for each device type, with ``CompileSettings.for_device(device_of(*args))``, so that
    a factory needs no device to be named (the state or key it is called with has one).
    ``backend``, when given, replaces the settings' backend."""

    def settings(device: torch.device | None) -> CompileSettings:
        chosen = compiler if compiler is not None else CompileSettings.for_device(device)
        return chosen if backend is None else chosen.replace(backend=backend)

    if compiler is not None:
        return build(settings(None))
    built: dict[str, Callable] = {}

    def call(*args: Any) -> Any:
        device = device_of(*args)
        if device.type not in built:
            built[device.type] = build(settings(device))
        return built[device.type](*args)

    return call


def compile_fn(fn: Callable, name: str, settings: CompileSettings) -> Callable:
    """``torch.compile(fn, fullgraph=True)`` with ``settings`` (``CompileSettings.for_device``
    gives a device's) and a cache of its own; with inductor and ``settings.precompile_dir``,
    kept on disk whole there (``funcppo.accel.precompile``).

    ``settings.cpp_wrapper``: the update's pieces take it: 1.11x on the MLP update, 1.14x on
    the LSTM's, whose unrolled sequence makes hundreds of calls per step, for some more
    seconds of cold compile; and the scans, the rollout's (1.48x) and the update's
    minibatch steps (1.06-1.25x), their loop bodies run without Python (docs/design-notes.md).
    No two carries of a scan under it may be one buffer: torch 2.13's C++ loop moves each
    carried output into its slot, so two carries that inductor computes as one buffer
    (CartPole's observation is its float32 state) leave the second slot empty and the next
    iteration crashes. Carries that could coincide are packed by ``scan_carry``.
    """
    if not isinstance(settings, CompileSettings):
        raise TypeError(f"settings: expected a CompileSettings, got {settings!r}")
    if settings.ahead_of_time and settings.backend == "inductor":
        from funcppo.accel.ahead import AheadOfTime

        return AheadOfTime(fn, name, settings, lambda: compile_fn(fn, name, settings.plain()))

    def trampoline(*args):
        return fn(*args)

    code = trampoline.__code__.replace(co_name=f"{name}_{next(_counter)}")
    fresh = types.FunctionType(
        code, trampoline.__globals__, code.co_name, None, trampoline.__closure__
    )
    backend = settings.backend
    options = settings.options()
    compiled = torch.compile(fresh, fullgraph=True, backend=backend, options=options or None)
    # Only inductor's compiled code can be written to a file.
    if backend != "inductor" or settings.precompile_dir is None:
        return compiled
    # Taken from the settings, not from ``options``: torch.compile pops ``guard_filter_fn``
    # out of the dict it is given. A file saved without the filter keeps the guards on the
    # closure and on the ``___unnamed_scope_<id>`` globals of this process (see
    # ``keep_input_guards``), and fails its check in every later process.
    guard_filter = keep_input_guards if settings.guard_filter else None

    def savable_guards(entries: list) -> list[bool]:
        keep = [True] * len(entries) if guard_filter is None else guard_filter(entries)
        return [k and savable(e) for k, e in zip(keep, entries, strict=True)]

    def make_savable() -> Callable:
        saved = settings.options() | {"guard_filter_fn": savable_guards}
        return torch.compile(fresh, fullgraph=True, backend=backend, options=saved)

    inductor = sorted((k, v) for k, v in settings.options().items() if k != "guard_filter_fn")
    context = (inductor, getattr(guard_filter, "__qualname__", None))
    directory = Path(settings.precompile_dir)
    load = dict(settings.inductor_options)
    return Precompiled(fn, name, compiled, make_savable, repr(context), directory, load)


def scan_cacheable():
    """Let inductor's on-disk caches keep a graph that holds a scan (lowered to a while loop).

    torch 2.13 marks neither operator cacheable, so every process compiled the rollout afresh
    (about 55 s for CartPole's, against 9 s from a warm cache). Their subgraphs are part of
    the graph module that the cache key hashes; the operators themselves are keyed by the
    torch version, through inductor's own setting for this.
    """
    import torch._inductor.config as inductor_config

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
